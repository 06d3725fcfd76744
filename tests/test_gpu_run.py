"""device=gpu for real: they need an NVIDIA GPU, a driver >= 580 and the CUDA build of pycaffe
in this venv (`make test-gpu`, on a GPU node). Elsewhere they are skipped with the reason the
probe gives. Written to run unchanged on a GPU node: the GPUs are whatever the probe sees."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_cli
from runner.gpu import caffe_has_gpu, cuda_probe, explain_probe

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
    assert run_cli("verify", gpu).returncode == 0
