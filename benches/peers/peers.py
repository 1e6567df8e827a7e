"""The Python side of the peer comparison (`benches/peers/run.sh`): one measurement per call, JSON on stdout.

    python peers.py decode   --shards A.tar B.tar ... --workers N --batch-size 32 --warmup 32
    python peers.py cam      --inputs cam_inputs.f32 --weights mobilenet_v2.safetensors --batch 16 --images 128 --threads N
    python peers.py tokenize --captions pairs.jsonl --count 20000
    python peers.py versions
    python peers.py photos   --fixtures fixtures/gcompris --out DIR --count 500 [--jobs N]
    python peers.py graph    --shards A.tar ... --weights W [--device cpu|cuda[:N]] --workers N --batch-size B
    python peers.py graph_nvjpeg --shards A.tar ... --weights W [--device cuda[:N]] --workers N --batch-size B

- decode: webdataset + PIL decode + torchvision Resize(224, bilinear, antialias) + CenterCrop(224) + ToTensor +
  Normalize(ImageNet) + patchify into [196, 768] (unfold, channel-major per patch as juicer's `patchify`), batched
  by a torch DataLoader (num_workers = --workers, batch_size = --batch-size). The window opens at the first batch
  that brings the count of samples to --warmup and closes at the last batch, as `juicer bench` measures.
- cam: torchvision mobilenet_v2 with the fixture weights (torchvision key names, no download), eval, inference
  mode, --threads intra-op threads; per batch: features + logits, softmax, top-5 classes (juicer's cam_top 5 >= top_k
  3), class activation maps (classifier weight rows x feature map), bilinear to 14x14 (align_corners=False), the
  probability-weighted saliency mix and the top-3 candidates, as juicer's CamScorer. Only the scoring is timed.
- tokenize: open_clip.tokenize over the captions cycled to --count, one thread (torch.set_num_threads(1)).
- photos: WebDataset shards of JPEG crops of the fixture photos (see cmd_photos); --jobs N renders the shards in N
  processes, with the same bytes as one process.
- graph: the Python peer of juicer's whole graph (see cmd_graph); --device cuda[:N] runs the CAM model on the GPU
  (batches pinned and copied, the clock read after torch.cuda.synchronize() at the window's two ends).
- graph_nvjpeg: the GPU-decode peer (see cmd_graph_nvjpeg): workers read raw JPEG bytes only, the main process
  decodes them with nvJPEG (torchvision.io.decode_jpeg on the GPU), resizes, crops and normalises on the GPU, then the
  graph's CAM and kept-half selection. Without CUDA it decodes on the CPU and says so in its JSON ("note").
"""

import argparse
import json
import os
import platform
import sys
import time


def cmd_versions(_args):
    import numpy
    import open_clip
    import PIL
    import safetensors
    import torch
    import torchvision
    import webdataset

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "pillow": PIL.__version__,
        "open_clip_torch": open_clip.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "torch_threads_default": torch.get_num_threads(),
    }
    try:
        import importlib.metadata as md

        out["ftfy"] = md.version("ftfy")
        out["regex"] = md.version("regex")
        out["webdataset"] = md.version("webdataset")
    except Exception:  # noqa: BLE001 (versions are informative only)
        pass
    print(json.dumps(out))


def cpu_model():
    """The processor's name (/proc/cpuinfo), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def patchify(x, patch=16):
    """[3, S, S] -> [(S/P)^2, 3*P*P], row-major patches, each flattened (c, py, px) like juicer's `patchify`."""
    c = x.shape[0]
    p = x.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, rows, cols, P, P]
    rows, cols = p.shape[1], p.shape[2]
    return p.permute(1, 2, 0, 3, 4).reshape(rows * cols, c * patch * patch)


def _identity(x):
    return x


