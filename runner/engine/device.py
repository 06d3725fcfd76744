"""Which device the tasks compute on, and which GPUs: the rules both launchers apply at plan
time (their resolve_device hooks) and a task started directly (run_shard with device=auto)."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Tuple

from .. import log
from ..errors import ConfigError
from .gpu import caffe_has_gpu, cuda_probe
from ..schema import CAFFE_LOADED, CPU_ONLY


def gpu_capable(cfg) -> bool:
    """Whether the tasks' engine can compute on a GPU (asked of this environment's Caffe)."""
    if cfg.backend == "simulated":
        return True  # stands in for a device in tests and benchmarks
    if cfg.backend in CPU_ONLY:
        return False
    return caffe_has_gpu()


def resolve_gpus(spec) -> List[str]:
    """launcher.gpus of the local launcher ("auto", a list, "1,3" or one id) -> GPU ids."""
    if spec not in (None, "auto"):
        if isinstance(spec, str):
            gpus = [g.strip() for g in spec.split(",") if g.strip()]
        elif isinstance(spec, int):
            gpus = [str(spec)]
        else:  # list / ListConfig
            gpus = [str(g) for g in spec]
        if not gpus:
            raise ConfigError("launcher.gpus is empty: give a list of GPU ids, e.g. launcher.gpus=[0,1]")
        return gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
        if n:
            return [str(i) for i in range(n)]
    raise ConfigError("device=gpu but no GPU is visible (CUDA_VISIBLE_DEVICES unset, nvidia-smi finds none): "
                      "set launcher.gpus=[0,1,...] or use device=cpu")


def resolve_local_device(cfg) -> str:
    """device=auto on this machine: the GPU when GPUs are visible here and Caffe has CUDA."""
    if cfg.device != "auto":
        return str(cfg.device)
    if not gpu_capable(cfg):
        return "cpu"
    try:
        resolve_gpus(cfg.launcher.get("gpus", "auto"))
    except ConfigError:
        return "cpu"
    if cfg.backend in CAFFE_LOADED:
        probe = cuda_probe()
        if not probe.usable:  # a CUDA build where the driver or devices cannot be used
            log.info("device=auto: the CPU (CUDA cannot use the GPUs here: %s)", probe.message)
            return "cpu"
    return "gpu"


def resolve_slurm_device(cfg) -> Tuple[str, int]:
    """(device, gpus_per_task) of a Slurm task. GPUs are requested only for tasks that will
    compute on them; holding a GPU while computing on the CPU is refused (allow_cpu_on_gpu)."""
    lc = cfg.launcher
    req = lc.gpus_per_task
    # with a container the image's Caffe runs, not this one: auto trusts this one (documented)
    capable = gpu_capable(cfg)
    if req == "auto" or req is None:
        gpus = 1 if cfg.device == "gpu" or (cfg.device == "auto" and capable) else 0
    else:
        try:
            gpus = int(req)
        except (TypeError, ValueError):
            gpus = -1
        if gpus < 0 or str(req).strip() not in (str(gpus), f"{gpus}.0"):
            raise ConfigError(f"launcher.gpus_per_task={req!r}: use auto, 0 or a positive integer")
    device = str(cfg.device)
    if device == "auto":
        device = "gpu" if gpus > 0 and capable else "cpu"
    if device == "gpu" and gpus == 0:
        raise ConfigError("device=gpu but launcher.gpus_per_task=0: the tasks would get no GPU; set "
                          "launcher.gpus_per_task=1 (or auto)")
    if device == "cpu" and gpus > 0:
        why = ("device=cpu" if cfg.device == "cpu" else
               f"backend={cfg.backend} computes on the CPU" if cfg.backend in CPU_ONLY else
               "this pycaffe is CPU-only")
        if not lc.get("allow_cpu_on_gpu", False):
            raise ConfigError(
                f"launcher.gpus_per_task={gpus} requests GPUs, but the tasks would compute on the CPU ({why}): "
                "use device=gpu with a CUDA build of Caffe (docker/Dockerfile.gpu), or launcher.gpus_per_task=0 "
                "to run on CPUs (launcher.allow_cpu_on_gpu=true runs anyway, e.g. to check GPU binding)")
        log.warning("launcher.allow_cpu_on_gpu=true: each task holds %d GPU(s) and computes on the CPU (%s)",
                    gpus, why)
    return device, gpus
