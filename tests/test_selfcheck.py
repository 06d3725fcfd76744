"""The GPU self-check (runner/engine/selfcheck.py) and what a GPU task says and sets (runner/engine/gpu.py).

The comparison and its messages are pure and tested without pycaffe. The task-level tests run
a real shard in this process with the tiny net on pycaffe's CPU on both sides, the "GPU" side
substituted by an engine that claims a GPU: perturbed, the task must stop with the one line
and write no row; exact, it must pass and record its difference in the shard and stats.json.
On a GPU node, tests/test_gpu_run.py checks the real thing."""
from __future__ import annotations

import math
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import tiny_model_args
from runner.engine import selfcheck as sc
from runner.engine.gpu import cudnn_conv_layers, describe_cudnn, gpu_numerics_env


# ---- pure parts --------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("gpu,cpu,want", [
    ([1.0, 2.0, 4.0], [1.0, 2.0, 4.0], 0.0),
    ([1.0, 2.0, 4.0 + 4e-6], [1.0, 2.0, 4.0], 1e-6),          # relative to the blob's max, 4
    ([0.0, 1e-3, 4.0], [0.0, 0.0, 4.0], 2.5e-4),              # a near-zero element does not blow up
    ([0.0, 0.0], [0.0, 0.0], 0.0),
    ([0.0, 1.0], [0.0, 0.0], math.inf),                       # cpu all zeros, gpu not
    ([np.nan, 1.0], [0.0, 1.0], math.inf),                    # NaN on the GPU only
    ([1.0, 2.0], [1.0, 2.0, 3.0], math.inf),                  # shapes differ
])
def test_relative_difference(gpu, cpu, want):
    got = sc.relative_difference(np.array(gpu), np.array(cpu))
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.unit
def test_judge_takes_the_worst_blob_and_tolerance_depends_on_tf32():
    chk = sc.check_verdict({"a": 1e-6, "b": 3e-3}, sc.tolerance(None, tf32=False), 4, 0.5)
    assert (chk.blob, chk.max_rel_diff, chk.passed) == ("b", 3e-3, False)
    assert sc.check_verdict({"a": 1e-6, "b": 3e-3}, sc.tolerance(None, tf32=True), 4, 0.5).passed
    assert sc.tolerance(None, False) == sc.FP32_TOLERANCE < sc.tolerance(None, True) == sc.TF32_TOLERANCE
    assert sc.tolerance(0.5, False) == 0.5
    assert chk.attrs()["selfcheck_blob"] == "b" and chk.attrs()["selfcheck_max_rel_diff"] == 3e-3


@pytest.mark.unit
def test_failure_line_names_difference_blob_gpu_and_fixes():
    chk = sc.check_verdict({"fc7": 0.031}, 1e-4, 4, 0.2)
    line = sc.failure_line(chk, "NVIDIA A100 (device 0, CUDA_VISIBLE_DEVICES=3)", tf32=False)
    assert "\n" not in line
    for part in ("0.031", "'fc7'", "NVIDIA A100 (device 0, CUDA_VISIBLE_DEVICES=3)", "0.0001", "device=cpu",
                 "--no-cudnn", "model.tf32=false", "driver", "no row was written"):
        assert part in line, part


@pytest.mark.unit
def test_gpu_numerics_env():
    assert gpu_numerics_env(False, 64) == {"NVIDIA_TF32_OVERRIDE": "0", "CAFFE_CUDNN_WORKSPACE_MB": "64"}
    assert gpu_numerics_env(True, 8) == {"NVIDIA_TF32_OVERRIDE": None, "CAFFE_CUDNN_WORKSPACE_MB": "8"}


def _conv(engine=0, dilation=()):
    return SimpleNamespace(type="Convolution", convolution_param=SimpleNamespace(engine=engine, dilation=list(dilation)))


@pytest.mark.unit
def test_cudnn_conv_layers_follows_caffes_layer_factory():
    layers = [_conv(), _conv(engine=2), _conv(engine=1), _conv(dilation=[2]), _conv(dilation=[1]),
              SimpleNamespace(type="Pooling")]
    assert cudnn_conv_layers(layers) == (3, 5)


