"""Fold BatchNorm (+ Scale) into the convolution before it, or the pair into one Scale, at load time.

A deploy net's BatchNorm and Scale layers are per-channel affine maps with frozen statistics:

    BN:    y = (x - mean / s) / sqrt(var / s + eps)     (s: the BN's third blob, Caffe's scale factor)
    Scale: z = gamma * y + beta

so after a convolution x = W * in + b they fold into it: W' = W * a, b' = (b - mean / s) * a + beta,
with a = gamma / sqrt(var / s + eps). The net then makes one pass over memory per convolution
instead of three (res10 and open_nsfw are full of such chains). It is exact only where nothing
else sees the values in between: the convolution's output is read by the BN alone, the BN's by
the Scale alone, and none of them is a blob the user asked for. Anything else stays as it is.

A BN + Scale pair that follows something else (a pre-activation block: Eltwise -> BN -> Scale
-> ReLU -> conv, or the input) becomes one Scale layer with a bias, named after the Scale:
z = (gamma * a) * x + (beta - gamma * a * mean / s), a = 1 / sqrt(var / s + eps): one pass over
memory instead of two (Caffe's BN alone makes several), under the same rules (the BN's output is
read by the Scale alone and is no requested blob).

fold_plan() decides on the prototxt alone (pure); folded_weights() and affine_weights() are the
arithmetic (pure, in float64 then rounded once to float32); load_folded() is the one place that
touches Caffe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .netstate import running_layers


@dataclass(frozen=True)
class Fold:
    conv: Optional[str]    # the convolution layer that absorbs the others; None: the BN + Scale
                           # pair became one Scale layer with a bias (named after the Scale)
    batchnorm: str
    scale: Optional[str]   # None: a BN with no Scale after it (or one that cannot fold)
    eps: float


def _readers(layers) -> Dict[Tuple[int, str], List[int]]:
    """(writer layer index, blob) -> indices of the layers that read that value. A blob written
    in place has one value per write; -1 is the net's input."""
    last: Dict[str, int] = {}
    readers: Dict[Tuple[int, str], List[int]] = {}
    for i, lp in enumerate(layers):
        for b in lp.bottom:
            readers.setdefault((last.get(b, -1), b), []).append(i)
        for t in lp.top:
            last[t] = i
            readers.setdefault((i, t), [])
    return readers


def _final_writer(layers) -> Dict[str, int]:
    last: Dict[str, int] = {}
    for i, lp in enumerate(layers):
        for t in lp.top:
            last[t] = i
    return last


def _foldable_conv(lp) -> bool:
    cp = lp.convolution_param
    return (lp.type == "Convolution" and len(lp.bottom) == 1 and len(lp.top) == 1 and cp.axis == 1
            and not any(p.name for p in lp.param))  # shared weights would change another layer too


def _foldable_bn(lp) -> bool:
    bp = lp.batch_norm_param
    # a BN that uses the batch's own statistics is not a fixed affine map
    global_stats = (not bp.HasField("use_global_stats")) or bp.use_global_stats
    return lp.type == "BatchNorm" and len(lp.bottom) == 1 and len(lp.top) == 1 and global_stats


def _foldable_scale(lp) -> bool:
    sp = lp.scale_param
    return lp.type == "Scale" and len(lp.bottom) == 1 and len(lp.top) == 1 and sp.axis == 1 and sp.num_axes == 1


def _touched_between(layers, start: int, end: int, skip: int, top: str, own_top: str) -> bool:
    """The head layer at `start` now writes `top` early: does a layer strictly between it and
    `end` (other than `skip`) read or write that name?"""
    return top != own_top and any(top in (*layers[k].bottom, *layers[k].top)
                                  for k in range(start + 1, end) if k != skip)


def fold_plan(param, keep: Sequence[str], pairs: bool = True):
    """(a NetParameter with each foldable chain reduced to its convolution, [Fold]).
    `param` is the net as it will be loaded (already cut after the last requested layer);
    `keep` the blobs the user reads: a value one of them names is never folded away.
    pairs=False: BN + Scale pairs after something else than a convolution stay (the bench's step)."""
    from caffe.proto import caffe_pb2 as pb

    # only the layers that run in TEST (Caffe's include/exclude rules): the net Caffe makes of
    # the folded text is the same whether the others are in it or not
    layers = running_layers(param)
    readers = _readers(layers)
    final = _final_writer(layers)
    kept_values = {(final[b], b) for b in keep if b in final}
    folds: List[Fold] = []
    drop, new_top = set(), {}
    for i, lp in enumerate(layers):
        if not _foldable_conv(lp):
            continue
        value = (i, lp.top[0])
        r = readers.get(value, [])
        if value in kept_values or len(r) != 1 or not _foldable_bn(layers[r[0]]):
            continue
        j = r[0]
        bn = layers[j]
        end, top = j, bn.top[0]
        scale = None
        r2 = readers.get((j, top), [])
        if (j, top) not in kept_values and len(r2) == 1 and _foldable_scale(layers[r2[0]]):
            end, scale = r2[0], layers[r2[0]].name
            top = layers[end].top[0]
        # the convolution now writes `top` early: no layer in between may touch that name
        if _touched_between(layers, i, end, j, top, lp.top[0]):
            continue
        folds.append(Fold(lp.name, bn.name, scale, float(bn.batch_norm_param.eps)))
        drop.update({j, end})
        new_top[i] = top
    # the BN + Scale pairs left (no convolution before them): one Scale with a bias, in the BN's place
    affine = {}
    for j, bn in enumerate(layers if pairs else []):
        if j in drop or not _foldable_bn(bn):
            continue
        r2 = readers.get((j, bn.top[0]), [])
        if (j, bn.top[0]) in kept_values or len(r2) != 1 or not _foldable_scale(layers[r2[0]]):
            continue
        end = r2[0]
        sc = layers[end]
        if any(p.name for p in sc.param) or _touched_between(layers, j, end, -1, sc.top[0], bn.top[0]):
            continue
        folds.append(Fold(None, bn.name, sc.name, float(bn.batch_norm_param.eps)))
        drop.add(end)
        affine[j] = sc
    out = pb.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    for i, lp in enumerate(layers):
        if i in drop:
            continue
        nl = out.layer.add()
        if i in affine:  # the Scale, reading the BN's input
            nl.CopyFrom(affine[i])
            nl.bottom[0] = lp.bottom[0]
            nl.scale_param.bias_term = True
            continue
        nl.CopyFrom(lp)
        if i in new_top:
            nl.top[0] = new_top[i]
            nl.convolution_param.bias_term = True
    return out, folds


