#!/usr/bin/env bash
# The GPU kit's runner: juicer against PyTorch data pipelines on a lent GPU machine, in one go, one table, one JSON.
#
#   DIR/run.sh [--quick | --smoke] [--out FILE] [--rounds N] [--samples N] [--steps N] [--device D] [--weights FILE]
#              [--batch N] [--warmup N] [--workers N] [--micro-batch N] [--timeout S] [--no-cuda] [--[no-]layers]
#
# DIR is a kit made by `bash benches/gpu.sh pack DIR` on a machine with cargo (benches/gpu/README.md). Here it needs
# bash, coreutils and a python3 with torch + torchvision (CUDA) + pillow + numpy (PYTHON=... picks another python):
# no Rust, no network, no root, no Vulkan loader, no xz or dpkg (python's lzma, tarfile and zipfile stand in).
#
#   1. unpacks DIR/bin.tar.xz (juicer, train_clip, and juicer-cuda when packed) into DIR/unpacked/bin;
#   2. extracts the Vulkan loader (libvulkan.so.1) from DIR/libvulkan1_*.deb into DIR/unpacked/vulkan and puts it first
#      on LD_LIBRARY_PATH: the machine's NVIDIA driver brings its Vulkan ICD, not the loader;
#   3. installs DIR/wheels (webdataset, braceexpand, pyyaml) into DIR/unpacked/pydeps (pip --target --no-deps, or
#      unzipped without pip) and puts that on PYTHONPATH;
#   4. records the machine (nvidia-smi, the Vulkan ICD manifests, cores, memory, /dev/shm, python/torch/torchvision
#      versions, an nvJPEG test decode) in DIR/unpacked/machine.json;
#   5. gets the MobileNetV2 weights for the PyTorch peers: `juicer export-weights FILE` (the bytes juicer embeds),
#      else carved out of the juicer binary (same bytes, checked against the sha256 in DIR/kit.json), or --weights;
#   6. makes the bench shards from the kit's photos (`peers.py photos`: 640x480 JPEG q90 random crops, seeded,
#      rendered by one process per core): --samples of them (3744; --quick 1248) in 3 shards per worker;
#   7. checks with LD_DEBUG that juicer's wgpu loads the kit's libvulkan.so.1 (a short decode-only run; when
#      wgpu:0 fails there, `--device wgpu`, wgpu's default adapter, is tried and used if it works);
#   8. runs side by side, --rounds times (3), in reverse order every other round, each run its own process:
#        juicer_graph       `juicer bench SHARDS --device wgpu:0 --batch-size 64 --warmup 256` (the whole graph)
#        juicer_decode      the same with `--stages decode --scorer none --workers N` (decode only, N = cores)
#        torch_graph        peers.py graph: webdataset + PIL in N DataLoader workers, MobileNetV2 CAM on CUDA
#        torch_nvjpeg       peers.py graph_nvjpeg: workers read raw JPEG bytes; nvJPEG decode, resize, crop,
#                           normalise and the CAM on the GPU (the reference of the ratio column)
#        juicer_cuda_graph  the whole graph with the CUDA build on cuda:0 (when packed; --no-cuda skips it)
#      then `juicer bench --layers` (the per-layer model profile, when this juicer has it; --no-layers skips it) and
#      train_clip for --steps steps (50) on the GPU, batch 64 (samples/s, data wait, loss);
#   9. prints one table (pipeline, samples/s median and per-round range, ratio to the nvJPEG peer, CPU ms/sample)
#      and writes one JSON report (--out, default DIR/report.json), the machine and every run's own JSON inside.
#      Every run's output is in DIR/unpacked/runs/*.log, the whole console in DIR/unpacked/run.log.
#
# --smoke: a check of the kit on a machine without a GPU: 64 samples, 1 round, batch 16, warm-up 16, juicer on
# `--device wgpu` (the default adapter: Mesa's lavapipe there), the PyTorch peers on the CPU (the nvJPEG peer
# decodes with decode_jpeg on the CPU and says so), train_clip 3 steps of batch 4, no layer profile (--layers
# adds it); the figures mean nothing. On a 2-core machine it takes about 10 minutes, most of it burn autotuning
# its kernels on lavapipe.
# --timeout S bounds each run (300 s; smoke 1200 s): one that takes longer is killed and reported as failed.
# A second run reuses DIR/unpacked (binaries, loader, wheels, shards); delete it to start afresh. Exit status: 0 when
# every run worked, 3 when some failed (the others are still measured and reported), 1 on a setup error.
set -euo pipefail

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$KIT/unpacked"
PY="${PYTHON:-python3}"

