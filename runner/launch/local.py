"""Local launcher: run_shard over the shards in a multiprocessing.Pool (spawn).

device=gpu: one worker per GPU, each binding its GPU (CUDA_VISIBLE_DEVICES) before Caffe
initialises. device=cpu: `workers` processes splitting the cores between them.
Progress comes from the shards' heartbeat files, the same ones `caffe-runner status` reads.
"""
from __future__ import annotations

import ctypes
import json
import logging
import logging.handlers
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from .. import log
from ..atomic import atomic_write_text
from ..device import resolve_gpus, resolve_local_device
from ..errors import ConfigError, ShardFailedError, Terminated
from ..extract import run_shard
from ..gpu import require_cuda_device, require_gpu_caffe
from ..merge import merge_run, open_merged
from ..plan import Run, plan_summary, prepare_run
from ..runtimes import Placement, container_spec, wrap
from ..stats import write_stats
from ..status import shard_state
from ..task import die_with_parent, setup_task_logging
from .base import Launcher
from .container_task import RESULT_PREFIX
from .workers import StartWatch, WorkerContext


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
        # one single-threaded process per core: decoding and the net share the cores; in one
        # process with every core a BLAS thread, pycaffe holds the GIL for the whole forward
        # (its decode threads stop) and Caffe's layers between GEMMs run on one core while the
        # other BLAS threads wait (make bench rows 2 and 10; bench/README.md)
        workers = lc.workers or cores
        if workers < 1:
            raise ConfigError(f"launcher.workers={workers}: use 1 or more")
        threads = lc.threads_per_worker or max(1, cores // workers)
    return {"workers": workers, "threads": threads, "gpus": gpus, "cores": cores}


def oversubscription(wp: Dict) -> Optional[str]:
    """The warning for more CPU workers than cores (pure), or None."""
    if wp["gpus"] or wp["workers"] <= wp["cores"]:
        return None
    return (f"launcher.workers={wp['workers']} is more than the {wp['cores']} core(s) here: the workers share "
            f"them (no faster, more memory); launcher.workers={max(1, wp['cores'] // 2)} (the default) or at most "
            f"{wp['cores']}")


def _init_worker(gpu_queue, level: int, log_queue=None) -> None:
    # Ctrl-C reaches the whole process group: the launcher alone handles it (and stops us),
    # so one line is printed instead of a traceback per worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if gpu_queue is not None:
        # bind the GPU before anything can initialise CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_queue.get(timeout=30)
    if log_queue is not None:
        # log lines go to the launcher, which prints them above its progress bar
        log.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
        log.setLevel(level)
        log.propagate = False
        return
    setup_task_logging(level)


def _shard_entry(cfg, index: int, threads: int):
    if cfg.container.runtime != "none":  # the shard runs as a process inside the image
        return run_shard_in_container(cfg, index, threads)
    return run_shard(cfg, index, threads=threads)


def run_shard_in_container(cfg, index: int, threads: int) -> Dict:
    """container.runtime set: run one shard as a process inside the image. The config travels
    as a file in the run directory (bound inside at the same path)."""
    logs = os.path.join(os.path.abspath(os.path.expanduser(str(cfg.output.dir))), "logs")
    os.makedirs(logs, exist_ok=True)
    cfg_path = os.path.join(logs, f"container-task-{index:05d}.yaml")
    atomic_write_text(cfg_path, OmegaConf.to_yaml(cfg, resolve=True))
    # the module name is what images already built run: keep it
    cmd = wrap(container_spec(cfg), ["python", "-m", "runner.launch.container_task", cfg_path, str(index),
                                     str(threads)]).command

    def die_with_worker():  # this worker killed: the runtime goes too (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)

    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_worker,
                       env=dict(os.environ, CAFFE_RUNNER_THREADS=str(threads)))
    lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        raise ShardFailedError(f"shard {index} in {cfg.container.runtime} image {cfg.container.image} exited "
                               f"{p.returncode} (its stderr is above; the command: {shlex.join(cmd)})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


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


def _spawn_pool(ctx, processes: int, initializer, initargs):
    return ctx.Pool(processes=processes, initializer=initializer, initargs=initargs)


class LocalLauncher(Launcher):
    """The shards on this machine, in a multiprocessing.Pool (spawn)."""
    name = "local"
    placement = Placement(srun=False, other_nodes=False)

    def __init__(self, pool: Callable = _spawn_pool):
        # pool(ctx, processes, initializer, initargs) -> a multiprocessing.Pool (tests: a fake)
        self.pool = pool

    def resolve_device(self, cfg) -> Tuple[str, int]:
        lc = cfg.launcher
        for key in ("workers", "threads_per_worker"):
            if lc.get(key) is not None and int(lc[key]) < 1:
                raise ConfigError(f"launcher.{key}={lc[key]}: use 1 or more (or null for the default)")
        device = resolve_local_device(cfg)
        if device == "gpu":
            if cfg.backend == "caffe" and cfg.container.runtime == "none":
                require_gpu_caffe()  # the real blocker first: no GPU list helps a CPU-only build
            resolve_gpus(lc.gpus)  # raises when none is visible
        return device, 0

    def require_gpu_here(self) -> None:
        require_cuda_device()  # a CUDA build, a driver and a device here

    def default_shards(self, cfg) -> int:
        return worker_plan(cfg)["workers"]

    def execute(self, cfg, accepted: Callable) -> Dict:
        return launch_local(cfg, accepted, self)


def launch_local(cfg, accepted: Callable, launcher: LocalLauncher) -> Dict:
    run = prepare_run(cfg, launcher, explicit_shards=cfg.num_shards)
    wp = worker_plan(cfg)  # after prepare_run: cfg.device is resolved there
    if oversubscription(wp):
        log.warning("%s", oversubscription(wp))
    accepted(run)
    todo = run.missing_shards()
    log.info("%s; local: %d worker(s) x %d thread(s)%s", plan_summary(run), wp["workers"], wp["threads"],
             f", GPUs {','.join(wp['gpus'])}" if wp["gpus"] else "")
    t0 = time.time()
    failed: Dict[int, str] = {}
    results: Dict[int, Dict] = {}
    if todo:
        # spawn, without the user's main module (a script, stdin, a notebook): workers.py
        ctx = WorkerContext()
        watch = StartWatch(ctx)
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
        init, initargs = watch.initializer(_init_worker, (gpu_queue, log.getEffectiveLevel() or logging.INFO, log_queue))
        pool = launcher.pool(ctx, procs, init, initargs)
        try:
            pending = {i: pool.apply_async(_shard_entry, (cfg, i, wp["threads"])) for i in todo}
            while pending:
                time.sleep(0.25)
                watch.check()  # a worker that cannot start fails the run instead of being replaced
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
        except KeyboardInterrupt as e:
            pool.terminate()
            view.close()
            done = len(run.done_shards())
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            raise type(e)(
                f"{what}: {done} of {run.num_shards} shards are complete and the others keep their last "
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
        summary["merged"] = str(merge_run(run))
        summary["blob_shapes"] = _blob_shapes(summary["merged"])
    summary["stats"] = write_stats(run, elapsed if todo else None)
    return summary


def _blob_shapes(merged: str) -> Dict:
    with open_merged(merged) as f:
        return {f[f"features/{k}"].attrs["blob"]: f[f"features/{k}"].shape[1:] for k in f["features"]}