def folded_weights(weight: np.ndarray, bias: Optional[np.ndarray], mean: np.ndarray, var: np.ndarray,
                   scale_factor: float, eps: float, gamma: Optional[np.ndarray] = None,
                   beta: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The convolution's (weight, bias) with BN (and Scale) applied; float64 inside, one rounding.
    Caffe's BatchNorm divides its stored statistics by the scale factor (0 stays 0)."""
    s = 0.0 if scale_factor == 0 else 1.0 / float(scale_factor)
    mean64, var64 = mean.astype(np.float64) * s, var.astype(np.float64) * s
    a = 1.0 / np.sqrt(var64 + float(eps))
    b = (np.zeros_like(mean64) if bias is None else bias.astype(np.float64)) - mean64
    if gamma is not None:
        a = a * gamma.astype(np.float64)
    b = b * a + (0.0 if beta is None else beta.astype(np.float64))
    shape = (-1,) + (1,) * (weight.ndim - 1)
    return ((weight.astype(np.float64) * a.reshape(shape)).astype(np.float32), b.astype(np.float32))


def affine_weights(mean: np.ndarray, var: np.ndarray, scale_factor: float, eps: float,
                   gamma: np.ndarray, beta: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """BN then Scale as one Scale layer's (gamma', beta'): the same map as a 1x1 identity
    convolution folded (folded_weights), float64 inside, one rounding."""
    w, b = folded_weights(np.ones((mean.size, 1), np.float32), None, mean, var, scale_factor, eps, gamma, beta)
    return w.ravel(), b


def net_from_text(caffe, text: str, weights: Optional[str] = None):
    """caffe.Net (TEST phase) of prototxt text, with weights when given (Caffe reads a path)."""
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(text)
    try:
        return caffe.Net(f.name, caffe.TEST, weights=weights) if weights else caffe.Net(f.name, caffe.TEST)
    finally:
        os.unlink(f.name)


def load_folded(caffe, prototxt_text: str, weights: str, keep: Sequence[str], pairs: bool = True):
    """A caffe.Net of `prototxt_text` with `weights`, BN/Scale chains folded into their
    convolutions where exact. Returns (net, [Fold])."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    param = caffe_pb2.NetParameter()
    text_format.Merge(prototxt_text, param)
    folded, folds = fold_plan(param, keep, pairs)

    src = net_from_text(caffe, prototxt_text, weights)
    if not folds:
        return src, folds
    # the folded net is made without weights, then every parameter is copied from the net Caffe
    # loaded (Caffe reads the weight file in every format it knows; a folded convolution now has
    # a bias its stored layer lacks, which Caffe's own copy would refuse)
    net = net_from_text(caffe, text_format.MessageToString(folded))
    by_layer = {f.conv or f.scale: f for f in folds}
    for name, blobs in net.params.items():
        f = by_layer.get(name)
        if f is None:
            for dst, s in zip(blobs, src.params[name]):
                dst.data[...] = s.data
            continue
        bn = src.params[f.batchnorm]
        sc = src.params[f.scale] if f.scale else []
        flat = [x.data.ravel() for x in (*bn, *sc)]  # per-channel vectors (old models store 1xCx1x1)
        stats = (flat[0], flat[1], float(flat[2][0]), f.eps)
        if f.conv is None:
            w, b = affine_weights(*stats, flat[3], flat[4] if len(sc) > 1 else None)
        else:
            conv = src.params[f.conv]
            w, b = folded_weights(conv[0].data, conv[1].data.ravel() if len(conv) > 1 else None, *stats,
                                  flat[3] if len(sc) > 0 else None, flat[4] if len(sc) > 1 else None)
        blobs[0].data[...] = w.reshape(blobs[0].data.shape)
        blobs[1].data[...] = b.reshape(blobs[1].data.shape)
    del src
    return net, folds
