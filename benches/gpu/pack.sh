#!/usr/bin/env bash
# Packs the GPU kit: everything a lent GPU machine without Rust, network or Vulkan loader needs to measure juicer
# against PyTorch, in one folder of at most 20 MiB. Run on the build machine (cargo, strip, xz, apt-get, pip):
#
#   bash benches/gpu.sh pack DIR [--cuda] [--no-build] [--no-train] [--photos auto|all|N] [--min-photos N]
#                                [--budget-mib M] [--libvulkan-deb FILE] [--force]
#
# then copy DIR to the GPU machine and run `DIR/run.sh` there (`DIR/run.sh --help`; `--smoke` checks it here).
#   1. builds `cargo build --release --bin juicer --example train_clip` (default features: wgpu); --cuda also
#      builds juicer with `--features cuda` into its own target dir (${CARGO_TARGET_DIR:-target}/cuda) and packs it
#      as juicer-cuda when the kit still holds every photo with it; --no-build packs the binaries already built;
#      --no-train leaves train_clip out (run.sh then skips the training run);
#   2. strips the binaries and compresses them together into DIR/bin.tar.xz: one xz stream (-9e, one thread, BCJ
#      x86 filter, a dictionary as large as the tar) so the copies of the code and of the 14 MB of MobileNetV2
#      weights that every binary embeds are stored once;
#   3. fetches Debian's libvulkan1 package (`apt-get download libvulkan1`, no root needed) into DIR, or copies
#      --libvulkan-deb FILE;
#   4. downloads the wheels the peers need and a stock torch install lacks, for CPython 3.12 manylinux x86_64
#      (`pip download --only-binary=:all: ... webdataset==<benches/peers/requirements.txt> braceexpand pyyaml`,
#      with dependencies), and keeps those torch does not bring (numpy, torch and the like are dropped) in
#      DIR/wheels;
#   5. copies run.sh, kit.py (benches/gpu/) and peers.py (benches/peers/), and the photos the bench shards are
#      cropped from (fixtures/gcompris: *.webp, pairs.jsonl, the captions' licence) into DIR/photos. --photos auto
#      (the default) takes all 73 if they fit the budget, else the first ones in pairs.jsonl order that do (at
#      least --min-photos, 16); --photos all insists on all of them; --photos N takes the first N;
#   6. writes DIR/kit.json (git commit, binaries and their sha256, the weights' sha256, photos, wheels, sizes),
#      prints a size table and fails, naming the biggest items, when `du -sb DIR` is over the budget (20 MiB).
# The weights are not packed a second time: run.sh gets them from the juicer binary (`juicer export-weights FILE`,
# or carved out of it, checked against the sha256 in kit.json). DIR must be new, empty or an earlier kit (--force
# replaces an earlier kit).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

DIR=""
CUDA=""
BUILD=1
NO_TRAIN=""
PHOTOS=auto
MIN_PHOTOS=16
BUDGET_MIB=20
DEB=""
FORCE=""
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cuda) CUDA=1; shift ;;
        --no-build) BUILD=""; shift ;;
        --no-train) NO_TRAIN=1; shift ;;
        --photos) need "$@"; PHOTOS="$2"; shift 2 ;;
        --min-photos) need "$@"; MIN_PHOTOS="$2"; shift 2 ;;
        --budget-mib) need "$@"; BUDGET_MIB="$2"; shift 2 ;;
        --libvulkan-deb) need "$@"; DEB="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [[ -z "$DIR" ]] || { echo "error: one DIR only ($DIR, $1)" >&2; exit 2; }; DIR="$1"; shift ;;
    esac
done
[[ -n "$DIR" ]] || { echo "error: bash benches/gpu.sh pack DIR (see --help)" >&2; exit 2; }
[[ "$PHOTOS" =~ ^(auto|all|[0-9]+)$ ]] || { echo "error: --photos auto, all or a number" >&2; exit 2; }
[[ "$MIN_PHOTOS" =~ ^[0-9]+$ && "$BUDGET_MIB" =~ ^[0-9]+$ ]] || { echo "error: --min-photos and --budget-mib are numbers" >&2; exit 2; }
BUDGET=$(( BUDGET_MIB * 1024 * 1024 ))

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
for tool in strip xz tar python3 sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "pack needs $tool"
done