class Prepare:
    """PIL image -> patches [196, 768]; a module-level class so DataLoader workers can pickle it."""

    def __init__(self):
        import torchvision.transforms as T

        self.transform = T.Compose(
            [
                T.Resize(224, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                T.CenterCrop(224),
                T.ToTensor(),
                T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )

    def __call__(self, image):
        return patchify(self.transform(image))


def cpu_with_workers(pids):
    """CPU seconds (user + system) of this process and the DataLoader worker processes `pids`; None if unreadable."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


class Window:
    """The timed window of a loader run: it opens at the batch that brings the count to `warmup` samples and
    closes at the last batch; CPU time counts this process and the DataLoader workers `pids`."""

    def __init__(self, warmup, pids, sync=None):
        self.warmup, self.pids, self.sync = warmup, pids, sync
        self.started = time.perf_counter()
        self.emitted = self.samples = self.batches = 0
        self.t0 = self.last = self.cpu0 = self.cpu1 = None

    def batch(self, n):
        now = time.perf_counter()
        self.emitted += n
        if self.t0 is None:
            if self.emitted >= self.warmup:
                if self.sync is not None:  # a GPU run: the warm-up's queued work is done before the clock starts
                    self.sync()
                    now = time.perf_counter()
                self.t0 = self.last = now
                self.cpu0 = self.cpu1 = cpu_with_workers(self.pids)
            return
        self.samples += n
        self.batches += 1
        self.last = now
        self.cpu1 = cpu_with_workers(self.pids)

    def finish(self):
        """A GPU run: waits for the queued work of the window's batches, then closes the window (a CPU run closes
        it at the last batch, in `batch`)."""
        if self.sync is not None and self.t0 is not None and self.samples:
            self.sync()
            self.last = time.perf_counter()
            self.cpu1 = cpu_with_workers(self.pids)

    def report(self, task, **extra):
        if self.t0 is None or self.samples == 0:
            sys.exit(f"{task}: the data ended after {self.emitted} samples, before the warm-up of {self.warmup} was done")
        seconds = self.last - self.t0
        cpu = None if self.cpu0 is None or self.cpu1 is None else self.cpu1 - self.cpu0
        return {"side": "python", "task": task, "items": self.samples, "batches": self.batches, "seconds": seconds,
                "per_s": self.samples / seconds, "cpu_seconds": cpu, "warmup_seconds": self.t0 - self.started,
                **extra}


def cam_scores(model, weight, x, cam_top=5, top_k=3, grid=(14, 14)):
    """juicer's cam scorer in batched torch ops: saliency [B, 196], top-k class ids and probabilities, their maps."""
    import torch
    import torch.nn.functional as F

    features = model.features(x)  # [B, 1280, 7, 7]
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(features, (1, 1)), 1))
    p, idx = logits.softmax(dim=1).topk(max(cam_top, top_k), dim=1)  # [B, 5]
    maps = torch.einsum("bkc,bchw->bkhw", weight[idx], features)  # [B, 5, 7, 7]
    maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    saliency = (p[:, :cam_top, None, None] * maps[:, :cam_top]).sum(dim=1).flatten(1)  # [B, 196]
    return saliency, idx[:, :top_k], p[:, :top_k], maps[:, :top_k].flatten(2)


