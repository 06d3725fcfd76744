"""A Caffe net as an ONNX graph, for ONNX Runtime's CPU kernels (backend=auto, onnxruntime).

Why: Caffe's CPU forward runs im2col plus one GEMM per image and a memory pass per layer; ONNX
Runtime's MLAS kernels (NCHWc convolutions with bias, BatchNorm and ReLU fused in) reach about
one core's SGEMM rate on the same nets (bench row 12). The graph is built from the prototxt's
layer parameters and the weights Caffe itself loaded, so Caffe's own file parsing, upgrading
and weight checks stay the ones that decide what the model is.

Exact by construction: one registry (REGISTRY) holds, per layer type, the parameter message it
reads, every field of that message it maps, the fields that cannot change a TEST forward (listed
by name: fillers, engines, training-only values), a check of the mapped values and the
conversion. A field set in the prototxt that is neither mapped nor listed harmless (this Caffe
fork's own fields, any field a newer caffe.proto adds) makes the layer refuse by name, and so
does a field of the LayerParameter itself that is not known; any other layer type is named by
`unsupported()` too, and the net runs on Caffe (backend=auto). Layers run or not by Caffe's
include/exclude rules (runner/engine/netstate.py). Blob names stay Caffe's: an in-place layer (ReLU
top == bottom) writes a new version `name__k`, and a requested blob is read at its last
version, which is what `net.blobs[name]` holds after Caffe's forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .netstate import NetState, layer_runs

OPSET = 17
Shape = Tuple[int, ...]


def _pair(values: Sequence[int], h: int, w: int, default: int) -> List[int]:
    """Caffe's repeated spatial field (1 or 2 values) or its _h/_w pair."""
    values = list(values)
    if len(values) == 1:
        return values * 2
    if len(values) == 2:
        return values
    return [h or default, w or default] if (h or w) else [default, default]


def conv_geometry(cp) -> Dict[str, List[int]]:
    kernel = _pair(cp.kernel_size, cp.kernel_h, cp.kernel_w, 1)
    pad = _pair(cp.pad, cp.pad_h, cp.pad_w, 0)
    stride = _pair(cp.stride, cp.stride_h, cp.stride_w, 1)
    dilation = _pair(cp.dilation, 0, 0, 1)
    return dict(kernel=kernel, pad=pad, stride=stride, dilation=dilation)


def pool_geometry(pp) -> Dict[str, List[int]]:
    """Caffe's PoolingLayer::LayerSetUp: kernel_size or kernel_h/_w; pad_h/_w when pad_h is
    given, else pad; stride_h/_w when stride_h is given, else stride."""
    kernel = [pp.kernel_size] * 2 if pp.HasField("kernel_size") else [pp.kernel_h, pp.kernel_w]
    pad = [pp.pad_h, pp.pad_w] if pp.HasField("pad_h") else [pp.pad] * 2
    stride = [pp.stride_h, pp.stride_w] if pp.HasField("stride_h") else [pp.stride] * 2
    return dict(kernel=kernel, pad=pad, stride=stride)


def caffe_pooled(sizes: Sequence[int], kernel: Sequence[int], pad: Sequence[int], stride: Sequence[int],
                 ceil_mode: bool = True) -> List[int]:
    """Caffe's pooled sizes (pooling_layer.cpp, Reshape): rounded up (this fork: down with
    ceil_mode: false), then, when ANY axis is padded, on every axis less a last window that
    would start in the padding."""
    rnd = math.ceil if ceil_mode else math.floor
    out = [int(rnd((n + 2 * p - k) / s)) + 1 for n, k, p, s in zip(sizes, kernel, pad, stride)]
    if any(pad):
        out = [o - 1 if (o - 1) * s >= n + p else o for o, n, p, s in zip(out, sizes, pad, stride)]
    return out


def caffe_pool_out(size: int, kernel: int, pad: int, stride: int) -> int:
    """One axis of caffe_pooled, both axes padded alike."""
    return caffe_pooled([size], [kernel], [pad], [stride])[0]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---- the graph being built -------------------------------------------------------------------

