"""backend=auto (the CPU default) and backend=onnxruntime (issue 30): the net Caffe loaded, as
an ONNX graph run by ONNX Runtime (runner/engine/onnxport.py). Its features equal Caffe's within the
fidelity bound on tiny nets of unusual shapes and on the real models, run to run bit-identical;
a net that does not convert exactly, or whose first batch differs from Caffe's, runs on Caffe
(auto) or is refused (onnxruntime); the shard file says which engine computed its rows."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import run_cli, tiny_model_args
from test_forward_path import ODD, _seeded_net, odd_net, rel  # noqa: F401 (odd_net: a fixture)

BOUND = 1e-5  # the project's fidelity bound: max |new - old| / max |old|

# the layer types and parameters the converter maps, in unusual shapes: a max pooling whose
# last window overhangs (Caffe's ceil rounding), one padded, an unpadded average one, a padded
# one that fits, a global one, LRN,
# Eltwise SUM with coefficients, PROD and MAX, Concat, LeakyReLU, Sigmoid, TanH, Dropout,
# Flatten, InnerProduct on a 2-D blob, Softmax
ZOO = """
name: "zoo"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 21 dim: 19 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 6 kernel_size: 5 stride: 2 pad: 2 weight_filler { type: "gaussian" std: 0.05 }
  bias_filler { type: "constant" value: 0.2 } } }
