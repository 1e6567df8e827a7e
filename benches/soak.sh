#!/usr/bin/env bash
# Soak: juicer over a long stream must hold its memory, descriptors and threads flat.
#
#   bash benches/soak.sh [--samples N] [--full-samples N] [--cam-samples N] [--drops N] [--out DIR] [--no-build]
#
# 1. `juicer bench` streams N samples (default 1,000,000): 10,000 synthetic JPEG samples (160x120, 64-px input)
#    reused over N / 10,000 epochs, on the cheap path: decode, the random scorer, prune and batch (`--stages
#    prune`: no model, no extract, no enrich), so that a million samples take minutes and the run measures the
#    graph itself (its threads, edges and buffers, started anew each epoch).
# 2. The same shards through the whole graph with the random scorer (default 1,000,000 samples, about 45 minutes
#    on 2 cores): extract runs the MobileNetV2 classifier on every image (about 380 samples/s), enrich
#    tokenises every caption and folds the classes in.
# 3. `juicer bench` with the cam scorer (the MobileNetV2 forward, the default) over 10,000 samples of 320x240.
# 4. The drop test: the loader's iterator dropped after a random number of batches, --drops times (default 1000),
#    alone in its test process: every stage thread joins, and the open descriptors and threads stay exactly
#    what they were after a first full epoch.
# While 1-3 run, RSS (kB), open descriptors and threads of the juicer process are sampled every 10 s
# (/proc/PID) into DIR/soak-{random,full,cam}.csv; the summary (first and last sample, the steady range, and the
# growth from the first half of the steady part to the second) goes to DIR/soak.txt and stdout. Steady is the run
# past its start-up (until the graph's threads run, then a tenth of the run). "Flat" means: the second half's
# median RSS is at most 2 % above the first half's (medians, because a sample taken while a batch is in flight
# is a transient peak, not growth; the maxima are printed beside them), and the second half's descriptors and
# threads never exceed the first half's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SAMPLES=1000000
FULL_SAMPLES=1000000
CAM_SAMPLES=10000
DROPS=1000
OUT=target/soak
BUILD=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --samples) SAMPLES="$2"; shift 2 ;;
        --full-samples) FULL_SAMPLES="$2"; shift 2 ;;
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
threads = [int(r["threads"]) for r in rows]
# Start-up is everything before the graph runs (synthetic shards being written, models loading: the process has
# fewer threads than its median) and then the first tenth of the run; the rest is split in halves. A leak shows
# as a second half whose maximum goes above the first half's.
start = next(i for i, t in enumerate(threads) if t >= statistics.median(threads))
run = rows[start:]
steady = run[len(run) // 10:]
if len(steady) < 4:
    print(f"{name}: only {len(steady)} steady sample(s); run longer"); sys.exit(0)
half = len(steady) // 2
for k in ("rss_kb", "fds", "threads"):
    v = [int(r[k]) for r in rows]
    s = [int(r[k]) for r in steady]
    a, b = s[:half], s[half:]
    if k == "rss_kb":
        ma, mb = statistics.median(a), statistics.median(b)
        growth = (mb - ma) / ma
        flat = growth <= 0.02
        shape = (f"median 1st half {ma / 1024:.1f} MiB, 2nd half {mb / 1024:.1f} MiB ({growth:+.1%}), "
                 f"max {max(a) / 1024:.1f} / {max(b) / 1024:.1f} MiB")
    else:
        flat = max(b) <= max(a)
        shape = f"max 1st half {max(a)}, 2nd half {max(b)}"
    unit = (lambda x: f"{x / 1024:.1f} MiB") if k == "rss_kb" else str
    print(f"{name} {k:7} first {unit(v[0])} last {unit(v[-1])}  steady {unit(min(s))}-{unit(max(s))}  {shape}  "
          f"{'flat' if flat else 'GROWS'}  [{len(rows)} samples, {rows[-1]['seconds']} s]")
PY
}

EPOCHS=$(( (SAMPLES + 9999) / 10000 ))
FULL_EPOCHS=$(( (FULL_SAMPLES + 9999) / 10000 ))
SYNTH=(--synthetic 10000 --synthetic-size 160x120 --synthetic-shard 500 --synthetic-dir "$OUT/synthetic-160")
echo "== 1. $((EPOCHS * 10000)) samples, --scorer random --stages prune ($EPOCHS epochs of 10,000)"
watch_run "$OUT/soak-random.csv" "$BIN" bench --device cpu --scorer random --image-size 64 "${SYNTH[@]}" \
    --stages prune --epochs "$EPOCHS" --warmup 0
echo "== 2. $((FULL_EPOCHS * 10000)) samples, --scorer random, every stage ($FULL_EPOCHS epochs of 10,000)"
watch_run "$OUT/soak-full.csv" "$BIN" bench --device cpu --scorer random --image-size 64 "${SYNTH[@]}" \
    --epochs "$FULL_EPOCHS" --warmup 0
echo "== 3. $CAM_SAMPLES samples, cam scorer"
watch_run "$OUT/soak-cam.csv" "$BIN" bench --device cpu --synthetic "$CAM_SAMPLES" --synthetic-size 320x240 \
    --synthetic-shard 500 --synthetic-dir "$OUT/synthetic-320" --warmup 0
echo "== 4. $DROPS iterator drops"
JUICER_SOAK_DROPS="$DROPS" cargo test --release --test integration -- --exact --test-threads 1 \
    pipeline::dropping_the_iterator_anywhere_joins_every_thread_and_leaks_no_descriptor --nocapture \
    2>&1 | tee "$OUT/soak-drops.log" | grep -E "drops:|test result" || true

{
    summary random "$OUT/soak-random.csv"
    summary full "$OUT/soak-full.csv"
    summary cam "$OUT/soak-cam.csv"
    grep -h "drops:" "$OUT/soak-drops.log" || echo "drop test: see $OUT/soak-drops.log"
} | tee "$OUT/soak.txt"
