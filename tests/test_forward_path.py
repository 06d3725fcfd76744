"""The fast CPU forward (issue 30): BatchNorm + Scale folded into the convolution before them
(runner/engine/fold.py) and Caffe's convolution running im2col + one GEMM for several images at once
(docker/pycaffe-convbatch.patch). Its features equal the upstream path's (model.conv_batch_mb=0
model.fold_batchnorm=false, the same process, the same build) within the fidelity bound, run to
run bit-identical; `inspect` prints a forward's GFLOP per image."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from conftest import run_cli

BOUND = 1e-5  # the project's fidelity bound: max |new - old| / max |old|


def rel(new, old) -> float:
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    return float(np.abs(new - old).max() / np.abs(old).max())


# ---- pure parts: the folding arithmetic, which chains fold, the FLOP count -----------------

@pytest.mark.unit
def test_folded_weights_equal_conv_then_bn_then_scale():
    """conv(x) -> BN (Caffe's scale factor, a large eps) -> Scale, in float64, against the folded
    convolution's single affine map."""
    from runner.engine.fold import folded_weights

    rng = np.random.default_rng(3)
    c, k = 5, 12
    w, b = rng.normal(size=(c, k)), rng.normal(size=c)
    mean, var, sf, eps = rng.normal(size=c), rng.uniform(0.01, 0.2, c), 0.5, 0.25
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    x = rng.normal(size=(k, 9))
    conv = w @ x + b[:, None]
    ref = (conv - (mean / sf)[:, None]) / np.sqrt(var / sf + eps)[:, None] * gamma[:, None] + beta[:, None]
    fw, fb = folded_weights(w.astype(np.float32), b.astype(np.float32), mean, var, sf, eps, gamma, beta)
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    assert rel(fw.astype(np.float64) @ x + fb[:, None], ref) < 1e-6
    # no bias, no Scale, a zero scale factor (Caffe: statistics 0)
    fw, fb = folded_weights(w.astype(np.float32), None, mean, var, 0.0, eps)
    assert rel(fw.astype(np.float64) @ x + fb[:, None], (w @ x) / np.sqrt(eps)) < 1e-6


CHAIN = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "bn1" type: "BatchNorm" bottom: "c1" top: "c1" %(bn)s }
layer { name: "sc1" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "bn2" type: "BatchNorm" bottom: "c2" top: "b2" }
layer { name: "sc2" type: "Scale" bottom: "b2" top: "s2" }
layer { name: "c3" type: "Convolution" bottom: "s2" top: "c3" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "bn3" type: "BatchNorm" bottom: "c3" top: "c3" }
layer { name: "sum" type: "Eltwise" bottom: "c3" bottom: "s2" top: "sum" }
"""


def _plan(keep, bn=""):
    from google.protobuf import text_format

    from runner.engine.fold import fold_plan
    from runner.engine.model import caffe_pb2

    param = caffe_pb2().NetParameter()
    text_format.Merge(CHAIN % {"bn": bn}, param)
    folded, folds = fold_plan(param, keep)
    return [(f.conv, f.batchnorm, f.scale) for f in folds], {lp.name: list(lp.top) for lp in folded.layer}


@pytest.mark.unit
@pytest.mark.parametrize("keep, bn, folds", [
    # in place, separate names, a BN without Scale
    (["sum"], "", [("c1", "bn1", "sc1"), ("c2", "bn2", "sc2"), ("c3", "bn3", None)]),
    # the user reads b2 (BN's output): the Scale stays, the BN still folds into c2
    (["sum", "b2"], "", [("c1", "bn1", "sc1"), ("c2", "bn2", None), ("c3", "bn3", None)]),
    # the user reads c2 (the convolution's own output): nothing folds into c2; bn2 + sc2 become one Scale
    (["sum", "c2"], "", [("c1", "bn1", "sc1"), ("c3", "bn3", None), (None, "bn2", "sc2")]),
    # a BN that uses the batch's statistics is no fixed map
    (["sum"], "batch_norm_param { use_global_stats: false }", [("c2", "bn2", "sc2"), ("c3", "bn3", None)]),
])
def test_fold_plan_folds_only_what_nobody_else_sees(keep, bn, folds):
    got, tops = _plan(keep, bn)
    assert got == folds
    if ("c2", "bn2", "sc2") in got:  # the convolution now writes the Scale's blob, read by c3 and sum
        assert tops["c2"] == ["s2"] and "sc2" not in tops and "bn2" not in tops
    assert tops["c3"] == ["c3"]  # in place: the name stays


@pytest.mark.unit
def test_fold_plan_keeps_a_convolution_read_twice():
    """c2's output feeding the BN and another layer: folding would change what the other reads."""
    text = CHAIN.replace('bottom: "c3" bottom: "s2"', 'bottom: "c3" bottom: "c2"') % {"bn": ""}
    from google.protobuf import text_format

    from runner.engine.fold import fold_plan
    from runner.engine.model import caffe_pb2

    param = caffe_pb2().NetParameter()
    text_format.Merge(text, param)
    # (bn2 + sc2, read by nobody else, still become one Scale: conv None)
    assert [f.conv for f in fold_plan(param, ["sum"])[1]] == ["c1", "c3", None]


