#!/usr/bin/env bash
# Peak memory of a streaming juicer run: 1,000 vs 50,000 samples through the whole graph (must stay flat), and
# how it depends on the edge capacity (`--capacity`, slots per edge).
#
#   bash benches/memory.sh            # ~5 min on 2 cores; synthetic shards go to target/bench-synthetic
#
# Every row is one `juicer bench` process (peak RSS is per process: getrusage's ru_maxrss). The stream runs the
# full graph (decode, cam score, prune, extract, enrich, batch) on synthetic 160×120 JPEGs. Length rows use a
# 64-px model input so 50k samples take about two minutes on 2 cores; the capacity rows use the default 224 px,
# where an item in flight weighs ~0.6 MB of pixels, so the bound on items in flight shows in the RSS.
# Needs python3 (to read the JSON reports).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
juicer=target/release/juicer
dir="${SYNTHETIC_DIR:-target/bench-synthetic}/160x120-50k"
gen=(--synthetic 50000 --synthetic-size 160x120 --synthetic-shard 1000 --synthetic-dir "$dir")

row() {
  local label="$1"
  shift
  "$juicer" bench "${gen[@]}" --device cpu --warmup 64 "$@" --json - 2>/dev/null | python3 -c '
import json, sys
label = sys.argv[1]
r = json.load(sys.stdin)
p = r["pipelines"][0]
rss = [t["rss_bytes"] for t in p["timeline"] if t["rss_bytes"]]
mib = lambda b: b / 2**20
tenth = rss[len(rss) // 10] if rss else 0
end = rss[-1] if rss else 0
n = p["samples"] + r["warmup_samples"]
peak = r["total"]["peak_rss_bytes"]
print("%-34s %7d %9.0f %10.0f %9.0f %9.0f" % (label, n, mib(peak), mib(tenth), mib(end), p["samples_per_s"]))
' "$label"
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-34s %7s %9s %10s %9s %9s\n' "run" "samples" "peak MiB" "RSS@10% MiB" "RSS@end" "samples/s"
row "1k samples, 64 px, capacity 16" --image-size 64 --limit 1000
row "50k samples, 64 px, capacity 16" --image-size 64
for cap in 4 16 64; do
  row "1k samples, 224 px, capacity $cap" --capacity "$cap" --limit 1000
done