@pytest.mark.unit
@pytest.mark.parametrize("args,want", [
    (("cpu", True, 92400, 3, 3), "no cuDNN: device=cpu"),
    (("gpu", False, 0, 3, 3), "no cuDNN: this pycaffe was built without it"),
    (("gpu", True, 92400, 11, 12), "cuDNN 9.24.0 for 11 of 12 convolution layers"),
    (("gpu", True, 8907, 2, 2), "cuDNN 8.9.7 for 2 of 2 convolution layers"),
    (("gpu", True, 92400, 0, 4), "no convolution layer picks it"),
])
def test_describe_cudnn(args, want):
    assert want in describe_cudnn(*args)


# ---- a real shard, the GPU side substituted -----------------------------------------------

def _prepare(tiny_net, photos, out):
    from runner.run.config import compose
    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    cfg = compose([f"input.dir={photos}", f"output.dir={out}", "num_shards=1", "batch_size=4", "device=cpu",
                   *tiny_model_args(tiny_net)])
    prepare_run(cfg, launcher_for(cfg), explicit_shards=1)
    return cfg


def _fake_gpu(monkeypatch, perturb):
    """load_engine returns the real pycaffe CPU engine posing as a GPU one; its forward (the
    'GPU') adds perturb(blob) to every output, forward_cpu is the untouched CPU forward."""
    import runner.task.extract as extract

    real = extract.load_engine

    def load(cfg, spec, blobs, in_shape, threads, gpu_device=0, **kw):
        eng = real(cfg, spec, blobs, in_shape, threads, gpu_device, **kw)
        cpu_forward = eng.forward

        def gpu_forward(x):
            return {b: v + perturb(v) for b, v in cpu_forward(x).items()}

        eng.forward, eng.forward_cpu = gpu_forward, cpu_forward
        eng.on_gpu, eng.gpu_label = True, "FakeGPU 9000 (device 0)"
        return eng

    monkeypatch.setattr(extract, "load_engine", load)


@pytest.mark.slow
def test_perturbed_gpu_stops_the_task_before_any_row(tiny_net, photos, tmp_path, monkeypatch):
    from runner.task.extract import run_shard

    cfg = _prepare(tiny_net, photos, tmp_path / "run")
    # 1e-3 of each blob's scale: what TF32 would do, ten times the FP32 tolerance
    _fake_gpu(monkeypatch, lambda v: 1e-3 * np.abs(v).max() * np.sign(v + 1e-30))
    with pytest.raises(sc.SelfCheckError) as e:
        run_shard(cfg, 0, threads=1)
    line = str(e.value)
    assert "\n" not in line and "FakeGPU 9000 (device 0)" in line and "'emb'" in line and "device=cpu" in line
    measured = float(line.split("differs from the CPU by ")[1].split()[0])
    assert measured == pytest.approx(1e-3, rel=0.05)
    shards = tmp_path / "run" / "shards"
    assert not list(shards.glob("*.h5")), "a failed self-check must leave no complete shard"
    for partial in shards.glob("*.partial*"):
        with h5py.File(partial, "r") as f:
            assert int(f.attrs.get("rows", 0)) == 0 and int(f.attrs.get("n_failures", 0)) == 0


@pytest.mark.slow
def test_exact_gpu_passes_and_records_its_difference(tiny_net, photos, tmp_path, monkeypatch):
    from runner.task.extract import run_shard
    from runner.run.plan import load_run
    from runner.store.stats import write_stats

    cfg = _prepare(tiny_net, photos, tmp_path / "run")
    _fake_gpu(monkeypatch, lambda v: np.zeros_like(v))
    res = run_shard(cfg, 0, threads=1)
    assert res["rows"] >= 10 and res["selfcheck_max_rel_diff"] == 0.0
    [shard] = (tmp_path / "run" / "shards").glob("*.h5")
    with h5py.File(shard, "r") as f:
        a = dict(f.attrs)
    assert a["selfcheck_max_rel_diff"] == 0.0 and a["selfcheck_blob"] == "emb"
    assert a["selfcheck_tolerance"] == sc.FP32_TOLERANCE and a["selfcheck_images"] == sc.SELFCHECK_IMAGES
    assert a["selfcheck_cpu_s"] > 0
    # what ran is recorded too: full FP32, the workspace bound, and (CPU build here) no cuDNN
    assert not a["tf32"] and a["cudnn_workspace_mb"] == 64 and a["gpu"] == "FakeGPU 9000 (device 0)"
    assert str(a["cudnn"]).startswith("no cuDNN: this pycaffe was built without it")
    st = write_stats(load_run(cfg))
    assert st["shards"][0]["selfcheck_max_rel_diff"] == 0.0 and st["shards"][0]["selfcheck_blob"] == "emb"


