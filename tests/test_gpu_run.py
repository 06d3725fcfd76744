"""device=gpu for real: they need an NVIDIA GPU, a driver >= 580 and the CUDA build of pycaffe
in this venv (`make test-gpu`, on a GPU node). Elsewhere they are skipped with the reason the
probe gives. Written to run unchanged on a GPU node: the GPUs are whatever the probe sees."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_cli
from runner.engine.gpu import caffe_has_cudnn, caffe_has_gpu, cuda_probe, explain_probe
from runner.engine.selfcheck import FP32_TOLERANCE, TF32_TOLERANCE

pytestmark = pytest.mark.gpu


def _no_gpu_reason():
    if not caffe_has_gpu():
        return "this venv has the CPU build of pycaffe (make test-gpu installs the CUDA one)"
    p = cuda_probe()
    return explain_probe(p, "this machine", os.environ.get("CUDA_VISIBLE_DEVICES"))


_reason = _no_gpu_reason()
if _reason:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=f"no usable GPU: {_reason}")]


def _read(path: Path):
    with h5py.File(path, "r") as f:
        return f["feats"][:].astype(np.float64), [bytes(n) for n in f["names_raw"][:]], dict(f.attrs)


def _gpu_ids(n: int):
    """n GPU ids for launcher.gpus: distinct ones when there are enough, else GPU 0 repeated
    (two workers sharing one GPU still exercises two processes with their own CUDA context)."""
    count = cuda_probe().devices
    return [str(i % count) for i in range(n)]


def _devices(run: Path) -> set:
    out = set()
    for s in sorted((run / "shards").glob("*.h5")):
        with h5py.File(s, "r") as f:
            out.add(str(f.attrs["device"]))
    return out


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


@pytest.mark.slow
def test_local_two_gpu_workers_equal_cpu(photos, tmp_path):
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    args = [f"input.dir={photos}", "num_shards=4", "batch_size=4"]
    # device=cpu explicitly: on a GPU node device=auto would pick the GPU for the baseline too
    run_cli(*args, f"output.dir={cpu}", "device=cpu", "launcher.workers=2")
    run_cli(*args, f"output.dir={gpu}", "device=gpu", f"launcher.gpus=[{','.join(_gpu_ids(2))}]")
    a, b = _read(cpu / "features.h5"), _read(gpu / "features.h5")
    assert a[1] == b[1] and len(a[1]) >= 10
    assert a[0].shape == b[0].shape and _rel(a[0], b[0]) <= 1e-4, _rel(a[0], b[0])
    assert _devices(cpu) == {"cpu"}
    devices = _devices(gpu)
    assert devices and all(d.startswith("gpu:") for d in devices), devices
    assert run_cli("verify", gpu).returncode == 0


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_on_gpus_equals_cpu(cluster, photos, tmp_path):
    """A 2-task array with device=gpu on the dev cluster, whose gres/gpu are this node's
    /dev/nvidia* devices when it has them (slurm/dev-cluster)."""
    conf = Path(os.environ["SLURM_CONF"]).with_name("gres.conf").read_text()
    if "/dev/nvidia" not in conf:
        pytest.skip(f"the dev cluster's gres/gpu are not this node's GPUs: {conf.strip()}")
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    run_cli(f"input.dir={photos}", f"output.dir={cpu}", "num_shards=2", "device=cpu", "launcher.workers=2")
    run_cli(f"input.dir={photos}", f"output.dir={gpu}", "num_shards=2", "device=gpu", "launcher=slurm",
            "launcher.cpus_per_task=2", "launcher.mem_gb=4", "launcher.timeout_min=20", "launcher.gpus_per_task=1",
            "launcher.wait=true")
    a, b = _read(cpu / "features.h5"), _read(gpu / "features.h5")
    assert a[1] == b[1]
    assert _rel(a[0], b[0]) <= 1e-4, _rel(a[0], b[0])
    assert _devices(cpu) == {"cpu"}
    for i in range(2):
        with h5py.File(gpu / "shards" / f"shard-{i:05d}-of-00002.h5", "r") as f:
            assert f.attrs["device"].startswith("gpu:") and f.attrs["visible_gpus"] != ""
            # every task proved its first batch against the CPU before writing, in full FP32
            assert 0.0 <= float(f.attrs["selfcheck_max_rel_diff"]) <= FP32_TOLERANCE
            assert not bool(f.attrs["tf32"])
    stats = json.loads((gpu / "stats.json").read_text())
    assert all(s["selfcheck_max_rel_diff"] <= FP32_TOLERANCE for s in stats["shards"]), stats["shards"]
    assert run_cli("verify", gpu).returncode == 0


# ---- cuDNN and TF32 (issue 18) ----------------------------------------------------------

MODELS = [("res10_ssd", "fc7"), ("open_nsfw", "pool")]


def _run(photos, out, model, *extra):
    run_cli(f"model={model}", f"input.dir={photos}", f"output.dir={out}", "num_shards=1", "batch_size=8",
            "launcher.progress=false", *extra)
    feats, names, _ = _read(out / "features.h5")
    with h5py.File(next((out / "shards").glob("*.h5")), "r") as f:
        attrs = dict(f.attrs)
    return feats, names, attrs


@pytest.mark.slow
@pytest.mark.parametrize("model,blob", MODELS)
def test_cudnn_features_equal_cpu_within_the_selfcheck_tolerance(photos, tmp_path, model, blob):
    cpu = _run(photos, tmp_path / "cpu", model, "device=cpu", f"output.blobs=[{blob}]")
    gpu = _run(photos, tmp_path / "gpu", model, "device=gpu", f"output.blobs=[{blob}]")
    assert cpu[1] == gpu[1]
    assert _rel(gpu[0], cpu[0]) <= FP32_TOLERANCE, _rel(gpu[0], cpu[0])
    a = gpu[2]
    assert float(a["selfcheck_max_rel_diff"]) <= FP32_TOLERANCE and not bool(a["tf32"])
    if caffe_has_cudnn():  # the net really ran on cuDNN, and says so
        assert "convolution layers" in str(a["cudnn"]) and int(a["cudnn_conv_layers"]) > 0, a["cudnn"]


@pytest.mark.slow
@pytest.mark.parametrize("model,blob", MODELS)
def test_tf32_stays_within_its_documented_bound(photos, tmp_path, model, blob):
    cpu = _run(photos, tmp_path / "cpu", model, "device=cpu", f"output.blobs=[{blob}]")
    t32 = _run(photos, tmp_path / "tf32", model, "device=gpu", "model.tf32=true", f"output.blobs=[{blob}]")
    assert _rel(t32[0], cpu[0]) <= TF32_TOLERANCE, _rel(t32[0], cpu[0])
    assert bool(t32[2]["tf32"]) and float(t32[2]["selfcheck_tolerance"]) == TF32_TOLERANCE


def test_python_m_runner_gpu_reports_the_cudnn_it_loads():
    import subprocess
    import sys

    out = json.loads(subprocess.run([sys.executable, "-m", "runner.engine.gpu"], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["caffe_has_cudnn"] == caffe_has_cudnn()
    if out["caffe_has_cudnn"]:
        assert out["cudnn"] and out["cudnn_version"] >= 8000, out