@pytest.mark.unit
def test_affine_weights_equal_bn_then_scale():
    """BN (scale factor 2, a large eps) then Scale with and without a bias, in float64, against the
    one Scale layer's gamma' * x + beta'."""
    from runner.engine.fold import affine_weights

    rng = np.random.default_rng(4)
    c = 6
    mean, var, sf, eps = rng.normal(size=c), rng.uniform(0.01, 0.2, c), 2.0, 0.3
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    x = rng.normal(size=(c, 11))
    bn = (x - (mean / sf)[:, None]) / np.sqrt(var / sf + eps)[:, None]
    g, b = affine_weights(mean, var, sf, eps, gamma, beta)
    assert g.shape == b.shape == (c,) and g.dtype == b.dtype == np.float32
    assert rel(g[:, None] * x + b[:, None], bn * gamma[:, None] + beta[:, None]) < 1e-6
    g, b = affine_weights(mean, var, sf, eps, gamma)
    assert rel(g[:, None] * x + b[:, None], bn * gamma[:, None]) < 1e-6


# pre-activation blocks: BN + Scale after the input and after an Eltwise, not after a convolution
PREACT = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "d_bn" }
layer { name: "sc0" type: "Scale" bottom: "d_bn" top: "d_bn" }
layer { name: "c1" type: "Convolution" bottom: "d_bn" top: "c1" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "c1" bottom: "data" top: "sum" }
layer { name: "bn1" type: "BatchNorm" bottom: "sum" top: "b1" }
layer { name: "sc1" type: "Scale" bottom: "b1" top: "b1" scale_param { bias_term: true } }
layer { name: "r1" type: "ReLU" bottom: "b1" top: "b1" }
layer { name: "c2" type: "Convolution" bottom: "b1" top: "c2" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "out" type: "Eltwise" bottom: "c2" bottom: "sum" top: "out" }
"""
SC0 = 'layer { name: "sc0" type: "Scale" bottom: "d_bn" top: "d_bn" }'
SC1 = 'layer { name: "sc1"'
BN1 = 'layer { name: "bn1" type: "BatchNorm" bottom: "sum" top: "b1" }'


@pytest.mark.unit
@pytest.mark.parametrize("keep, edits, folds", [
    # both pairs become one Scale each (c1 and c2 have no BN after them)
    (["out"], [], [(None, "bn0", "sc0"), (None, "bn1", "sc1")]),
    # b1 is written in place: the name means the Scale's output, which the one Scale still writes
    (["out", "b1"], [], [(None, "bn0", "sc0"), (None, "bn1", "sc1")]),
    # the user reads the BN's own output (the Scale writes another name): that pair stays
    (["out", "d_bn"], [(SC0, SC0.replace('top: "d_bn"', 'top: "d_s"')),
                       ('Convolution" bottom: "d_bn"', 'Convolution" bottom: "d_s"')],
     [(None, "bn1", "sc1")]),
    # a Scale with shared (named) parameters, a BN on the batch's own statistics: left alone
    (["out"], [(SC0, SC0.replace("}", 'param { name: "shared" } }')),
               (BN1, BN1.replace("}", "batch_norm_param { use_global_stats: false } }"))], []),
    # the BN's output read by another layer too (before the Scale writes the name in place)
    (["out", "side"], [(SC1, 'layer { name: "side" type: "Power" bottom: "b1" top: "side" }\n' + SC1)],
     [(None, "bn0", "sc0")]),
])
def test_fold_plan_makes_one_scale_of_a_bn_scale_pair(keep, edits, folds):
    from google.protobuf import text_format

    from runner.engine.fold import fold_plan
    from runner.engine.model import caffe_pb2

    text = PREACT
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    param = caffe_pb2().NetParameter()
    text_format.Merge(text, param)
    out, fl = fold_plan(param, keep)
    layers = [lp.name for lp in out.layer]
    by_name = {lp.name: lp for lp in out.layer}
    assert [(f.conv, f.batchnorm, f.scale) for f in fl] == folds
    for _, bn, sc in folds:  # the BN is gone; its Scale, with a bias, reads the BN's input in the BN's place
        assert bn not in by_name and by_name[sc].scale_param.bias_term
    if (None, "bn1", "sc1") in folds:
        assert list(by_name["sc1"].bottom) == ["sum"] and list(by_name["sc1"].top) == ["b1"]
        assert layers.index("sum") < layers.index("sc1") < layers.index("r1")
    if (None, "bn0", "sc0") in folds:
        assert list(by_name["sc0"].bottom) == ["data"] and layers.index("sc0") == 1


@pytest.mark.unit
@pytest.mark.parametrize("kind, bottom, top, weight, flop", [
    ("Convolution", (3, 300, 300), (32, 150, 150), (32, 3, 7, 7), 2 * 32 * 150 * 150 * 3 * 49),
    ("Convolution", (8, 10, 10), (12, 10, 10), (12, 2, 3, 3), 2 * 12 * 100 * 2 * 9),  # group 4
    ("Deconvolution", (4, 5, 5), (2, 10, 10), (4, 2, 2, 2), 2 * 100 * 2 * 4),
    ("InnerProduct", (256, 2, 2), (10,), (10, 1024), 2 * 10 * 1024),
    ("ReLU", (4, 5, 5), (4, 5, 5), (), 0),
])
def test_layer_flops(kind, bottom, top, weight, flop):
    from runner.engine.flops import layer_flops

    assert layer_flops(kind, bottom, top, weight) == flop


# ---- the real Caffe: a tiny net with unusual shapes ------------------------------------------

ODD = """
name: "odd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 24 dim: 30 } } }
layer { name: "strided" type: "Convolution" bottom: "data" top: "a"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 weight_filler { type: "gaussian" std: 0.1 }
  bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu_a" type: "ReLU" bottom: "a" top: "a" }
layer { name: "grouped" type: "Convolution" bottom: "a" top: "g"
  convolution_param { num_output: 12 kernel_size: 3 group: 4 dilation: 2 pad: 2 bias_term: false
  weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "bn_g" type: "BatchNorm" bottom: "g" top: "g" batch_norm_param { eps: 0.5 } }
layer { name: "scale_g" type: "Scale" bottom: "g" top: "g" scale_param { bias_term: true } }
layer { name: "relu_g" type: "ReLU" bottom: "g" top: "g" }
layer { name: "one" type: "Convolution" bottom: "g" top: "o"
  convolution_param { num_output: 16 kernel_size: 1 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "bn_o" type: "BatchNorm" bottom: "o" top: "o_bn" batch_norm_param { eps: 0.3 } }
layer { name: "scale_o" type: "Scale" bottom: "o_bn" top: "o_s" }
layer { name: "rect" type: "Convolution" bottom: "o_s" top: "r"
  convolution_param { num_output: 6 kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "bn_r" type: "BatchNorm" bottom: "r" top: "r" batch_norm_param { eps: 0.4 } }
layer { name: "pool" type: "Pooling" bottom: "r" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 3 } }
layer { name: "bn_p" type: "BatchNorm" bottom: "p" top: "p" batch_norm_param { eps: 0.2 } }
layer { name: "scale_p" type: "Scale" bottom: "p" top: "p" }
layer { name: "relu_p" type: "ReLU" bottom: "p" top: "p" }
layer { name: "fc" type: "InnerProduct" bottom: "p" top: "fc" inner_product_param { num_output: 10
  weight_filler { type: "gaussian" std: 0.1 } } }
"""


def _seeded_net(proto, text: str, seed: int):
    """The prototxt written to proto, loaded on the CPU with Caffe's fillers seeded; and a numpy
    generator of the same seed: the same weights and inputs every session."""
    import caffe

    proto.write_text(text)
    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    return caffe.Net(str(proto), caffe.TEST), np.random.default_rng(seed)


@pytest.fixture(scope="module")
def odd_net(tmp_path_factory):
    """Random weights, and BN statistics and Scale parameters that matter (large eps, scale factor 0.5)."""
    d = tmp_path_factory.mktemp("odd")
    proto = d / "odd.prototxt"
    net, rng = _seeded_net(proto, ODD, 5)
    for name, blobs in net.params.items():
        if name.startswith("bn_"):
            c = blobs[0].data.size
            blobs[0].data[...] = rng.normal(0, 0.2, c) * 0.5
            blobs[1].data[...] = rng.uniform(0.02, 0.2, c) * 0.5
            blobs[2].data[...] = 0.5
        elif name.startswith("scale_"):
            for b in blobs:
                b.data[...] = rng.normal(0.5, 0.5, b.data.shape)
    weights = d / "odd.caffemodel"
    net.save(str(weights))
    return proto, weights


def _engine(proto, weights, blobs, **model):
    from omegaconf import OmegaConf

    from runner.engine.model import CaffeEngine, parse_prototxt

    m = OmegaConf.create({"weights": str(weights), **model})
    return CaffeEngine(m, parse_prototxt(str(proto)), blobs, (3, 24, 30))


UPSTREAM = {"conv_batch_mb": 0, "fold_batchnorm": False}


@pytest.mark.parametrize("blobs", [["fc"], ["fc", "o_bn"], ["g", "fc"]])
def test_odd_net_fast_path_equals_upstream(odd_net, blobs):
    """Groups, strides, dilation, a 1x1 and a 2x3 kernel, BN with and without Scale, in place and
    not, a BN + Scale after a pooling (one Scale layer); a batch of 7, not a multiple of the
    blocks (12x15 outputs: blocks of 5 and 2 images for a 1,024-column GEMM; the 11x7 one takes
    all 7)."""
    x = np.random.default_rng(0).uniform(-100, 100, (7, 3, 24, 30)).astype(np.float32)
    old = _engine(*odd_net, blobs, **UPSTREAM).forward(x)
    for model in ({}, {"conv_batch_mb": 1}, {"fold_batchnorm": False}, {"conv_batch_mb": 0}):
        eng = _engine(*odd_net, blobs, **model)
        new = eng.forward(x)
        for b in blobs:
            assert new[b].shape == old[b].shape
            assert rel(new[b], old[b]) <= BOUND, (model, b, rel(new[b], old[b]))
        again = eng.forward(x)
        assert all(np.array_equal(again[b], new[b]) for b in blobs), model  # the same numbers every run
    # what folded: never a blob the user reads (o_bn read: its Scale stays a layer)
    folds = {(f.batchnorm, f.scale) for f in _engine(*odd_net, blobs).folds}
    assert folds == {("bn_g", "scale_g"), ("bn_o", None if "o_bn" in blobs else "scale_o"), ("bn_r", None),
                     ("bn_p", "scale_p")}  # bn_p + scale_p after a pooling: one Scale layer


def test_a_batch_of_one_and_a_reshape(odd_net):
    """The batch shrinking (a shard's last batch) and growing again gives the same rows."""
    x = np.random.default_rng(1).uniform(-100, 100, (5, 3, 24, 30)).astype(np.float32)
    eng = _engine(*odd_net, ["fc"], conv_batch_mb=1)
    full = eng.forward(x)["fc"]
    one = eng.forward(x[3:4])["fc"]
    assert rel(one[0], full[3]) <= BOUND
    assert np.array_equal(eng.forward(x)["fc"], full)


# ---- the real models on the sample photos, end to end ---------------------------------------

def _run(photos, out, *args, env=None):
    run_cli(f"input.dir={photos}", f"output.dir={out}", "launcher.workers=1", "num_shards=1", "batch_size=7",
            *args, env=env, timeout=1200)
    with h5py.File(out / "features.h5") as f:
        names = list(f["names"].asstr()[:])
        blobs = {k: f[f"features/{k}"][:] for k in f["features"]}
        return names, blobs, f["feats"][:]


@pytest.mark.slow
@pytest.mark.parametrize("model, blobs", [("res10_ssd", "[fc7,conv6_2_h]"), ("open_nsfw", "[pool]")])
def test_real_models_fast_path_equals_upstream(photos, tmp_path_factory, model, blobs):
    """res10 (fc7, conv6_2_h) and open_nsfw (pool, a ResNet full of BatchNorm + Scale) on the
    sample photos: Caffe's default path and the CPU default (backend=auto: ONNX Runtime, which
    the shard file names) against Caffe's upstream path, within 1e-5, per blob."""
    env = {"CAFFE_MODELS": str(tmp_path_factory.getbasetemp() / "models")}  # open_nsfw fetched once
    tmp = tmp_path_factory.mktemp(model)
    common = (f"model={model}", f"output.blobs={blobs}", "output.pooling=none", "device=cpu")
    old = _run(photos, tmp / "old", *common, "backend=caffe", "model.conv_batch_mb=0", "model.fold_batchnorm=false",
               env=env)
    for backend in ("caffe", "auto"):
        new = _run(photos, tmp / backend, *common, f"backend={backend}", env=env)
        assert old[0] == new[0] and len(new[0]) > 10
        for b in old[1]:
            assert rel(new[1][b], old[1][b]) <= BOUND, (backend, b, rel(new[1][b], old[1][b]))
        assert rel(new[2], old[2]) <= BOUND
        with h5py.File(tmp / backend / "shards" / "shard-00000-of-00001.h5") as f:
            assert f.attrs["engine"].startswith("onnxruntime " if backend == "auto" else "caffe"), f.attrs["engine"]


def test_inspect_prints_gflop_per_image(res10):
    """res10 to fc7: 2.10 GFLOP per image (the issue's count from the net's own shapes)."""
    p = run_cli("inspect", "output.blobs=[fc7]")
    line = [ln for ln in p.stdout.splitlines() if "GFLOP per image" in ln]
    assert len(line) == 1 and line[0].startswith("forward to fc7: 2.10 GFLOP per image"), p.stdout
    assert "engine on the CPU (backend=auto): ONNX Runtime (every layer up to the chosen blobs converts)" in p.stdout


def test_a_negative_conv_buffer_is_refused_before_any_work(photos, tmp_path):
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "model.conv_batch_mb=-1", check=False)
    assert p.returncode == 2 and not (tmp_path / "r").exists(), p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        "model.conv_batch_mb=-1: use 0 (one image per GEMM, as Caffe upstream) or more MB of column buffer per "
        "convolution (32 is the default)"), p.stderr
    assert "Traceback" not in p.stderr


# ---- max pooling without the mask (docker/pycaffe-poolmax.patch) ----------------------------

# (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, ceil_mode) on a 2x3x13x17 input:
# padding, stride > kernel, ceil rounding past the edge (windows clipped, or wholly outside)
POOLS = [(3, 3, 2, 2, 0, 0, True), (3, 3, 2, 2, 1, 1, True), (2, 3, 3, 4, 0, 0, True), (2, 2, 5, 3, 1, 1, False),
         (3, 2, 1, 2, 2, 1, True), (1, 1, 4, 4, 0, 0, True), (5, 4, 2, 3, 0, 0, False), (13, 17, 1, 1, 0, 0, True)]


def _pool_ref(x, kh, kw, sh, sw, ph, pw, ph_out, pw_out):
    """Caffe's max pooling, in numpy: -FLT_MAX, then each window's inputs in row order, a value
    replacing the maximum only when strictly greater (NaN never; the first of equal values stays);
    also the index of that input in its plane (Caffe's mask)."""
    n, c, h, w = x.shape
    out = np.empty((n, c, ph_out, pw_out), np.float32)
    idx = np.empty((n, c, ph_out, pw_out), np.int64)
    for i in range(ph_out):
        for j in range(pw_out):
            hs, ws = i * sh - ph, j * sw - pw
            he, we = min(hs + kh, h), min(ws + kw, w)
            hs, ws = max(hs, 0), max(ws, 0)
            m = np.full((n, c), -np.finfo(np.float32).max, np.float32)
            best = np.full((n, c), -1)
            for y in range(hs, he):
                for z in range(ws, we):
                    v = x[:, :, y, z]
                    up = v > m
                    m, best = np.where(up, v, m), np.where(up, y * w + z, best)
            out[:, :, i, j], idx[:, :, i, j] = m, best
    return out, idx


def _pool_net(tmp_path, shape, pool, phase_name, extra=""):
    import caffe

    kh, kw, sh, sw, ph, pw, ceil_mode = pool
    proto = tmp_path / f"pool{hash((pool, phase_name, extra)) & 0xffff}.prototxt"
    proto.write_text(f"""force_backward: true
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "p" pooling_param {{ pool: MAX kernel_h: {kh} kernel_w: {kw}
  stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} ceil_mode: {str(ceil_mode).lower()} }} }}
{extra}""")
    caffe.set_mode_cpu()
    return caffe.Net(str(proto), getattr(caffe, phase_name))


def _odd_values(rng, shape):
    """Small integers (many ties), signed zeros, NaN and -inf among them."""
    x = rng.integers(-4, 4, shape).astype(np.float32)
    x[rng.random(shape) < 0.08] = -0.0
    x[rng.random(shape) < 0.03] = np.nan
    x[rng.random(shape) < 0.03] = -np.inf
    return x


@pytest.mark.parametrize("pool", POOLS)
def test_max_pooling_is_bit_equal_to_caffes_definition(tmp_path, monkeypatch, pool):
    """The mask-free TEST-phase forward, Caffe's own loop (CAFFE_POOL_MASK=1, and the TRAIN phase)
    and numpy's reference give the same bits; Backward in TEST phase (it rebuilds the mask from
    the bottom, even after a ReLU changed the top in place) routes each gradient to the same input."""
    shape = (2, 3, 13, 17)
    x = _odd_values(np.random.default_rng(sum(pool)), shape)
    # Backward's input: no window without a maximum (NaN or -inf alone: Caffe's mask says -1, and
    # its Backward writes before the plane)
    xb = np.where(np.isfinite(x), x, np.float32(-5))
    relu = 'layer { name: "relu" type: "ReLU" bottom: "p" top: "p" }'
    runs = {}
    for label, phase_name, mask in (("fast", "TEST", None), ("caffe", "TEST", "1"), ("train", "TRAIN", None)):
        if mask:
            monkeypatch.setenv("CAFFE_POOL_MASK", mask)
        else:
            monkeypatch.delenv("CAFFE_POOL_MASK", raising=False)
        net = _pool_net(tmp_path, shape, pool, phase_name)
        net.blobs["data"].data[...] = x
        net.forward()
        top = net.blobs["p"].data.copy()
        net.blobs["data"].data[...] = xb
        net.forward()
        net.blobs["p"].diff[...] = np.arange(top.size, dtype=np.float32).reshape(top.shape) + 1
        net.backward()
        runs[label] = (top, net.blobs["data"].diff.copy())
        net = _pool_net(tmp_path, shape, pool, phase_name, relu)  # the top changed in place before Backward
        net.blobs["data"].data[...] = xb
        net.forward()
        net.blobs["p"].diff[...] = np.arange(top.size, dtype=np.float32).reshape(top.shape) + 1
        net.backward()
        runs[label + "_relu"] = net.blobs["data"].diff.copy()
    kh, kw, sh, sw, ph, pw, _ = pool
    ref = _pool_ref(x, kh, kw, sh, sw, ph, pw, *runs["fast"][0].shape[2:])[0]
    refb, idx = _pool_ref(xb, kh, kw, sh, sw, ph, pw, *ref.shape[2:])
    assert (idx >= 0).all() and np.isnan(x).any() and np.isneginf(x).any() and (x == 0).any()

    def routed(top_diff):  # each output's gradient added to its window's first maximum
        grad = np.zeros(shape, np.float32)
        flat = grad.reshape(shape[0] * shape[1], -1)
        planes = zip(idx.reshape(len(flat), -1), top_diff.reshape(len(flat), -1))
        for k, (plane, d) in enumerate(planes):
            for i, v in zip(plane, d):
                if i >= 0:
                    flat[k, i] += v
        return grad

    order = np.arange(ref.size, dtype=np.float32).reshape(ref.shape) + 1
    with np.errstate(invalid="ignore"):
        after_relu = order * (refb > 0)  # ReLU's Backward passes a gradient where its output is > 0
    for label in ("fast", "caffe", "train"):
        top, diff = runs[label]
        assert np.array_equal(top.view(np.uint32), ref.view(np.uint32)), label
        assert np.array_equal(diff, routed(order)), label
        assert np.array_equal(runs[label + "_relu"], routed(after_relu)), label


# ---- wide outputs in bands of rows (docker/pycaffe-convbatch.patch) ----------------------

WIDE = """
force_backward: false
layer { name: "data" type: "Input" top: "data" top: "strip"
  input_param { shape { dim: 3 dim: 3 dim: 41 dim: 67 } shape { dim: 2 dim: 2 dim: 4 dim: 1100 } } }
layer { name: "c_pad" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 8 kernel_size: 3 pad: 1
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "c_dil" type: "Convolution" bottom: "a" top: "b" convolution_param { num_output: 6 kernel_size: 3 dilation: 2
  pad: 1 group: 2 bias_term: false weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "c_str" type: "Convolution" bottom: "b" top: "c" convolution_param { num_output: 4 kernel_h: 5 kernel_w: 3
  stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 0 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.5 } } }
layer { name: "c_big" type: "Convolution" bottom: "data" top: "d" convolution_param { num_output: 5 kernel_size: 7 stride: 2 pad: 3
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "c_row" type: "Convolution" bottom: "strip" top: "e" convolution_param { num_output: 3 kernel_size: 3 pad: 1
  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 1 } } }
"""


def test_wide_layers_in_bands_of_rows_equal_caffes_loop(tmp_path, monkeypatch):
    """Outputs of 2,747 (pad 1), 2,535 (dilation 2, 2 groups, no bias), 1,248 (5x3 kernel, stride
    2 across only: bands of 32 rows, the last one short), 714 pixels (7x7 stride 2: one band) and a strip
    1,100 wide (a band is one row): the banded forward equals Caffe's per-image loop
    (CAFFE_CONV_BATCH_MB=0) within the fidelity bound, and run to run bit-identical."""
    net, rng = _seeded_net(tmp_path / "wide.prototxt", WIDE, 7)
    net.blobs["data"].data[...] = rng.uniform(-50, 50, net.blobs["data"].data.shape)
    net.blobs["strip"].data[...] = rng.uniform(-50, 50, net.blobs["strip"].data.shape)
    out = {}
    for mb in ("0", "32", "32"):
        monkeypatch.setenv("CAFFE_CONV_BATCH_MB", mb)
        net.forward()
        out.setdefault(mb, []).append({b: net.blobs[b].data.copy() for b in "abcde"})
    assert {b: net.blobs[b].data.shape[2] * net.blobs[b].data.shape[3] for b in "abcde"} == \
        {"a": 2747, "b": 2535, "c": 1248, "d": 714, "e": 4400}
    old, (new, again) = out["0"][0], out["32"]
    for b in "abcde":
        assert rel(new[b], old[b]) <= BOUND, (b, rel(new[b], old[b]))
        assert np.array_equal(new[b], again[b]), b