def patch_loader(args, pin_memory=False, sync=None):
    """webdataset → PIL → `Prepare` in a `DataLoader` over `args.shards` (batches of `args.batch_size`, with
    `args.workers` workers, pinned batches with `pin_memory`), started, with its timed [`Window`] (`sync`: see
    `Window`)."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = (
        wds.WebDataset(args.shards, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg;jpeg;png;webp", "txt")
        .map_tuple(Prepare(), _identity)
    )
    if pin_memory:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=True)
    else:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    it = iter(loader)
    return it, Window(args.warmup, [w.pid for w in getattr(it, "_workers", [])], sync)


def cmd_decode(args):
    import torch

    torch.set_num_threads(args.workers)  # the main process only collects; each worker runs with 1 torch thread
    it, window = patch_loader(args)
    shape = None
    for patches, _captions in it:
        shape = list(patches.shape)
        window.batch(patches.shape[0])
    print(json.dumps(window.report("decode", workers=args.workers, batch_shape=shape)))


def _load_safetensors(path):
    """A safetensors file as {name: tensor} without the `safetensors` package (which a GPU kit may lack): 8 bytes of
    little-endian header length, the JSON header, then the raw little-endian tensor data."""
    import struct

    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = bytearray(data[8 + n :])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        dtype = dtypes[t["dtype"]]
        flat = torch.frombuffer(body, dtype=dtype, offset=start, count=(end - start) // dtype.itemsize) if end > start \
            else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(t["shape"]).clone()
    return out


def load_mobilenet(weights):
    import torchvision

    try:
        from safetensors.torch import load_file
    except ImportError:  # the GPU kit carries no safetensors wheel: the format is simple enough to read here
        load_file = _load_safetensors

    model = torchvision.models.mobilenet_v2(weights=None)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    bad = [k for k in missing if not k.endswith("num_batches_tracked")]
    if bad or unexpected:
        sys.exit(f"cam: {weights} does not match torchvision's mobilenet_v2: missing {bad}, unexpected {unexpected}")
    return model.eval()


def cmd_cam(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    x = torch.from_numpy(np.fromfile(args.inputs, dtype="<f4").reshape(-1, 3, 224, 224).copy())
    model = load_mobilenet(args.weights)
    weight = model.classifier[1].weight.detach()  # [1000, 1280]

    def score(xb):
        return cam_scores(model, weight, xb)

    n = x.shape[0]
    b = args.batch
    with torch.inference_mode():
        # Untimed: every distinct input once (warm-up), for the cross-check with juicer.
        top3, saliency = [], []
        for i in range(0, n, b):
            s, idx, p, _maps = score(x[i : i + b])
            top3.extend([[int(c), float(q)] for c, q in zip(ci, pi)] for ci, pi in zip(idx.tolist(), p.tolist()))
            saliency.extend(s.tolist())
        # Timed: whole batches of the inputs cycled, assembled before the clock starts.
        n_batches = max(1, -(-args.images // b))
        batches = [x[torch.arange(k * b, (k + 1) * b) % n].contiguous() for k in range(n_batches)]
        seconds = cpu = 0.0
        for xb in batches:
            t, c = time.perf_counter(), time.process_time()
            out = score(xb)
            seconds += time.perf_counter() - t
            cpu += time.process_time() - c
            del out
    items = n_batches * b
    print(
        json.dumps(
            {
                "side": "python",
                "task": "cam",
                "items": items,
                "batch": b,
                "seconds": seconds,
                "per_s": items / seconds,
                "cpu_seconds": cpu,
                "threads": torch.get_num_threads(),
                "check": {"top3": top3, "saliency": saliency},
            }
        )
    )


def _photo_plan(args, pairs, rng, w, h):
    """The crops `cmd_photos` draws, without decoding a photo: per sample (pair index, scaled size, crop offset),
    drawn from `rng` in sample order, from the image sizes in the file headers."""
    from PIL import Image

    sizes = {}
    plan = []
    for i in range(args.count):
        k = i % len(pairs)
        if k not in sizes:
            with Image.open(os.path.join(args.fixtures, pairs[k]["image"])) as im:
                sizes[k] = im.size
        iw, ih = sizes[k]
        cover = max(w / iw, h / ih)
        scale = cover / rng.uniform(args.scale_min, 1.0)
        sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
        x, y = rng.randint(0, sw - w), rng.randint(0, sh - h)
        plan.append((k, sw, sh, x, y))
    return plan


def _photo_shard(job):
    """Writes one shard of `cmd_photos`'s plan."""
    import io
    import tarfile

    from PIL import Image

    fixtures, path, w, h, items, pairs = job
    with tarfile.open(path + ".partial", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (k, sw, sh, x, y) in items:
            pair = pairs[k]
            im = Image.open(os.path.join(fixtures, pair["image"])).convert("RGB")
            im = im.resize((sw, sh), Image.BILINEAR)
            buf = io.BytesIO()
            im.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("txt", pair["caption"].encode("utf-8"))):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(path + ".partial", path)
    return path


