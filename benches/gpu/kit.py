"""The Python half of the GPU kit's run.sh (benches/gpu/run.sh): standard library only (Python >= 3.8), so it runs
before anything is installed, on a machine with bash and python3 and nothing else of ours.

    python3 kit.py untar-xz ARCHIVE DEST           unpack a .tar.xz without the xz binary (python's lzma)
    python3 kit.py deb PACKAGE.deb DEST            extract a .deb's data.tar.* without dpkg (an `ar` archive)
    python3 kit.py wheels DEST WHEEL...            unzip wheels onto a PYTHONPATH folder without pip
    python3 kit.py weights JUICER OUT [--sha256 H] carve the safetensors juicer embeds out of its binary
    python3 kit.py machine --juicer BIN ...        the machine as JSON: GPUs, Vulkan drivers, cores, versions
    python3 kit.py bench ...                       the side-by-side rounds, train_clip, the table and the report
    python3 kit.py table REPORT                    print a report's table again

run.sh calls these; `bench` is where the measuring happens (see cmd_bench).
"""

import argparse
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile

from peers import cores, cpu_model  # peers.py travels beside kit.py in every kit


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def die(msg):
    log(f"error: {msg}")
    sys.exit(1)


def _extract(tar, dest):
    """tarfile.extractall with the `data` filter where this Python has it (no absolute paths, no escapes)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:
        tar.extractall(dest)


# ---------------------------------------------------------------------------------------------------- unpacking


def cmd_untar_xz(a):
    os.makedirs(a.dest, exist_ok=True)
    try:
        import lzma  # noqa: F401 (tarfile's r:xz needs it)
    except ImportError:
        die("this python3 has no lzma module and there is no xz binary: cannot unpack the binaries")
    with tarfile.open(a.archive, "r:xz") as tar:
        _extract(tar, a.dest)


def ar_members(path):
    """(name, bytes) of each member of a System V / GNU `ar` archive (what a .deb is)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"!<arch>\n":
        die(f"{path} is not an ar archive (a .deb starts with !<arch>)")
    pos, out = 8, []
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + 60
        out.append((name, data[start : start + size]))
        pos = start + size + (size % 2)  # members are padded to an even offset
    return out


