"""What every row shares: measurements in fresh spawned processes (started together behind a
barrier when they share the cores), medians, run directories prepared as the CLI prepares them,
the sample images, and printing a table of rows.

Each measurement runs in fresh spawned processes (BLAS threads set before Caffe loads); peak
memory is each process's own high-water mark (VmHWM), never ru_maxrss, which a spawned child
inherits from its parent.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from peakmem import peak_rss_mb as own_peak_rss_mb

REPO = Path(__file__).resolve().parent.parent.parent

_BARRIER = None  # set in a child started by in_children: the timed part starts together


def sync() -> float:
    """Called by a measurement right before its timed part; returns the start time."""
    if _BARRIER is not None:
        _BARRIER.wait(timeout=600)
    return time.time()


def _child(fn: Callable[..., Dict], kwargs: Dict, q, barrier=None) -> None:
    global _BARRIER
    try:
        _BARRIER = barrier
        threads = kwargs.pop("_threads", None)
        if threads:
            from runner.task.identity import configure_threads

            configure_threads(threads)
        out = fn(**kwargs)
        out["peak_rss_mb"] = own_peak_rss_mb()  # this process's own peak (VmHWM), not its parent's
        q.put(("ok", out))
    except BaseException as e:  # reported by the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def in_children(fn: Callable[..., Dict], n: int, threads: int, **kwargs) -> List[Dict]:
    """`n` fresh spawned processes running fn at once (their timed parts start together). fn is a
    module-level function of a bench module: the child imports it by name."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(n) if n > 1 else None
    procs = [ctx.Process(target=_child, args=(fn, dict(kwargs, _threads=threads), q, barrier))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = collect(q, procs, fn.__name__)
    return [out for _, out in results]


def collect(q, procs, what: str) -> List:
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


def in_child(fn: Callable[..., Dict], threads: int, **kwargs) -> Dict:
    return in_children(fn, 1, threads, **kwargs)[0]


def together_rate(results: List[Dict]) -> float:
    """Images per second of processes that ran at once: all their images over the window from
    the first start to the last end."""
    return sum(r["images"] for r in results) / (max(r["t1"] for r in results) - min(r["t0"] for r in results))


def median(xs):
    return float(statistics.median(xs))


def compose_fresh(run_dir: Path, overrides: List[str]):
    """The config as the CLI composes it, for a fresh run directory."""
    import shutil

    from runner.run.config import compose

    shutil.rmtree(run_dir, ignore_errors=True)  # every repeat starts from nothing
    return compose(overrides + [f"output.dir={run_dir}", "output.overwrite=true"])


def prepare(run_dir: Path, overrides: List[str], shards: int = 1) -> str:
    """Compose the config as the CLI would and write the run's plan and manifest."""
    from omegaconf import OmegaConf

    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    cfg = compose_fresh(run_dir, overrides)
    prepare_run(cfg, launcher_for(cfg), explicit_shards=shards)
    return OmegaConf.to_yaml(cfg)


def prepare_local(run_dir: Path, overrides: List[str]):
    """As `caffe-runner launcher=local` plans it: the worker plan, one shard per worker (the
    rows measure a worker's steady pipeline; the launcher's default of 4 shards per worker only
    changes who takes the tail)."""
    from omegaconf import OmegaConf

    from runner.launch.local import worker_plan
    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    cfg = compose_fresh(run_dir, ["launcher.shards_per_worker=1", *overrides])
    prepare_run(cfg, launcher_for(cfg), explicit_shards=cfg.num_shards)
    return OmegaConf.to_yaml(cfg), worker_plan(cfg)


def shard_run(cfg_yaml: str, index: int = 0) -> Dict:
    """run_shard on a prepared run directory; its own timing excludes model load."""
    from omegaconf import OmegaConf

    from runner.task.extract import run_shard

    cfg = OmegaConf.create(cfg_yaml)
    res = run_shard(cfg, index, threads=int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    return res


def camera_set(cache: Path, count: int) -> List[str]:
    """Camera-sized JPEGs (12 MP, about 2 MB), made once and kept under the cache folder."""
    from runner.ui.samples import CAMERA_VERSION, camera_photos

    d = cache / "bench" / f"camera-v{CAMERA_VERSION}"
    have = len(list(d.glob("cam*.jpg"))) if d.exists() else 0
    if have < count:
        print(f"writing {count - have} camera-sized JPEGs (4000x3000, ~2 MB) to {d} (kept for later runs)",
              flush=True)
    return [str(p) for p in camera_photos(d, count)]


def photo_set(work: Path, count: int) -> Path:
    """The photo-sized sample JPEGs under work/images, written once; images.done holds the count
    written (a --quick run's set is too small for a full one)."""
    from runner.ui.samples import write_corpus

    imgs = work / "images"
    done = work / "images.done"
    if not done.exists() or not done.read_text().isdigit() or int(done.read_text()) < count:
        print(f"writing {count} photo-sized JPEGs (500x375 .. 1600x1200) to {imgs}", flush=True)
        write_corpus(imgs, count, seed=1)
        done.write_text(str(count))
    return imgs


def print_rows(rows: Sequence[tuple], header: Optional[str] = None) -> None:
    """(row number, what, value, ratio) lines in aligned columns; with a header (the value
    column's title), a title line first."""
    w = max(len(x[1]) for x in rows)
    if header:
        print(f"\n{'#':2} {'what':{w}}  {header:>22}  ratio")
    for n, what, val, ratio in rows:
        print(f"{n:2} {what:{w}}  {val:>22}  {ratio}")
