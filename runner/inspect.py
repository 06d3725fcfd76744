"""`caffe-runner inspect [overrides]`: what a run would produce, before running it: the
net's blobs with shapes, the preprocessing, and the bytes per image for the chosen blobs,
pooling and dtype (to size the disk for a run of millions)."""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np
from omegaconf import OmegaConf


def compose_config(overrides: List[str]):
    from .config import compose

    return compose(list(overrides) + ["output.dir=/nonexistent"])


def blob_shapes(spec, end_index: int, weights=None):
    """(per-image shape of every blob up to layer end_index, from Caffe's own shape inference;
    the shape of each layer's first parameter blob, for the FLOP count)."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe

    from .fold import net_from_text
    from .model import set_caffe_cpu_mode, truncated_prototxt

    set_caffe_cpu_mode(caffe)
    net = net_from_text(caffe, truncated_prototxt(spec, end_index))
    return ({name: tuple(b.data.shape[1:]) for name, b in net.blobs.items()},
            {name: tuple(p[0].data.shape) for name, p in net.params.items()})


def _cpu_engine(layers, shapes) -> str:
    """What backend=auto will run on the CPU, from the prototxt alone (each task still checks
    its first batch against Caffe)."""
    from .onnxport import unsupported

    why = unsupported(layers, {name: (1,) + tuple(s) for name, s in shapes.items()})
    if not why:
        return "ONNX Runtime (every layer up to the chosen blobs converts)"
    more = f"; {len(why) - 3} more" if len(why) > 3 else ""
    return f"Caffe ({'; '.join(why[:3])}{more})"


def inspect_model(overrides: List[str]) -> str:
    from .config import preset_model_paths
    from .model import check_fixed_shape, check_model_files, chosen_blobs, input_hw, parse_prototxt
    from .features import pooled_shape

    cfg = compose_config(overrides)
    check_model_files(cfg.model, lambda: preset_model_paths(cfg.model.name))
    spec = parse_prototxt(cfg.model.prototxt)
    chosen = chosen_blobs(cfg)
    for b in chosen:
        spec.producer(b)
    check_fixed_shape(chosen, spec)
    end = spec.end_layer(chosen)
    try:  # every blob of the net when this Caffe knows all its layers
        shapes, weight_shapes = blob_shapes(spec, len(spec.layers) - 1)
        partial = False
    except Exception:
        shapes, weight_shapes = blob_shapes(spec, end)
        partial = True
    h, w = input_hw(cfg.model, spec)
    itemsize = np.dtype(str(cfg.output.dtype)).itemsize
    lines = [f"model {cfg.model.name}", f"  prototxt {cfg.model.prototxt}", f"  weights  {cfg.model.weights}",
             f"  input    {spec.input_name}: 3 x {h} x {w}", "", "blobs (name <- last layer writing it: shape per image):"]
    for name in spec.blobs:
        if name == spec.input_name or name not in shapes:
            continue
        layer = spec.layers[spec.producer(name)]
        mark = "  *" if name in chosen else "   "
        lines.append(f"{mark} {name:<28} <- {layer.name:<24} {' x '.join(map(str, shapes[name]))}")
    if partial:
        lines.append("   (the net was cut after the last chosen blob: later layers are unknown to this Caffe)")
    from .gpu import cudnn_summary

    used = {layer.name for layer in spec.layers[:end + 1]}
    lines += ["", "convolutions: " + cudnn_summary([lp for lp in spec.param.layer if lp.name in used], str(cfg.device))]
    # what a forward to the chosen blobs costs (the net runs every layer up to the last of them)
    from .flops import forward_flops

    flops = forward_flops(spec.layers[:end + 1], shapes, weight_shapes)
    lines.append(f"forward to {', '.join(chosen)}: {sum(flops.values()) / 1e9:.2f} GFLOP per image "
                 f"({len(flops)} convolution and inner-product layers up to {spec.layers[end].name})")
    if cfg.backend == "auto":
        lines.append("engine on the CPU (backend=auto): " + _cpu_engine([lp for lp in spec.param.layer if lp.name in used],
                                                                       shapes))
    pp = OmegaConf.to_container(cfg.model.preprocess)
    lines += ["", "preprocessing: " + json.dumps(pp), "",
              f"output ({cfg.output.dtype}, pooling {cfg.output.pooling}, l2_normalize {cfg.output.l2_normalize}):"]
    total = 0
    for b in chosen:
        shp = pooled_shape(shapes[b], cfg.output.pooling)
        nbytes = int(np.prod(shp)) * itemsize
        total += nbytes
        lines.append(f"  {b:<28} {' x '.join(map(str, shp)):<16} {nbytes:>10,d} bytes per image")
    lines.append(f"  total {total:,d} bytes per image = {total * 1e6 / 1e9:,.1f} GB per million images "
                 "(plus names and index)")
    return "\n".join(lines)
