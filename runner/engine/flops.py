"""Arithmetic cost of a forward, counted from the net's own shapes (what `inspect` prints and
the bench divides by the time): multiply-adds count 2 FLOP.

  Convolution:    2 x output elements x input channels per group x kernel area
                  (= 2 x top count x the weight blob's count per output channel)
  Deconvolution:  2 x input elements x output channels per group x kernel area
  InnerProduct:   2 x the weight blob's count (x rows when the layer keeps leading axes)

Other layers (ReLU, pooling, BatchNorm, Eltwise...) are memory passes, not counted: the figure
is what a matrix multiply has to do, so that a forward's GFLOP/s compares with one core's SGEMM.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Iterable, Tuple

import numpy as np

Shape = Tuple[int, ...]


def layer_flops(kind: str, bottom: Shape, top: Shape, weight: Shape) -> int:
    """FLOP per image of one layer (shapes per image, without the batch axis)."""
    if kind == "Convolution":
        return 2 * int(np.prod(top)) * int(np.prod(weight[1:]))
    if kind == "Deconvolution":
        return 2 * int(np.prod(bottom)) * int(np.prod(weight[1:]))
    if kind == "InnerProduct":
        rows = int(np.prod(bottom)) // int(weight[1]) if weight[1] else 1  # axis > 1 keeps rows
        return 2 * rows * int(np.prod(weight))
    return 0


def forward_flops(layers: Iterable, blob_shapes: Dict[str, Shape], weight_shapes: Dict[str, Shape]) -> Dict[str, int]:
    """layer name -> FLOP per image, for the counted layers among `layers` (LayerInfo: name,
    type, bottoms, tops). blob_shapes per image; weight_shapes: a layer's first param blob."""
    out: Dict[str, int] = {}
    for layer in layers:
        w = weight_shapes.get(layer.name)
        if w is None or not layer.bottoms or not layer.tops:
            continue
        f = layer_flops(layer.type, blob_shapes[layer.bottoms[0]], blob_shapes[layer.tops[0]], w)
        if f:
            out[layer.name] = f
    return out


def net_flops(net) -> int:
    """FLOP per image of a loaded caffe.Net's whole forward (the net as it runs: folded or not)."""
    layers = [SimpleNamespace(name=name, type=layer.type, bottoms=net.bottom_names[name], tops=net.top_names[name])
              for name, layer in net.layer_dict.items()]
    shapes = {b: tuple(v.data.shape[1:]) for b, v in net.blobs.items()}
    weights = {name: tuple(p[0].data.shape) for name, p in net.params.items()}
    return sum(forward_flops(layers, shapes, weights).values())