def cmd_photos(args):
    """Writes WebDataset shards of `count` JPEG crops (`size`, quality 90) of the fixture photos, deterministic.

    Each sample is one fixture photo (cycled), scaled so that the crop shows between all of its width or height and
    `scale_min` of it, then cropped at a drawn offset: real photo content at a camera-like size, unlike the synthetic
    shards. The crops are planned in order first (cheap), then the shards are rendered, by `--jobs` processes when
    more than one: the bytes do not depend on the job count.
    """
    import multiprocessing
    import random

    w, h = (int(v) for v in args.size.split("x"))
    with open(os.path.join(args.fixtures, "pairs.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    plan = _photo_plan(args, pairs, rng, w, h)
    per = args.per_shard
    jobs = []
    for s in range(-(-args.count // per)):
        items = [(i, plan[i]) for i in range(s * per, min(args.count, (s + 1) * per))]
        jobs.append((args.fixtures, os.path.join(args.out, f"photos-{s:06d}.tar"), w, h, items, pairs))
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
            shards = pool.map(_photo_shard, jobs, chunksize=1)
    else:
        shards = [_photo_shard(job) for job in jobs]
    print(json.dumps({"shards": shards, "count": args.count, "size": args.size}))


def cmd_graph(args):
    """The Python peer of juicer's whole graph: webdataset + PIL decode and transforms in DataLoader workers, then
    torchvision MobileNetV2 CAM saliency and top-3 classes per batch in the main process (the `cam` maths).

    --device cuda[:N]: the model and the batches on that GPU (pinned batches, non-blocking copies); the workers are
    started before CUDA is, and the clock is read after torch.cuda.synchronize() when the window opens and closes."""
    import torch

    torch.set_num_threads(args.threads)
    model = load_mobilenet(args.weights)
    weight = model.classifier[1].weight.detach()
    if args.device == "cpu":
        it, window = patch_loader(args)
        with torch.inference_mode():
            for patches, _captions in it:
                b = patches.shape[0]
                # patches [B, 196, 768] back to images [B, 3, 224, 224] (the loader hands out patches, as juicer does).
                x = patches.reshape(b, 14, 14, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 224, 224)
                saliency = cam_scores(model, weight, x)[0]
                keep = saliency.topk(saliency.shape[1] // 2, dim=1).indices  # the kept half, as juicer's default ratio
                _kept = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[2]))
                window.batch(b)
        print(json.dumps(window.report("graph", workers=args.workers, threads=torch.get_num_threads())))
        return
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit(f"graph: --device {args.device}: torch has no CUDA device here (torch.cuda.is_available() is False)")
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    it, window = patch_loader(args, pin_memory=True, sync=sync)  # workers forked before CUDA starts in this process
    model = model.to(device)
    weight = weight.to(device)
    with torch.inference_mode():
        for patches, _captions in it:
            b = patches.shape[0]
            patches = patches.to(device, non_blocking=True)
            x = patches.reshape(b, 14, 14, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 224, 224)
            saliency = cam_scores(model, weight, x)[0]
            keep = saliency.topk(saliency.shape[1] // 2, dim=1).indices
            _kept = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[2]))
            window.batch(b)
    window.finish()
    print(json.dumps(window.report("graph", workers=args.workers, threads=torch.get_num_threads(),
                                   device=str(device), gpu=torch.cuda.get_device_name(device))))


def _collate_jpeg_bytes(samples):
    """(jpeg bytes, caption bytes) samples -> one uint8 tensor of the JPEGs back to back, their lengths, the captions:
    a batch crosses from the worker in one shared-memory tensor instead of one per image."""
    import torch

    jpegs = [s[0] for s in samples]
    data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
    return data, [len(j) for j in jpegs], [s[1] for s in samples]


def cmd_graph_nvjpeg(args):
    """The GPU-decode peer of juicer's whole graph: webdataset in DataLoader workers reads the raw JPEG bytes only (no
    decoding there); the main process decodes each batch with nvJPEG (`torchvision.io.decode_jpeg(list of uint8
    tensors, device='cuda')`), resizes (bilinear, antialias) the short side to 224, centre-crops 224, scales to
    [0, 1] and normalises (ImageNet) on the GPU, then runs the graph peer's CAM maths and keeps the top half of the
    patches. The window and CPU time are as `graph`'s (clock read after torch.cuda.synchronize()).

    Without CUDA (a smoke test on a machine without a GPU) it decodes on the CPU with the same call and reports
    "device": "cpu" and a "note" saying there was no nvJPEG."""
    import torch
    import torchvision
    import torchvision.transforms.functional as TF
    import webdataset as wds
    from torch.utils.data import DataLoader
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(args.threads)
    note = None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        note = "torch.cuda is unavailable: decode_jpeg ran on the CPU (no nvJPEG), and so did the model"
        device = torch.device("cpu")
    model = load_mobilenet(args.weights)
    weight = model.classifier[1].weight.detach()
    dataset = wds.WebDataset(args.shards, shardshuffle=False, empty_check=False).to_tuple("jpg;jpeg", "txt")
    use_cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=_collate_jpeg_bytes, pin_memory=False)
    it = iter(loader)  # workers forked before CUDA starts in this process
    sync = (lambda: torch.cuda.synchronize(device)) if use_cuda else None
    window = Window(args.warmup, [w.pid for w in getattr(it, "_workers", [])], sync)
    model = model.to(device)
    weight = weight.to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    size = 224

    def prepare(images):
        """Decoded [3, H, W] uint8 images -> [B, 3, 224, 224] normalised float: torchvision Resize(224, bilinear,
        antialias) + CenterCrop(224) + ToTensor + Normalize, as the `graph` peer's PIL path, on the GPU."""
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) == 1:  # the usual case (the photo crops are all 640x480): one batched resize
            x = TF.resize(torch.stack(images), [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            x = TF.center_crop(x, [size, size])
        else:
            x = torch.stack([
                TF.center_crop(TF.resize(im, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True),
                               [size, size]) for im in images])
        return (x.float() / 255.0 - mean) / std

    with torch.inference_mode():
        for data, lengths, _captions in it:
            b = len(lengths)
            jpegs = list(torch.split(data, lengths))
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
            x = prepare(images)
            saliency = cam_scores(model, weight, x)[0]
            patches = x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * 16 * 16)
            keep = saliency.topk(saliency.shape[1] // 2, dim=1).indices
            _kept = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[2]))
            window.batch(b)
    window.finish()
    extra = {"device": str(device), "decode": "nvjpeg" if use_cuda else "cpu",
             "torchvision": torchvision.__version__}
    if use_cuda:
        extra["gpu"] = torch.cuda.get_device_name(device)
    if note:
        extra["note"] = note
    print(json.dumps(window.report("graph_nvjpeg", workers=args.workers, threads=torch.get_num_threads(), **extra)))


