#!/usr/bin/env bash
# Soak: juicer over a long stream must hold its memory, descriptors and threads flat.
#
#   bash benches/soak.sh [--samples N] [--cam-samples N] [--drops N] [--out DIR] [--no-build]
#
# 1. `juicer bench` streams N samples (default 1,000,000): 10,000 synthetic JPEG samples (160x120, 64-px input)
#    reused over N / 10,000 epochs, the cheap `--scorer random` path (decode, prune, enrich, batch; no model).
# 2. `juicer bench` with the cam scorer (the MobileNetV2 forward, the default) over 10,000 samples of 320x240.
# 3. The drop test: the loader's iterator dropped after a random number of batches, --drops times (default 1000),
#    alone in its test process: every stage thread joins, and the open descriptors and threads stay exactly
#    what they were after a first full epoch.
# While 1 and 2 run, RSS (kB), open descriptors and threads of the juicer process are sampled every 10 s
# (/proc/PID) into DIR/soak-random.csv and DIR/soak-cam.csv; the summary (first, median and last sample of
# each, and max - min) goes to DIR/soak.txt and stdout. "Flat" means: after the first sample, which includes the
# start-up, RSS varies by less than 10 % and descriptors and threads do not grow.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SAMPLES=1000000
CAM_SAMPLES=10000
DROPS=1000
OUT=target/soak
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --samples) SAMPLES="$2"; shift 2 ;;
        --cam-samples) CAM_SAMPLES="$2"; shift 2 ;;
        --drops) DROPS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --no-build) BUILD=""; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
if [[ -n "$BUILD" ]]; then
    # The binary `cargo test` builds (step 3 needs the test binary anyway): `cargo build --bin juicer` alone
    # resolves burn's features without the dev-dependencies and compiles the burn stack a second time.
    cargo test --release --no-run
fi
BIN="${CARGO_TARGET_DIR:-target}/release/juicer"

# Runs "$@" in the background and samples its /proc every 10 s into $1.csv until it exits.
watch_run() {
    local csv="$1"; shift
    echo "seconds,rss_kb,fds,threads" > "$csv"
    "$@" > "$csv.log" 2>&1 &
    local pid=$! t=0
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -r /proc/$pid/status ]]; then
            local rss threads fds
            rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
            threads=$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
            fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
            [[ -n "$rss" ]] && echo "$t,$rss,$fds,$threads" >> "$csv"
        fi
        sleep 10
        t=$((t + 10))
    done
    wait "$pid"
}

summary() {
    python3 - "$1" "$2" <<'PY'
import csv, statistics, sys
name, path = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(path))]
if len(rows) < 3:
    print(f"{name}: only {len(rows)} sample(s); run longer"); sys.exit(0)
def col(k): return [int(r[k]) for r in rows]
steady = rows[1:]
for k in ("rss_kb", "fds", "threads"):
    v = col(k); s = [int(r[k]) for r in steady]
    spread = (max(s) - min(s)) / max(1, statistics.median(s))
    print(f"{name} {k:8} first {v[0]:>8} median {statistics.median(v):>10} last {v[-1]:>8} "
          f"steady max-min {max(s) - min(s):>7} ({spread:.1%})  over {len(rows)} samples, {rows[-1]['seconds']} s")
PY
}

EPOCHS=$(( (SAMPLES + 9999) / 10000 ))
echo "== 1. $((EPOCHS * 10000)) samples, --scorer random ($EPOCHS epochs of 10,000)"
watch_run "$OUT/soak-random.csv" "$BIN" bench --device cpu --scorer random --image-size 64 \
    --synthetic 10000 --synthetic-size 160x120 --synthetic-shard 500 --synthetic-dir "$OUT/synthetic-160" \
    --epochs "$EPOCHS" --warmup 0
echo "== 2. $CAM_SAMPLES samples, cam scorer"
watch_run "$OUT/soak-cam.csv" "$BIN" bench --device cpu --synthetic "$CAM_SAMPLES" --synthetic-size 320x240 \
    --synthetic-shard 500 --synthetic-dir "$OUT/synthetic-320" --warmup 0
echo "== 3. $DROPS iterator drops"
JUICER_SOAK_DROPS="$DROPS" cargo test --release --test integration -- --exact --test-threads 1 \
    pipeline::dropping_the_iterator_anywhere_joins_every_thread_and_leaks_no_descriptor --nocapture \
    2>&1 | tee "$OUT/soak-drops.log" | grep -E "drops:|test result" || true

{
    summary random "$OUT/soak-random.csv"
    summary cam "$OUT/soak-cam.csv"
    grep -h "drops:" "$OUT/soak-drops.log" || echo "drop test: see $OUT/soak-drops.log"
} | tee "$OUT/soak.txt"
