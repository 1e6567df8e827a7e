#!/usr/bin/env bash
# juicer against its Python peers, side by side: one run, the same inputs, the same cores.
#
#   bash benches/peers/run.sh [--rounds N] [--quick] [--json FILE] [--cores N] [--venv DIR] [--no-build]
#
# From a clean clone this one command
#   1. creates a Python venv (default target/peers-venv; reused when present, topped up when
#      benches/peers/requirements.txt changed) and pip-installs the pinned peers: torch, torchvision,
#      webdataset, pillow, open_clip_torch, ftfy, regex, safetensors, numpy. torch comes from the default
#      package index; on Linux x86_64 that is the CUDA build (about 5.5 GB installed), which runs on the CPU
#      here. Extra pip options (say, an extra index with CPU-only wheels) go in PEERS_PIP_ARGS.
#   2. builds juicer (`cargo build --release --bin juicer --example peer_bench`, default features);
#   3. runs benches/peers/compare.py: every comparison, both sides back to back, juicer first in odd rounds
#      and Python first in even ones, --rounds times (default 5), then prints medians and the ratio
#      juicer/Python (> 1: juicer is faster), the machine, the versions, and writes the JSON report
#      (default target/peers/results.json).
#
# The comparisons (details in benches/peers/README.md):
#   graph     the whole juicing graph with juicer's defaults (`juicer bench PHOTOS --device cpu`) vs the Python
#             peer that decodes (webdataset + PIL + torchvision transforms in a DataLoader) and computes the
#             MobileNetV2 CAM saliency and top classes per batch, on 500 640x480 JPEG crops of the fixture photos.
#   decode    decode → resize 224 (bilinear, antialias) → centre crop → normalise → patchify [196, 768], batch 32:
#             `juicer bench --stages decode --scorer none` vs webdataset + PIL + torchvision transforms + torch
#             DataLoader, on the same synthetic JPEG shards (640x480, made by `juicer bench --synthetic`) and,
#             unless --quick, on the fixture shards (73 WebP photos); on the synthetic shards and the photo
#             crops also with --full-res-jpeg (no reduced-scale JPEG decoding). samples/s after a 32-sample warm-up.
#   cam       MobileNetV2 forward + class activation maps of the top classes on the 14x14 grid + top-3 classes,
#             on the CPU, batch 16, on the same decoded fixture photos: juicer's CamScorer
#             (examples/peer_bench.rs) vs torchvision mobilenet_v2 with the same weights. images/s, scoring only.
#   tokenize  CLIP BPE tokenisation of the fixture captions cycled to 20000, padded to 77:
#             juicer's ClipTokenizer vs open_clip.tokenize. captions/s.
#
# Cores (N = --cores, default all the process may use): decode runs N workers on both sides (juicer
# --workers N; DataLoader num_workers=N, each worker one torch thread); cam runs N intra-op threads on both sides
# (RAYON_NUM_THREADS=N for burn's flex backend; torch.set_num_threads(N), OMP_NUM_THREADS=N); tokenize runs on
# one thread on both sides. Both sides get OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy default` leaves it unset):
# spinning OpenMP threads made 2-thread torch 4x slower than 1 thread on a 2-core machine shared with other work.
# The table also gives process CPU ms per item (less disturbed by load).
# --quick: 3 rounds unless --rounds is given, smaller inputs, no fixture decode row. Other options go to
# compare.py (`--cores N`, `--omp-wait-policy`, `--synthetic N`, `--cam-batch B`, `--cam-images N`, `--captions N`).
#
# Everything generated (venv, synthetic shards, decoded inputs) stays under target/, which git ignores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

VENV="${PEERS_VENV:-target/peers-venv}"
ROUNDS=""
QUICK=""
BUILD=1
JSON="target/peers/results.json"
PASS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --rounds=*) ROUNDS="${1#*=}"; shift ;;
        --quick) QUICK=1; shift ;;
        --no-build) BUILD=""; shift ;;
        --json) JSON="$2"; shift 2 ;;
        --json=*) JSON="${1#*=}"; shift ;;
        --venv) VENV="$2"; shift 2 ;;
        --venv=*) VENV="${1#*=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
if [[ -z "$ROUNDS" ]]; then
    if [[ -n "$QUICK" ]]; then ROUNDS=3; else ROUNDS=5; fi
fi

say() { printf '\n== %s\n' "$*" >&2; }

# 1. The venv.
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "error: need Python >= 3.10 with venv (set PYTHON=...)" >&2
    exit 1
fi
REQ="benches/peers/requirements.txt"
STAMP="$VENV/.peers-requirements"
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
if ! cmp -s "$REQ" "$STAMP" 2>/dev/null; then
    say "installing the Python peers into $VENV (pinned, $REQ)"
    t0=$(date +%s)
    # shellcheck disable=SC2086 # PEERS_PIP_ARGS is a list of options
    "$VENV/bin/python" -m pip install --quiet ${PEERS_PIP_ARGS:-} -r "$REQ"
    cp "$REQ" "$STAMP"
    echo "installed in $(( $(date +%s) - t0 )) s; venv size $(du -sh "$VENV" | cut -f1)" >&2
else
    say "reusing venv $VENV"
fi

# 2. juicer.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if [[ -n "$BUILD" ]]; then
    say "building juicer (release)"
    cargo build --release --bin juicer --example peer_bench
else
    say "--no-build: using $TARGET_DIR/release/juicer and $TARGET_DIR/release/examples/peer_bench as they are"
fi
for bin in "$TARGET_DIR/release/juicer" "$TARGET_DIR/release/examples/peer_bench"; do
    [[ -x "$bin" ]] || { echo "error: $bin is missing (run without --no-build)" >&2; exit 1; }
done

# 3. The comparison.
say "running the comparison ($ROUNDS round(s))"
QUICK_ARG=()
[[ -n "$QUICK" ]] && QUICK_ARG=(--quick)
exec "$VENV/bin/python" benches/peers/compare.py \
    --rounds "$ROUNDS" "${QUICK_ARG[@]}" --json "$JSON" \
    --python "$VENV/bin/python" \
    --juicer "$TARGET_DIR/release/juicer" \
    --peer-bench "$TARGET_DIR/release/examples/peer_bench" \
    --work "$TARGET_DIR/peers" \
    "${PASS[@]}"
