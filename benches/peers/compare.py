"""Runs juicer and its Python peers alternately on the same inputs and cores; prints medians and ratios.

Called by `benches/peers/run.sh` (which sets up the venv and builds juicer); standard library only. Every round runs
every comparison, both sides back to back, juicer first in odd rounds and Python first in even ones, so that a load
change on the machine hits both sides alike. The ratio is median(juicer) / median(Python): above 1, juicer is faster.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from peers import cores, cpu_model  # benches/peers/peers.py, beside this file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_json(cmd, env_extra, timeout):
    """Runs `cmd`, returns the JSON object on the last line of its stdout."""
    env = dict(os.environ)
    env.update(env_extra)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    return json.loads(lines[-1])


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def version_of(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


class Comparison:
    def __init__(self, key, title, unit, juicer, python):
        self.key, self.title, self.unit = key, title, unit
        self.juicer_fn, self.python_fn = juicer, python
        self.runs = {"juicer": [], "python": []}
        self.cpu_ms = {"juicer": [], "python": []}  # process CPU milliseconds per item in the timed region
        self.last = {}

    def run(self, side):
        fn = self.juicer_fn if side == "juicer" else self.python_fn
        rec = fn()
        self.runs[side].append(rec["per_s"])
        cpu = rec.get("cpu_seconds")
        if cpu is not None and cpu == cpu and rec.get("items"):
            self.cpu_ms[side].append(1000.0 * cpu / rec["items"])
        self.last[side] = rec
        return rec

    def summary(self):
        j, p = self.runs["juicer"], self.runs["python"]
        jm, pm = statistics.median(j), statistics.median(p)
        jc, pc = self.cpu_ms["juicer"], self.cpu_ms["python"]
        jcm = statistics.median(jc) if jc else None
        pcm = statistics.median(pc) if pc else None
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "juicer_per_s": j,
            "python_per_s": p,
            "juicer_median": jm,
            "python_median": pm,
            "ratio": jm / pm,
            "round_ratios": [a / b for a, b in zip(j, p)],
            "juicer_cpu_ms_per_item": jc,
            "python_cpu_ms_per_item": pc,
            "juicer_cpu_ms_median": jcm,
            "python_cpu_ms_median": pcm,
            "cpu_ratio": pcm / jcm if jcm and pcm else None,
        }


def cam_check(j, p):
    jt, pt = j["check"]["top3"], p["check"]["top3"]
    top1 = sum(a[0][0] == b[0][0] for a, b in zip(jt, pt))
    top3 = sum([c[0] for c in a] == [c[0] for c in b] for a, b in zip(jt, pt))
    dprob = max(abs(x[1] - y[1]) for a, b in zip(jt, pt) for x, y in zip(a, b))
    rel = 0.0
    for a, b in zip(j["check"]["saliency"], p["check"]["saliency"]):
        scale = max(max(abs(v) for v in b), 1e-12)
        rel = max(rel, max(abs(x - y) for x, y in zip(a, b)) / scale)
    return {"images": len(jt), "top1_agree": top1, "top3_agree": top3, "max_abs_dprob": dprob, "max_rel_dsaliency": rel}


def token_check(j, p):
    jr, pr = j["check"]["rows"], p["check"]["rows"]
    return {"captions": len(jr), "identical_rows": sum(a == b for a, b in zip(jr, pr))}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller inputs, no fixture-photo decode row")
    ap.add_argument("--json", default=os.path.join(HERE, "..", "..", "target", "peers", "results.json"))
    ap.add_argument("--python", required=True, help="the venv's python")
    ap.add_argument("--juicer", required=True, help="the juicer binary")
    ap.add_argument("--peer-bench", required=True, help="the peer_bench example binary")
    ap.add_argument("--work", required=True, help="folder for generated inputs (synthetic shards, CAM inputs)")
    ap.add_argument("--cores", type=int, default=cores())
    ap.add_argument("--synthetic", type=int, default=None, help="synthetic samples (default 1024, quick 256)")
    ap.add_argument("--cam-batch", type=int, default=16)
    ap.add_argument("--cam-images", type=int, default=None, help="images timed per CAM run (default 128, quick 64)")
    ap.add_argument("--captions", type=int, default=None, help="captions per tokenise run (default 20000, quick 5000)")
    ap.add_argument("--photos", type=int, default=None, help="640x480 photo crops for the graph rows (default 500, quick 200)")
    ap.add_argument("--graph-workers", type=int, default=1,
                    help="DataLoader workers of the Python graph peer (default 1: with N torch threads in the main "
                    "process it measured faster on 2 cores than N workers)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds allowed for one run")
    ap.add_argument(
        "--omp-wait-policy", default="PASSIVE",
        help="OMP_WAIT_POLICY for both sides (default PASSIVE: idle OpenMP threads sleep instead of spinning, which "
        "keeps torch from collapsing when another process takes a core; `default` leaves it unset)")
    args = ap.parse_args()

    n_cores = args.cores
    synthetic = args.synthetic or (256 if args.quick else 1024)
    cam_images = args.cam_images or (64 if args.quick else 128)
    n_captions = args.captions or (5000 if args.quick else 20000)
    n_photos = args.photos or (200 if args.quick else 500)
    batch, warmup = 32, 32
    py = [args.python, os.path.join(HERE, "peers.py")]
    weights = os.path.join(ROOT, "fixtures/mobilenet_v2/mobilenet_v2.safetensors")
    captions = os.path.join(ROOT, "fixtures/gcompris/pairs.jsonl")
    os.makedirs(args.work, exist_ok=True)

    # Thread budgets (see README): decode = N workers on both sides; CAM = N intra-op threads on both sides;
    # tokenise = 1 thread on both sides.
    env_n = {
        "RAYON_NUM_THREADS": str(n_cores),
        "OMP_NUM_THREADS": str(n_cores),
        "MKL_NUM_THREADS": str(n_cores),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env_1 = {"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.omp_wait_policy.lower() != "default":
        env_n["OMP_WAIT_POLICY"] = env_1["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()

    started = time.time()
    log(f"peers: {n_cores} core(s), {args.rounds} round(s){' (quick)' if args.quick else ''}; preparing inputs ...")
    # Inputs, made once and shared: synthetic JPEG shards (juicer's generator) and the decoded fixture photos.
    syn_dir = os.path.join(args.work, f"synthetic-640x480-n{synthetic}")
    prep = subprocess.run(
        [args.juicer, "bench", "--synthetic", str(synthetic), "--synthetic-size", "640x480", "--synthetic-dir", syn_dir,
         "--stages", "decode", "--scorer", "none", "--device", "cpu", "--workers", str(n_cores),
         "--batch-size", str(batch), "--warmup", str(warmup)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env_n}, timeout=args.timeout,
    )
    if prep.returncode != 0:
        sys.exit(f"generating synthetic shards failed:\n{prep.stderr[-3000:]}")
    with open(os.path.join(syn_dir, "synthetic.json")) as f:
        syn_shards = [os.path.join(syn_dir, s) for s in json.load(f)["shards"]]
    cam_inputs = os.path.join(args.work, "cam_inputs.f32")
    cam_meta = run_json([args.peer_bench, "cam-inputs", "--out", cam_inputs], env_n, args.timeout)
    # The 3 fixture shards (25 + 25 + 23 WebP photos, ~1024 px) listed 4 times: 292 samples, enough for a window
    # after the warm-up, and 6 shards of 146 samples per DataLoader worker with 2 workers.
    fixture_shards = [os.path.join(ROOT, f"fixtures/shards/gcompris-{i:06d}.tar") for i in range(3)] * 4
    # Real photo content at a camera-like size: JPEG crops (640x480, quality 90) of the fixture photos.
    photo_dir = os.path.join(args.work, f"photos-640x480-n{n_photos}")
    photo_shards = run_json([*py, "photos", "--fixtures", os.path.join(ROOT, "fixtures/gcompris"), "--out", photo_dir,
                             "--count", str(n_photos)], env_n, args.timeout)["shards"]

    def juicer_bench(shards, extra):
        """`juicer bench SHARDS --device cpu --warmup 32 --json F` plus `extra`; the first pipeline's rate and CPU."""
        def go():
            with tempfile.NamedTemporaryFile(suffix=".json", dir=args.work, delete=False) as tmp:
                path = tmp.name
            try:
                subprocess.run(
                    [args.juicer, "bench", *shards, "--device", "cpu", "--batch-size", str(batch), "--warmup",
                     str(warmup), "--json", path, *extra],
                    cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env_n}, timeout=args.timeout,
                    check=True,
                )
                with open(path) as f:
                    rep = json.load(f)
            finally:
                os.unlink(path)
            p = rep["pipelines"][0]
            cpu = p.get("cpu_seconds")
            return {"per_s": p["samples_per_s"], "items": p["samples"], "seconds": p["seconds"],
                    "cpu_seconds": cpu[1] - cpu[0] if cpu else None}

        return go

    def juicer_decode(shards, *extra):
        return juicer_bench(shards, ["--stages", "decode", "--scorer", "none", "--workers", str(n_cores), *extra])

    def python_decode(shards):
        return lambda: run_json(
            [*py, "decode", "--shards", *shards, "--workers", str(n_cores), "--batch-size", str(batch),
             "--warmup", str(warmup)], env_n, args.timeout)

    graph_python = lambda: run_json(  # noqa: E731
        [*py, "graph", "--shards", *photo_shards, "--weights", weights, "--workers", str(args.graph_workers),
         "--threads", str(n_cores), "--batch-size", str(batch), "--warmup", str(warmup)], env_n, args.timeout)
    comps = [
        Comparison(
            "graph", f"whole graph (juicer defaults) vs decode + CAM, photo crops 640x480 ({n_photos}), batch {batch}",
            "img/s", juicer_bench(photo_shards, []), graph_python),
    ]
    # Each JPEG input twice: reduced-scale decoding (the default), then every JPEG at full resolution.
    for key, what, shards in [("decode", f"synthetic JPEG 640x480 ({synthetic})", syn_shards),
                              ("decode_photos", f"photo crops 640x480 ({n_photos})", photo_shards)]:
        comps.append(Comparison(key, f"decode→patchify, {what}, batch {batch}, {n_cores} workers", "img/s",
                                juicer_decode(shards), python_decode(shards)))
        comps.append(Comparison(key + "_full", "  the same, JPEG decoded at full resolution (--full-res-jpeg)",
                                "img/s", juicer_decode(shards, "--full-res-jpeg"), python_decode(shards)))
    # The floor under the photo rows: juicer's JPEG decoding alone on the same cores (libjpeg at the reduced scale,
    # then also the resize), nothing the graph adds. The ratio of a decode row cannot exceed these.
    for upto, what in [("libjpeg", "libjpeg-turbo alone at juicer's reduced scale"),
                       ("resize", "libjpeg-turbo + the resize to the 224 crop")]:
        comps.append(Comparison(
            f"floor_{upto}", f"  floor: {what}, photo crops, {n_cores} threads, nothing else", "img/s",
            lambda upto=upto: run_json([args.peer_bench, "jpeg", "--shards", *photo_shards, "--upto", upto,
                                        "--threads", str(n_cores)], env_n, args.timeout),
            python_decode(photo_shards)))
    if not args.quick:
        comps.append(Comparison(
            "decode_fixtures", f"decode→patchify, fixture WebP photos (73 x4), batch {batch}, {n_cores} workers",
            "img/s", juicer_decode(fixture_shards), python_decode(fixture_shards)))
    comps += [
        Comparison(
            "cam", f"CAM + top-3 on CPU, MobileNetV2, batch {args.cam_batch}, {n_cores} threads", "img/s",
            lambda: run_json([args.peer_bench, "cam", "--inputs", cam_inputs, "--batch", str(args.cam_batch),
                              "--images", str(cam_images)], env_n, args.timeout),
            lambda: run_json([*py, "cam", "--inputs", cam_inputs, "--weights", weights, "--batch", str(args.cam_batch),
                              "--images", str(cam_images), "--threads", str(n_cores)], env_n, args.timeout)),
        Comparison(
            "tokenize", f"CLIP tokenise, {n_captions} captions, 1 thread", "captions/s",
            lambda: run_json([args.peer_bench, "tokenize", "--captions", captions, "--count", str(n_captions)],
                             env_1, args.timeout),
            lambda: run_json([*py, "tokenize", "--captions", captions, "--count", str(n_captions)], env_1,
                             args.timeout)),
    ]

    load_start = loadavg()
    for r in range(args.rounds):
        order = ["juicer", "python"] if r % 2 == 0 else ["python", "juicer"]
        for c in comps:
            for side in order:
                rec = c.run(side)
                log(f"  round {r + 1}/{args.rounds}  {c.key:<16} {side:<6} {rec['per_s']:10.1f} {c.unit}")
    load_end = loadavg()

    checks = {}
    cam = next(c for c in comps if c.key == "cam")
    checks["cam"] = cam_check(cam.last["juicer"], cam.last["python"])
    tok = next(c for c in comps if c.key == "tokenize")
    checks["tokenize"] = token_check(tok.last["juicer"], tok.last["python"])
    for c in comps:
        if c.key.startswith("decode") or c.key == "graph":
            checks[c.key] = {"juicer_samples": c.last["juicer"]["items"], "python_samples": c.last["python"]["items"]}

    versions = json.loads(subprocess.run([*py, "versions"], capture_output=True, text=True, check=True).stdout)
    versions["juicer"] = version_of([args.juicer, "--version"])
    versions["rustc"] = version_of(["rustc", "--version"])
    machine = {
        "cores": n_cores,
        "cpu": cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }
    summaries = [c.summary() for c in comps]
    report = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "quick": args.quick,
        "machine": machine,
        "versions": versions,
        "settings": {
            "decode": {"batch_size": batch, "warmup_samples": warmup, "workers": n_cores, "synthetic": synthetic,
                       "synthetic_size": "640x480", "photos": n_photos, "image_size": 224, "patch_size": 16},
            "graph": {"photos": n_photos, "batch_size": batch, "warmup_samples": warmup,
                      "juicer": "juicer bench defaults on --device cpu (model workers and threads chosen at build)",
                      "python_workers": args.graph_workers, "python_threads": n_cores},
            "cam": {"batch": args.cam_batch, "images_timed": cam_images, "threads": n_cores, "cam_top": 5, "top_k": 3,
                    "inputs": cam_meta["images"]},
            "tokenize": {"captions": n_captions, "distinct": checks["tokenize"]["captions"], "threads": 1},
            "env": {"many": env_n, "one": env_1},
        },
        "comparisons": summaries,
        "checks": checks,
        "seconds": time.time() - started,
    }
    out = args.json if os.path.isabs(args.json) else os.path.join(os.getcwd(), args.json)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)

    # The table.
    w = max(len(s["title"]) for s in summaries)
    print()
    print(f"juicer vs Python peers: {args.rounds} round(s), alternating sides, same inputs, {n_cores} core(s)")
    print(f"machine: {machine['cpu']}, {n_cores} core(s), {machine['os']} {machine['arch']}; "
          f"load average {fmt_load(load_start)} at start, {fmt_load(load_end)} at end")
    print(f"threads: graph: juicer's defaults vs {args.graph_workers} DataLoader worker(s) + {n_cores} torch threads; "
          f"decode {n_cores} workers per side; cam {n_cores} intra-op threads per side (RAYON_NUM_THREADS, "
          f"torch.set_num_threads); tokenize 1 thread per side; OMP_WAIT_POLICY="
          f"{env_n.get('OMP_WAIT_POLICY', '(unset)')}")
    print()
    print(f"  {'comparison':<{w}}  {'juicer':>10}  {'python':>10}  {'unit':<10}  {'ratio':>6}  {'per round':>9}"
          f"  {'CPU ms/item juicer':>18}  {'python':>7}  {'ratio':>6}")
    for s in summaries:
        rr = s["round_ratios"]
        jc, pc, cr = s["juicer_cpu_ms_median"], s["python_cpu_ms_median"], s["cpu_ratio"]
        cpu = (f"{jc:>18.3f}  {pc:>7.3f}  {cr:>5.2f}x" if cr else f"{'n/a':>18}  {'n/a':>7}  {'':>6}")
        print(f"  {s['title']:<{w}}  {s['juicer_median']:>10.1f}  {s['python_median']:>10.1f}  {s['unit']:<10}  "
              f"{s['ratio']:>5.2f}x  {min(rr):>4.2f}–{max(rr):<4.2f}  {cpu}")
    print()
    print("  medians over the rounds; ratio = juicer / python throughput (> 1: juicer is faster); per round: the range")
    print("  of each round's ratio. CPU ms/item: process CPU time (all threads, DataLoader workers included) in the")
    print("  timed window per item; its ratio = python / juicer (> 1: juicer needs less CPU), less disturbed by load.")
    cc, tc = checks["cam"], checks["tokenize"]
    print(f"  checks: CAM top-1 agree {cc['top1_agree']}/{cc['images']}, top-3 ids agree {cc['top3_agree']}/{cc['images']}, "
          f"max |Δp| {cc['max_abs_dprob']:.1e}, max saliency Δ {cc['max_rel_dsaliency']:.1e} (of its max); "
          f"token rows identical {tc['identical_rows']}/{tc['captions']}")
    for c in summaries:
        if c["key"].startswith("decode") or c["key"] == "graph":
            d = checks[c["key"]]
            print(f"          {c['key']}: samples in the window juicer {d['juicer_samples']}, python {d['python_samples']}")
    v = versions
    print(f"  versions: {v['juicer']} ({v['rustc']}); python {v['python']}, torch {v['torch']}, torchvision "
          f"{v['torchvision']}, webdataset {v['webdataset']}, pillow {v['pillow']}, open_clip_torch "
          f"{v['open_clip_torch']}, ftfy {v.get('ftfy', '?')}")
    print(f"  report: {os.path.relpath(out, os.getcwd())}  ({report['seconds']:.0f} s)")
    headline = {s["key"]: s["ratio"] for s in summaries}
    print()
    print("RATIOS (juicer/python throughput, medians of {} rounds): graph {:.2f}x  decode {:.2f}x (full-res JPEG "
          "{:.2f}x)  decode photos {:.2f}x (floor: libjpeg alone {:.2f}x)  cam {:.2f}x  tokenize {:.2f}x".format(
              args.rounds, headline["graph"], headline["decode"], headline["decode_full"], headline["decode_photos"],
              headline["floor_libjpeg"], headline["cam"], headline["tokenize"]))


def fmt_load(l):
    return "n/a" if l is None else "/".join(f"{x:.1f}" for x in l)


if __name__ == "__main__":
    main()
