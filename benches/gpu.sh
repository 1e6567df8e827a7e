#!/usr/bin/env bash
# Every GPU figure juicer reports, in one go, into one JSON report. Two ways, depending on the GPU machine:
#
#   A GPU machine without Rust (the lent ones: no cargo, no network, no Vulkan loader): a kit of at most 20 MiB.
#     bash benches/gpu.sh pack DIR [--cuda] [--no-build] [--photos auto|all|N] [--budget-mib M] [--force] ...
#         on the build machine: builds, strips and xz-compresses juicer + train_clip (with --cuda also a CUDA build
#         of juicer), fetches Debian's libvulkan1 .deb and the webdataset wheels for CPython 3.12, copies the peer
#         scripts and the photos the bench shards are cropped from, checks the size (`bash benches/gpu.sh pack
#         --help` for every option; benches/gpu/README.md for the layout);
#     DIR/run.sh [--quick] [--out FILE] ...
#         on the GPU machine (bash + python3 with torch): juicer (wgpu, and CUDA when packed) against PyTorch
#         pipelines (webdataset + PIL + CUDA MobileNetV2 CAM; nvJPEG decode on the GPU + CAM), alternating rounds,
#         then train_clip; one table, one JSON (DIR/report.json). `DIR/run.sh --smoke` checks a kit on a machine
#         without a GPU (Mesa's lavapipe, the peers on the CPU). `DIR/run.sh --help` for every option.
#
#   A GPU machine with cargo: everything in one step, building there.
#     bash benches/gpu.sh [--out FILE] [--backend wgpu|cuda] [--lavapipe] [--samples N] [--steps N]
#
# The one-step mode: GPU time is short and lent: build first (the script builds before it touches the GPU), run
# this once, give the machine back. It measures, on the GPU backend it finds:
#   1. `juicer bench` (the whole graph, defaults) with micro-batch 16, 32 and 64, on synthetic JPEG shards
#      (640x480, --samples of them) and on the fixture shards (73 WebP photos, listed 4 times), one pipeline per
#      GPU (`--devices`): samples/s, kept patches/s, time to the first batch, CPU per sample, stage shares;
#   2. the ViT-Ti training step on full vs pruned batches (`cargo bench --bench step`, batch 32): the step-time
#      ratio pruning buys;
#   3. `train_clip` for --steps steps (default 50) on the GPU: loss, samples/s, time waiting for data.
# and writes target/gpu/report.json (or --out): the machine (nvidia-smi, Vulkan drivers, cores), the backend,
# every run's JSON and the raw output of the others. Progress goes to stderr.
#
# Backend: on a machine with NVIDIA GPUs (`nvidia-smi`), wgpu when NVIDIA's Vulkan driver is installed, else
# burn's CUDA backend (`--features cuda`; NVIDIA containers often ship the CUDA driver without the Vulkan one);
# elsewhere wgpu (AMD, Intel through Mesa). --backend forces either. --lavapipe runs everything on Mesa's software Vulkan driver
# with small sizes (64 synthetic samples, 16-sample windows, the fixture shards once, a batch-4 step bench,
# 3 training steps): a CI-free check that the script runs end to end on a machine without a GPU (slow: lavapipe
# runs on the CPU); its figures mean nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The two-step mode's first step lives in benches/gpu/pack.sh.
if [[ "${1:-}" == pack ]]; then
    shift
    exec bash "$ROOT/benches/gpu/pack.sh" "$@"
fi

OUT="target/gpu/report.json"
BACKEND=""
LAVAPIPE=""
SAMPLES=""
STEPS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --backend) BACKEND="$2"; shift 2 ;;
        --lavapipe) LAVAPIPE=1; shift ;;
        --samples) SAMPLES="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
say() { printf '\n== %s\n' "$*" >&2; }

WORK="target/gpu"
mkdir -p "$WORK"
RUNS="$WORK/runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"

