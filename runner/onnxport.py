"""A Caffe net as an ONNX graph, for ONNX Runtime's CPU kernels (backend=auto, onnxruntime).

Why: Caffe's CPU forward runs im2col plus one GEMM per image and a memory pass per layer; ONNX
Runtime's MLAS kernels (NCHWc convolutions with bias, BatchNorm and ReLU fused in) reach about
one core's SGEMM rate on the same nets (bench row 12). The graph is built from the prototxt's
layer parameters and the weights Caffe itself loaded, so Caffe's own file parsing, upgrading
and weight checks stay the ones that decide what the model is.

Only what maps exactly is converted; any other layer (or parameter) is named by
`unsupported()` and the net runs on Caffe. Blob names stay Caffe's: an in-place layer (ReLU
top == bottom) writes a new version `name__k`, and a requested blob is read at its last
version, which is what `net.blobs[name]` holds after Caffe's forward.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

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
    kernel = [pp.kernel_size] * 2 if pp.HasField("kernel_size") else [pp.kernel_h, pp.kernel_w]
    pad = [pp.pad] * 2 if pp.HasField("pad") or not (pp.pad_h or pp.pad_w) else [pp.pad_h, pp.pad_w]
    stride = [pp.stride] * 2 if pp.HasField("stride") or not (pp.stride_h or pp.stride_w) else [pp.stride_h, pp.stride_w]
    return dict(kernel=kernel, pad=pad, stride=stride)


def caffe_pool_out(size: int, kernel: int, pad: int, stride: int) -> int:
    """Caffe's pooled size (pooling_layer.cpp): rounded up, less a last window that would start
    in the padding."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# layer type -> whether its parameters map exactly (a reason when not), given the bottom shapes
def _why_not(lp, shapes: Mapping[str, Shape]) -> str:
    t = lp.type
    bottom = shapes.get(lp.bottom[0]) if lp.bottom else None
    if t in ("Input", "Dropout", "Split", "ReLU", "Sigmoid", "TanH"):
        return ""
    if t == "Convolution":
        cp = lp.convolution_param
        if cp.axis != 1 or (bottom is not None and len(bottom) != 4):
            return "only 2-D convolutions over axis 1 are converted"
        if any(getattr(cp, f, 1) != 1 for f in ("width_group", "height_group")):  # this Caffe's own fields
            return "a convolution with width_group or height_group"
        return ""
    if t == "InnerProduct":
        return "" if lp.inner_product_param.axis == 1 else "an InnerProduct over an axis other than 1"
    if t == "BatchNorm":
        bp = lp.batch_norm_param  # in TEST, Caffe uses the stored statistics unless told otherwise
        return "a BatchNorm with use_global_stats: false" if bp.HasField("use_global_stats") and \
            not bp.use_global_stats else ""
    if t == "Scale":
        sp = lp.scale_param
        if len(lp.bottom) != 1:
            return "a Scale with its factor as a second bottom"
        if sp.axis != 1 or sp.num_axes != 1:
            return "a Scale over axes other than channels"
        return ""
    if t == "Pooling":
        pp = lp.pooling_param
        if pp.pool not in (0, 1):
            return "stochastic pooling"
        if not getattr(pp, "ceil_mode", True):  # this Caffe's own field: sizes rounded down
            return "pooling with ceil_mode: false"
        if bottom is None or len(bottom) != 4:
            return "pooling of a blob that is not N x C x H x W"
        if pp.global_pooling:
            return ""
        g = pool_geometry(pp)
        for size, k, p, s in zip(bottom[2:], g["kernel"], g["pad"], g["stride"]):
            if p >= k:
                return "pooling with pad >= kernel"
            out = caffe_pool_out(size, k, p, s)
            if pp.pool == 1 and p and (out - 1) * s + k > size + 2 * p:
                # Caffe divides by the window clipped to the padded input, padding counted: no
                # ONNX divisor is that when the last window overhangs it (without padding both
                # divide by the values inside, count_include_pad=0)
                return "padded average pooling whose last window overhangs the padded input"
        return ""
    if t == "LRN":
        return "" if lp.lrn_param.norm_region == 0 else "LRN within channels"
    if t == "Eltwise":
        ep = lp.eltwise_param
        if ep.operation != 1 and len(ep.coeff):
            return "Eltwise coefficients on an operation other than SUM"
        return ""
    if t == "Concat":
        return ""
    if t == "Softmax":
        return "" if lp.softmax_param.axis == 1 and bottom is not None and len(bottom) in (2, 4) else \
            "a Softmax over an axis other than channels"
    if t == "Flatten":
        fp = lp.flatten_param
        return "" if fp.end_axis == -1 else "a Flatten with end_axis"
    return f"no {t} layer in the converter"


