"""What the cores can do: pure arithmetic from measured per-image costs (make bench rows 2, 7, 10).

On a CPU node decoding and the net's forward share the same cores, so the best a pipeline can
do is the rate at which the cores finish both for every image. On a GPU node the net runs on
the GPU and decoding alone is on the cores, so the decode threads decide whether the GPU is
busy. The bench measures the costs; these functions turn them into the limits it compares with.
"""
from __future__ import annotations

import math


def cost_s_per_image(images_per_s: float, cores: int) -> float:
    """Core-seconds one image takes, from a stage's rate with all `cores` on it alone."""
    if images_per_s <= 0 or cores < 1:
        raise ValueError(f"need a positive rate and at least one core, got {images_per_s} img/s on {cores}")
    return cores / images_per_s


def shared_cores_limit(cores: int, decode_s_per_image: float, forward_s_per_image: float) -> float:
    """Images per second when decode and forward share `cores` and nothing else is lost: every
    image costs decode_s + forward_s core-seconds. (With rates D and F measured with all cores
    on one stage, this is 1 / (1/D + 1/F).)"""
    total = decode_s_per_image + forward_s_per_image
    if total <= 0 or cores < 1:
        raise ValueError(f"costs must add up to more than 0 s and cores must be >= 1 "
                         f"(got {decode_s_per_image} + {forward_s_per_image} s, {cores} cores)")
    return cores / total


def decode_threads_per_gpu(gpu_images_per_s: float, per_thread_images_per_s: float) -> int:
    """Decode threads (each a core) that keep a device of `gpu_images_per_s` busy; the net's own
    thread is not counted."""
    if per_thread_images_per_s <= 0:
        raise ValueError(f"decode rate per thread must be positive, got {per_thread_images_per_s}")
    return max(1, math.ceil(gpu_images_per_s / per_thread_images_per_s - 1e-9))


def gpu_busy_fraction(decode_threads: int, per_thread_images_per_s: float, gpu_images_per_s: float) -> float:
    """The share of time a GPU of `gpu_images_per_s` can be busy when `decode_threads` feed it."""
    return min(1.0, decode_threads * per_thread_images_per_s / gpu_images_per_s)
