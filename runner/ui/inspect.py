"""`caffe-runner inspect [overrides]`: what a run would produce, before running it: the input
the net is really fed, the net's blobs with their shapes at that input, the layer writing each,
the GFLOP of a forward to it, its bytes per image and the engine backend=auto would run, the
preprocessing, and the bytes per image for the chosen blobs, pooling and dtype (to size the disk
for a run of millions).

It works on any prototxt: with no blob chosen (a net of your own has no default_blobs) or an
unknown one, it lists every blob to choose from (an unknown blob still exits 2, after the
listing). The shapes come from Caffe's own shape inference, in a child process
(modelcheck.shapes_in_child), at the input size the run uses: a layer that does not take that
input would abort the process."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import numpy as np
from omegaconf import OmegaConf

from ..run.config import compose, is_own_model, own_preprocess_missing, preset_model_paths
from ..errors import ConfigError
from ..engine.features import pooled_shape
from ..engine.flops import forward_flops
from ..engine.gpu import cudnn_summary
from ..engine.model import check_fixed_shape, check_model_files, chosen_blobs, input_hw, parse_prototxt
from ..engine.modelcheck import describe_shape_failure, shapes_in_child
from ..engine.netstate import running_layers
from ..engine.onnxport import unsupported
from ..run.plan import describe_input, size_source


class InspectedBlobError(ConfigError):
    """output.blobs names a blob the net does not have: the listing is printed, then this line."""

    def __init__(self, message: str, listing: str):
        super().__init__(message)
        self.listing = listing


def compose_config(overrides: List[str]):
    """The run's config for these overrides; the preprocessing of a net of your own may be left
    out (inspect shows what is missing instead of refusing)."""
    return compose(list(overrides) + ["output.dir=/nonexistent"], require_preprocess=False)


def _cpu_engine(layers, shapes) -> str:
    """What backend=auto will run on the CPU, from the prototxt alone (each task still checks
    its first batch against Caffe)."""
    why = unsupported(layers, {name: (1,) + tuple(s) for name, s in shapes.items()})
    if not why:
        return "ONNX Runtime (every layer up to the chosen blobs converts)"
    more = f"; {len(why) - 3} more" if len(why) > 3 else ""
    return f"Caffe ({'; '.join(why[:3])}{more})"


def net_shapes(spec, prototxt: str, shape: List[int], chosen: List[str]) -> Tuple[Dict, Dict, int, str]:
    """(per-image blob shapes, first-parameter shapes, index of the last layer they cover, why
    the net was cut there or "") at input `shape`: the whole net when Caffe takes it, else the net
    cut after the chosen blobs, else (no blob chosen) the longest head of the net that does.
    Raises ConfigError (the run's own refusal) when the chosen blobs do not take that input."""
    last = len(spec.layers) - 1
    got, said = shapes_in_child(prototxt, shape, last)
    if got is not None:
        return got["blobs"], got["params"], last, ""
    if chosen:
        end = spec.end_layer(chosen)
        got, said_cut = shapes_in_child(prototxt, shape, end)
        if got is None:
            own = spec.input_shape
            raise ConfigError(describe_shape_failure(
                prototxt, {"shape": shape, "blobs": chosen,
                           "net_hw": [int(own[2]), int(own[3])] if own and len(own) == 4 else None}, said_cut, 1))
        return got["blobs"], got["params"], end, said
    lo, hi, best = 0, last - 1, None  # the longest head that Caffe takes (bisection: one child each)
    while lo <= hi:
        mid = (lo + hi) // 2
        got, _ = shapes_in_child(prototxt, shape, mid)
        if got is not None:
            best, lo = (got, mid), mid + 1
        else:
            hi = mid - 1
    if best is None:
        return {}, {}, -1, said
    return best[0]["blobs"], best[0]["params"], best[1], said


def _blob_table(spec, shapes, weight_shapes, upto: int, chosen: List[str], cfg, itemsize: int) -> List[str]:
    """One line per blob: name, the layer that writes it, its shape per image, the GFLOP of a
    forward to it, its bytes per image (output.pooling, output.dtype) and backend=auto's engine."""
    layers = spec.layers[:upto + 1]
    flops = forward_flops(layers, {k: tuple(v) for k, v in shapes.items()},
                          {k: tuple(v) for k, v in weight_shapes.items()})
    params = {lp.name: lp for lp in spec.param.layer}
    batched = {name: (1,) + tuple(s) for name, s in shapes.items()}
    auto = str(cfg.backend) == "auto"
    verdict: Dict[int, str] = {}
    listed = [n for n in spec.blobs if n != spec.input_name and n in shapes and spec.producer(n) <= upto]
    bw = max([28] + [len(n) for n in listed])
    lw = max([24] + [len(spec.layers[spec.producer(n)].name) for n in listed])
    lines = [f"    {'blob':<{bw}} {'<- layer writing it':<{lw + 3}} {'shape per image':<16} {'GFLOP':>7} "
             f"{'bytes/image':>12}" + ("  engine (backend=auto, CPU)" if auto else "")]
    for name in listed:
        i = spec.producer(name)
        gflop = sum(f for n, f in flops.items() if n in {layer.name for layer in spec.layers[:i + 1]}) / 1e9
        nbytes = int(np.prod(pooled_shape(tuple(shapes[name]), cfg.output.pooling))) * itemsize
        engine = ""
        if auto:
            if i not in verdict:
                used = {layer.name for layer in spec.layers[:i + 1]}
                why = unsupported([params[n] for n in params if n in used], batched)
                verdict[i] = "onnxruntime" if not why else f"caffe ({why[0].split(':')[0]})"
            engine = "  " + verdict[i]
        mark = "  *" if name in chosen else "   "
        lines.append(f"{mark} {name:<{bw}} <- {spec.layers[i].name:<{lw}} {' x '.join(map(str, shapes[name])):<16} "
                     f"{gflop:>7.2f} {nbytes:>12,d}{engine}")
    return lines


def inspect_model(overrides: List[str]) -> str:
    cfg = compose_config(overrides)
    check_model_files(cfg.model, lambda: preset_model_paths(cfg.model.name))
    spec = parse_prototxt(cfg.model.prototxt)
    problem: Optional[str] = None
    try:
        chosen = chosen_blobs(cfg)
        for b in chosen:
            spec.producer(b)
        check_fixed_shape(chosen, spec)
    except ConfigError as e:
        chosen, problem = [], str(e)
    h, w = input_hw(cfg.model, spec)
    channels = int(spec.input_shape[1]) if spec.input_shape and len(spec.input_shape) == 4 else 3
    shapes, weight_shapes, upto, cut = net_shapes(spec, str(cfg.model.prototxt), [1, channels, h, w], chosen)
    itemsize = np.dtype(str(cfg.output.dtype)).itemsize
    pp = cfg.model.preprocess
    missing = own_preprocess_missing(overrides) if is_own_model(cfg, overrides) else []
    if missing:
        fed = (f"input {channels}x{h}x{w} ({size_source(cfg.model)}); preprocessing: not given, a run refuses "
               f"until it is: {', '.join('model.preprocess.' + k for k in missing)}")
    else:
        fed = describe_input(pp, (h, w), channels, size_source(cfg.model))
    lines = [f"model {cfg.model.name}", f"  prototxt {cfg.model.prototxt}", f"  weights  {cfg.model.weights}",
             f"  {spec.input_name}: {fed}", "",
             f"blobs at {channels}x{h}x{w} (* chosen; GFLOP: a forward to the blob, per image; bytes: stored per "
             f"image, {cfg.output.dtype}, pooling {cfg.output.pooling}):"]
    lines += _blob_table(spec, shapes, weight_shapes, upto, chosen, cfg, itemsize)
    if cut:
        after = spec.layers[upto + 1].name if upto + 1 < len(spec.layers) else "the end"
        lines.append(f"   (listed up to layer {spec.layers[upto].name if upto >= 0 else 'none'}: from {after} on "
                     f"Caffe does not build the net at {channels}x{h}x{w}: {cut})")
    if not chosen:
        listing = "\n".join(lines)
        if problem and "no blobs to extract" not in problem:
            raise InspectedBlobError(problem, listing)
        return (f"{listing}\n\nno blob chosen (model {cfg.model.name} has no default_blobs): name the ones to "
                "extract with output.blobs=[name,...]")
    end = spec.end_layer(chosen)
    used = {layer.name for layer in spec.layers[:end + 1]}
    # the layers that run (Caffe's include/exclude rules): a TRAIN twin of the same name does not
    ran = [lp for lp in running_layers(spec.param) if lp.name in used]
    lines += ["", "convolutions: " + cudnn_summary(ran, str(cfg.device))]
    # what a forward to the chosen blobs costs (the net runs every layer up to the last of them)
    flops = forward_flops(spec.layers[:end + 1], {k: tuple(v) for k, v in shapes.items()},
                          {k: tuple(v) for k, v in weight_shapes.items()})
    lines.append(f"forward to {', '.join(chosen)}: {sum(flops.values()) / 1e9:.2f} GFLOP per image "
                 f"({len(flops)} convolution and inner-product layers up to {spec.layers[end].name})")
    if cfg.backend == "auto":
        lines.append("engine on the CPU (backend=auto): " + _cpu_engine(ran, shapes))
    said = (f"not given: a run refuses until {', '.join('model.preprocess.' + k for k in missing)} are" if missing
            else json.dumps(OmegaConf.to_container(pp)))
    lines += ["", "preprocessing: " + said, "",
              f"output ({cfg.output.dtype}, pooling {cfg.output.pooling}, l2_normalize {cfg.output.l2_normalize}):"]
    total = 0
    for b in chosen:
        shp = pooled_shape(tuple(shapes[b]), cfg.output.pooling)
        nbytes = int(np.prod(shp)) * itemsize
        total += nbytes
        lines.append(f"  {b:<28} {' x '.join(map(str, shp)):<16} {nbytes:>10,d} bytes per image")
    lines.append(f"  total {total:,d} bytes per image = {total * 1e6 / 1e9:,.1f} GB per million images "
                 "(plus names and index)")
    return "\n".join(lines)
