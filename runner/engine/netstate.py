"""Caffe's layer rules (NetStateRule), once: which layers of a prototxt run when the net is made
the way every engine here makes it, `caffe.Net(prototxt, caffe.TEST, weights=...)`.

Caffe (net.cpp, Net::Net, FilterNet and StateMeetsRule) builds the net's state from the
prototxt's own `state { stage: ... }`, with the phase set to TEST and the level to pycaffe's
default 0 (whatever the file says); a layer with no rules runs unless one `exclude` rule is met;
a layer with `include` rules runs only when one of them is met; a rule is met when its phase (if
given) is the state's, min_level <= level <= max_level (each if given), every `stage` is one of
the state's stages and no `not_stage` is. Both include and exclude on one layer: Caffe refuses
the net.

Used by the prototxt parser (runner/engine/model.py), the BatchNorm fold (runner/engine/fold.py) and the ONNX
converter (runner/engine/onnxport.py) alike. Pure: reads protobuf messages, imports nothing of Caffe.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

TEST = 1  # caffe.proto: enum Phase { TRAIN = 0; TEST = 1; }


class NetState(NamedTuple):
    phase: int
    level: int
    stages: Tuple[str, ...]


def test_state(param) -> NetState:
    """The state pycaffe's caffe.Net(file, caffe.TEST) gives a NetParameter: TEST, level 0,
    the file's own stages (pycaffe adds none)."""
    return NetState(TEST, 0, tuple(param.state.stage) if param.HasField("state") else ())


def meets_rule(rule, state: NetState) -> bool:
    """Caffe's StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stages for s in rule.stage):
        return False
    return not any(s in state.stages for s in rule.not_stage)


class RuleError(ValueError):
    """A layer with both include and exclude rules (Caffe refuses such a net)."""


def layer_runs(lp, state: NetState) -> bool:
    """Caffe's FilterNet for one layer: does it run in `state`?"""
    if len(lp.include) and len(lp.exclude):
        raise RuleError(f"layer {lp.name!r} has both include and exclude rules; Caffe takes one or the other: "
                        "keep one of them in the prototxt")
    if len(lp.include):
        return any(meets_rule(r, state) for r in lp.include)
    return not any(meets_rule(r, state) for r in lp.exclude)


def running_layers(param, state: NetState = None) -> List:
    """The LayerParameters of `param` (a NetParameter) that run in TEST (or `state`), in order."""
    state = test_state(param) if state is None else state
    return [lp for lp in param.layer if layer_runs(lp, state)]
