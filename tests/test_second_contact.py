"""Issue 20 ("second contact"): one line for every mistake, checked in-process on the pure
functions that make the decision and the message (the fast layer: no pycaffe, no cluster)."""
from __future__ import annotations

import pytest

from runner.errors import ConfigError
from runner.model import LayerInfo, NetSpec, check_fixed_shape, unknown_blob_message, variable_shape_blobs

pytestmark = pytest.mark.unit


def _layers(*rows):
    return tuple(LayerInfo(n, t, tuple(b), tuple(tp)) for n, t, b, tp in rows)


# a detector like res10: a backbone, heads, and a DetectionOutput whose shape changes per image
SSD = _layers(("data_bn", "BatchNorm", ["data"], ["data_bn"]),
              ("conv1_h", "Convolution", ["data_bn"], ["conv1_h"]),
              ("conv1_bn_h", "BatchNorm", ["conv1_h"], ["conv1_h"]),
              ("fc7", "Convolution", ["conv1_h"], ["fc7"]),
              ("mbox_loc", "Concat", ["fc7"], ["mbox_loc"]),
              ("mbox_conf_flatten", "Flatten", ["fc7"], ["mbox_conf_flatten"]),
              ("mbox_priorbox", "Concat", ["fc7"], ["mbox_priorbox"]),
              ("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
               ["detection_out"]),
              ("after", "Reshape", ["detection_out"], ["after"]),
              *[(f"extra{i}", "ReLU", ["fc7"], [f"extra_blob{i}"]) for i in range(12)])


def _spec(layers=SSD):
    return NetSpec(None, layers, "data", (1, 3, 300, 300))


# ---- item 7: variable-shaped blobs are refused at plan time ---------------------------------

def test_detection_output_and_what_follows_it_vary_per_image():
    var = variable_shape_blobs(SSD)
    assert set(var) == {"detection_out", "after"}
    assert var["after"].name == "detection_out"


def test_a_variable_blob_is_refused_naming_the_fixed_ones_it_comes_from():
    with pytest.raises(ConfigError) as e:
        check_fixed_shape(["fc7", "detection_out"], _spec())
    msg = str(e.value)
    assert "'detection_out' changes shape from image to image" in msg and "DetectionOutput" in msg
    assert "mbox_loc, mbox_conf_flatten, mbox_priorbox" in msg and "\n" not in msg
    check_fixed_shape(["fc7", "mbox_loc"], _spec())  # fixed ones pass


# ---- item 8: a layer name, the input, or a typo: a short line with the closest blob -------

def test_a_layer_name_is_answered_with_the_blobs_it_writes():
    msg = unknown_blob_message("conv1_bn_h", SSD, "data")
    assert "'conv1_bn_h' is a layer, not a blob; it writes conv1_h" in msg and "output.blobs=[conv1_h]" in msg
    assert len(msg) < 200


def test_a_near_miss_is_answered_with_the_closest_blob_not_the_whole_list():
    msg = unknown_blob_message("conv1", SSD, "data")
    assert "did you mean conv1_h" in msg and "extra_blob7" not in msg and len(msg) < 200, msg
    with pytest.raises(ConfigError, match="did you mean conv1_h"):
        _spec().producer("conv1")


def test_the_input_blob_is_not_a_feature():
    msg = unknown_blob_message("data", SSD, "data")
    assert "'data' is the net's input" in msg and "not in the net" not in msg and len(msg) < 200


def test_a_small_net_lists_its_blobs():
    small = SSD[:4]
    msg = unknown_blob_message("nope", small, "data")
    assert msg.endswith("its blobs are: data_bn, conv1_h, fc7")
