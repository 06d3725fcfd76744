"""The GPU self-check: before a task on a GPU writes its first row, its first images are
computed again on the CPU with the same net and weights, and the task stops when the two
differ beyond a tolerance. A broken driver, a build whose GPU code does not fit the GPU, or
TF32 arithmetic nobody asked for then ends the task in seconds instead of silently changing
every feature of the run.

The metric, per requested blob: max |gpu - cpu| / max |cpu|, over the checked images (the
largest element error, relative to the blob's scale; an element-wise relative error would
blow up on the near-zero values ReLU nets are full of). The worst blob decides.

The tolerance, from evidence:
- FP32 on both sides differs only in summation order and algorithm (cuBLAS/cuDNN vs
  OpenBLAS, im2col vs Winograd/FFT/implicit GEMM): about 1e-6 relative per element, a few
  1e-6 on deep features. Measured on this metric between two independent FP32
  implementations of the same nets, Caffe CPU vs OpenCV DNN (whose 3x3 convolutions use
  Winograd), 20 sample photos (bench/selfcheck_evidence.py -> bench/selfcheck_evidence.json):
  res10 fc7 3.2e-6, open_nsfw pool 1.6e-6. FP32_TOLERANCE = 1e-4 leaves 30x above that for
  cuDNN's FFT/Winograd algorithms, which lose a few more bits.
- TF32 rounds the multiplicands to a 10-bit mantissa (unit roundoff 2^-11 = 4.9e-4): features
  move in the 3rd-4th significant digit. Emulated on the CPU (every convolution's and inner
  product's input and weights rounded to TF32, same script): res10 fc7 7.7e-4, open_nsfw pool
  1.3e-3, 8x and 13x above FP32_TOLERANCE, which therefore catches TF32 nobody asked for.
  With model.tf32=true, TF32_TOLERANCE = 1e-2 (8x above the emulated effect).
- A wrong result (a bad driver, a kernel missing for the GPU) differs in the first digit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from ..errors import RunnerError

FP32_TOLERANCE = 1e-4
TF32_TOLERANCE = 1e-2
# images of the first batch computed again on the CPU (the CPU pass is the self-check's cost)
SELFCHECK_IMAGES = 4


class SelfCheckError(RunnerError):
    """A task's GPU results differ from the CPU's beyond the tolerance: no row was written."""


def relative_difference(gpu: np.ndarray, cpu: np.ndarray) -> float:
    """max |gpu - cpu| / max |cpu| (inf when they differ where cpu is all zeros, or gpu has
    NaN/inf where cpu has not)."""
    gpu = np.asarray(gpu, dtype=np.float64)
    cpu = np.asarray(cpu, dtype=np.float64)
    if gpu.shape != cpu.shape:
        return math.inf
    if not np.isfinite(gpu).all() and not np.array_equal(np.isfinite(gpu), np.isfinite(cpu)):
        return math.inf
    fin = np.isfinite(cpu)
    diff = float(np.max(np.abs(gpu[fin] - cpu[fin]), initial=0.0))
    scale = float(np.max(np.abs(cpu[fin]), initial=0.0))
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else math.inf


def compare(gpu: Mapping[str, np.ndarray], cpu: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """relative_difference per blob of cpu."""
    return {b: relative_difference(gpu[b], cpu[b]) for b in cpu}


def tolerance(configured: Optional[float], tf32: bool) -> float:
    if configured is not None:
        return float(configured)
    return TF32_TOLERANCE if tf32 else FP32_TOLERANCE


@dataclass(frozen=True)
class SelfCheck:
    # the worst blob and its difference
    blob: str
    max_rel_diff: float
    # every blob's difference
    per_blob: Dict[str, float]
    tolerance: float
    images: int
    # seconds the CPU pass took (the self-check's cost)
    cpu_s: float

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def attrs(self) -> Dict[str, object]:
        """What a shard file and stats.json record."""
        return {"selfcheck_max_rel_diff": self.max_rel_diff, "selfcheck_blob": self.blob,
                "selfcheck_tolerance": self.tolerance, "selfcheck_images": self.images,
                "selfcheck_cpu_s": round(self.cpu_s, 4)}


def check_verdict(per_blob: Mapping[str, float], tol: float, images: int, cpu_s: float) -> SelfCheck:
    blob = max(per_blob, key=lambda b: per_blob[b])
    return SelfCheck(blob, per_blob[blob], dict(per_blob), tol, images, cpu_s)


def failure_line(chk: SelfCheck, gpu: str, tf32: bool) -> str:
    """The one line a failed self-check stops the task with. Pure."""
    tf = "model.tf32=true" if tf32 else "model.tf32=false (full FP32)"
    return (f"GPU self-check failed on {gpu}: blob {chk.blob!r} differs from the CPU by "
            f"{chk.max_rel_diff:.3g} (max |gpu-cpu| / max |cpu| over {chk.images} images; tolerance "
            f"{chk.tolerance:.3g}, {tf}); no row was written. Try: device=cpu; model.tf32=false; a pycaffe "
            "built with --no-cudnn; updating the NVIDIA driver or building for this GPU's architecture "
            "(CUDA_ARCH=native); gpu_selfcheck=false only if you know why they differ")


def run_selfcheck(engine, x: np.ndarray, gpu_out: Mapping[str, np.ndarray], tol: float,
                  tf32: bool, images: int = SELFCHECK_IMAGES) -> SelfCheck:
    """Compute the first `images` inputs of x again on the CPU (engine.forward_cpu) and compare
    with the GPU's rows of the same batch; raises SelfCheckError when they differ beyond tol."""
    k = max(1, min(images, len(x)))
    t0 = time.perf_counter()
    cpu_out = engine.forward_cpu(x[:k])
    cpu_s = time.perf_counter() - t0
    chk = check_verdict(compare({b: v[:k] for b, v in gpu_out.items()}, cpu_out), tol, k, cpu_s)
    if not chk.passed:
        raise SelfCheckError(failure_line(chk, engine.gpu_label, tf32))
    return chk