class _Graph:
    """Nodes and initializers of the ONNX graph; a Caffe blob's current version (an in-place
    layer writes `name__k`)."""

    def __init__(self, input_name: str):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: List = []
        self.inits: List = []
        self.version: Dict[str, str] = {input_name: input_name}
        self.writes: Dict[str, int] = {input_name: 0}

    def cur(self, b: str) -> str:
        return self.version[b]

    def new(self, b: str) -> str:
        k = self.writes.get(b)
        self.writes[b] = 0 if k is None else k + 1
        self.version[b] = b if k is None else f"{b}__{k + 1}"
        return self.version[b]

    def const(self, name: str, arr, dtype=np.float32) -> str:
        self.inits.append(self.numpy_helper.from_array(np.ascontiguousarray(arr, dtype=dtype), name))
        return name

    def node(self, op: str, ins: List[str], outs: List[str], name: str, **attrs) -> None:
        self.nodes.append(self.helper.make_node(op, ins, outs, name=name, **attrs))


def _per_channel(arr: np.ndarray, rank: int) -> np.ndarray:
    return np.asarray(arr, np.float32).reshape((1, -1) + (1,) * (rank - 2))


# ---- per layer type: check (a reason when its values do not map, else "") and convert --------
# check(lp, shapes) -> str; convert(g, lp, ins, w, shapes) -> None. shapes: blob -> Caffe's shape
# (with the batch axis), as the net Caffe loaded and reshaped has it.

def _bottom(lp, shapes) -> Optional[Tuple[int, ...]]:
    return tuple(shapes[lp.bottom[0]]) if lp.bottom and lp.bottom[0] in shapes else None


def _ok(lp, shapes) -> str:
    return ""


def _identity(g, lp, ins, w, shapes):
    for top in lp.top:
        g.node("Identity", ins[:1], [g.new(top)], lp.name if len(lp.top) == 1 else f"{lp.name}/{top}")


def _nothing(g, lp, ins, w, shapes):
    pass


def _check_conv(lp, shapes):
    cp = lp.convolution_param
    b = _bottom(lp, shapes)
    if cp.axis != 1 or b is None or len(b) != 4 or len(cp.kernel_size) > 2 or len(cp.pad) > 2 \
            or len(cp.stride) > 2 or len(cp.dilation) > 2:
        return "only 2-D convolutions over axis 1 are converted"
    if cp.width_group != 1 or cp.height_group != 1:  # this Caffe's own fields
        return "a convolution with width_group or height_group"
    return ""


def _conv(g, lp, ins, w, shapes):
    cp, geo, name = lp.convolution_param, conv_geometry(lp.convolution_param), lp.name
    args = ins + [g.const(f"{name}/W", w[0])] + ([g.const(f"{name}/b", w[1])] if cp.bias_term else [])
    g.node("Conv", args, [g.new(lp.top[0])], name, kernel_shape=geo["kernel"], pads=geo["pad"] * 2,
           strides=geo["stride"], dilations=geo["dilation"], group=int(cp.group))


def _check_ip(lp, shapes):
    b = _bottom(lp, shapes)
    if b is None:
        return "an InnerProduct whose input shape is unknown"
    if _axis(lp.inner_product_param.axis, len(b)) < 1:
        return "an InnerProduct over the batch axis"
    return ""


def _ip(g, lp, ins, w, shapes):
    ip, name = lp.inner_product_param, lp.name
    b = _bottom(lp, shapes)
    axis = _axis(ip.axis, len(b))
    weight = w[0] if not ip.transpose else w[0].T  # num_output x K
    out = g.new(lp.top[0])
    if axis == 1:
        flat = f"{name}/flat"
        g.node("Flatten", ins, [flat], f"{name}/flatten", axis=1)
        args = [flat, g.const(f"{name}/W", weight)] + ([g.const(f"{name}/b", w[1])] if ip.bias_term else [])
        g.node("Gemm", args, [out], name, transB=1)
        return
    # the leading axes stay (Caffe's M = product of the axes before `axis`), the rest is K
    k = int(np.prod(b[axis:]))
    g.node("Reshape", [ins[0], g.const(f"{name}/shape", [0] + list(b[1:axis]) + [k], np.int64)], [f"{name}/flat"],
           f"{name}/reshape")
    mm = f"{name}/mm" if ip.bias_term else out
    g.node("MatMul", [f"{name}/flat", g.const(f"{name}/Wt", np.asarray(weight).T)], [mm], f"{name}/matmul")
    if ip.bias_term:
        g.node("Add", [mm, g.const(f"{name}/b", np.asarray(w[1]).ravel())], [out], name)


def _check_bn(lp, shapes):
    bp = lp.batch_norm_param  # in TEST, Caffe uses the stored statistics unless told otherwise
    if bp.HasField("use_global_stats") and not bp.use_global_stats:
        return "a BatchNorm with use_global_stats: false"
    b = _bottom(lp, shapes)
    return "" if b is not None and len(b) >= 2 else "a BatchNorm of a blob without channels"