# The kit folder: new, empty, or an earlier kit (replaced with --force). Nothing else is ever deleted.
if [[ -e "$DIR" ]]; then
    [[ -d "$DIR" ]] || die "$DIR exists and is not a folder"
    if [[ -n "$(ls -A "$DIR")" ]]; then
        [[ -f "$DIR/kit.json" ]] || die "$DIR is not empty and is not a kit (no kit.json): choose another DIR"
        [[ -n "$FORCE" ]] || die "$DIR already holds a kit: --force replaces it"
        rm -rf "${DIR:?}"
    fi
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. The binaries.
TARGET="${CARGO_TARGET_DIR:-target}"
CUDA_TARGET="$TARGET/cuda"
if [[ -n "$BUILD" ]]; then
    say "building juicer and train_clip (release, default features)"
    if [[ -n "$NO_TRAIN" ]]; then cargo build --release --bin juicer; else cargo build --release --bin juicer --example train_clip; fi
    if [[ -n "$CUDA" ]]; then
        say "building juicer with --features cuda into $CUDA_TARGET"
        CARGO_TARGET_DIR="$CUDA_TARGET" cargo build --release --features cuda --bin juicer
    fi
else
    say "--no-build: packing the binaries in $TARGET/release as they are"
fi
BINS=("$TARGET/release/juicer")
NAMES=(juicer)
if [[ -z "$NO_TRAIN" ]]; then BINS+=("$TARGET/release/examples/train_clip"); NAMES+=(train_clip); fi
if [[ -n "$CUDA" ]]; then BINS+=("$CUDA_TARGET/release/juicer"); NAMES+=(juicer-cuda); fi
for b in "${BINS[@]}"; do
    [[ -x "$b" ]] || die "$b is missing (build it, or run without --no-build)"
done
mkdir -p "$TMP/bin"
for i in "${!BINS[@]}"; do
    cp "${BINS[$i]}" "$TMP/bin/${NAMES[$i]}"
    strip "$TMP/bin/${NAMES[$i]}"
done

# One xz stream over one tar of the stripped binaries, juicer first. -T1: several threads would cut the stream
# into independent blocks; the dictionary covers the whole tar, so a later binary's copy of the code and the
# embedded weights is a back-reference.
compress() {  # compress OUT NAME...: bin.tar.xz of the named binaries in $TMP/bin
    local out="$1" tarsize dict
    shift
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$TMP/bin" -cf "$TMP/bin.tar" "$@"
    tarsize=$(stat -c %s "$TMP/bin.tar")
    dict=$(( (tarsize + 1048575) / 1048576 ))
    (( dict < 64 )) && dict=64
    (( dict > 1536 )) && dict=1536
    xz -T1 --x86 --lzma2=preset=9e,dict="${dict}MiB" -c "$TMP/bin.tar" > "$out"
    rm -f "$TMP/bin.tar"
}
say "compressing ${NAMES[*]} (xz -9e, one stream; a minute or two)"
t0=$SECONDS
KEEP=(juicer)
[[ -n "$NO_TRAIN" ]] || KEEP+=(train_clip)
compress "$DIR/bin.tar.xz" "${KEEP[@]}"
echo "  bin.tar.xz $(stat -c %s "$DIR/bin.tar.xz") bytes in $(( SECONDS - t0 )) s" >&2
if [[ -n "$CUDA" ]]; then
    compress "$TMP/bin-cuda.tar.xz" "${KEEP[@]}" juicer-cuda
    echo "  with juicer-cuda: $(stat -c %s "$TMP/bin-cuda.tar.xz") bytes" >&2
fi

# 2. Debian's Vulkan loader package.
say "libvulkan1 (Debian package)"
if [[ -n "$DEB" ]]; then
    [[ -f "$DEB" ]] || die "--libvulkan-deb $DEB: no such file"
    cp "$DEB" "$DIR/"