layer { name: "leaky" type: "ReLU" bottom: "c1" top: "c1" relu_param { negative_slope: 0.1 } }
layer { name: "mp" type: "Pooling" bottom: "c1" top: "mp" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "mpp" type: "Pooling" bottom: "c1" top: "mpp" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "app" type: "Pooling" bottom: "mp" top: "app" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "lrn" type: "LRN" bottom: "mp" top: "lrn" lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 k: 2 } }
layer { name: "a" type: "Convolution" bottom: "lrn" top: "a"
  convolution_param { num_output: 6 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "b" type: "Convolution" bottom: "lrn" top: "b"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 group: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sig" type: "Sigmoid" bottom: "b" top: "sb" }
layer { name: "tanh" type: "TanH" bottom: "a" top: "ta" }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "sb" bottom: "ta" bottom: "a" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "prod" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "lrn" top: "cat" }
layer { name: "ap" type: "Pooling" bottom: "cat" top: "ap" pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "drop" type: "Dropout" bottom: "ap" top: "ap" dropout_param { dropout_ratio: 0.5 } }
layer { name: "gp" type: "Pooling" bottom: "ap" top: "gp" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "ap" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 9
  weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 5
  weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""
ZOO_SHAPE = (3, 21, 19)


@pytest.fixture(scope="module")
def zoo_net(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    proto = d / "zoo.prototxt"
    net, _ = _seeded_net(proto, ZOO, 11)
    weights = d / "zoo.caffemodel"
    net.save(str(weights))
    return proto, weights


def _model(weights):
    return OmegaConf.create({"weights": str(weights), "conv_batch_mb": 0, "fold_batchnorm": False})


def _caffe(proto, weights, blobs, shape):
    from runner.engine.model import CaffeEngine, parse_prototxt

    return CaffeEngine(_model(weights), parse_prototxt(str(proto)), blobs, shape)


def _onnx(proto, weights, blobs, shape, required=False, threads=1):
    from runner.engine.model import OnnxEngine, parse_prototxt

    return OnnxEngine(_model(weights), parse_prototxt(str(proto)), blobs, shape, threads, required=required)


def _equal_within_bound(proto, weights, blobs, shape, seed):
    x = np.random.default_rng(seed).uniform(-100, 100, (7,) + shape).astype(np.float32)
    old = _caffe(proto, weights, blobs, shape).forward(x)
    eng = _onnx(proto, weights, blobs, shape)
    new = eng.forward(x)
    for b in blobs:
        assert new[b].shape == old[b].shape, b
        assert rel(new[b], old[b]) <= BOUND, (b, rel(new[b], old[b]))
    assert eng.attrs()["engine"].startswith("onnxruntime")  # the first batch's check passed
    assert eng.attrs()["engine_check_max_rel_diff"] <= BOUND
    again = eng.forward(x)
    assert all(np.array_equal(again[b], new[b]) for b in blobs)  # the same numbers every run
    one = eng.forward(x[2:3])  # a shard's last batch of one, then the full batch again
    assert all(rel(one[b][0], new[b][2]) <= BOUND for b in blobs)
    assert all(np.array_equal(eng.forward(x)[b], new[b]) for b in blobs)


@pytest.mark.parametrize("blobs", [["fc"], ["fc", "o_bn"], ["g", "a", "fc"]])
def test_odd_net_onnx_equals_caffe(odd_net, blobs):
    """Groups, strides, dilation, a 1x1 and a 2x3 kernel, BN (Caffe's scale factor, large eps)
    with and without Scale, in place (g is read after its BN, Scale and ReLU: its last
    version) and not; a batch of 7, then 1."""
    _equal_within_bound(*odd_net, blobs, (3, 24, 30), 0)


@pytest.mark.parametrize("blobs", [["prob"], ["mpp", "gp", "fc", "c1"], ["cat", "sum", "app"]])
def test_zoo_net_onnx_equals_caffe(zoo_net, blobs):
    _equal_within_bound(*zoo_net, blobs, ZOO_SHAPE, 1)


# ---- what does not convert, or does not match --------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("layer, shape, why", [
    ('layer { name: "f" type: "Flatten" bottom: "x" top: "f" flatten_param { axis: 0 } }',
     (1, 4, 8, 8), "a Flatten over the batch axis"),
    ('layer { name: "p" type: "Pooling" bottom: "x" top: "p" pooling_param { pool: STOCHASTIC kernel_size: 2 } }',
     (1, 4, 8, 8), "stochastic pooling"),
    ('layer { name: "w" type: "Power" bottom: "x" top: "w" }', (1, 4, 8, 8), "no Power layer in the converter"),
    ('layer { name: "s" type: "Scale" bottom: "x" bottom: "y" top: "s" }', (1, 4, 8, 8), "second bottom"),
    ('layer { name: "b" type: "BatchNorm" bottom: "x" top: "x" batch_norm_param { use_global_stats: false } }',
     (1, 4, 8, 8), "use_global_stats: false"),
    ('layer { name: "l" type: "LRN" bottom: "x" top: "l" lrn_param { norm_region: WITHIN_CHANNEL } }',
     (1, 4, 8, 8), "LRN within channels"),
    # fields of the Caffe fork we build (brocolli), not BVLC's
    ('layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 4 kernel_size: 1 '
     'width_group: 2 } }', (1, 4, 8, 8), "width_group"),
])
def test_what_does_not_map_exactly_is_named(layer, shape, why):
    from google.protobuf import text_format

    from runner.engine.model import caffe_pb2
    from runner.engine.onnxport import unsupported

    param = caffe_pb2().NetParameter()
    text_format.Merge(layer, param)
    reasons = unsupported(list(param.layer), {"x": shape, "y": shape[:2]})
    assert len(reasons) == 1 and why in reasons[0] and reasons[0].startswith(param.layer[0].name + " ("), reasons


@pytest.mark.unit
@pytest.mark.parametrize("size, kernel, pad, stride, out", [
    (8, 3, 0, 2, 4), (7, 3, 0, 2, 3), (8, 2, 1, 2, 5), (9, 2, 1, 2, 5), (5, 3, 1, 2, 3), (10, 3, 1, 3, 4)])
def test_caffes_pooled_size(size, kernel, pad, stride, out):
    from runner.engine.onnxport import caffe_pool_out

    assert caffe_pool_out(size, kernel, pad, stride) == out


POWER = ODD.replace('layer { name: "fc"', 'layer { name: "pow" type: "Power" bottom: "p" top: "p" '
                    'power_param { power: 2 shift: 1 } }\nlayer { name: "fc"')


def test_auto_runs_caffe_for_a_net_that_does_not_convert(tmp_path, photos):
    """A Power layer: auto computes with Caffe (the shard says engine=caffe), onnxruntime refuses
    it, in one line naming the layer and the fix."""
    proto = tmp_path / "pow.prototxt"
    net, _ = _seeded_net(proto, POWER, 2)
    weights = tmp_path / "pow.caffemodel"
    net.save(str(weights))
    model = [f"model.prototxt={proto}", f"model.weights={weights}", "model.name=pow",
             "model.preprocess.mean=[100,110,120]", "model.preprocess.channel_order=BGR",
             "model.preprocess.raw_scale=255", "model.preprocess.scale=1", "model.input_size=[24,30]"]
    common = (f"input.dir={photos}", "launcher=local", "launcher.workers=1", "num_shards=1", "output.blobs=[fc]",
              *model)
    run_cli(*common, f"output.dir={tmp_path / 'auto'}")
    with h5py.File(tmp_path / "auto" / "shards" / "shard-00000-of-00001.h5") as f:
        assert f.attrs["engine"] == "caffe"
    p = run_cli("inspect", *model, "output.blobs=[fc]")  # said before any run
    assert "engine on the CPU (backend=auto): Caffe (pow (Power): no Power layer in the converter)" in p.stdout, \
        p.stdout
    p = run_cli(*common, f"output.dir={tmp_path / 'ort'}", "backend=onnxruntime", check=False)
    assert p.returncode != 0
    assert "pow (Power): no Power layer in the converter" in p.stderr and "backend=auto" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture
def wrong_epsilon(monkeypatch):
    """A converter whose BatchNorm takes 10x Caffe's eps: within reach of every other check."""
    import onnx.helper

    make_node = onnx.helper.make_node

    def bad(op, *args, **kw):
        if op == "BatchNormalization":
            kw["epsilon"] = kw["epsilon"] * 10
        return make_node(op, *args, **kw)

    monkeypatch.setattr(onnx.helper, "make_node", bad)


def test_a_net_that_differs_on_the_noise_probe_runs_on_caffe(odd_net, wrong_epsilon):
    """The load's probe batch of noise catches the wrong conversion before any image: auto runs
    Caffe, onnxruntime refuses in one line."""
    from runner.errors import ConfigError
    from runner.engine.model import NotConvertible, load_engine, parse_prototxt

    with pytest.raises(NotConvertible, match=r"random noise .*on blob 'fc'"):
        _onnx(*odd_net, ["fc"], (3, 24, 30))
    proto, weights = odd_net
    cfg = OmegaConf.create({"backend": "auto", "device": "cpu", "model": {"weights": str(weights)}})
    assert load_engine(cfg, parse_prototxt(str(proto)), ["fc"], (3, 24, 30), threads=1).attrs() == {"engine": "caffe"}
    cfg.backend = "onnxruntime"
    with pytest.raises(ConfigError, match=r"random noise"):
        load_engine(cfg, parse_prototxt(str(proto)), ["fc"], (3, 24, 30), threads=1)


def test_a_first_batch_that_differs_goes_on_with_caffe(odd_net, wrong_epsilon, monkeypatch):
    """Without the probe (here switched off), the first batch's check: auto: the task goes on
    with Caffe's rows (the difference recorded); onnxruntime: stops before a row is returned."""
    import runner.engine.model
    from runner.engine.model import OnnxCheckError

    monkeypatch.setattr(runner.engine.model, "PROBE_IMAGES", 0)

    x = np.random.default_rng(3).uniform(-100, 100, (5, 3, 24, 30)).astype(np.float32)
    old = _caffe(*odd_net, ["fc"], (3, 24, 30)).forward(x)
    eng = _onnx(*odd_net, ["fc"], (3, 24, 30))
    new = eng.forward(x)
    a = eng.attrs()
    assert a["engine"].startswith("caffe (onnxruntime differed by") and a["engine_check_max_rel_diff"] > BOUND, a
    assert rel(new["fc"], old["fc"]) <= BOUND
    assert rel(eng.forward(x)["fc"], old["fc"]) <= BOUND  # and the batches after it
    with pytest.raises(OnnxCheckError, match=r"first 4 images differ from Caffe's.*no row was written"):
        _onnx(*odd_net, ["fc"], (3, 24, 30), required=True).forward(x)


@pytest.mark.unit
def test_a_run_planned_with_caffe_resumes_with_auto(photos, tmp_path, tiny_net):
    """The run dir records the backend family: caffe, auto and onnxruntime compute the same net
    within the bound, so changing among them (or the new default) resumes instead of refusing."""
    from runner.schema import identity_backend

    assert {identity_backend(b) for b in ("caffe", "auto", "onnxruntime")} == {"caffe"}
    assert identity_backend("opencv") == "opencv"
    out = tmp_path / "run"
    common = (f"input.dir={photos}", f"output.dir={out}", "launcher=local", "launcher.workers=1", "num_shards=2",
              *tiny_model_args(tiny_net))
    run_cli(*common, "backend=caffe")
    p = run_cli(*common, "backend=auto")
    assert "already complete" in p.stderr, p.stderr


def test_an_onnx_runtime_error_runs_the_net_on_caffe(odd_net, monkeypatch):
    """Whatever ONNX Runtime itself refuses (here: making the session) is no error of the
    user's model, which Caffe loaded: auto runs Caffe, onnxruntime refuses in one line."""
    import runner.engine.onnxport
    from runner.errors import ConfigError
    from runner.engine.model import load_engine, parse_prototxt

    def broken(model, threads):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : a kernel this build lacks")

    monkeypatch.setattr(runner.engine.onnxport, "session", broken)
    proto, weights = odd_net
    spec = parse_prototxt(str(proto))
    cfg = OmegaConf.create({"backend": "auto", "device": "cpu", "model": {"weights": str(weights)}})
    eng = load_engine(cfg, spec, ["fc"], (3, 24, 30), threads=1)
    assert eng.attrs() == {"engine": "caffe"}
    cfg.backend = "onnxruntime"
    with pytest.raises(ConfigError, match=r"ONNX Runtime cannot run it: RuntimeError: .*a kernel this build lacks"):
        load_engine(cfg, spec, ["fc"], (3, 24, 30), threads=1)


FACT5 = """
name: "fact5"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 30 dim: 31 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3
  weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 3 stride: 2
  pad_h: 0 pad_w: 1 } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" flatten_param { axis: 2 } }
"""


def test_the_fact_5_net_runs_under_auto_as_under_caffe(tmp_path, photos):
    """Issue 35, fact 5: conv, AVE pooling padded on one axis only, Flatten { axis: 2 }, both
    blobs asked: backend=auto exits 0 on ONNX Runtime (the probe and every shard's first batch
    passed), every shard's rows within the bound of backend=caffe's, in Caffe's shapes."""
    proto = tmp_path / "fact5.prototxt"
    net, _ = _seeded_net(proto, FACT5, 4)
    weights = tmp_path / "fact5.caffemodel"
    net.save(str(weights))
    common = (f"input.dir={photos}", "launcher=local", "launcher.workers=1", "num_shards=2", "output.blobs=[pool,flat]",
              f"model.prototxt={proto}", f"model.weights={weights}", "model.name=fact5",
              "model.preprocess.mean=[100,110,120]", "model.preprocess.channel_order=BGR",
              "model.preprocess.raw_scale=255", "model.preprocess.scale=1", "model.input_size=[30,31]")
    run_cli(*common, f"output.dir={tmp_path / 'caffe'}", "backend=caffe")
    run_cli(*common, f"output.dir={tmp_path / 'auto'}", "backend=auto")
    for i in range(2):
        name = f"shards/shard-{i:05d}-of-00002.h5"
        with h5py.File(tmp_path / "caffe" / name) as c, h5py.File(tmp_path / "auto" / name) as a:
            assert a.attrs["engine"].startswith("onnxruntime"), dict(a.attrs)
            assert a.attrs["engine_check_max_rel_diff"] <= BOUND and a.attrs["engine_check_probe_max_rel_diff"] <= BOUND
            assert c["features/pool"].shape[1:] == a["features/pool"].shape[1:] == (4, 14, 15)
            assert c["features/flat"].shape[1:] == a["features/flat"].shape[1:] == (4, 210)
            for b in ("pool", "flat"):
                assert rel(a["features/" + b][:], c["features/" + b][:]) <= BOUND, b


@pytest.fixture
def old_flatten(monkeypatch):
    """The converter's Flatten as it was before issue 35: ONNX Flatten(axis), right for axis 1
    only ((N*C, H*W) for axis 2, against Caffe's (N, C, H*W))."""
    from dataclasses import replace

    import runner.engine.onnxport as op

    def flatten(g, lp, ins, w, shapes):
        g.node("Flatten", ins, [g.new(lp.top[0])], lp.name, axis=int(lp.flatten_param.axis))

    kind = op.REGISTRY["Flatten"]
    monkeypatch.setitem(op.REGISTRY, "Flatten", replace(kind, check=lambda lp, shapes: "", convert=flatten))


def test_onnx_shapes_are_compared_with_caffes_at_load(tmp_path, old_flatten):
    """A conversion whose output shape is not Caffe's is refused when the net loads, before any
    image (auto: Caffe computes the task, its rows in Caffe's shapes); the engine's row shapes
    are Caffe's in any case."""
    from runner.engine.model import NotConvertible, load_engine, parse_prototxt

    proto = tmp_path / "fact5.prototxt"
    net, _ = _seeded_net(proto, FACT5, 4)
    weights = tmp_path / "fact5.caffemodel"
    net.save(str(weights))
    with pytest.raises(NotConvertible, match=r"blob 'flat' is \[210\] in ONNX Runtime, \[4, 210\] in Caffe"):
        _onnx(proto, weights, ["pool", "flat"], (3, 30, 31))
    cfg = OmegaConf.create({"backend": "auto", "device": "cpu", "model": {"weights": str(weights)}})
    eng = load_engine(cfg, parse_prototxt(str(proto)), ["pool", "flat"], (3, 30, 31), threads=1)
    assert eng.attrs() == {"engine": "caffe"} and eng.blob_shapes == {"pool": (4, 14, 15), "flat": (4, 210)}


def test_every_shard_first_batch_is_checked_again(odd_net, monkeypatch):
    """A task keeping its engine for several shards checks each shard's first batch against
    Caffe (its net freed after each check, loaded again for the next); a shard whose batch
    differs goes on with Caffe."""
    x = np.random.default_rng(5).uniform(-100, 100, (5, 3, 24, 30)).astype(np.float32)
    old = _caffe(*odd_net, ["fc"], (3, 24, 30)).forward(x)
    eng = _onnx(*odd_net, ["fc"], (3, 24, 30))
    eng.start_shard()
    eng.forward(x)
    first = eng.attrs()
    assert first["engine"].startswith("onnxruntime") and first["engine_check_max_rel_diff"] <= BOUND
    assert eng._reference is None  # freed after the check
    eng.forward(x)  # the shard's other batches: not checked
    eng.start_shard()
    eng.forward(x)  # the next shard: checked again, passes
    assert eng.attrs()["engine"].startswith("onnxruntime") and eng._reference is None
    real = eng._session.run

    def drifted(names, feeds):  # ONNX Runtime now computes something else
        return [o * 1.001 for o in real(names, feeds)]

    monkeypatch.setattr(eng._session, "run", drifted)
    eng.forward(x)  # no shard began: not checked, not caught
    eng.start_shard()
    new = eng.forward(x)
    a = eng.attrs()
    assert a["engine"].startswith("caffe (onnxruntime differed by") and a["engine_check_max_rel_diff"] > BOUND, a
    assert rel(new["fc"], old["fc"]) <= BOUND
    assert rel(eng.forward(x)["fc"], old["fc"]) <= BOUND


DRIFT = """
# loaded by every Python process of the run (PYTHONPATH): ONNX Runtime made wrong by 0.1% after
# the load's probe (switched off), so that each shard's first batch falls back to Caffe
import runner.engine.model
import runner.engine.onnxport

runner.engine.model.PROBE_IMAGES = 0
_real = runner.engine.onnxport.session


class _Drifted:
    def __init__(self, s):
        self.s = s

    def run(self, names, feeds):
        return [o * 1.001 for o in self.s.run(names, feeds)]


runner.engine.onnxport.session = lambda model, threads: _Drifted(_real(model, threads))
"""


def test_a_fallback_writes_rows_in_caffes_shapes(tmp_path, photos):
    """Issue 35, fact 5's second defect: after a shard's first batch falls back to Caffe, the
    shard's datasets (made from the engine's shapes: Caffe's) take Caffe's rows; exit 0, the
    rows equal backend=caffe's, the shard says why it ran Caffe."""
    proto = tmp_path / "fact5.prototxt"
    net, _ = _seeded_net(proto, FACT5, 4)
    weights = tmp_path / "fact5.caffemodel"
    net.save(str(weights))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(DRIFT)
    common = (f"input.dir={photos}", "launcher=local", "launcher.workers=1", "num_shards=1", "output.blobs=[pool,flat]",
              f"model.prototxt={proto}", f"model.weights={weights}", "model.name=fact5",
              "model.preprocess.mean=[100,110,120]", "model.preprocess.channel_order=BGR",
              "model.preprocess.raw_scale=255", "model.preprocess.scale=1", "model.input_size=[30,31]")
    run_cli(*common, f"output.dir={tmp_path / 'caffe'}", "backend=caffe")
    p = run_cli(*common, f"output.dir={tmp_path / 'auto'}", "backend=auto", env={"PYTHONPATH": str(site)})
    assert "goes on with Caffe" in p.stderr, p.stderr
    name = "shards/shard-00000-of-00001.h5"
    with h5py.File(tmp_path / "caffe" / name) as c, h5py.File(tmp_path / "auto" / name) as a:
        assert a.attrs["engine"].startswith("caffe (onnxruntime differed by"), dict(a.attrs)
        for b in ("pool", "flat"):
            assert a["features/" + b].shape == c["features/" + b].shape
            assert rel(a["features/" + b][:], c["features/" + b][:]) <= BOUND, b