MODE=full
OUT=""
ROUNDS=""; SAMPLES=""; STEPS=""; DEVICE=""; WEIGHTS=""; BATCH=""; WARMUP=""; WORKERS=""; MICRO=0; TIMEOUT=""
NO_CUDA=""; LAYERS=""
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "error: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) MODE=quick; shift ;;
        --smoke) MODE=smoke; shift ;;
        --out) need "$@"; OUT="$2"; shift 2 ;;
        --rounds) need "$@"; ROUNDS="$2"; shift 2 ;;
        --samples) need "$@"; SAMPLES="$2"; shift 2 ;;
        --steps) need "$@"; STEPS="$2"; shift 2 ;;
        --device) need "$@"; DEVICE="$2"; shift 2 ;;
        --weights) need "$@"; WEIGHTS="$2"; shift 2 ;;
        --batch) need "$@"; BATCH="$2"; shift 2 ;;
        --warmup) need "$@"; WARMUP="$2"; shift 2 ;;
        --workers) need "$@"; WORKERS="$2"; shift 2 ;;
        --micro-batch) need "$@"; MICRO="$2"; shift 2 ;;
        --timeout) need "$@"; TIMEOUT="$2"; shift 2 ;;
        --no-cuda) NO_CUDA=1; shift ;;
        --no-layers) LAYERS=--no-layers; shift ;;
        --layers) LAYERS=--layers; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

CORES="$(nproc 2>/dev/null || echo 1)"
WORKERS="${WORKERS:-$CORES}"
LAYER_ARGS=""
TRAIN_BATCH=64
case "$MODE" in
    full)  SAMPLES="${SAMPLES:-3744}" ;;
    quick) SAMPLES="${SAMPLES:-1248}" ;;
    smoke) SAMPLES="${SAMPLES:-64}"; ROUNDS="${ROUNDS:-1}"; STEPS="${STEPS:-3}"; BATCH="${BATCH:-16}"
           WARMUP="${WARMUP:-16}"; DEVICE="${DEVICE:-wgpu}"; TRAIN_BATCH=4
           LAYER_ARGS="--layer-rounds 1 --layer-warmup 0"; LAYERS="${LAYERS:---no-layers}"
           TIMEOUT="${TIMEOUT:-1200}" ;;  # lavapipe: burn's autotuning alone takes minutes
