"""A tiny CLIP-style model trained in PyTorch on juiced batches: kept patches + positions on the image side,
enriched caption tokens on the text side, a contrastive loss. 20 steps on the fixture shards; exits non-zero
unless the loss falls.

    python python/examples/train_torch.py [--steps 20] [SHARDS ...]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import juicer

ROOT = pathlib.Path(__file__).resolve().parents[2]


class TinyClip(nn.Module):
    def __init__(self, patch_dim: int, grid_cells: int, vocab: int = 49408, dim: int = 64) -> None:
        super().__init__()
        self.patch = nn.Linear(patch_dim, dim)
        self.position = nn.Embedding(grid_cells, dim)
        self.image = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.token = nn.Embedding(vocab, dim)
        self.text = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    @staticmethod
    def pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, batch: dict) -> torch.Tensor:
        img = self.patch(batch["patches"]) + self.position(batch["positions"])
        img = F.normalize(self.image(self.pool(img, batch["patch_mask"])), dim=-1)
        txt = F.normalize(self.text(self.pool(self.token(batch["tokens"]), batch["token_mask"])), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        labels = torch.arange(len(logits))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("shards", nargs="*", default=[str(ROOT / "fixtures/shards/gcompris-{000000..000002}.tar")])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)

    image_size, patch = 64, 16
    loader = juicer.Loader(args.shards, batch_size=args.batch_size, seed=0, image_size=image_size, patch_size=patch,
                           shuffle_buffer=64, device="cpu")
    model = TinyClip(3 * patch * patch, (image_size // patch) ** 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    epoch = 0
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        for batch in DataLoader(loader, batch_size=None, num_workers=0):
            if len(batch["keys"]) < 2:
                continue
            loss = model(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {len(losses):2d}  epoch {epoch}  loss {loss.item():.4f}  kept {batch['patches'].shape[1]}"
                  f"  e.g. {batch['enriched'][0]!r}")
            if len(losses) == args.steps:
                break
        epoch += 1
    s = loader.summary()
    print(f"last epoch: read {s['read']}, emitted {s['emitted']}, dropped {s['dropped']}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss: first 3 steps {first:.4f}, last 3 steps {last:.4f}")
    if not last < first:
        print("the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