else
    mkdir -p "$TMP/deb"
    # As root apt warns that it downloads "unsandboxed" (its _apt user cannot write to the temp folder): harmless.
    ( cd "$TMP/deb" && apt-get download libvulkan1 ) >&2 \
        || die "apt-get download libvulkan1 failed (run apt-get update first, or pass --libvulkan-deb FILE)"
    cp "$TMP"/deb/libvulkan1_*.deb "$DIR/"
fi
ls "$DIR"/libvulkan1_*.deb >&2

# 3. The wheels a stock CUDA torch install lacks.
say "wheels for CPython 3.12 manylinux x86_64"
WDS="$(grep -E '^webdataset==' benches/peers/requirements.txt || echo webdataset)"
mkdir -p "$TMP/wheels" "$DIR/wheels"
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --implementation cp --abi cp312 -d "$TMP/wheels" "$WDS" braceexpand pyyaml >&2 \
    || die "pip download of $WDS braceexpand pyyaml failed"
# What the GPU machines have with torch (torch, torchvision, pillow, numpy and torch's own dependencies) is dropped;
# anything else webdataset pulls in is kept and named.
for whl in "$TMP"/wheels/*.whl; do
    name="$(basename "$whl" | cut -d- -f1 | tr 'A-Z_' 'a-z-')"
    case "$name" in
        numpy|torch|torchvision|pillow|typing-extensions|filelock|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|\
        setuptools|triton|nvidia-*|cuda-*)
            echo "  dropped $(basename "$whl") (comes with torch)" >&2 ;;
        *)
            cp "$whl" "$DIR/wheels/"
            echo "  kept    $(basename "$whl")" >&2 ;;
    esac
done

# 4. The scripts.
cp benches/gpu/run.sh benches/gpu/kit.py benches/peers/peers.py "$DIR/"
chmod +x "$DIR/run.sh"

# 5. The photos: all that fit (or as asked), in pairs.jsonl order.
say "photos (fixtures/gcompris)"
mkdir -p "$DIR/photos"
cp fixtures/gcompris/LICENSE-GPL-3.0 "$DIR/photos/"
KIT_JSON_RESERVE=8192  # kit.json, written last
used=$(du -sb "$DIR" | cut -f1)
python3 - "$DIR" "$PHOTOS" "$MIN_PHOTOS" $(( BUDGET - used - KIT_JSON_RESERVE )) <<'PY' >&2 || die "copying the photos failed"
import json, os, shutil, sys
kit, how, min_photos, room = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
src = "fixtures/gcompris"
with open(os.path.join(src, "pairs.jsonl"), encoding="utf-8") as f:
    lines = [l for l in f if l.strip()]
pairs = [json.loads(l) for l in lines]
chosen, size = [], 0
for line, pair in zip(lines, pairs):
    cost = os.path.getsize(os.path.join(src, pair["image"])) + len(line.encode("utf-8"))
    if how == "auto" and size + cost > room:
        break
    if how not in ("auto", "all") and len(chosen) >= int(how):
        break
    chosen.append((line, pair))
    size += cost
if how == "auto" and len(chosen) < min_photos:
    # Packed anyway: the size check below then fails with the table that shows what is too big.
    print(f"  only {len(chosen)} of {len(pairs)} photos fit in the {room} bytes the rest of the kit leaves; packing "
          f"--min-photos {min_photos} anyway: the kit will be over budget")
    chosen = list(zip(lines, pairs))[:min_photos]
    size = sum(os.path.getsize(os.path.join(src, p["image"])) + len(l.encode("utf-8")) for l, p in chosen)
for line, pair in chosen:
    shutil.copy(os.path.join(src, pair["image"]), os.path.join(kit, "photos", pair["image"]))
with open(os.path.join(kit, "photos", "pairs.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(line for line, _ in chosen)
print(f"  {len(chosen)} of {len(pairs)} photos, {size} bytes" + ("" if len(chosen) == len(pairs) else
      f" (the first {len(chosen)} of pairs.jsonl: all would not fit the budget)"))
PY

# 6. juice-cuda goes in when the kit still holds every photo with it.
CUDA_NOTE=""
if [[ -n "$CUDA" ]]; then
    n_photos=$(grep -c . "$DIR/photos/pairs.jsonl")
    n_all=$(grep -c . fixtures/gcompris/pairs.jsonl)
    now=$(du -sb "$DIR" | cut -f1)
    extra=$(( $(stat -c %s "$TMP/bin-cuda.tar.xz") - $(stat -c %s "$DIR/bin.tar.xz") ))
    if (( n_photos == n_all && now + extra + KIT_JSON_RESERVE <= BUDGET )); then
        mv "$TMP/bin-cuda.tar.xz" "$DIR/bin.tar.xz"
        KEEP+=(juicer-cuda)
        CUDA_NOTE="packed"
        echo "  juicer-cuda packed (+$extra bytes)" >&2
    else
        CUDA_NOTE="left out: +$extra bytes would not fit the budget with every photo"
        echo "  juicer-cuda $CUDA_NOTE" >&2
    fi
fi

# 7. kit.json, the size table, the budget.
python3 - "$DIR" "$BUDGET" "$CUDA_NOTE" "$TMP/bin" "${KEEP[@]}" <<'PY'
import datetime, hashlib, json, os, subprocess, sys
kit, budget, cuda_note, bindir, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

weights = "fixtures/mobilenet_v2/mobilenet_v2.safetensors"
with open(os.path.join(kit, "photos", "pairs.jsonl"), encoding="utf-8") as f:
    photos = [json.loads(l)["image"] for l in f if l.strip()]
with open("fixtures/gcompris/pairs.jsonl", encoding="utf-8") as f:
    all_photos = sum(1 for l in f if l.strip())
manifest = {
    "schema": 1,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
    "binaries": {name: {"stripped_bytes": os.path.getsize(os.path.join(bindir, name)),
                        "sha256": sha(os.path.join(bindir, name))} for name in keep},
    "juicer_cuda": cuda_note or "not asked for (--cuda)",
    "bin_tar_xz_bytes": os.path.getsize(os.path.join(kit, "bin.tar.xz")),
    "weights": {"file": weights, "bytes": os.path.getsize(weights), "sha256": sha(weights),
                "source_on_gpu": "juicer export-weights, else carved out of the juicer binary"},
    "libvulkan_deb": sorted(f for f in os.listdir(kit) if f.startswith("libvulkan1_"))[0],
    "wheels": sorted(os.listdir(os.path.join(kit, "wheels"))),
    "photos": {"included": len(photos), "of": all_photos, "images": photos},
    "budget_bytes": budget,
}
with open(os.path.join(kit, "kit.json"), "w") as f:
    json.dump(manifest, f, indent=2)

def du(path):
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])

items = sorted(((du(os.path.join(kit, n)), n) for n in os.listdir(kit)), reverse=True)
total = du(kit)
mib = lambda n: n / (1024 * 1024)  # noqa: E731
print(f"\nGPU kit {kit}")
print(f"  {'item':<40} {'bytes':>10} {'MiB':>7}")
for size, name in items:
    print(f"  {name + ('/' if os.path.isdir(os.path.join(kit, name)) else ''):<40} {size:>10} {mib(size):>7.2f}")
for name, b in manifest["binaries"].items():
    print(f"    (in bin.tar.xz: {name}, {b['stripped_bytes']} bytes stripped, {mib(b['stripped_bytes']):.1f} MiB)")
print(f"  {'total (du -sb)':<40} {total:>10} {mib(total):>7.2f}   budget {budget} ({mib(budget):.0f} MiB)")
print(f"  photos: {len(photos)} of {all_photos}; juicer-cuda: {manifest['juicer_cuda']}")
if total > budget:
    worst = ", ".join(f"{n} ({mib(s):.2f} MiB)" for s, n in items[:3])
    print(f"\nerror: the kit is {total - budget} bytes ({mib(total - budget):.2f} MiB) over the {mib(budget):.0f} MiB "
          f"budget; the biggest items: {worst}", file=sys.stderr)
    sys.exit(1)
print(f"\nkit ready: copy {kit} to the GPU machine and run {os.path.basename(kit)}/run.sh there "
      f"(--help; --smoke checks it on this machine)")
PY
