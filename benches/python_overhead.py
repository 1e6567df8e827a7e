"""Python iteration overhead: `juicer.Loader` iterated from Python (batches as torch tensors over the Rust buffers)
against the same loader iterated in Rust inside the same extension (`_juicer._rust_epoch`, the GIL released), on
the decode-only graph, where the per-batch cost of the Python layer weighs most. Rounds alternate the two sides;
the report gives medians, the per-round range and the ratio Python / Rust samples/s (1.0 = no overhead).

    PYTHONPATH=<the built package> python benches/python_overhead.py [--samples 2048] [--rounds 5]
        [--size 640x480] [--batch-size 32] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import statistics
import tarfile
import tempfile
import time

import juicer
from juicer import _juicer


def make_shards(d: pathlib.Path, n: int, size: tuple[int, int], per_shard: int = 256) -> list[str]:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for s in range(0, n, per_shard):
        path = d / f"overhead-{s // per_shard:06d}.tar"
        paths.append(str(path))
        if path.exists():
            continue
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                # Smooth gradients with per-sample offsets (cheap to make, real JPEGs to decode).
                img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
                img = Image.merge("RGB", [c.point(lambda v, k=k: (v + i * (k + 1) * 7) % 256) for k, c in enumerate(img.split())])
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def python_epoch(shards: list[str], options: dict) -> tuple[int, float]:
    loader = juicer.Loader(shards, **options)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["patches"].shape[0]
    return n, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", default="640x480")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    d = pathlib.Path(args.dir) if args.dir else pathlib.Path(tempfile.mkdtemp(prefix="juicer-overhead-"))
    shards = make_shards(d, args.samples, size)
    options = dict(batch_size=args.batch_size, device="cpu", last_stage="decode", scorer="none")

    # One warm-up epoch each (page cache, allocator).
    _juicer._rust_epoch(shards, **options)
    python_epoch(shards, options)
    rust, py = [], []
    for r in range(args.rounds):
        sides = [("rust", rust), ("python", py)] if r % 2 == 0 else [("python", py), ("rust", rust)]
        for name, out in sides:
            if name == "rust":
                n, _, secs = _juicer._rust_epoch(shards, **options)
            else:
                n, secs = python_epoch(shards, options)
            assert n == args.samples, f"{name} yielded {n} of {args.samples} samples"
            out.append(n / secs)
    ratios = [a / b for a, b in zip(py, rust)]
    report = {
        "samples": args.samples,
        "size": args.size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "rust_samples_per_s": {"median": statistics.median(rust), "min": min(rust), "max": max(rust)},
        "python_samples_per_s": {"median": statistics.median(py), "min": min(py), "max": max(py)},
        "ratio_python_over_rust": {
            "of_medians": statistics.median(py) / statistics.median(rust),
            "per_round_min": min(ratios),
            "per_round_max": max(ratios),
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
