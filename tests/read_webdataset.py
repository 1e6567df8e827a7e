#!/usr/bin/env python3
"""Reads the shards `juicer write` wrote with Python `webdataset` and checks the layout.

Usage: read_webdataset.py DIR EXPECTED [--require-orig]

Every `*.tar` in DIR is read in name order with `webdataset.WebDataset`. Each sample must have a `png` that PIL
decodes to an RGB image_size x image_size mosaic, a UTF-8 `txt`, a `json` with the documented fields
(grid, patch, kept, scores, classes, added, image_size, source_meta) that agree with each other, and, if
present (always with --require-orig), a UTF-8 `orig.txt`. Keys must be unique and the sample count must be
EXPECTED. Prints a one-line summary; exits non-zero on any failure.
"""

import argparse
import glob
import io
import json
import os
import sys

import webdataset as wds
from PIL import Image

FIELDS = ("grid", "patch", "kept", "scores", "classes", "added", "image_size", "source_meta")


def check(sample, require_orig):
    """Problems with one sample (empty when it is fine)."""
    problems = []
    for ext in ("png", "txt", "json"):
        if ext not in sample:
            problems.append(f"no {ext}")
    if "orig.txt" not in sample and require_orig:
        problems.append("no orig.txt")
    if problems:
        return problems
    meta = json.loads(sample["json"])
    missing = [f for f in FIELDS if f not in meta]
    if missing:
        return [f"json lacks {missing}"]
    rows, cols = meta["grid"]
    side = meta["image_size"]
    if rows * meta["patch"] != side or cols * meta["patch"] != side:
        problems.append(f"grid {meta['grid']} x patch {meta['patch']} != image_size {side}")
    kept = meta["kept"]
    if kept != sorted(set(kept)) or any(not 0 <= k < rows * cols for k in kept):
        problems.append("kept is not sorted unique grid indices")
    if meta["scores"] and len(meta["scores"]) != rows * cols:
        problems.append(f"{len(meta['scores'])} scores for a {rows}x{cols} grid")
    for c in meta["classes"] + meta["added"]:
        # {"id": ImageNet index or null for a hypernym, "wnid": "n########", "name", "prob"}
        good = (
            set(c) == {"id", "wnid", "name", "prob"}
            and (c["id"] is None or isinstance(c["id"], int))
            and isinstance(c["wnid"], str)
            and (c["wnid"] == "" or (c["wnid"].startswith("n") and len(c["wnid"]) == 9))
            and 0.0 <= c["prob"] <= 1.0
        )
        if not good:
            problems.append(f"bad class {c}")
    img = Image.open(io.BytesIO(sample["png"]))
    img.load()
    if img.format != "PNG" or img.mode != "RGB" or img.size != (side, side):
        problems.append(f"png is {img.format} {img.mode} {img.size}, expected PNG RGB {(side, side)}")
    sample["txt"].decode("utf-8")
    if "orig.txt" in sample:
        sample["orig.txt"].decode("utf-8")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("expected", type=int)
    parser.add_argument("--require-orig", action="store_true")
    args = parser.parse_args()

    shards = sorted(glob.glob(os.path.join(args.dir, "*.tar")))
    if not shards:
        print(f"webdataset: no *.tar in {args.dir}", file=sys.stderr)
        return 1
    keys, failures, with_orig = set(), [], 0
    for sample in wds.WebDataset(shards, shardshuffle=False):
        key = sample["__key__"]
        try:
            problems = check(sample, args.require_orig)
        except Exception as e:  # a decode or parse failure is a problem of this sample
            problems = [f"{type(e).__name__}: {e}"]
        if key in keys:
            problems.append("key seen before")
        keys.add(key)
        with_orig += "orig.txt" in sample
        failures.extend(f"{key}: {p}" for p in problems)
    if len(keys) != args.expected:
        failures.append(f"{len(keys)} samples, expected {args.expected}")
    for f in failures[:20]:
        print(f"webdataset: {f}", file=sys.stderr)
    status = "FAILED" if failures else "ok"
    print(
        f"webdataset {wds.__version__}: {len(keys)} samples from {len(shards)} shard(s) in {args.dir}, "
        f"{with_orig} with orig.txt: {status}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