def cmd_tokenize(args):
    import open_clip
    import torch

    torch.set_num_threads(1)
    with open(args.captions, encoding="utf-8") as f:
        unique = [json.loads(line)["caption"] for line in f if line.strip()]
    texts = [unique[i % len(unique)] for i in range(max(1, args.count))]
    # Untimed: the distinct captions once (warms open_clip's BPE word cache), for the cross-check with juicer.
    rows = open_clip.tokenize(unique).tolist()
    t, c = time.perf_counter(), time.process_time()
    out = open_clip.tokenize(texts)
    seconds = time.perf_counter() - t
    cpu = time.process_time() - c
    assert tuple(out.shape) == (len(texts), 77)
    print(
        json.dumps(
            {
                "side": "python",
                "task": "tokenize",
                "items": len(texts),
                "seconds": seconds,
                "per_s": len(texts) / seconds,
                "cpu_seconds": cpu,
                "threads": 1,
                "check": {"rows": rows},
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--shards", nargs="+", required=True)
    d.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--warmup", type=int, default=32)
    c = sub.add_parser("cam")
    c.add_argument("--inputs", required=True)
    c.add_argument("--weights", required=True)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--images", type=int, default=128)
    c.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ph = sub.add_parser("photos")
    ph.add_argument("--fixtures", required=True)
    ph.add_argument("--out", required=True)
    ph.add_argument("--count", type=int, default=500)
    ph.add_argument("--per-shard", type=int, default=100)
    ph.add_argument("--size", default="640x480")
    ph.add_argument("--scale-min", type=float, default=0.7)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--jobs", type=int, default=1, help="processes rendering shards (same bytes as 1)")
    g = sub.add_parser("graph")
    g.add_argument("--shards", nargs="+", required=True)
    g.add_argument("--weights", required=True)
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--warmup", type=int, default=32)
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where the CAM model runs")
    gn = sub.add_parser("graph_nvjpeg")
    gn.add_argument("--shards", nargs="+", required=True)
    gn.add_argument("--weights", required=True)
    gn.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    gn.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    gn.add_argument("--batch-size", type=int, default=64)
    gn.add_argument("--warmup", type=int, default=32)
    gn.add_argument("--device", default="cuda", help="cuda[:N] (default cuda); without CUDA it falls back to the CPU")
    t = sub.add_parser("tokenize")
    t.add_argument("--captions", required=True)
    t.add_argument("--count", type=int, default=20000)
    sub.add_parser("versions")
    args = ap.parse_args()
    {
        "decode": cmd_decode, "cam": cmd_cam, "tokenize": cmd_tokenize, "photos": cmd_photos, "graph": cmd_graph,
        "graph_nvjpeg": cmd_graph_nvjpeg, "versions": cmd_versions,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