esac
LAYERS="${LAYERS:---layers}"
TIMEOUT="${TIMEOUT:-300}"  # per run: a hung run must not eat the lent machine's time
ROUNDS="${ROUNDS:-3}"; STEPS="${STEPS:-50}"; BATCH="${BATCH:-64}"; WARMUP="${WARMUP:-256}"; DEVICE="${DEVICE:-wgpu:0}"
OUT="${OUT:-$KIT/report.json}"
for v in ROUNDS SAMPLES STEPS BATCH WARMUP WORKERS MICRO TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "error: --${v,,} must be a whole number, not '${!v}'" >&2; exit 2; }
done
# Output paths are made absolute here: the runs below do not all start in the caller's folder.
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
if [[ -n "$WEIGHTS" ]]; then case "$WEIGHTS" in /*) ;; *) WEIGHTS="$PWD/$WEIGHTS" ;; esac; fi

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

main() {
    say "GPU kit $KIT, mode $MODE: $SAMPLES samples, $ROUNDS round(s), batch $BATCH, warm-up $WARMUP, $WORKERS workers, juicer on $DEVICE"
    command -v "$PY" >/dev/null 2>&1 || die "no $PY here (set PYTHON=/path/to/python3, the one with torch)"
    "$PY" -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null || die "$PY is older than Python 3.8"
    "$PY" -c 'import torch, torchvision, PIL, numpy' 2>/dev/null \
        || die "$PY cannot import torch, torchvision, PIL and numpy (set PYTHON=... to a python that has them)"
    [[ -f "$KIT/bin.tar.xz" && -f "$KIT/kit.py" && -f "$KIT/peers.py" && -d "$KIT/photos" ]] \
        || die "$KIT is not a complete kit (bin.tar.xz, kit.py, peers.py, photos/ expected; see benches/gpu/README.md)"
    mkdir -p "$WORK"

    # 1. The binaries, unpacked again when the archive changed.
    local bin="$WORK/bin" stamp
    stamp="$(stat -c '%s %Y' "$KIT/bin.tar.xz")"
    if [[ "$(cat "$bin/.stamp" 2>/dev/null || true)" != "$stamp" ]]; then
        say "unpacking bin.tar.xz"
        rm -rf "$bin"
        mkdir -p "$bin"
        if command -v xz >/dev/null 2>&1 && command -v tar >/dev/null 2>&1; then
            xz -dc "$KIT/bin.tar.xz" | tar -xf - -C "$bin"
        else
            echo "no xz binary: unpacking with python's lzma" >&2
            "$PY" "$KIT/kit.py" untar-xz "$KIT/bin.tar.xz" "$bin"
        fi
        echo "$stamp" > "$bin/.stamp"
    fi
    JUICER="$bin/juicer"
    [[ -x "$JUICER" ]] || die "the kit's bin.tar.xz has no juicer binary"
    TRAIN=""; [[ -x "$bin/train_clip" ]] && TRAIN="$bin/train_clip"
    JUICER_CUDA=""; [[ -x "$bin/juicer-cuda" && -z "$NO_CUDA" ]] && JUICER_CUDA="$bin/juicer-cuda"
    ls -l "$bin" >&2

    # 2. The Vulkan loader, from Debian's libvulkan1 package, first on the library path.
    local debs=("$KIT"/libvulkan1_*.deb) vk="$WORK/vulkan" lib
    [[ -e "${debs[0]}" ]] || die "the kit has no libvulkan1_*.deb"
    if [[ ! -e "$vk/.done" ]]; then
        say "extracting the Vulkan loader from $(basename "${debs[0]}")"
        rm -rf "$vk"
        mkdir -p "$vk"
        if command -v dpkg-deb >/dev/null 2>&1; then
            dpkg-deb -x "${debs[0]}" "$vk"
        else
            echo "no dpkg-deb: extracting the .deb with python" >&2
            "$PY" "$KIT/kit.py" deb "${debs[0]}" "$vk"
        fi
        touch "$vk/.done"
    fi
    lib="$(find "$vk" -name 'libvulkan.so.1' -print -quit)"
    [[ -n "$lib" ]] || die "no libvulkan.so.1 in $(basename "${debs[0]}") (extracted to $vk)"
    VK_DIR="$(dirname "$lib")"
    export LD_LIBRARY_PATH="$VK_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "Vulkan loader: $lib -> $(readlink -f "$lib")" >&2

    # 3. The Python packages the machine lacks.
    local pydeps="$WORK/pydeps" wheels=("$KIT"/wheels/*.whl)
    [[ -e "${wheels[0]}" ]] || die "the kit has no wheels/*.whl"
    if [[ ! -e "$pydeps/.done" ]]; then
        say "installing ${#wheels[@]} wheel(s) into $pydeps"
        rm -rf "$pydeps"
        # --no-deps: --target ignores what the python already has, so pip would ask for webdataset's numpy too.
        if "$PY" -m pip --version >/dev/null 2>&1 \
            && "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$pydeps" \
                "${wheels[@]}"; then
            :
        else
            echo "pip is missing or failed: unzipping the wheels instead" >&2
            rm -rf "$pydeps"
            "$PY" "$KIT/kit.py" wheels "$pydeps" "${wheels[@]}"
        fi
        touch "$pydeps/.done"
    fi
    export PYTHONPATH="$pydeps${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c 'import webdataset' || die "webdataset does not import from $pydeps"

    # 4. The machine.
    say "the machine"
    "$PY" "$KIT/kit.py" machine --juicer "$JUICER" --out "$WORK/machine.json"

    # 5. The MobileNetV2 weights for the PyTorch peers: the very bytes juicer embeds.
    local sha=""
    sha="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("weights", {}).get("sha256", ""))' \
        "$KIT/kit.json" 2>/dev/null || true)"
    if [[ -z "$WEIGHTS" ]]; then
        WEIGHTS="$WORK/mobilenet_v2.safetensors"
        if [[ ! -s "$WEIGHTS" ]]; then
            say "MobileNetV2 weights for the peers"
            rm -f "$WEIGHTS.tmp"
            if "$JUICER" export-weights "$WEIGHTS.tmp" > "$WORK/export-weights.log" 2>&1 && [[ -s "$WEIGHTS.tmp" ]]; then
                echo "  from \`juicer export-weights\`" >&2
            else
                echo "  \`juicer export-weights\` is not in this juicer (see $WORK/export-weights.log): carving the" \
                     "embedded safetensors out of the binary" >&2
                "$PY" "$KIT/kit.py" weights "$JUICER" "$WEIGHTS.tmp" ${sha:+--sha256 "$sha"}
            fi
            mv "$WEIGHTS.tmp" "$WEIGHTS"
        fi
    fi
    [[ -s "$WEIGHTS" ]] || die "no weights file $WEIGHTS"
    if [[ -n "$sha" ]]; then
        local got
        got="$(sha256sum "$WEIGHTS" | cut -d' ' -f1)"
        if [[ "$got" != "$sha" ]]; then
            echo "warning: $WEIGHTS has sha256 $got, not the $sha juicer was built with" >&2
        fi
    fi

    # 6. The bench shards: 3 per DataLoader worker.
    local shards_n per dir
    shards_n=$(( WORKERS * 3 ))
    per=$(( (SAMPLES + shards_n - 1) / shards_n ))
    dir="$WORK/shards-n$SAMPLES-p$per"
    SHARDS_JSON="$dir.json"
    if [[ ! -s "$SHARDS_JSON" ]]; then
        say "making $SAMPLES photo crops, $per per shard, with $CORES process(es)"
        rm -rf "$dir"
        local t0=$SECONDS
        "$PY" "$KIT/peers.py" photos --fixtures "$KIT/photos" --out "$dir" --count "$SAMPLES" --per-shard "$per" \
            --jobs "$CORES" > "$SHARDS_JSON.tmp"
        mv "$SHARDS_JSON.tmp" "$SHARDS_JSON"
        echo "  $(( SECONDS - t0 )) s; $(du -sh "$dir" | cut -f1) in $dir" >&2
    fi

    # 7. Does juicer's wgpu load the kit's loader? The dynamic linker says which file it mapped.
    say "checking juicer's Vulkan loader and device $DEVICE (short decode-only run under LD_DEBUG=libs)"
    local ld="$WORK/ld" first loaded probe_ok=true
    rm -rf "$ld"
    mkdir -p "$ld"
    first="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["shards"][0])' "$SHARDS_JSON")"
    probe() {  # probe DEVICE: a decode-only run of 8 samples on DEVICE, traced by the dynamic linker
        rm -f "$ld"/trace.*
        LD_DEBUG=libs LD_DEBUG_OUTPUT="$ld/trace" timeout "$TIMEOUT" "$JUICER" bench "$first" --stages decode \
            --scorer none --device "$1" --batch-size 8 --warmup 8 --samples 8 > "$ld/probe.log" 2>&1
    }
    if ! probe "$DEVICE"; then
        echo "warning: juicer could not run on $DEVICE:" >&2
        tail -n 15 "$ld/probe.log" >&2
        if [[ "$DEVICE" == wgpu:0 ]] && probe wgpu; then
            # wgpu:N counts discrete GPUs only; the default adapter may still be the GPU (its type reads otherwise).
            echo "  but it runs on \`--device wgpu\` (wgpu's default adapter): using that" >&2
            DEVICE=wgpu
        else
            probe_ok=false
            echo "warning: the juicer wgpu rows and train_clip are skipped" >&2
        fi
    fi
    loaded="$(grep -h 'calling init: .*libvulkan\.so' "$ld"/trace.* 2>/dev/null | head -n 1 | sed 's/.*calling init: //' || true)"
    if [[ -z "$loaded" ]]; then
        echo "warning: the probe loaded no libvulkan.so.1 (see $ld/probe.log)" >&2
    elif [[ "$(readlink -f "$loaded")" != "$(readlink -f "$VK_DIR")"/* ]]; then
        die "juicer loaded the Vulkan loader $loaded, not the kit's ($VK_DIR): something overrides LD_LIBRARY_PATH"
    else
        echo "  juicer loaded the kit's Vulkan loader: $loaded" >&2
    fi
    "$PY" -c 'import json, sys; json.dump({"path": sys.argv[1] or None, "kit_loader_dir": sys.argv[2],
        "from_kit": bool(sys.argv[1]) and sys.argv[1].startswith(sys.argv[2]), "probe_ok": sys.argv[3] == "true",
        "device": sys.argv[4]}, open(sys.argv[5], "w"), indent=2)' \
        "$loaded" "$VK_DIR" "$probe_ok" "$DEVICE" "$WORK/loader.json"
    local juicer_args=(--juicer "$JUICER")
    [[ -n "$TRAIN" ]] && juicer_args+=(--train "$TRAIN")
    if [[ "$probe_ok" != true ]]; then
        juicer_args=()
    fi
    [[ -n "$JUICER_CUDA" ]] && juicer_args+=(--juicer-cuda "$JUICER_CUDA")

    # 8.–9. The rounds, train_clip, the table and the report.
    say "measuring"
    local rc=0
    "$PY" "$KIT/kit.py" bench --mode "$MODE" --work "$WORK" --out "$OUT" --machine "$WORK/machine.json" \
        --kit-json "$KIT/kit.json" --loader-check "$WORK/loader.json" --shards-json "$SHARDS_JSON" \
        --samples "$SAMPLES" ${juicer_args[@]+"${juicer_args[@]}"} --python "$PY" --peers "$KIT/peers.py" --weights "$WEIGHTS" \
        --device "$DEVICE" --workers "$WORKERS" --batch "$BATCH" --warmup "$WARMUP" --micro-batch "$MICRO" \
        --rounds "$ROUNDS" --steps "$STEPS" --train-batch "$TRAIN_BATCH" --timeout "$TIMEOUT" "$LAYERS" \
        --layer-args "$LAYER_ARGS" || rc=$?
    return "$rc"
}

# The console goes to DIR/unpacked/run.log as well. A pipeline, not `exec > >(tee ...)`: nothing is left to wait for
# when main returns, and pipefail hands back main's exit status.
mkdir -p "$WORK"
main 2>&1 | tee "$WORK/run.log"