@pytest.mark.slow
def test_small_difference_passes_and_the_switch_turns_the_check_off(tiny_net, photos, tmp_path, monkeypatch):
    from runner.task.extract import run_shard

    # 1e-6 of the scale: FP32 summation-order noise passes, and is measured
    cfg = _prepare(tiny_net, photos, tmp_path / "a")
    _fake_gpu(monkeypatch, lambda v: 1e-6 * np.abs(v).max() * np.ones_like(v))
    res = run_shard(cfg, 0, threads=1)
    assert 5e-7 < res["selfcheck_max_rel_diff"] < 2e-6
    # off: a large difference goes through unchecked, and nothing is recorded
    cfg = _prepare(tiny_net, photos, tmp_path / "b")
    cfg.gpu_selfcheck = False
    _fake_gpu(monkeypatch, lambda v: 0.5 * np.abs(v).max() * np.ones_like(v))
    res = run_shard(cfg, 0, threads=1)
    assert res["rows"] >= 10 and "selfcheck_max_rel_diff" not in res


# ---- the GPU report (bench/bench_gpu.py) --------------------------------------------------

def test_bench_gpu_switch_takes_every_layer_off_cudnn(tiny_net):
    import sys

    from google.protobuf import text_format

    from conftest import REPO
    from runner.engine.model import caffe_pb2

    sys.path.insert(0, str(REPO / "bench"))
    from bench_gpu import without_cudnn

    p = caffe_pb2().NetParameter()
    text_format.Merge(without_cudnn(tiny_net[0].read_text()), p)
    assert cudnn_conv_layers(p.layer) == (0, 1)
    engines = {lp.name: lp for lp in p.layer}
    assert engines["pool-1"].pooling_param.engine == 1 and engines["act"].tanh_param.engine == 1
    assert engines["prob"].softmax_param.engine == 1 and engines["relu.1"].relu_param.engine == 1


def test_bench_gpu_without_a_gpu_stops_with_the_reason(tmp_path):
    import subprocess
    import sys

    from conftest import REPO
    from runner.engine.gpu import caffe_has_gpu, cuda_probe

    if caffe_has_gpu() and cuda_probe().usable:
        pytest.skip("a usable GPU is here: make bench-gpu measures it")
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("bench-gpu: skipped: ") and len(p.stderr.splitlines()) == 1
    assert not out.exists()


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("model.cudnn_workspace_mb=-1", "model.cudnn_workspace_mb=-1: use 0"),
    ("gpu_selfcheck_tolerance=0", "gpu_selfcheck_tolerance=0.0: use a positive bound"),
])
def test_bad_gpu_numbers_are_refused_before_any_work(override, message):
    from runner.run.config import compose
    from runner.errors import ConfigError
    from runner.run.plan import _check_ranges

    _check_ranges(compose(["output.dir=/nonexistent"]))
    with pytest.raises(ConfigError, match=message):
        _check_ranges(compose(["output.dir=/nonexistent", override]))


@pytest.mark.unit
def test_the_end_of_run_summary_shows_the_self_checks():
    from runner.store.stats import format_summary

    st = {"rows": 10, "failures": 0, "failures_by_reason": {},
          "shards": [{"shard": 0, "selfcheck_max_rel_diff": 2.5e-7}, {"shard": 1, "selfcheck_max_rel_diff": 1.2e-6}]}
    text = format_summary({"run_dir": "/r", "stats": st, "shards": {}})
    assert "GPU self-check: 2 shard(s) passed, GPU vs CPU at most 1.2e-06" in text
    st["shards"] = [{"shard": 0}]
    assert "self-check" not in format_summary({"run_dir": "/r", "stats": st, "shards": {}})