def _bn(g, lp, ins, w, shapes):
    # Caffe keeps mean and variance times a moving-average factor (third blob)
    name = lp.name
    s = float(np.asarray(w[2]).ravel()[0])
    f = 0.0 if s == 0 else 1.0 / s
    c = np.asarray(w[0]).size
    g.node("BatchNormalization", ins + [g.const(f"{name}/one", np.ones(c)), g.const(f"{name}/zero", np.zeros(c)),
                                        g.const(f"{name}/mean", np.asarray(w[0]).ravel() * f),
                                        g.const(f"{name}/var", np.asarray(w[1]).ravel() * f)],
           [g.new(lp.top[0])], name, epsilon=float(lp.batch_norm_param.eps))


def _check_scale(lp, shapes):
    sp = lp.scale_param
    if len(lp.bottom) != 1:
        return "a Scale with its factor as a second bottom"
    if sp.axis != 1 or sp.num_axes != 1:
        return "a Scale over axes other than channels"
    return ""


def _scale(g, lp, ins, w, shapes):
    name = lp.name
    rank = len(shapes[lp.bottom[0]])
    out = g.new(lp.top[0])
    if len(w) > 1:
        g.node("Mul", [ins[0], g.const(f"{name}/gamma", _per_channel(w[0], rank))], [f"{name}/mul"], f"{name}/mul")
        g.node("Add", [f"{name}/mul", g.const(f"{name}/beta", _per_channel(w[1], rank))], [out], name)
    else:
        g.node("Mul", [ins[0], g.const(f"{name}/gamma", _per_channel(w[0], rank))], [out], name)


def _relu(g, lp, ins, w, shapes):
    slope = float(lp.relu_param.negative_slope)
    if slope:
        g.node("LeakyRelu", ins, [g.new(lp.top[0])], lp.name, alpha=slope)
    else:
        g.node("Relu", ins, [g.new(lp.top[0])], lp.name)


def _unary(op: str):
    def convert(g, lp, ins, w, shapes):
        g.node(op, ins, [g.new(lp.top[0])], lp.name)
    return convert


def _check_pool(lp, shapes):
    pp = lp.pooling_param
    if pp.pool not in (0, 1):
        return "stochastic pooling"
    b = _bottom(lp, shapes)
    if b is None or len(b) != 4:
        return "pooling of a blob that is not N x C x H x W"
    if pp.global_pooling:
        return ""
    geo = pool_geometry(pp)
    if any(p >= k for p, k in zip(geo["pad"], geo["kernel"])):
        return "pooling with pad >= kernel"
    out = caffe_pooled(b[2:], geo["kernel"], geo["pad"], geo["stride"], bool(pp.ceil_mode))
    if any((o - 1) * s - p >= n for o, s, p, n in zip(out, geo["stride"], geo["pad"], b[2:])):
        # an unpadded pooling with stride > kernel, rounded up: Caffe pools an empty window
        # (-FLT_MAX, or 0 / 0)
        return "pooling whose last window lies wholly outside the input"
    return ""


