"""device=auto and the GPU request with this machine's real CPU-only pycaffe (imports caffe:
not in the unit layer)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.schema import LocalLauncherConf, ModelConf, RunConf, SlurmLauncherConf
from runner.errors import ConfigError
from runner.gpu import caffe_has_gpu
from runner.device import resolve_local_device, resolve_slurm_device


def _cfg(launcher, **top):
    cfg = OmegaConf.structured(RunConf(model=ModelConf(name="m", prototxt="p", weights="w"), launcher=launcher))
    for k, v in top.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture(autouse=True)
def cpu_only_caffe():
    if caffe_has_gpu():
        pytest.skip("this pycaffe has CUDA: these tests describe a CPU-only build")


def test_cpu_only_caffe_on_slurm_requests_no_gpu():
    assert resolve_slurm_device(_cfg(SlurmLauncherConf())) == ("cpu", 0)


def test_cpu_only_caffe_holding_a_gpu_is_refused_with_both_ways_out():
    with pytest.raises(ConfigError) as e:
        resolve_slurm_device(_cfg(SlurmLauncherConf(gpus_per_task=1)))
    msg = str(e.value)
    assert "this pycaffe is CPU-only" in msg and "device=gpu with a CUDA build" in msg
    assert "launcher.gpus_per_task=0" in msg
    assert resolve_slurm_device(_cfg(SlurmLauncherConf(gpus_per_task=1, allow_cpu_on_gpu=True))) == ("cpu", 1)


def test_cpu_only_caffe_local_auto_is_cpu_even_with_gpus_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resolve_local_device(_cfg(LocalLauncherConf())) == "cpu"
