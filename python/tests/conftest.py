"""Shared fixtures: the repository's fixture shards and small synthetic shards made with Pillow."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE_SHARDS = [str(ROOT / "fixtures" / "shards" / f"gcompris-{i:06d}.tar") for i in range(3)]


def jpeg(i: int, w: int = 64, h: int = 48) -> bytes:
    """A small JPEG whose content depends on ``i``."""
    from PIL import Image

    img = Image.new("RGB", (w, h))
    img.putdata([((x * 7 + i * 13) % 256, (y * 11 + i * 29) % 256, (x + y + i) % 256) for y in range(h) for x in range(w)])
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shard(path: pathlib.Path, start: int, n: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            for ext, data in (("jpg", jpeg(i)), ("txt", f"picture number {i}".encode())):
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> list[str]:
    """Four shards of 10, 7, 12 and 9 small JPEG samples."""
    d = tmp_path_factory.mktemp("shards")
    sizes = [10, 7, 12, 9]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [write_shard(d / f"syn-{i:06d}.tar", s, n) for i, (s, n) in enumerate(zip(starts, sizes))]


# Small, fast settings for the synthetic shards: 32-px input, 16-px patches, no model.
SMALL = dict(image_size=32, patch_size=16, batch_size=4, device="cpu", scorer="random", decode_workers=2, capacity=4)


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (the same one, the same import path)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout)
