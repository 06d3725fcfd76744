"""Rows 2 and 10: what the cores can do when decoding and the net share them, and caffe-runner's
ratio to it (photo-sized JPEGs in row 2, 12-MP camera photos in row 10).

With D the decode rate with every core decoding (decode_one_thread, one single-threaded process
per core) and F the forward rate with every core on the net (forward_only, likewise), an image
costs cores/D + cores/F core-seconds: the limit (capacity.shared_cores_limit). The pipeline runs
as `caffe-runner launcher=local` runs it (pipeline_rate: the local launcher's worker plan, one
shard per worker, all workers started together), end to end and in steady state. The rounds
themselves run in extract.py (rows 1-11 share them); `--only limits` runs these rows alone.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from capacity import cost_s_per_image, shared_cores_limit
from peakmem import peak_rss_mb as own_peak_rss_mb
from .common import collect, median, prepare_local, print_rows, sync


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
    t0, c0 = sync(), time.process_time()
    for _ in range(n_batches):
        eng.forward(x)
    t1 = time.time()
    n = batch * n_batches
    return {"images_per_s": n / (t1 - t0), "images": n, "t0": t0, "t1": t1,
            "cpu_s_per_image": (time.process_time() - c0) / n}


def decode_one_thread(paths: List[str], reduced: bool) -> Dict:
    """Decode + resize to 300x300 in this one thread: images per second of wall time and per
    second of this process's CPU time (the second does not drop when other processes share
    the cores, so it is the figure to size decode threads with on a busy machine)."""
    from runner.engine.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    d.load(os.fsencode(paths[0]))  # warm up (imports, first-call costs)
    t0, c0 = sync(), time.process_time()
    for p in paths:
        img, why = d.load(os.fsencode(p))
        assert why is None, why
    t1 = time.time()
    return {"images_per_s": len(paths) / (t1 - t0), "images": len(paths), "t0": t0, "t1": t1,
            "images_per_cpu_s": len(paths) / (time.process_time() - c0)}


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
    cfg_yaml, wp = prepare_local(run_dir, overrides)
    ctx = mp.get_context("spawn")
    q, barrier = ctx.Queue(), ctx.Barrier(wp["workers"])
    procs = [ctx.Process(target=_pipeline_worker, args=(cfg_yaml, i, wp["threads"], barrier, q))
             for i in range(wp["workers"])]
    for p in procs:
        p.start()
    res = [out for _, out in collect(q, procs, "pipeline")]
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
            "forward_busy_fraction": median([r["forward_busy_fraction"] for r in res]),
            "forward_busy_fraction_steady": median([r["forward_busy_fraction_steady"] for r in res]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in res)}


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
            out[run] = median(per)
    return out


def shared_core_limits(rows: Dict[str, List[float]], cores: int) -> Dict[str, Dict]:
    """Per round (side by side), what the cores can do when decode and forward share them, and
    the pipeline's ratio to it; the median over rounds."""
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
        out[key] = {"rounds": per_round, "ratio_median": median([x["ratio"] for x in per_round]),
                    "limit_median": median([x["limit"] for x in per_round]),
                    "decode_s_median": median([x["decode_s"] for x in per_round]),
                    "forward_s_median": median([x["forward_s"] for x in per_round])}
    return out


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
    print_rows(rows)
