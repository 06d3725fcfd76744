"""Local launcher: run_shard over the shards in a multiprocessing.Pool (spawn).

device=gpu: one worker per GPU, each binding its GPU (CUDA_VISIBLE_DEVICES) before Caffe
initialises. device=cpu: `workers` processes splitting the cores between them.
Progress comes from the shards' heartbeat files, the same ones `caffe-runner status` reads.
"""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List

from .. import log
from ..errors import ConfigError, ShardFailedError
from ..plan import Run, plan_summary, prepare_run
from ..status import shard_state

_worker_threads = 1


def resolve_gpus(spec) -> List[str]:
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


def worker_plan(cfg) -> Dict:
    """How many workers, BLAS threads each, and which GPUs: resolved once, here."""
    cores = len(os.sched_getaffinity(0))
    lc = cfg.launcher
    if cfg.device == "gpu":
        gpus = resolve_gpus(lc.gpus)
        workers = len(gpus)
        threads = lc.threads_per_worker or max(1, cores // workers)
    else:
        gpus = []
        # one single-threaded process per core: decoding and the net share the cores, and
        # OpenBLAS threads waiting at each GEMM's barrier (and Caffe's serial layers between
        # GEMMs) waste the cores the decode threads need (make bench rows 2 and 10)
        workers = lc.workers or cores
        if workers < 1:
            raise ConfigError(f"launcher.workers={workers}: use 1 or more")
        threads = lc.threads_per_worker or max(1, cores // workers)
    return {"workers": workers, "threads": threads, "gpus": gpus}


def _die_with_parent(poll_s: float = 0.5) -> None:
    """A worker whose launcher was killed must not go on writing. (PR_SET_PDEATHSIG is tied
    to the creating *thread*, and Pool creates replacement workers from a helper thread
    that exits on close: it would kill idle workers holding Pool's queue lock.)"""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(gpu_queue, threads: int, level: int, log_queue=None) -> None:
    global _worker_threads
    _worker_threads = threads
    # Ctrl-C reaches the whole process group: the launcher alone handles it (and stops us),
    # so one line is printed instead of a traceback per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if gpu_queue is not None:
        # bind the GPU before anything can initialise CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get(timeout=30)
    if log_queue is not None:
        # log lines go to the launcher, which prints them above its progress bar
        log.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
        log.setLevel(level)
        log.propagate = False
        return
    from ..extract import setup_task_logging

    setup_task_logging(level)


def _shard_entry(cfg, index: int):
    from ..extract import run_shard

    if cfg.container.runtime != "none":  # the shard runs as a process inside the image
        from .container import run_shard_in_container

        return run_shard_in_container(cfg, index, _worker_threads)

    return run_shard(cfg, index, threads=_worker_threads)


class _ProgressView:
    """One bar over all images: shards complete before this launch count whole, the others by
    their heartbeats."""

    def __init__(self, run: Run, todo: List[int], enabled: bool):
        self.done_before = run.plan["count"] - sum(
            (lambda b: b[1] - b[0])(run.shard_range(i)) for i in todo)
        self.last = self.done_before
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=run.plan["count"], initial=self.done_before, unit="img", dynamic_ncols=True,
                            desc=f"{run.num_shards} shards", file=sys.stderr)

    def update(self, done_now: int) -> None:
        n = self.done_before + done_now
        if self.bar is not None and n > self.last:
            self.bar.update(n - self.last)
            self.last = n

    def close(self):
        if self.bar is not None:
            self.bar.close()


def launch_local(cfg) -> Dict:
    run = prepare_run(cfg, default_shards=lambda: worker_plan(cfg)["workers"], explicit_shards=cfg.num_shards)
    wp = worker_plan(cfg)  # after prepare_run: cfg.device is resolved there
    from . import plan_accepted

    plan_accepted(run)
    todo = run.missing_shards()
    log.info("%s; local: %d worker(s) x %d thread(s)%s", plan_summary(run), wp["workers"], wp["threads"],
             f", GPUs {','.join(wp['gpus'])}" if wp["gpus"] else "")
    t0 = time.time()
    failed: Dict[int, str] = {}
    results: Dict[int, Dict] = {}
    if todo:
        ctx = mp.get_context("spawn")
        gpu_queue = None
        if wp["gpus"]:
            gpu_queue = ctx.Queue()
            for g in wp["gpus"]:
                gpu_queue.put(g)
        procs = min(wp["workers"], len(todo))
        view = _ProgressView(run, todo, bool(cfg.launcher.progress) and sys.stderr.isatty())
        log_queue = ctx.Queue()
        listener = logging.handlers.QueueListener(log_queue, *log.handlers, respect_handler_level=True)
        listener.start()
        pool = ctx.Pool(processes=procs, initializer=_init_worker,
                        initargs=(gpu_queue, wp["threads"], log.getEffectiveLevel() or logging.INFO, log_queue))
        try:
            pending = {i: pool.apply_async(_shard_entry, (cfg, i)) for i in todo}
            while pending:
                time.sleep(0.25)
                # the same per-shard states `caffe-runner status` shows, read once per poll
                states = {i: shard_state(run, i, time.time()) for i in todo}
                for i in list(pending):
                    ar = pending[i]
                    if ar.ready():
                        del pending[i]
                        try:
                            results[i] = ar.get()
                        except Exception as e:
                            # reported once, in the error that ends the launch
                            failed[i] = f"{type(e).__name__}: {e}"
                        continue
                    # a worker killed from outside (OOM killer, kill -9) never reports back; its
                    # heartbeat says running with a dead pid (one from before this launch is a
                    # previous crash's, not news)
                    st = states[i]
                    if st["state"] == "interrupted" and st["started"] >= t0:
                        del pending[i]
                        failed[i] = f"worker pid {st['pid']} died while running the shard (killed?)"
                        # Pool never hears of a task whose worker died: settle it, or close/join
                        # would wait for it forever (multiprocessing keeps it in its cache)
                        ar._set(0, (False, ShardFailedError(failed[i])))
                view.update(sum(s["done"] for s in states.values()))
        except KeyboardInterrupt:
            pool.terminate()
            view.close()
            done = len(run.done_shards())
            raise KeyboardInterrupt(
                f"interrupted: {done} of {run.num_shards} shards are complete and the others keep their last "
                f"flushed batch in {run.rundir.shards_dir}; rerun the same command to resume") from None
        except BaseException:
            pool.terminate()
            raise
        else:
            # every shard has finished or been declared dead, so the workers are idle: let them
            # exit on the close sentinel (terminate can block on a queue lock when a worker was
            # killed, and Pool replaced it)
            pool.close()
            pool.join()
        finally:
            view.close()
            listener.stop()
    elapsed = time.time() - t0
    if failed:
        raise ShardFailedError(
            f"{len(failed)} of {run.num_shards} shards failed ({'; '.join(f'shard {i}: {m}' for i, m in sorted(failed.items()))}); "
            f"completed shards are kept in {run.rundir.shards_dir}: rerun the same command to do only the rest")
    summary = {"run_dir": str(run.rundir.path), "elapsed_s": elapsed, "shards": results,
               "num_shards": run.num_shards, "already_complete": run.num_shards - len(todo)}
    if cfg.output.merge:
        from ..merge import merge_run

        summary["merged"] = str(merge_run(run))
        summary["blob_shapes"] = _blob_shapes(summary["merged"])
    from ..stats import write_stats

    summary["stats"] = write_stats(run, elapsed if todo else None)
    return summary


def _blob_shapes(merged: str) -> Dict:
    from ..merge import open_merged

    with open_merged(merged) as f:
        return {f[f"features/{k}"].attrs["blob"]: f[f"features/{k}"].shape[1:] for k in f["features"]}
