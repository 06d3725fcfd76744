"""Where the GPU self-check's tolerances come from (runner/engine/selfcheck.py), measured without a GPU.

On the sample photos, with the self-check's metric (max |a - b| / max |b| per blob):
1. fp32_vs_independent_fp32: Caffe on the CPU against OpenCV DNN, a second FP32 implementation
   of the same prototxt and weights (other summation orders, Winograd for 3x3 convolutions):
   what FP32 GPU vs CPU may differ by.
2. tf32_emulated: Caffe on the CPU with every Convolution's and InnerProduct's input and
   weights rounded to TF32 (10-bit mantissa, round to nearest; products accumulated in FP32,
   as the tensor cores do) against plain FP32: what model.tf32=true changes.

    python bench/selfcheck_evidence.py [--out bench/selfcheck_evidence.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GLOG_minloglevel", "2")

from runner.engine.selfcheck import compare  # noqa: E402

MODELS = {  # name: blobs, input H W, mean (BGR)
    "res10_ssd": (["fc7"], (300, 300), (104.0, 177.0, 123.0)),
    "open_nsfw": (["pool"], (224, 224), (104.0, 117.0, 123.0)),
}


def tf32(a: np.ndarray) -> np.ndarray:
    """Round float32 to TF32 (8-bit exponent, 10-bit mantissa), to nearest."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def images(folder: Path, hw):
    import cv2

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = []
    for p in files:
        im = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if im is not None:
            out.append(cv2.resize(im, (hw[1], hw[0])).astype(np.float32))
    return np.stack(out)


def caffe_forward(net, x, blobs, emulate_tf32: bool):
    net.blobs[net.inputs[0]].reshape(*x.shape)
    net.reshape()
    net.blobs[net.inputs[0]].data[...] = x
    if not emulate_tf32:
        net.forward()
        return {b: net.blobs[b].data.copy() for b in blobs}
    names = list(net._layer_names)
    saved = {}
    for i, layer in enumerate(net.layers):
        name = names[i]
        if layer.type in ("Convolution", "InnerProduct"):
            bottoms = net.bottom_names[name]
            keep = {b: net.blobs[b].data.copy() for b in bottoms}
            for b in bottoms:
                net.blobs[b].data[...] = tf32(net.blobs[b].data)
            saved[name] = [p.data.copy() for p in layer.blobs]
            layer.blobs[0].data[...] = tf32(layer.blobs[0].data)  # weights; the bias is added in FP32
            net.forward(start=name, end=name)
            for b, v in keep.items():  # the other readers of the bottom see it unrounded
                if b not in net.top_names[name]:
                    net.blobs[b].data[...] = v
            for p, v in zip(layer.blobs, saved[name]):
                p.data[...] = v
        else:
            net.forward(start=name, end=name)
    return {b: net.blobs[b].data.copy() for b in blobs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/selfcheck_evidence.json")
    ap.add_argument("--photos", default=None, help="a folder of photos (default: the bundled samples)")
    a = ap.parse_args()
    import caffe
    import cv2

    from runner.run.config import compose
    from runner.engine.model import parse_prototxt, truncated_prototxt

    photos = Path(a.photos) if a.photos else None
    if photos is None:
        import tempfile

        from runner.ui.samples import write_samples

        photos = Path(tempfile.mkdtemp(prefix="selfcheck-evidence-"))
        write_samples(photos)
    caffe.set_mode_cpu()
    results = {}
    for name, (blobs, hw, mean) in MODELS.items():
        cfg = compose([f"model={name}"], require_output=False)
        x = images(photos, hw) - np.array(mean, np.float32)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        spec = parse_prototxt(cfg.model.prototxt)
        text = truncated_prototxt(spec, spec.end_layer(blobs))
        proto = Path(photos) / f"{name}.prototxt"
        proto.write_text(text)
        net = caffe.Net(str(proto), caffe.TEST, weights=cfg.model.weights)
        fp32 = caffe_forward(net, x, blobs, emulate_tf32=False)
        t32 = caffe_forward(net, x, blobs, emulate_tf32=True)
        cv = cv2.dnn.readNetFromCaffe(str(proto), cfg.model.weights)
        cv.setInput(x)
        layer_of = {b: spec.layers[spec.producer(b)].name for b in blobs}
        ocv = dict(zip(blobs, cv.forward([layer_of[b] for b in blobs])))
        results[name] = {"images": int(len(x)), "blobs": blobs,
                         "fp32_vs_independent_fp32": compare(ocv, fp32),
                         "tf32_emulated": compare(t32, fp32)}
        print(name, json.dumps(results[name]), flush=True)
    Path(a.out).write_text(json.dumps({"metric": "max |a - b| / max |b| per blob", "models": results}, indent=1))
    print("written", a.out)


if __name__ == "__main__":
    main()
