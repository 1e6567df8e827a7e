#!/usr/bin/env bash
# Start-up and throughput from object storage, side by side in one run: 200 shards on a local S3 API (moto on
# 127.0.0.1) against the same shards on local disk.
#
#   bash benches/object_store.sh        # ~3 min on 2 cores; needs python3 with moto[server] (and boto3, its dep)
#
# Rows (each one `juicer bench` process, decode stage only so the source is what is measured):
# - time to first batch for rank 0 of 8 over s3://, without a manifest (cold count scan, cache off), with the
#   count cache warm (one HEAD per shard), and with a manifest (no shard read before it is consumed);
# - samples/s over the whole data, rank 0 of 1, from s3:// and from local disk.
# moto is a Python server on the same 2 cores, so absolute figures say little; the ratios are the result.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
juicer="$PWD/target/release/juicer"
moto="${JUICER_MOTO_SERVER:-moto_server}"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null; rm -rf "$work"' EXIT
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
  AWS_REGION=us-east-1 JUICER_CACHE_DIR="$work/cache"
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port))" 2>/dev/null && break; sleep 0.2; done

# 200 shards of 16 synthetic 320x240 JPEGs (the bench's generator), uploaded to s3://bench/d/.
"$juicer" bench --synthetic 3200 --synthetic-size 320x240 --synthetic-shard 16 --synthetic-dir "$work/local" \
  --device cpu --stages decode --samples 16 --warmup 0 >/dev/null 2>&1
python3 - "$work/local" "$port" <<'EOF'
import os, sys, boto3
d, port = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
s3.create_bucket(Bucket="bench")
for name in sorted(os.listdir(d)):
    if name.endswith(".tar"):
        s3.upload_file(os.path.join(d, name), "bench", f"d/{name}")
EOF
shards=$(ls "$work/local"/*.tar | wc -l)
first=$(ls "$work/local"/*.tar | head -1 | xargs basename | sed 's/-[0-9]*\.tar$//')
spec="s3://bench/d/${first}-{000000..$(printf %06d $((shards - 1)))}.tar"
"$juicer" index "$spec" --out s3://bench/d/train.json 2>/dev/null

bench() {
  "$juicer" bench "$@" --device cpu --stages decode --warmup 0 --json - 2>/dev/null | python3 -c '
import json, sys
p = json.load(sys.stdin)["pipelines"][0]
print(p["first_batch_seconds"], p["samples_per_s"])'
}
read -r cold _ < <(bench "$spec" --rank 0 --world-size 8 --samples 64 --no-count-cache)
bench "$spec" --rank 0 --world-size 8 --samples 64 >/dev/null   # fills the count cache
read -r warm _ < <(bench "$spec" --rank 0 --world-size 8 --samples 64)
read -r manifest _ < <(bench s3://bench/d/train.json --rank 0 --world-size 8 --samples 64)
read -r _ s3_rate < <(bench "$spec")
read -r _ local_rate < <(bench "$work/local/${first}-{000000..$(printf %06d $((shards - 1)))}.tar")
python3 - "$shards" "$cold" "$warm" "$manifest" "$s3_rate" "$local_rate" <<'EOF'
import sys
n, cold, warm, man, s3, local = sys.argv[1], *map(float, sys.argv[2:])
print(f"| start-up, rank 0 of 8 over {n} moto shards | first batch (s) | vs manifest |")
print("|---|---|---|")
print(f"| no manifest, cold scan | {cold:.2f} | {cold / man:.1f}x |")
print(f"| no manifest, count cache warm | {warm:.2f} | {warm / man:.1f}x |")
print(f"| manifest | {man:.2f} | 1.0x |")
print()
print(f"| throughput, decode stage, 1 rank | samples/s | vs local disk |")
print("|---|---|---|")
print(f"| local disk | {local:.0f} | 1.00 |")
print(f"| s3:// (moto) | {s3:.0f} | {s3 / local:.2f} |")
EOF
