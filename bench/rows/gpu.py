"""Rows 7-8: feeding a GPU (issue 10).

A GPU's forward is tens of times faster than one core's JPEG decoding: how many decode threads
keep one GPU busy follows from the decode rate per thread, measured here on the photo-sized
JPEGs, and an assumed GPU rate until a GPU node measures it (rows 7-8). Row 8 runs with a usable
GPU only. `--gpu-feeding-only` runs these rows alone.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Dict, List

import numpy as np

from capacity import decode_threads_per_gpu, gpu_busy_fraction
from .common import in_child, median
from .limits import decode_one_thread


ASSUMED_GPU_IMAGES_PER_S = 2000.0  # res10 to fc7, 300x300, batch 16 on one current GPU (assumed)


def _slurm_default_decode_threads() -> int:
    from runner.schema import SlurmLauncherConf

    return SlurmLauncherConf().cpus_per_task - 1  # the task's decode threads (the net has one core)


SLURM_DEFAULT_DECODE_THREADS = _slurm_default_decode_threads()


def gpu_forward_only(proto: str, weights: str, blobs: List[str], batch: int, n_batches: int, hw=(300, 300)) -> Dict:
    """forward_only on the GPU (device 0 of CUDA_VISIBLE_DEVICES)."""
    from runner.engine.model import CaffeEngine, parse_prototxt

    class M:
        pass

    m = M()
    m.weights = weights
    eng = CaffeEngine(m, parse_prototxt(proto), blobs, (3,) + tuple(hw), device="gpu")
    x = np.random.default_rng(0).uniform(-120, 120, (batch, 3) + tuple(hw)).astype(np.float32)
    for _ in range(3):
        eng.forward(x)  # warm up: cuBLAS handles, allocations
    t0 = time.perf_counter()
    for _ in range(n_batches):
        eng.forward(x)  # returns host copies of the blobs: the GPU work is done
    return {"images_per_s": batch * n_batches / (time.perf_counter() - t0)}


def gpu_feeding(paths: List[str], threads: int, repeats: int, runner_rate, proto: str, weights: str,
                cams: List[str]) -> Dict:
    """Rows 7-8: decode images/s per thread (default and reduced JPEG decoding), photo-sized and
    camera-sized, the threads that keep one GPU at ASSUMED_GPU_IMAGES_PER_S busy, the simulated
    device at that rate with the threads this machine has; and with a usable GPU, its
    forward-only and end-to-end rates."""
    from runner.engine.gpu import caffe_has_gpu, cuda_probe, explain_probe

    out: Dict = {"assumed_gpu_images_per_s": ASSUMED_GPU_IMAGES_PER_S, "threads_here": threads}
    for kind, ps in (("", paths), ("camera_", cams)):
        for mode, reduced in (("default", False), ("reduced_jpeg", True)):
            runs = [in_child(decode_one_thread, 1, paths=ps, reduced=reduced) for _ in range(repeats)]
            one = median([r["images_per_cpu_s"] for r in runs])
            out[f"{kind}decode_per_thread_{mode}"] = one  # per second of CPU time: one core's worth
            out[f"{kind}decode_per_thread_wall_{mode}"] = median([r["images_per_s"] for r in runs])
            out[f"{kind}threads_per_gpu_{mode}"] = decode_threads_per_gpu(ASSUMED_GPU_IMAGES_PER_S, one)
            # what the Slurm default (cpus_per_task - 1 decode threads) delivers to that GPU
            out[f"{kind}busy_at_slurm_default_{mode}"] = gpu_busy_fraction(
                SLURM_DEFAULT_DECODE_THREADS, one, ASSUMED_GPU_IMAGES_PER_S)
    # the simulated device at the assumed GPU rate, fed by this machine's threads: the pipeline
    # delivers what decoding allows, which the per-thread figure predicts
    batch_s = round(16 / ASSUMED_GPU_IMAGES_PER_S, 4)
    sims = [runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"],
                        "sim-gpu") for _ in range(repeats)]
    out["simulated_gpu_images_per_s"] = median([r["images_per_s"] for r in sims])
    out["simulated_gpu_busy_fraction"] = median([r["forward_busy_fraction"] for r in sims])
    out["predicted_busy_fraction"] = gpu_busy_fraction(threads, out["decode_per_thread_wall_reduced_jpeg"],
                                                       ASSUMED_GPU_IMAGES_PER_S)
    probe = cuda_probe() if caffe_has_gpu() else None
    why = "the CPU build of pycaffe" if probe is None else explain_probe(probe, platform.node(),
                                                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
    if why:
        out["gpu"] = {"skipped": why}
        return out
    fwd = [in_child(gpu_forward_only, 1, proto=proto, weights=weights, blobs=["fc7"], batch=16,
                    n_batches=max(20, len(paths) // 8))["images_per_s"] for _ in range(repeats)]
    e2e = [runner_rate(["device=gpu", "decode.reduced_jpeg=true"], "gpu")["images_per_s"] for _ in range(repeats)]
    out["gpu"] = {"forward_only_images_per_s": median(fwd), "end_to_end_images_per_s": median(e2e),
                  "end_to_end_vs_forward": median(e2e) / median(fwd),
                  "threads_per_gpu_measured_reduced_jpeg": decode_threads_per_gpu(median(fwd),
                                                                              out["decode_per_thread_reduced_jpeg"])}
    return out


def print_gpu_rows(g: Dict) -> None:
    a = g["assumed_gpu_images_per_s"]
    for kind, what in (("", "photo-sized"), ("camera_", "camera 12 MP")):
        if f"{kind}decode_per_thread_default" not in g:
            continue
        print(f"{'7':2} {what}: decode per thread, default / reduced JPEG  "
              f"{g[kind + 'decode_per_thread_default']:.0f} / {g[kind + 'decode_per_thread_reduced_jpeg']:.0f} img/s"
              f"  threads per GPU at {a:.0f} img/s: {g[kind + 'threads_per_gpu_default']} / "
              f"{g[kind + 'threads_per_gpu_reduced_jpeg']}  GPU busy with the Slurm default's "
              f"{SLURM_DEFAULT_DECODE_THREADS}: {g[kind + 'busy_at_slurm_default_default']:.2f} / "
              f"{g[kind + 'busy_at_slurm_default_reduced_jpeg']:.2f}")
    print(f"{'7':2} simulated GPU at {a:.0f} img/s, {g['threads_here']} threads here  "
          f"{g['simulated_gpu_images_per_s']:.0f} img/s  busy {g['simulated_gpu_busy_fraction']:.3f} "
          f"(predicted {g['predicted_busy_fraction']:.3f})")
    if "skipped" in g["gpu"]:
        print(f"{'8':2} GPU forward-only / end to end: skipped ({g['gpu']['skipped']})")
    else:
        print(f"{'8':2} GPU forward-only / end to end  {g['gpu']['forward_only_images_per_s']:.0f} / "
              f"{g['gpu']['end_to_end_images_per_s']:.0f} img/s  ({g['gpu']['end_to_end_vs_forward']:.2f} of forward)")
