"""device=auto and the GPU request with this machine's real CPU-only pycaffe (imports caffe:
not in the unit layer)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.schema import LocalLauncherConf, ModelConf, RunConf, SlurmLauncherConf
from runner.errors import ConfigError
from runner.engine.gpu import caffe_has_gpu
from runner.engine.device import resolve_local_device, resolve_slurm_device


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


def test_device_gpu_with_a_cpu_only_caffe_names_the_build_first(monkeypatch):
    """It used to say 'no GPU is visible: set launcher.gpus=[0,...]'; following that advice then
    revealed the real blocker. The CPU-only build is what to fix, whatever GPUs are listed."""
    from runner.launch.registry import launcher_for
    from runner.run.plan import _check_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi either
    for gpus in ("auto", [0, 1]):
        cfg = _cfg(LocalLauncherConf(gpus=gpus), device="gpu")
        with pytest.raises(ConfigError) as e:
            _check_device(cfg, launcher_for(cfg))
        assert "this pycaffe is CPU-only" in str(e.value) and "no GPU is visible" not in str(e.value)
