"""How far two `juicer run --jsonl` outputs of the same samples agree: saliency rank correlation, kept-set
overlap, classes and enriched captions.

    python3 benches/agreement.py BEFORE.jsonl AFTER.jsonl [--min-spearman 0.99] [--min-overlap 0.95]

Per sample (matched by key): the Spearman correlation of the patch scores (average ranks for ties), the overlap
of the kept patch sets |A ∩ B| / max(|A|, |B|), whether the classes (names, not probabilities) and the enriched
caption are identical. Prints the minimum, median and mean of each and how many samples fall below the thresholds
(`-v`: which), and exits 1 when the mean Spearman or the mean kept overlap is under its threshold (the acceptance
of a change that must not move saliency). Standard library only.
"""

import argparse
import json
import statistics
import sys


def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            r[order[k]] = avg
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return 1.0 if va == 0 or vb == 0 else cov / (va * vb) ** 0.5


def names(record):
    return [c.get("wnid", c.get("name")) for c in record.get("classes") or []]


def load(path):
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "scores" in r:
                    out[r["key"]] = r
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--min-spearman", type=float, default=0.99)
    ap.add_argument("--min-overlap", type=float, default=0.95)
    ap.add_argument("--json", help="write the per-sample figures and the summary here")
    ap.add_argument("-v", "--verbose", action="store_true", help="list the samples below the thresholds")
    args = ap.parse_args()
    a, b = load(args.before), load(args.after)
    keys = sorted(set(a) & set(b))
    if not keys:
        sys.exit("no sample key in common")
    rows = []
    for k in keys:
        x, y = a[k], b[k]
        ka, kb = set(x.get("kept", [])), set(y.get("kept", []))
        rows.append({
            "key": k,
            "spearman": spearman(x["scores"], y["scores"]),
            "kept_overlap": len(ka & kb) / max(len(ka), len(kb), 1),
            "classes_same": names(x) == names(y),
            "enriched_same": x.get("enriched") == y.get("enriched"),
        })
    sp = [r["spearman"] for r in rows]
    ov = [r["kept_overlap"] for r in rows]
    summary = {
        "samples": len(rows),
        "only_before": len(set(a) - set(b)),
        "only_after": len(set(b) - set(a)),
        "spearman_min": min(sp), "spearman_median": statistics.median(sp), "spearman_mean": statistics.fmean(sp),
        "kept_overlap_min": min(ov), "kept_overlap_median": statistics.median(ov),
        "kept_overlap_mean": statistics.fmean(ov),
        "spearman_below": sum(v < args.min_spearman for v in sp),
        "kept_overlap_below": sum(v < args.min_overlap for v in ov),
        "classes_same": sum(r["classes_same"] for r in rows),
        "enriched_same": sum(r["enriched_same"] for r in rows),
    }
    print(f"{summary['samples']} samples in common ({summary['only_before']} only before, "
          f"{summary['only_after']} only after)")
    print(f"  Spearman of the patch scores: min {summary['spearman_min']:.4f}  median "
          f"{summary['spearman_median']:.4f}  mean {summary['spearman_mean']:.4f}")
    print(f"  kept-set overlap:             min {summary['kept_overlap_min']:.3f}  median "
          f"{summary['kept_overlap_median']:.3f}  mean {summary['kept_overlap_mean']:.3f}")
    print(f"  below the thresholds: Spearman {summary['spearman_below']}, kept overlap "
          f"{summary['kept_overlap_below']} of {len(rows)}")
    print(f"  identical classes {summary['classes_same']}/{len(rows)}, identical enriched captions "
          f"{summary['enriched_same']}/{len(rows)}")
    for r in rows if args.verbose else []:
        if r["spearman"] < args.min_spearman or r["kept_overlap"] < args.min_overlap:
            print(f"  below: {r['key']} Spearman {r['spearman']:.4f} overlap {r['kept_overlap']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples": rows}, f, indent=2)
    ok = summary["spearman_mean"] >= args.min_spearman and summary["kept_overlap_mean"] >= args.min_overlap
    print("PASS" if ok else "FAIL", f"(mean Spearman >= {args.min_spearman}, mean overlap >= {args.min_overlap})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