# 0. What the machine has.
icds=()
for dir in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    [[ -d "$dir" ]] && for f in "$dir"/*.json; do [[ -e "$f" ]] && icds+=("$(basename "$f")"); done
done
nvidia_icd=""
for f in "${icds[@]+"${icds[@]}"}"; do [[ "$f" == nvidia* ]] && nvidia_icd="$f"; done
nvidia="$(nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true)"
gpus=$(printf '%s' "$nvidia" | grep -c . || true)
if [[ -z "$BACKEND" ]]; then
    # NVIDIA GPUs: wgpu when NVIDIA's Vulkan driver is installed, else CUDA. Other machines: wgpu, which finds
    # AMD and Intel GPUs through Mesa's drivers (`juicer bench --devices gpus` says so when it finds none).
    if [[ -n "$LAVAPIPE" ]]; then BACKEND=wgpu
    elif [[ "$gpus" -gt 0 ]]; then if [[ -n "$nvidia_icd" ]]; then BACKEND=wgpu; else BACKEND=cuda; fi
    else BACKEND=wgpu
    fi
fi
if [[ -n "$LAVAPIPE" ]]; then
    DEVICES="wgpu"   # wgpu's default adapter: lavapipe on a machine without a GPU
    SAMPLES="${SAMPLES:-64}"; STEPS="${STEPS:-3}"; STEP_BATCH=4; STEP_ROUNDS=1; STEP_WARMUP=1; MICRO=(16); WARM=8
    WINDOW=(--samples 16); FIXTURE_COPIES=1
else
    case "$BACKEND" in
        wgpu) DEVICES="gpus" ;;
        cuda) DEVICES="$(seq -s, -f 'cuda:%g' 0 $(( ${gpus:-1} > 0 ? ${gpus:-1} - 1 : 0 )))" ;;
        *) echo "error: --backend wgpu or cuda" >&2; exit 2 ;;
    esac
    SAMPLES="${SAMPLES:-2048}"; STEPS="${STEPS:-50}"; STEP_BATCH=32; STEP_ROUNDS=10; STEP_WARMUP=2; MICRO=(16 32 64)
    WARM=64
    WINDOW=(); FIXTURE_COPIES=4
fi
FEATURES="$BACKEND"
STEP_DEVICE="${DEVICES%%,*}"; [[ "$STEP_DEVICE" == gpus ]] && STEP_DEVICE="wgpu:0"
say "backend $BACKEND (features: $FEATURES), devices $DEVICES; Vulkan drivers: ${icds[*]:-none}; nvidia-smi: ${gpus:-0} GPU(s)"

# 1. Build everything before the first GPU run.
say "building (release, --features $FEATURES)"
t0=$(date +%s)
cargo build --release --features "$FEATURES" --bin juicer --example train_clip >&2
cargo bench --features "$FEATURES" --bench step --no-run >&2
build_s=$(( $(date +%s) - t0 ))
JUICER="${CARGO_TARGET_DIR:-target}/release/juicer"
TRAIN="${CARGO_TARGET_DIR:-target}/release/examples/train_clip"

# 2. The graph on the GPU(s).
SYN="$WORK/synthetic-640x480-n$SAMPLES"
FIXTURES=()
for _ in $(seq "$FIXTURE_COPIES"); do FIXTURES+=(fixtures/shards/gcompris-00000{0,1,2}.tar); done
for mb in "${MICRO[@]}"; do
    say "juicer bench, synthetic, micro-batch $mb"
    "$JUICER" bench --synthetic "$SAMPLES" --synthetic-size 640x480 --synthetic-dir "$SYN" --devices "$DEVICES" \
        --micro-batch "$mb" --warmup "$WARM" "${WINDOW[@]+"${WINDOW[@]}"}" --json "$RUNS/bench-synthetic-mb$mb.json" >&2
    say "juicer bench, fixture photos x4, micro-batch $mb"
    "$JUICER" bench "${FIXTURES[@]}" --devices "$DEVICES" --micro-batch "$mb" --warmup "$WARM" \
        "${WINDOW[@]+"${WINDOW[@]}"}" --json "$RUNS/bench-fixtures-mb$mb.json" >&2
done

# 3. What pruning buys the training step.
say "ViT-Ti step, full vs pruned batches, batch $STEP_BATCH, on $STEP_DEVICE"
cargo bench --features "$FEATURES" --bench step -- --device "$STEP_DEVICE" --batch "$STEP_BATCH" \
    --rounds "$STEP_ROUNDS" --warmup "$STEP_WARMUP" --json "$RUNS/step.json" >&2

# 4. A short training run.
say "train_clip, $STEPS steps on $STEP_DEVICE"
"$TRAIN" --steps "$STEPS" --device "$STEP_DEVICE" --quiet > "$RUNS/train_clip.txt"
cat "$RUNS/train_clip.txt" >&2

# 5. One report.
mkdir -p "$(dirname "$OUT")"
python3 - "$RUNS" "$OUT" "$BACKEND" "$DEVICES" "${LAVAPIPE:-0}" "$build_s" "$nvidia" "${icds[*]:-}" <<'PY'
import datetime, glob, json, os, platform, sys
runs, out, backend, devices, lavapipe, build_s, nvidia, icds = sys.argv[1:9]
report = {
    "schema": 1,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "backend": backend, "devices": devices, "lavapipe": lavapipe == "1", "build_seconds": int(build_s),
    "machine": {"nvidia_smi": [l for l in nvidia.splitlines() if l.strip()], "vulkan_drivers": icds.split(),
                "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
                "arch": platform.machine()},
    "bench": {}, "step": None, "train_clip": None,
}
for path in sorted(glob.glob(os.path.join(runs, "bench-*.json"))):
    with open(path) as f:
        report["bench"][os.path.basename(path)[len("bench-"):-len(".json")]] = json.load(f)
with open(os.path.join(runs, "step.json")) as f:
    report["step"] = json.load(f)
with open(os.path.join(runs, "train_clip.txt")) as f:
    report["train_clip"] = f.read().strip()
with open(out, "w") as f:
    json.dump(report, f, indent=2)
for name, rep in report["bench"].items():
    for p in rep.get("pipelines", []):
        print(f"bench {name:<18} {p.get('device', '?'):<10} {p['samples_per_s']:9.1f} samples/s", file=sys.stderr)
print(f"report: {out}", file=sys.stderr)
PY