def unsupported(layers: Sequence, shapes: Mapping[str, Shape]) -> List[str]:
    """'layer (Type): why' for each layer of `layers` (caffe_pb2 LayerParameter, in order) that
    does not map exactly onto ONNX; [] when the whole net converts. shapes: blob -> shape as
    Caffe made it (with the batch axis)."""
    out = []
    for lp in layers:
        why = _why_not(lp, shapes)
        if why:
            out.append(f"{lp.name} ({lp.type}): {why}")
    return out


def to_onnx(layers: Sequence, input_name: str, input_shape: Shape, params: Mapping[str, List[np.ndarray]],
            shapes: Mapping[str, Shape], outputs: Sequence[str]) -> Tuple[bytes, List[str]]:
    """The serialized ONNX model of `layers` (all of them supported) and the graph's output names
    for `outputs` (Caffe blob names, read at their last version). params: layer -> Caffe's
    weight blobs as loaded. The batch axis is left free."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    version: Dict[str, str] = {input_name: input_name}
    writes: Dict[str, int] = {input_name: 0}

    def cur(b: str) -> str:
        return version[b]

    def new(b: str) -> str:
        k = writes.get(b)
        writes[b] = 0 if k is None else k + 1
        version[b] = b if k is None else f"{b}__{k + 1}"
        return version[b]

    def const(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def node(op: str, ins: List[str], outs: List[str], name: str, **attrs) -> None:
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))

    def per_channel(arr: np.ndarray, rank: int) -> np.ndarray:
        return np.asarray(arr, np.float32).reshape((1, -1) + (1,) * (rank - 2))

    for lp in layers:
        t, name = lp.type, lp.name
        if t == "Input":
            continue
        ins = [cur(b) for b in lp.bottom]
        w = params.get(name, [])
        if t in ("Dropout",):  # TEST phase: the identity
            node("Identity", ins, [new(lp.top[0])], name)
        elif t == "Split":
            for top in lp.top:
                node("Identity", ins, [new(top)], f"{name}/{top}")
        elif t == "Convolution":
            cp, g = lp.convolution_param, conv_geometry(lp.convolution_param)
            args = ins + [const(f"{name}/W", w[0])] + ([const(f"{name}/b", w[1])] if cp.bias_term else [])
            node("Conv", args, [new(lp.top[0])], name, kernel_shape=g["kernel"], pads=g["pad"] * 2,
                 strides=g["stride"], dilations=g["dilation"], group=int(cp.group))
        elif t == "InnerProduct":
            ip = lp.inner_product_param
            flat = f"{name}/flat"
            node("Flatten", ins, [flat], f"{name}/flatten", axis=1)
            weight = w[0] if not ip.transpose else w[0].T  # Gemm's B transposed: num_output x K
            args = [flat, const(f"{name}/W", weight)] + ([const(f"{name}/b", w[1])] if ip.bias_term else [])
            node("Gemm", args, [new(lp.top[0])], name, transB=1)
        elif t == "BatchNorm":
            # Caffe keeps mean and variance times a moving-average factor (third blob)
            s = float(w[2].ravel()[0])
            f = 0.0 if s == 0 else 1.0 / s
            c = w[0].size
            node("BatchNormalization", ins + [const(f"{name}/one", np.ones(c)), const(f"{name}/zero", np.zeros(c)),
                                              const(f"{name}/mean", w[0] * f), const(f"{name}/var", w[1] * f)],
                 [new(lp.top[0])], name, epsilon=float(lp.batch_norm_param.eps))
        elif t == "Scale":
            rank = len(shapes[lp.bottom[0]])
            out = new(lp.top[0])
            if len(w) > 1:
                node("Mul", [ins[0], const(f"{name}/gamma", per_channel(w[0], rank))], [f"{name}/mul"], f"{name}/mul")
                node("Add", [f"{name}/mul", const(f"{name}/beta", per_channel(w[1], rank))], [out], name)
            else:
                node("Mul", [ins[0], const(f"{name}/gamma", per_channel(w[0], rank))], [out], name)
        elif t == "ReLU":
            slope = float(lp.relu_param.negative_slope)
            if slope:
                node("LeakyRelu", ins, [new(lp.top[0])], name, alpha=slope)
            else:
                node("Relu", ins, [new(lp.top[0])], name)
        elif t in ("Sigmoid", "TanH"):
            node("Sigmoid" if t == "Sigmoid" else "Tanh", ins, [new(lp.top[0])], name)
        elif t == "Pooling":
            pp = lp.pooling_param
            if pp.global_pooling:
                node("GlobalMaxPool" if pp.pool == 0 else "GlobalAveragePool", ins, [new(lp.top[0])], name)
            else:
                g = pool_geometry(pp)
                kw = dict(kernel_shape=g["kernel"], strides=g["stride"], pads=g["pad"] * 2, ceil_mode=1)
                if pp.pool == 1:
                    kw["count_include_pad"] = int(any(g["pad"]))
                node("MaxPool" if pp.pool == 0 else "AveragePool", ins, [new(lp.top[0])], name, **kw)
        elif t == "LRN":
            lr = lp.lrn_param
            node("LRN", ins, [new(lp.top[0])], name, size=int(lr.local_size), alpha=float(lr.alpha),
                 beta=float(lr.beta), bias=float(lr.k))
        elif t == "Eltwise":
            ep = lp.eltwise_param
            if ep.operation == 1:  # SUM, with Caffe's coefficients
                coeff = list(ep.coeff) or [1.0] * len(ins)
                terms = []
                for i, (b, c) in enumerate(zip(ins, coeff)):
                    if c == 1.0:
                        terms.append(b)
                    else:
                        node("Mul", [b, const(f"{name}/c{i}", np.float32(c))], [f"{name}/t{i}"], f"{name}/t{i}")
                        terms.append(f"{name}/t{i}")
                node("Sum", terms, [new(lp.top[0])], name)
            elif ep.operation == 2:  # MAX
                node("Max", ins, [new(lp.top[0])], name)
            else:  # PROD: ONNX's Mul takes two
                acc = ins[0]
                for i, b in enumerate(ins[1:-1]):
                    node("Mul", [acc, b], [f"{name}/p{i}"], f"{name}/p{i}")
                    acc = f"{name}/p{i}"
                node("Mul", [acc, ins[-1]], [new(lp.top[0])], name)
        elif t == "Concat":
            cp = lp.concat_param
            axis = int(cp.concat_dim) if cp.HasField("concat_dim") else int(cp.axis)
            node("Concat", ins, [new(lp.top[0])], name, axis=axis)
        elif t == "Softmax":
            node("Softmax", ins, [new(lp.top[0])], name, axis=1)
        elif t == "Flatten":
            node("Flatten", ins, [new(lp.top[0])], name, axis=int(lp.flatten_param.axis))
        else:
            raise ValueError(f"{name} ({t}) cannot be converted: check unsupported() first")
    if len(nodes) == 0:
        raise ValueError("the net has no layer to convert")
    graph_in = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N"] + list(input_shape[1:]))]
    names = [cur(b) for b in outputs]
    graph_out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    model = helper.make_model(helper.make_graph(nodes, "caffe", graph_in, graph_out, inits),
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