def _pool(g, lp, ins, w, shapes):
    """Caffe's output size by construction: ONNX's floor rounding (ceil_mode=0) with the end
    padding each axis needs for exactly Caffe's number of windows, then sliced if more. Average
    pooling divides, in Caffe, by the window clipped to the padded input (padding counted):
    ONNX's count_include_pad=1 is that while no window passes the padded input's end; else
    the input is zero-padded explicitly and the average counts what lies inside that
    (count_include_pad=0), which is Caffe's divisor."""
    pp, name = lp.pooling_param, lp.name
    out = g.new(lp.top[0])
    if pp.global_pooling:
        g.node("GlobalMaxPool" if pp.pool == 0 else "GlobalAveragePool", ins, [out], name)
        return
    b = _bottom(lp, shapes)
    geo = pool_geometry(pp)
    sizes, k, p, s = list(b[2:]), geo["kernel"], geo["pad"], geo["stride"]
    want = caffe_pooled(sizes, k, p, s, bool(pp.ceil_mode))
    need = [(o - 1) * st + kk - n - pd for o, st, kk, n, pd in zip(want, s, k, sizes, p)]  # end pad Caffe uses
    src, begin = ins[0], list(p)
    if pp.pool == 1 and any(p) and any(nd > pd for nd, pd in zip(need, p)):
        # a window passes the padded input's end: pad explicitly, count what is inside
        src = f"{name}/padded"
        g.node("Pad", [ins[0], g.const(f"{name}/pads", [0, 0] + list(p) + [0, 0] + list(p), np.int64)], [src],
               f"{name}/pad", mode="constant")
        sizes = [n + 2 * pd for n, pd in zip(sizes, p)]
        need = [nd - pd for nd, pd in zip(need, p)]
        begin, cip = [0, 0], 0
    else:
        cip = int(any(p)) if pp.pool == 1 else None
    end = [max(0, nd) for nd in need]
    got = [(n + bg + e - kk) // st + 1 for n, bg, e, kk, st in zip(sizes, begin, end, k, s)]
    kw = dict(kernel_shape=k, strides=s, pads=begin + end, ceil_mode=0)
    if pp.pool == 1:
        kw["count_include_pad"] = cip
    pooled = out if got == want else f"{name}/pooled"
    g.node("MaxPool" if pp.pool == 0 else "AveragePool", [src], [pooled], name, **kw)
    if got != want:  # a floor-rounded window more than Caffe keeps
        g.node("Slice", [pooled, g.const(f"{name}/starts", [0, 0], np.int64), g.const(f"{name}/ends", want, np.int64),
                         g.const(f"{name}/axes", [2, 3], np.int64)], [out], f"{name}/slice")


def _check_lrn(lp, shapes):
    b = _bottom(lp, shapes)
    if lp.lrn_param.norm_region != 0:
        return "LRN within channels"
    return "" if b is not None and len(b) == 4 else "LRN of a blob that is not N x C x H x W"


def _lrn(g, lp, ins, w, shapes):
    lr = lp.lrn_param  # Caffe: x / (k + alpha / n * sum x^2) ^ beta, ONNX: the same
    g.node("LRN", ins, [g.new(lp.top[0])], lp.name, size=int(lr.local_size), alpha=float(lr.alpha),
           beta=float(lr.beta), bias=float(lr.k))


def _check_eltwise(lp, shapes):
    ep = lp.eltwise_param
    if ep.operation != 1 and len(ep.coeff):
        return "Eltwise coefficients on an operation other than SUM"
    if len(ep.coeff) not in (0, len(lp.bottom)):
        return "Eltwise with a coefficient count other than its bottoms'"
    return ""


def _eltwise(g, lp, ins, w, shapes):
    ep, name = lp.eltwise_param, lp.name
    if ep.operation == 1:  # SUM, with Caffe's coefficients
        coeff = list(ep.coeff) or [1.0] * len(ins)
        terms = []
        for i, (b, c) in enumerate(zip(ins, coeff)):
            if c == 1.0:
                terms.append(b)
            else:
                g.node("Mul", [b, g.const(f"{name}/c{i}", np.float32(c))], [f"{name}/t{i}"], f"{name}/t{i}")
                terms.append(f"{name}/t{i}")
        g.node("Sum", terms, [g.new(lp.top[0])], name)
    elif ep.operation == 2:  # MAX
        g.node("Max", ins, [g.new(lp.top[0])], name)
    else:  # PROD: ONNX's Mul takes two
        acc = ins[0]
        for i, b in enumerate(ins[1:-1]):
            g.node("Mul", [acc, b], [f"{name}/p{i}"], f"{name}/p{i}")
            acc = f"{name}/p{i}"
        g.node("Mul", [acc, ins[-1]], [g.new(lp.top[0])], name)


def _concat_axis(lp, rank: int) -> int:
    cp = lp.concat_param
    return _axis(int(cp.concat_dim) if cp.HasField("concat_dim") else int(cp.axis), rank)


def _check_concat(lp, shapes):
    b = _bottom(lp, shapes)
    if b is None:
        return "a Concat whose input shape is unknown"
    return "" if _concat_axis(lp, len(b)) >= 1 else "a Concat over the batch axis"


def _concat(g, lp, ins, w, shapes):
    g.node("Concat", ins, [g.new(lp.top[0])], lp.name, axis=_concat_axis(lp, len(_bottom(lp, shapes))))


def _check_softmax(lp, shapes):
    b = _bottom(lp, shapes)
    if b is None:
        return "a Softmax whose input shape is unknown"
    return "" if _axis(lp.softmax_param.axis, len(b)) >= 1 else "a Softmax over the batch axis"


def _softmax(g, lp, ins, w, shapes):
    # opset >= 13: over the one axis, as Caffe's
    g.node("Softmax", ins, [g.new(lp.top[0])], lp.name, axis=_axis(lp.softmax_param.axis, len(_bottom(lp, shapes))))


def flatten_shape(bottom: Sequence[int], axis: int, end_axis: int) -> Optional[List[int]]:
    """Caffe's Flatten: the axes before `axis` kept, axis..end_axis collapsed into one, the rest
    kept; None when it collapses the batch axis (or the axes are out of range)."""
    rank = len(bottom)
    a, e = _axis(axis, rank), _axis(end_axis, rank)
    if not 1 <= a <= e < rank:
        return None
    return list(bottom[:a]) + [int(np.prod(bottom[a:e + 1]))] + list(bottom[e + 1:])


def _check_flatten(lp, shapes):
    b = _bottom(lp, shapes)
    if b is None:
        return "a Flatten whose input shape is unknown"
    fp = lp.flatten_param
    shape = flatten_shape(b, fp.axis, fp.end_axis)
    if shape is None:
        return f"a Flatten over the batch axis (axis {fp.axis}, end_axis {fp.end_axis})"
    top = shapes.get(lp.top[0])
    if top is not None and tuple(top[1:]) != tuple(shape[1:]):
        return f"a Flatten whose shape {shape[1:]} is not Caffe's {list(top[1:])}"
    return ""


def _flatten(g, lp, ins, w, shapes):
    fp = lp.flatten_param
    shape = flatten_shape(_bottom(lp, shapes), fp.axis, fp.end_axis)
    g.node("Reshape", [ins[0], g.const(f"{lp.name}/shape", [0] + shape[1:], np.int64)], [g.new(lp.top[0])], lp.name)


@dataclass(frozen=True)
class LayerKind:
    """How one Caffe layer type converts: `param` is the LayerParameter field of its parameter
    message ("" for none); every field of that message set in a prototxt must be in `mapped`
    (the conversion reads it; `check` judges its value) or `harmless` (it cannot change a TEST
    forward); any other makes the layer refuse by name."""
    param: str
    mapped: FrozenSet[str]
    harmless: FrozenSet[str]
    check: Callable
    convert: Callable


def _kind(param: str, mapped: str, harmless: str, check: Callable, convert: Callable) -> LayerKind:
    return LayerKind(param, frozenset(mapped.split()), frozenset(harmless.split()), check, convert)


# fillers: initial values of training (the weights come from the caffemodel); engine: which
# implementation (CAFFE/CUDNN) computes the same function; moving_average_fraction, dropout_ratio,
# stable_prod_grad: training only; force_nd_im2col: the same convolution by another loop;
# BatchNorm's use_alpha_beta, do_all_reduce, weight_filler, bias_filler: read by this fork's
# BatchNormKyle layer only, never by BatchNorm (batch_norm_layer.cpp reads use_global_stats,
# moving_average_fraction and eps); InputParameter's shape: the net is reshaped to the run's input
REGISTRY: Dict[str, LayerKind] = {
    "Input": _kind("input_param", "", "shape", _ok, _nothing),
    "Dropout": _kind("dropout_param", "", "dropout_ratio", _ok, _identity),  # TEST: the identity (a copy)
    "Split": _kind("", "", "", _ok, _identity),
    "ReLU": _kind("relu_param", "negative_slope", "engine", _ok, _relu),
    "Sigmoid": _kind("sigmoid_param", "", "engine", _ok, _unary("Sigmoid")),
    "TanH": _kind("tanh_param", "", "engine", _ok, _unary("Tanh")),
    "Convolution": _kind("convolution_param",
                         "num_output bias_term pad pad_h pad_w kernel_size kernel_h kernel_w dilation stride stride_h "
                         "stride_w group width_group height_group axis",
                         "weight_filler bias_filler engine force_nd_im2col", _check_conv, _conv),
    "InnerProduct": _kind("inner_product_param", "num_output bias_term axis transpose", "weight_filler bias_filler",
                          _check_ip, _ip),
    "BatchNorm": _kind("batch_norm_param", "use_global_stats eps",
                       "moving_average_fraction use_alpha_beta do_all_reduce weight_filler bias_filler", _check_bn, _bn),
    "Scale": _kind("scale_param", "axis num_axes bias_term", "filler bias_filler", _check_scale, _scale),
    "Pooling": _kind("pooling_param",
                     "pool pad pad_h pad_w kernel_size kernel_h kernel_w stride stride_h stride_w global_pooling "
                     "ceil_mode", "engine", _check_pool, _pool),
    "LRN": _kind("lrn_param", "local_size alpha beta norm_region k", "engine", _check_lrn, _lrn),
    "Eltwise": _kind("eltwise_param", "operation coeff", "stable_prod_grad", _check_eltwise, _eltwise),
    "Concat": _kind("concat_param", "axis concat_dim", "", _check_concat, _concat),
    "Softmax": _kind("softmax_param", "axis", "engine", _check_softmax, _softmax),
    "Flatten": _kind("flatten_param", "axis end_axis", "", _check_flatten, _flatten),
}

# the LayerParameter's own fields: name, type, bottom and top are the graph; these cannot change
# a TEST forward (loss weights and gradient switches act in backward, `param` holds learning
# rates and sharing names of the weights Caffe loaded, `blobs` the stored weights Caffe read,
# include/exclude decided whether the layer runs: runner/engine/netstate.py); a parameter message of
# another layer type (`..._param`) is never read by this one. Any other field refuses the layer.
LAYER_MAPPED = frozenset("name type bottom top".split())
LAYER_HARMLESS = frozenset("phase loss_weight param blobs propagate_down include exclude".split())


def _why_not(lp, shapes: Mapping[str, Shape]) -> str:
    kind = REGISTRY.get(lp.type)
    if kind is None:
        return f"no {lp.type} layer in the converter"
    for fd, _ in lp.ListFields():
        if fd.name in LAYER_MAPPED or fd.name in LAYER_HARMLESS or fd.name == kind.param:
            continue
        if fd.name.endswith("_param"):
            continue
        return f"its field {fd.name} is not converted"
    if kind.param:
        for fd, _ in getattr(lp, kind.param).ListFields():
            if fd.name not in kind.mapped and fd.name not in kind.harmless:
                return f"{kind.param}.{fd.name} is not converted"
    return kind.check(lp, shapes)


def unsupported(layers: Sequence, shapes: Mapping[str, Shape], state: Optional[NetState] = None) -> List[str]:
    """'layer (Type): why' for each layer of `layers` (caffe_pb2 LayerParameter, in order) that
    does not map exactly onto ONNX; [] when the whole net converts. shapes: blob -> shape as
    Caffe made it (with the batch axis). Layers that do not run in TEST (`state`, default the
    TEST state with no stages) are skipped."""
    state = state or NetState(1, 0, ())
    out = []
    for lp in layers:
        if not layer_runs(lp, state):
            continue
        why = _why_not(lp, shapes)
        if why:
            out.append(f"{lp.name} ({lp.type}): {why}")
    return out


def to_onnx(layers: Sequence, input_name: str, input_shape: Shape, params: Mapping[str, List[np.ndarray]],
            shapes: Mapping[str, Shape], outputs: Sequence[str],
            state: Optional[NetState] = None) -> Tuple[bytes, List[str]]:
    """The serialized ONNX model of `layers` (all of them supported: unsupported() first) and the
    graph's output names for `outputs` (Caffe blob names, read at their last version). params:
    layer -> Caffe's weight blobs as loaded. The batch axis is left free."""
    from onnx import TensorProto, helper

    state = state or NetState(1, 0, ())
    g = _Graph(input_name)
    for lp in layers:
        if not layer_runs(lp, state):
            continue
        why = _why_not(lp, shapes)
        if why:
            raise ValueError(f"{lp.name} ({lp.type}) cannot be converted: {why}")
        REGISTRY[lp.type].convert(g, lp, [g.cur(b) for b in lp.bottom], params.get(lp.name, []), shapes)
    if len(g.nodes) == 0:
        raise ValueError("the net has no layer to convert")
    graph_in = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N"] + list(input_shape[1:]))]
    names = [g.cur(b) for b in outputs]
    graph_out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    model = helper.make_model(helper.make_graph(g.nodes, "caffe", graph_in, graph_out, g.inits),
                              opset_imports=[helper.make_opsetid("", OPSET)], producer_name="caffe-runner")
    model.ir_version = 8  # read by every onnxruntime since 1.14
    return model.SerializeToString(), names


def session(model: bytes, threads: int) -> Callable:
    """An ONNX Runtime CPU session with `threads` threads, sequential, run as fn(x) -> outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # the task's threads are its own: no spinning workers taking a core another worker needs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
