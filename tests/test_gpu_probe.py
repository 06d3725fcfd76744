"""runner/engine/gpu.py without a GPU: what device=gpu is told on each kind of machine (a table over
the pure explain_probe), and the real probe against the pycaffe installed in this venv."""
from __future__ import annotations

import pytest

from runner.errors import ConfigError
from runner.engine.gpu import CudaProbe, caffe_has_gpu, cuda_probe, explain_probe, require_cuda_device

NO_DRIVER = CudaProbe(35, "CUDA driver version is insufficient for CUDA runtime version", runtime_cuda=13000)
OLD_DRIVER = CudaProbe(35, "CUDA driver version is insufficient for CUDA runtime version", driver_cuda=12040,
                       runtime_cuda=13000, driver_lib=True)
NO_DEVICE = CudaProbe(100, "no CUDA-capable device is detected", driver_cuda=13000, runtime_cuda=13000,
                      driver_lib=True)
ZERO_DEVICES = CudaProbe(0, "no error", devices=0, driver_cuda=13000, runtime_cuda=13000, driver_lib=True)
BUSY = CudaProbe(46, "all CUDA-capable devices are busy or unavailable", driver_cuda=13000, runtime_cuda=13000,
                 driver_lib=True)
NOT_LOADABLE = CudaProbe(-1, "libcublasLt.so.13: cannot open shared object file")
GOOD = CudaProbe(0, "no error", devices=2, driver_cuda=13000, runtime_cuda=13000, driver_lib=True)


@pytest.mark.parametrize("probe,expect", [
    (NO_DRIVER, ["has no NVIDIA driver", "libcuda.so.1 not found", "insufficient", "device=cpu"]),
    (OLD_DRIVER, ["supports CUDA 12.4", "needs CUDA 13.0", ">= 580", "update the driver", "--cuda-home"]),
    (NO_DEVICE, ["no GPU is visible", "CUDA_VISIBLE_DEVICES='7'", "no CUDA-capable device", "nvidia-smi"]),
    (ZERO_DEVICES, ["no GPU is visible", "no devices"]),
    (BUSY, ["CUDA error 46", "busy or unavailable", "nvidia-smi"]),
    (NOT_LOADABLE, ["cannot be asked", "libcublasLt.so.13", "make setup CAFFE=gpu"]),
])
def test_each_unusable_machine_gets_its_own_reason_and_fix(probe, expect):
    msg = explain_probe(probe, "node7", "7")
    assert msg is not None and msg.startswith("device=gpu but ")
    for e in expect:
        assert e in msg, (e, msg)
    assert "node7" in msg


def test_usable_gpu_is_not_an_error():
    assert explain_probe(GOOD, "node7", None) is None
    assert GOOD.usable and not NO_DEVICE.usable and not ZERO_DEVICES.usable


def test_unset_visible_devices_is_said_so():
    assert "CUDA_VISIBLE_DEVICES unset" in explain_probe(NO_DEVICE, "h", None)


@pytest.mark.skipif(caffe_has_gpu(), reason="this venv has the CUDA build (tests/test_cuda_build.py covers it)")
def test_probe_of_cpu_build_says_cpu_only_without_loading_cuda():
    p = cuda_probe()
    assert p.code == -1 and "CPU-only" in p.message and p.library == ""
    with pytest.raises(ConfigError, match="CPU-only"):
        require_cuda_device()