def cmd_deb(a):
    members = ar_members(a.deb)
    payload = [(n, b) for n, b in members if n.startswith("data.tar")]
    if not payload:
        die(f"{a.deb}: no data.tar.* member (members: {[n for n, _ in members]})")
    name, blob = payload[0]
    os.makedirs(a.dest, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
            _extract(tar, a.dest)
    except tarfile.TarError as e:
        die(f"{a.deb}: cannot read {name} with this python's tarfile ({e}); install dpkg (dpkg-deb -x) or use a "
            "python that reads this compression")


def cmd_wheels(a):
    """A wheel is a zip whose root is what site-packages gets; NAME.data/{purelib,platlib} go to the root too."""
    os.makedirs(a.dest, exist_ok=True)
    for whl in a.wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(a.dest)
        for entry in os.listdir(a.dest):
            if entry.endswith(".data"):
                for kind in ("purelib", "platlib"):
                    src = os.path.join(a.dest, entry, kind)
                    if os.path.isdir(src):
                        for item in os.listdir(src):
                            shutil.move(os.path.join(src, item), os.path.join(a.dest, item))
                shutil.rmtree(os.path.join(a.dest, entry))
        log(f"  unzipped {os.path.basename(whl)}")


# ---------------------------------------------------------------------------------------------------- weights

# The safetensors juicer embeds (torchvision's MobileNetV2 IMAGENET1K_V1, fixtures/mobilenet_v2/...) starts its JSON
# header with these bytes; the 8 bytes before them are the header's length.
WEIGHTS_MARK = b'{"__metadata__":{"format":"pt"},"classifier.1.bias":'


def carve_weights(binary):
    """The embedded safetensors file's bytes, found in `binary` (include_bytes! stores it verbatim), or None."""
    with open(binary, "rb") as f:
        data = f.read()
    at = data.find(WEIGHTS_MARK)
    while at >= 8:
        n = int.from_bytes(data[at - 8 : at], "little")
        try:
            header = json.loads(data[at : at + n])
            end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
            blob = data[at - 8 : at + n + end]
            if len(blob) == 8 + n + end:
                return blob
        except (ValueError, KeyError, TypeError):
            pass
        at = data.find(WEIGHTS_MARK, at + 1)
    return None


def cmd_weights(a):
    import hashlib

    blob = carve_weights(a.juicer)
    if blob is None:
        die(f"no embedded MobileNetV2 safetensors found in {a.juicer}")
    digest = hashlib.sha256(blob).hexdigest()
    if a.sha256 and digest != a.sha256:
        die(f"the safetensors carved from {a.juicer} has sha256 {digest}, the kit expects {a.sha256}")
    with open(a.out, "wb") as f:
        f.write(blob)
    log(f"  weights: {len(blob)} bytes carved from {os.path.basename(a.juicer)} (sha256 {digest[:16]}...)")


# ---------------------------------------------------------------------------------------------------- machine


def sh(cmd, timeout=60):
    """stdout of `cmd` stripped, or None when it is missing or fails."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def mem_total_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def vulkan_icds():
    """The Vulkan ICD manifests the loader reads, each with the driver library it names and whether it is there."""
    dirs = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d",
            "/usr/local/etc/vulkan/icd.d"]
    ldcache = sh(["ldconfig", "-p"]) or ""
    out = []
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(d, name)
            entry = {"file": path}
            try:
                with open(path) as f:
                    lib = json.load(f).get("ICD", {}).get("library_path")
                entry["library_path"] = lib
                if lib:
                    entry["library_found"] = os.path.exists(lib) if os.path.isabs(lib) else (
                        f"{lib} " in ldcache or f"/{lib}\n" in ldcache + "\n")
            except (OSError, ValueError) as e:
                entry["error"] = str(e)
            out.append(entry)
    return out


def loaded_library(soname):
    """Loads `soname` in this process as the dynamic linker resolves it now (LD_LIBRARY_PATH included) and returns
    the file it mapped, or the error."""
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError as e:
        return {"error": str(e)}
    with open("/proc/self/maps") as f:
        for line in f:
            if soname.split(".so")[0] + ".so" in line:
                return {"path": os.path.realpath(line.split()[-1])}
    return {"error": "loaded, but not found in /proc/self/maps"}


def python_stack():
    out = {"python": sys.version.split()[0], "executable": sys.executable}
    for mod in ("numpy", "PIL", "torchvision", "webdataset", "safetensors"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001 (informative only)
            out[mod] = None
            out[f"{mod}_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["cudnn"] = torch.backends.cudnn.version()
            out["nvjpeg"] = nvjpeg_check()
    except Exception as e:  # noqa: BLE001
        out["torch"] = None
        out["torch_error"] = f"{type(e).__name__}: {e}"
    return out


def nvjpeg_check():
    """Decodes one small JPEG with torchvision.io.decode_jpeg on the GPU: 'ok' or the error."""
    try:
        import torch
        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, "JPEG", quality=90)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        img = decode_jpeg([data], device="cuda")[0]
        torch.cuda.synchronize()
        return "ok" if tuple(img.shape) == (3, 48, 64) else f"unexpected shape {tuple(img.shape)}"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def machine(juicer=None):
    gpus = sh(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version,pci.bus_id,clocks.max.sm,"
               "power.limit", "--format=csv,noheader"])
    shm = None
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cores": cores(),
        "cpu": cpu_model(),
        "memory_bytes": mem_total_bytes(),
        "dev_shm_bytes": shm,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "nvidia_smi": [l.strip() for l in (gpus or "").splitlines() if l.strip()] or None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "vulkan_icds": vulkan_icds(),
        "vulkan_loader": loaded_library("libvulkan.so.1"),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        "python": python_stack(),
        "juicer": sh([juicer, "--version"]) if juicer else None,
        "tools": {t: shutil.which(t) is not None for t in ("xz", "dpkg-deb", "nvidia-smi", "vulkaninfo")},
    }


def cmd_machine(a):
    m = machine(a.juicer)
    with open(a.out, "w") as f:
        json.dump(m, f, indent=2)
    p = m["python"]
    log(f"  cores {m['cores']} ({m['cpu']}), memory {fmt_bytes(m['memory_bytes'])}, /dev/shm {fmt_bytes(m['dev_shm_bytes'])}")
    log(f"  GPUs (nvidia-smi): {'; '.join(m['nvidia_smi']) if m['nvidia_smi'] else 'none'}")
    icds = ", ".join(f"{os.path.basename(i['file'])}" + ("" if i.get("library_found", True) else " (library missing)")
                     for i in m["vulkan_icds"])
    log(f"  Vulkan ICDs: {icds or 'none'}; loader: {m['vulkan_loader'].get('path') or m['vulkan_loader'].get('error')}")
    log(f"  python {p['python']}, torch {p.get('torch')} (CUDA {p.get('torch_cuda')}, available: "
        f"{p.get('cuda_available')}), torchvision {p.get('torchvision')}, pillow {p.get('PIL')}, numpy {p.get('numpy')}, "
        f"webdataset {p.get('webdataset')}" + (f", nvJPEG: {p['nvjpeg']}" if "nvjpeg" in p else ""))
    log(f"  juicer: {m['juicer']}")


def fmt_bytes(n):
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------------- bench


def run_cmd(cmd, log_path, env, timeout):
    """Runs `cmd` in its own process group with stdout + stderr into `log_path`; kills the group on timeout.
    Returns (returncode or None on timeout, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, time.perf_counter() - t0


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def last_json_line(path):
    with open(path, errors="replace") as f:
        for line in reversed(f.read().splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                return json.loads(line)
    raise ValueError(f"no JSON line in {path}")


class Pipeline:
    """One row of the table: a command run once per round, its samples/s read from its JSON."""

    def __init__(self, key, title, kind, cmd, env=None):
        self.key, self.title, self.kind, self.cmd, self.env = key, title, kind, cmd, env or {}
        self.rounds, self.failed, self.last = [], None, None

    def run(self, rnd, order, work, base_env, timeout):
        stem = os.path.join(work, f"{self.key}-round{rnd}")
        env = dict(base_env)
        env.update(self.env)
        cmd = list(self.cmd)
        if self.kind == "juicer":
            cmd += ["--json", stem + ".json"]
        rc, wall = run_cmd(cmd, stem + ".log", env, timeout)
        if rc != 0:
            why = f"timed out after {timeout} s" if rc is None else f"exit status {rc}"
            self.failed = f"round {rnd}: {why}; see {stem}.log\n{tail(stem + '.log')}"
            return None
        try:
            if self.kind == "juicer":
                with open(stem + ".json") as f:
                    rep = json.load(f)
                p = rep["pipelines"][0]
                cpu = p.get("cpu_seconds")
                rec = {"samples_per_s": p["samples_per_s"], "samples": p["samples"], "seconds": p["seconds"],
                       "cpu_seconds": cpu[1] - cpu[0] if cpu else None, "first_batch_seconds": p["first_batch_seconds"],
                       "warmup_seconds": p["warmup_seconds"], "bottleneck": p.get("bottleneck"),
                       "device": p.get("device"), "dropped": p.get("dropped"),
                       "peak_rss_bytes": rep.get("total", {}).get("peak_rss_bytes")}
                self.last = rep
            else:
                rep = last_json_line(stem + ".log")
                rec = {"samples_per_s": rep["per_s"], "samples": rep["items"], "seconds": rep["seconds"],
                       "cpu_seconds": rep.get("cpu_seconds"), "warmup_seconds": rep.get("warmup_seconds"),
                       "device": rep.get("device", "cpu"), "note": rep.get("note")}
                self.last = rep
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            self.failed = f"round {rnd}: unreadable result ({type(e).__name__}: {e}); see {stem}.log"
            return None
        rec.update({"round": rnd, "order": order, "wall_seconds": wall})
        if rec.get("cpu_seconds") is not None and rec["samples"]:
            rec["cpu_ms_per_sample"] = 1000.0 * rec["cpu_seconds"] / rec["samples"]
        self.rounds.append(rec)
        return rec

    def summary(self):
        rates = [r["samples_per_s"] for r in self.rounds]
        cpu = [r["cpu_ms_per_sample"] for r in self.rounds if r.get("cpu_ms_per_sample") is not None]
        notes = sorted({r["note"] for r in self.rounds if r.get("note")})
        return {
            "key": self.key, "title": self.title, "command": self.cmd, "env": self.env, "rounds": self.rounds,
            "median_samples_per_s": statistics.median(rates) if rates else None,
            "min_samples_per_s": min(rates) if rates else None, "max_samples_per_s": max(rates) if rates else None,
            "median_cpu_ms_per_sample": statistics.median(cpu) if cpu else None,
            "failed": self.failed, "notes": notes, "last_json": self.last,
        }


TRAIN_STEP = re.compile(r"^step\s+(\d+)\s+epoch\s+(\d+)\s+loss\s+([-\d.naNinf]+)\s+([\d.]+) samples/s\s+data wait\s+"
                        r"([\d.]+) ms\s+compute\s+([\d.]+) ms")
TRAIN_SUMMARY = re.compile(r"^steps \S+: loss ([-\d.naNinf]+) \(first \d+\) → ([-\d.naNinf]+) \(last \d+\); ([\d.]+) "
                           r"samples/s; data wait ([\d.]+) ms total \(([\d.]+)%\), compute ([\d.]+) ms")


def parse_train(log_path):
    steps, summary = [], None
    with open(log_path, errors="replace") as f:
        for line in f:
            m = TRAIN_STEP.match(line.strip())
            if m:
                steps.append({"step": int(m[1]), "epoch": int(m[2]), "loss": float(m[3]), "samples_per_s": float(m[4]),
                              "wait_ms": float(m[5]), "compute_ms": float(m[6])})
            m = TRAIN_SUMMARY.match(line.strip())
            if m:
                summary = {"loss_first": float(m[1]), "loss_last": float(m[2]), "samples_per_s": float(m[3]),
                           "data_wait_ms": float(m[4]), "data_wait_percent": float(m[5]), "compute_ms": float(m[6])}
    # Steady state: the steps after the first 5 (kernel compilation and autotuning happen in the first ones).
    skip = 5 if len(steps) > 10 else 1
    steady = steps[skip:]
    if steady:
        wait = sum(s["wait_ms"] for s in steady)
        comp = sum(s["compute_ms"] for s in steady)
        summary = dict(summary or {})
        summary["steady_from_step"] = skip + 1
        summary["steady_steps"] = len(steady)
        summary["steady_median_samples_per_s"] = statistics.median(s["samples_per_s"] for s in steady)
        summary["steady_data_wait_percent"] = 100.0 * wait / max(wait + comp, 1e-9)
    return steps, summary


def torch_lib_dirs(python):
    """The CUDA libraries PyTorch's wheels bring (nvrtc, cudart, ...), for juicer's CUDA backend, which loads them at
    run time: [dir, ...] from site-packages/nvidia/*/lib."""
    code = ("import os, nvidia; print('\\n'.join(os.path.join(p, d, 'lib') for p in nvidia.__path__ "
            "for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, 'lib'))))")
    out = sh([python, "-c", code]) or ""
    return [l for l in out.splitlines() if l.strip()]


def cmd_bench(a):
    started = time.time()
    os.makedirs(a.work, exist_ok=True)
    runs = os.path.join(a.work, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    os.makedirs(runs)
    with open(a.shards_json) as f:
        shards = json.load(f)["shards"]
    with open(a.machine) as f:
        mach = json.load(f)
    kit = {}
    if a.kit_json and os.path.exists(a.kit_json):
        with open(a.kit_json) as f:
            kit = json.load(f)
    cuda = bool(mach.get("python", {}).get("cuda_available"))
    # The PyTorch peers' device: CUDA when torch has it. The nvJPEG peer is asked for CUDA unless --peer-device
    # says otherwise; without CUDA it decodes on the CPU itself and says so in its JSON (a note under the table).
    peer_device = a.peer_device or ("cuda" if cuda else "cpu")
    if peer_device.startswith("cuda") and not cuda:
        log(f"  note: --peer-device {peer_device}, but torch.cuda is unavailable: the graph peer runs on the CPU")
        peer_device = "cpu"
    nv_device = a.peer_device or "cuda"
    n = a.workers
    shm = mach.get("dev_shm_bytes")
    need = n * 2 * a.batch * 196 * 768 * 4  # the graph peer's batches in flight: workers x prefetch 2 x float32
    if shm is not None and shm < 2 * need:
        log(f"  warning: /dev/shm holds {fmt_bytes(shm)}; the torch_graph peer passes about {fmt_bytes(need)} of "
            "batches through it and may die of a bus error (a container's default 64 MiB is too small)")
    base_env = dict(os.environ)
    base_env.update({"OMP_WAIT_POLICY": "PASSIVE"})
    if not base_env.get("XDG_RUNTIME_DIR"):
        base_env.setdefault("NODEVICE_SELECT", "1")  # as juicer sets for itself: Mesa's device-select layer is noisy headless
    common = ["--batch-size", str(a.batch), "--warmup", str(a.warmup)]
    mb = ["--micro-batch", str(a.micro_batch)] if a.micro_batch else []
    py = [a.python, a.peers]
    pipes = []
    if a.juicer:
        pipes.append(Pipeline("juicer_graph", f"juicer, whole graph ({a.device})", "juicer",
                              [a.juicer, "bench", *shards, "--device", a.device, *common, *mb]))
        pipes.append(Pipeline("juicer_decode", f"juicer, decode only ({a.device}, {n} workers)", "juicer",
                              [a.juicer, "bench", *shards, "--stages", "decode", "--scorer", "none", "--device",
                               a.device, "--workers", str(n), *common]))
    pipes.append(Pipeline("torch_graph", f"PyTorch: webdataset + PIL, {n} workers, CAM on {peer_device}", "python",
                          [*py, "graph", "--shards", *shards, "--weights", a.weights, "--device", peer_device,
                           "--workers", str(n), *common]))
    nv_title = "PyTorch: raw bytes, nvJPEG decode + CAM on cuda" if cuda and nv_device.startswith("cuda") else \
        "PyTorch: raw bytes, decode_jpeg + CAM on the CPU (no CUDA)"
    pipes.append(Pipeline("torch_nvjpeg", nv_title, "python",
                          [*py, "graph_nvjpeg", "--shards", *shards, "--weights", a.weights, "--device", nv_device,
                           "--workers", str(n), *common]))
    if a.juicer_cuda:
        libs = torch_lib_dirs(a.python)
        env = {"LD_LIBRARY_PATH": ":".join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]).strip(":")}
        pipes.append(Pipeline("juicer_cuda_graph", f"juicer, whole graph ({a.cuda_device}, CUDA build)", "juicer",
                              [a.juicer_cuda, "bench", *shards, "--device", a.cuda_device, *common, *mb], env))
    log(f"  {len(pipes)} pipelines x {a.rounds} round(s), order reversed in even rounds; "
        f"{len(shards)} shards; runs in {runs}")
    for r in range(1, a.rounds + 1):
        order = pipes if r % 2 == 1 else list(reversed(pipes))
        for pos, p in enumerate(order):
            if p.failed:
                continue
            rec = p.run(r, pos, runs, base_env, a.timeout)
            if rec is None:
                log(f"  round {r}/{a.rounds}  {p.key:<18} FAILED: {p.failed.splitlines()[0]}")
            else:
                cpu = rec.get("cpu_ms_per_sample")
                log(f"  round {r}/{a.rounds}  {p.key:<18} {rec['samples_per_s']:9.1f} samples/s  ({rec['samples']} in "
                    f"{rec['seconds']:.2f} s" + (f", {cpu:.2f} CPU ms/sample" if cpu is not None else "") + ")")

    # The model profile (`juicer bench --layers`, when this juicer has it).
    layers = None
    if a.juicer and a.layers and "--layers" in (sh([a.juicer, "bench", "--help"]) or ""):
        stem = os.path.join(runs, "layers")
        cmd = [a.juicer, "bench", "--layers", "--device", a.device, "--json", stem + ".json", *shlex.split(a.layer_args)]
        rc, wall = run_cmd(cmd, stem + ".log", base_env, a.timeout)
        if rc == 0:
            with open(stem + ".json") as f:
                layers = {"command": cmd, "report": json.load(f), "seconds": wall}
            log(f"  layer profile: {stem}.log")
        else:
            layers = {"command": cmd, "failed": f"exit status {rc}; see {stem}.log\n{tail(stem + '.log')}"}
            log(f"  layer profile FAILED (see {stem}.log)")

    # A short training run on juiced batches.
    train = None
    if a.train and a.steps > 0:
        stem = os.path.join(runs, "train_clip")
        cmd = [a.train, *shards, "--steps", str(a.steps), "--device", a.device, "--batch-size", str(a.train_batch)]
        log(f"  train_clip: {a.steps} steps on {a.device}, batch {a.train_batch}")
        rc, wall = run_cmd(cmd, stem + ".log", base_env, a.timeout)
        steps, summary = parse_train(stem + ".log")
        train = {"command": cmd, "seconds": wall, "steps": steps, "summary": summary}
        if rc != 0:
            train["failed"] = (f"timed out after {a.timeout} s" if rc is None else f"exit status {rc}") + \
                f"; see {stem}.log\n{tail(stem + '.log')}"
            log(f"  train_clip FAILED: {train['failed'].splitlines()[0]}")
    elif a.steps <= 0:
        train = {"skipped": "--steps 0"}
    else:
        train = {"skipped": "the kit has no train_clip binary, or juicer could not run on the device"}

    summaries = [p.summary() for p in pipes]
    ref = next((s for s in summaries if s["key"] == "torch_nvjpeg"), None)
    ref_rate = ref and ref["median_samples_per_s"]
    for s in summaries:
        s["ratio_to_nvjpeg_peer"] = (s["median_samples_per_s"] / ref_rate
                                     if ref_rate and s["median_samples_per_s"] else None)
    report = {
        "schema": 1,
        "what": "juicer vs PyTorch data pipelines on a lent GPU machine (benches/gpu: the kit's run.sh)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": a.mode,
        "settings": {"samples": a.samples, "shards": len(shards), "batch_size": a.batch, "warmup_samples": a.warmup,
                     "workers": n, "rounds": a.rounds, "device": a.device, "peer_device": peer_device,
                     "micro_batch": a.micro_batch or "juicer's default", "train_steps": a.steps,
                     "train_batch": a.train_batch, "timeout_s": a.timeout, "env": {"OMP_WAIT_POLICY": "PASSIVE"},
                     "photos": kit.get("photos", {}).get("included"), "reference": "torch_nvjpeg"},
        "machine": mach,
        "vulkan_loader_check": json.load(open(a.loader_check)) if a.loader_check and os.path.exists(a.loader_check)
        else None,
        "kit": kit,
        "pipelines": summaries,
        "layers": layers,
        "train_clip": train,
        "seconds": time.time() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report, a.out)
    failed = [s["key"] for s in summaries if s["failed"]]
    if failed or (train and train.get("failed")):
        log(f"some runs failed: {', '.join(failed + (['train_clip'] if train and train.get('failed') else []))} "
            f"(their errors are in the report)")
        sys.exit(3)


def print_table(report, path):
    st, m = report["settings"], report["machine"]
    gpu = "; ".join(m.get("nvidia_smi") or []) or "no NVIDIA GPU"
    print()
    print(f"juicer vs PyTorch on {gpu}")
    print(f"  {m.get('cores')} cores ({m.get('cpu')}); {st['samples']} photo crops 640x480 in {st['shards']} shards; "
          f"batch {st['batch_size']}; warm-up {st['warmup_samples']}; {st['rounds']} round(s), order reversed in "
          f"even rounds; medians" + ("   [SMOKE: tiny sizes, software Vulkan: the figures mean nothing]"
                                     if report["mode"] == "smoke" else ""))
    rows = report["pipelines"]
    w = max(len(r["title"]) for r in rows)
    print()
    print(f"  {'pipeline':<{w}}  {'samples/s':>10}  {'per round':>17}  {'x nvJPEG peer':>13}  {'CPU ms/sample':>13}")
    for r in rows:
        if r["median_samples_per_s"] is None:
            print(f"  {r['title']:<{w}}  {'FAILED':>10}  {(r['failed'] or '').splitlines()[0][:110]}")
            continue
        rng = f"{r['min_samples_per_s']:.1f}–{r['max_samples_per_s']:.1f}"
        ratio = f"{r['ratio_to_nvjpeg_peer']:.2f}x" if r["ratio_to_nvjpeg_peer"] else "n/a"
        cpu = f"{r['median_cpu_ms_per_sample']:.2f}" if r["median_cpu_ms_per_sample"] is not None else "n/a"
        mark = "  (failed in a later round)" if r["failed"] else ""
        print(f"  {r['title']:<{w}}  {r['median_samples_per_s']:>10.1f}  {rng:>17}  {ratio:>13}  {cpu:>13}{mark}")
    for r in rows:
        for note in r.get("notes") or []:
            print(f"  note ({r['key']}): {note}")
    t = report.get("train_clip")
    if t and t.get("summary"):
        s = t["summary"]
        print(f"  train_clip, {len(t['steps'])} steps on {st['device']}, batch {st['train_batch']}: "
              f"{s.get('samples_per_s', float('nan')):.1f} samples/s overall, data wait {s.get('data_wait_percent', float('nan')):.0f} % "
              f"(from step {s.get('steady_from_step', '?')}: median {s.get('steady_median_samples_per_s', float('nan')):.1f} samples/s, data wait "
              f"{s.get('steady_data_wait_percent', float('nan')):.0f} %), loss {s.get('loss_first', float('nan')):.3f} → "
              f"{s.get('loss_last', float('nan')):.3f}" + ("  FAILED" if t.get("failed") else ""))
    elif t and t.get("failed"):
        print(f"  train_clip FAILED: {t['failed'].splitlines()[0]}")
    elif t and t.get("skipped"):
        print(f"  train_clip skipped: {t['skipped']}")
    lc = report.get("vulkan_loader_check")
    if lc:
        print(f"  Vulkan loader used by juicer: {lc.get('path') or lc.get('error')}")
    print("  ratio = samples/s over the nvJPEG peer's (> 1: faster); CPU ms/sample: process CPU time (all threads, "
          "DataLoader workers included) in the window per sample")
    print(f"  report: {path}")


def cmd_table(a):
    with open(a.report) as f:
        print_table(json.load(f), a.report)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("untar-xz")
    u.add_argument("archive")
    u.add_argument("dest")
    d = sub.add_parser("deb")
    d.add_argument("deb")
    d.add_argument("dest")
    wh = sub.add_parser("wheels")
    wh.add_argument("dest")
    wh.add_argument("wheels", nargs="+")
    we = sub.add_parser("weights")
    we.add_argument("juicer")
    we.add_argument("out")
    we.add_argument("--sha256")
    m = sub.add_parser("machine")
    m.add_argument("--juicer")
    m.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--mode", default="full")
    b.add_argument("--work", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--machine", required=True)
    b.add_argument("--kit-json")
    b.add_argument("--loader-check")
    b.add_argument("--shards-json", required=True)
    b.add_argument("--samples", type=int, required=True)
    b.add_argument("--juicer")
    b.add_argument("--juicer-cuda")
    b.add_argument("--train")
    b.add_argument("--python", required=True)
    b.add_argument("--peers", required=True)
    b.add_argument("--weights", required=True)
    b.add_argument("--device", default="wgpu:0")
    b.add_argument("--cuda-device", default="cuda:0")
    b.add_argument("--peer-device", default="")
    b.add_argument("--workers", type=int, default=cores())
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--warmup", type=int, default=256)
    b.add_argument("--micro-batch", type=int, default=0)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--train-batch", type=int, default=64)
    b.add_argument("--timeout", type=int, default=600)
    b.add_argument("--layers", action=argparse.BooleanOptionalAction if hasattr(argparse, "BooleanOptionalAction")
                   else "store_true", default=True)
    b.add_argument("--layer-args", default="", help="more options of `juicer bench --layers`, one string")
    t = sub.add_parser("table")
    t.add_argument("report")
    a = ap.parse_args()
    {"untar-xz": cmd_untar_xz, "deb": cmd_deb, "wheels": cmd_wheels, "weights": cmd_weights, "machine": cmd_machine,
     "bench": cmd_bench, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
