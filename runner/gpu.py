"""What this machine's Caffe and GPUs can do, asked without letting Caffe abort the process.

A CPU-only pycaffe aborts (glog FATAL) on set_mode_gpu + forward, and a CUDA pycaffe aborts
on set_mode_gpu when no usable driver is there: every question here is answered by looking
at files or through cheap probes, before Caffe is asked for a GPU.
"""
from __future__ import annotations

import importlib.util

from .errors import ConfigError


def caffe_has_gpu() -> bool:
    """Whether the installed _caffe.so was built with CUDA (it links the CUDA runtime)."""
    spec = importlib.util.find_spec("caffe._caffe")
    if spec is None or not spec.origin:
        return False
    with open(spec.origin, "rb") as f:
        data = f.read()
    return b"libcudart" in data or b"cudaGetDevice" in data


def require_gpu_caffe() -> None:
    if not caffe_has_gpu():
        raise ConfigError("device=gpu but this pycaffe is CPU-only (built by docker/build-pycaffe.sh): use "
                          "device=cpu, or the CUDA image docker/Dockerfile.gpu on a GPU cluster")
