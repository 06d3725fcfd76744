"""Local launcher: run_shard over the shards in a pool of worker processes (workers.py).

device=gpu: one worker per GPU, each binding its GPU (CUDA_VISIBLE_DEVICES) before Caffe
initialises. device=cpu: `workers` processes splitting the cores between them.
Progress comes from the shards' heartbeat files, the same ones `caffe-runner status` reads.
Every worker is watched from start to end (workers.py): a worker that dies (SIGKILL, the OOM
killer, a segfault, Caffe's abort) stops the run at once with one line naming its shard, how it
died and, when Caffe aborted, Caffe's own fatal line, read from the worker's stderr file
(RUN/logs/local-worker-PID.err, shown on the console as it is written).
"""
from __future__ import annotations

import ctypes
import json
import logging
import logging.handlers
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from .. import log
from ..store.atomic import atomic_write_text
from ..engine.device import resolve_gpus, resolve_local_device
from ..errors import ConfigError, ShardFailedError, Terminated
from ..task.extract import run_shard
from ..store.events import EventLog, events_path, read_events
from ..engine.gpu import require_cuda_device, require_gpu_caffe
from ..task.isolate import POISON_AFTER_DEATHS, attempt_open, shard_deaths
from ..store.lastwords import caffe_last_words, describe_exit, signal_hint
from ..store.liveness import last_beat
from ..results.merge import merge_run, merged_is_current, open_merged
from ..run.plan import Run, plan_summary, prepare_run
from ..run.sharedpass import pass_missing
from ..runtimes import Placement, container_spec, wrap
from ..store.stats import current_stats, write_stats
from ..run.status import shard_state
from ..task.identity import die_with_parent
from .base import Launcher
from .container_task import RESULT_PREFIX
from .workers import Death, TaskError, WorkerPool, log_handler
from ..schema import CAFFE_LOADED


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


_stderr_path: Optional[str] = None  # in a worker: the file its fd 2 writes to


def _init_worker(gpu: Optional[str], level: int, stderr_dir: Optional[str] = None) -> None:
    """A worker's initializer (WorkerPool): its stderr file, its GPU, its log lines to the launcher."""
    global _stderr_path
    if stderr_dir is not None:
        # fd 2 itself, so that Caffe's glog (C++) writes there too: a line written before an
        # abort is on disk when the process dies, for the launcher to quote
        _stderr_path = _WorkerStderr.path_in(stderr_dir, os.getpid())
        fd = os.open(_stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    die_with_parent()
    if gpu is not None:
        # bound before anything can initialise CUDA in this process: one GPU per worker
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    # log lines go to the launcher, which prints them above its progress bar
    log.handlers[:] = [log_handler()]
    log.setLevel(level)
    log.propagate = False


_keep: Dict = {}  # in a worker: the engine and pipeline it loaded, kept for its next shards


def _shard_entry(cfg, index: int, threads: int):
    if cfg.container.runtime != "none":  # the shard runs as a process inside the image
        return run_shard_in_container(cfg, index, threads)
    # a pool serves one run: the net is loaded once per worker, however many shards it takes
    return run_shard(cfg, index, threads=threads, keep=_keep)


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

    said_before = os.path.getsize(_stderr_path) if _stderr_path and os.path.exists(_stderr_path) else 0
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_worker,
                       env=dict(os.environ, CAFFE_RUNNER_THREADS=str(threads)))
    lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        # the process in the image wrote to this worker's fd 2: Caffe's abort is quoted from there
        words = caffe_last_words(_WorkerStderr.tail_of(_stderr_path, said_before)) if _stderr_path else None
        raise ShardFailedError(f"shard {index} in {cfg.container.runtime} image {cfg.container.image} ended with "
                               f"{describe_exit(p.returncode)}{': Caffe aborted: ' + words if words else ''} "
                               f"(its stderr is above; the command: {shlex.join(cmd)})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def progress_line(done: int, total: int, done_here: int, elapsed_s: float, shards_done: int, num_shards: int) -> str:
    """The progress line printed when stderr is not a terminal (pure): done_here images were
    done by this launch in elapsed_s (the rate and ETA are this launch's)."""
    rate = done_here / elapsed_s if elapsed_s > 0 else 0.0
    left = total - done
    eta = f", ETA {left / rate:.0f} s" if rate > 0 and left > 0 else ""
    pct = 100.0 * done / total if total else 100.0
    return (f"progress: {done}/{total} images ({pct:.0f}%), {rate:.1f} img/s{eta}; "
            f"{shards_done}/{num_shards} shards done")


class _ProgressView:
    """One bar over all images: shards complete before this launch count whole, the others by
    their heartbeats. Without a terminal (a log file, nohup, cron, CI) a bar would print nothing
    useful: a progress line every line_every_s seconds instead, as Slurm tasks log."""

    def __init__(self, run: Run, todo: List[int], enabled: bool, line_every_s: float = 0.0):
        self.done_before = run.plan["count"] - sum(
            (lambda b: b[1] - b[0])(run.shard_range(i)) for i in todo)
        self.total, self.num_shards, self.num_todo = run.plan["count"], run.num_shards, len(todo)
        self.last = self.done_before
        self.bar = None
        self.line_every_s = line_every_s
        self.t0 = self.last_line = time.time()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=run.plan["count"], initial=self.done_before, unit="img", dynamic_ncols=True,
                            desc=f"{run.num_shards} shards", file=sys.stderr)

    def update(self, done_now: int, shards_done: int = 0) -> None:
        n = self.done_before + done_now
        if self.bar is not None and n > self.last:
            self.bar.update(n - self.last)
            self.last = n
        now = time.time()
        if self.line_every_s > 0 and now - self.last_line >= self.line_every_s:
            self.last_line = now
            log.info("%s", progress_line(n, self.total, done_now, now - self.t0,
                                         self.num_shards - self.num_todo + shards_done, self.num_shards))

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def write(self, text: str) -> None:
        """Text from a worker's stderr, above the bar."""
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr, end="")
        else:
            sys.stderr.write(text)
            sys.stderr.flush()


class _WorkerStderr:
    """Each worker's fd 2 is a file of the run (RUN/logs/local-worker-PID.err), written by the
    worker itself; the launcher shows what is new on the console at each poll and, when a
    worker dies, reads its last words there. (A pipe read by a thread of the worker would lose
    them: an abort ends that thread too.)"""

    TAIL = 64 << 10

    def __init__(self, folder: str):
        self.folder = folder
        self.offsets: Dict[int, int] = {}

    @staticmethod
    def path_in(folder: str, pid: int) -> str:
        return os.path.join(folder, f"local-worker-{pid}.err")

    def path(self, pid: int) -> str:
        return self.path_in(self.folder, pid)

    def pump(self, pids: Sequence[int], write: Callable[[str], None], whole: bool = False) -> None:
        """Show the complete lines each worker wrote since the last call (all of it: whole)."""
        for pid in pids:
            try:
                with open(self.path(pid), "rb") as f:
                    f.seek(self.offsets.get(pid, 0))
                    data = f.read()
            except OSError:
                continue
            if not whole:
                data = data[:data.rfind(b"\n") + 1]
            if data:
                self.offsets[pid] = self.offsets.get(pid, 0) + len(data)
                write(data.decode(errors="replace"))

    def tail(self, pid: int) -> str:
        return self.tail_of(self.path(pid))

    @classmethod
    def tail_of(cls, path: str, start: int = 0) -> str:
        """The end of a file, from `start` at most (what one command in the worker wrote)."""
        try:
            with open(path, "rb") as f:
                f.seek(max(start, os.fstat(f.fileno()).st_size - cls.TAIL))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tidy(self, pids: Sequence[int]) -> None:
        """Remove the files of workers that said nothing; the others are kept with the run."""
        for pid in pids:
            try:
                if os.path.getsize(self.path(pid)) == 0:
                    os.unlink(self.path(pid))
            except OSError:
                pass


def death_message(deaths: Sequence[Tuple[Optional[int], Death, Optional[str], str]], num_shards: int) -> str:
    """One line for workers that died: [(shard, or None for an idle worker; the death; Caffe's
    last words; the worker's stderr file)]. Deaths with the same cause are named together (pure)."""
    groups: Dict[str, List[Tuple[Optional[int], Death, str]]] = {}
    for shard, d, words, path in deaths:
        if words:
            cause = f"Caffe aborted: {words}"
        else:
            hint = signal_hint(d.exitcode)
            cause = ("was " if d.exitcode < 0 else "ended with ") + d.how + (f" ({hint})" if hint else "")
        groups.setdefault(cause, []).append((shard, d, path))
    parts = []
    for cause, items in groups.items():
        shards = sorted(s for s, _, _ in items if s is not None)
        idle = len(items) - len(shards)
        who = [f"shard {shards[0]} of {num_shards}" if len(shards) == 1 else
               f"shards {', '.join(map(str, shards))} of {num_shards}"] if shards else []
        who += ["an idle worker" if idle == 1 else f"{idle} idle workers"] if idle else []
        pids = ", ".join(str(d.pid) for _, d, _ in items)
        if cause.startswith("Caffe aborted"):
            out = f"its output: {items[0][2]}" if len(items) == 1 else f"their output: {os.path.dirname(items[0][2])}"
            parts.append(f"{' and '.join(who)}: {cause} (worker pid {pids}, {items[0][1].how}; {out})")
        else:
            if shards:
                subject = "its worker" if len(items) == 1 else "their workers"
                parts.append(f"{' and '.join(who)}: {subject} (pid {pids}) {cause}")
            else:
                parts.append(f"{who[0]} (pid {pids}) {cause}")
    return "; ".join(parts)


def _events_of(run, shard: int):
    return events_path(run.rundir.path, run.shard_path(shard).stem)


def _record_death(run, shard: int, error: str, log_path: str, died: str = "") -> None:
    """The shard's heartbeat and event log say how it ended (`caffe-runner status` shows it);
    the dead worker could not write them itself. `died`: how (the attempt counts as one that
    died: isolate.py)."""
    last_beat(lambda b: run.write_heartbeat(shard, b), run.read_heartbeat(shard) or {}, state="failed", shard=shard,
              error=error, log=log_path)
    EventLog(_events_of(run, shard), {}).write("failed", error=error[:300], died=died)


def _mark_stopped(run, shards) -> None:
    """The launcher stopped these shards' workers (another worker died, Ctrl-C, SIGTERM): an
    attempt still open in a shard's event log ends with "stopped", so that it does not count as
    one that died (isolate.py)."""
    for i in shards:
        path = _events_of(run, i)
        if attempt_open(read_events(path)):
            EventLog(path, {}).write("stopped")


def _start_pool(initializer, initargs, on_log):
    return WorkerPool(initializer, initargs, on_log)


class LocalLauncher(Launcher):
    """The shards on this machine, in a pool of worker processes (workers.py)."""
    name = "local"
    placement = Placement(srun=False, other_nodes=False)

    def __init__(self, pool: Callable = _start_pool):
        # pool(initializer, [initargs of each worker], on_log) -> a WorkerPool (tests: a fake)
        self.pool = pool

    def resolve_device(self, cfg) -> Tuple[str, int]:
        lc = cfg.launcher
        for key in ("workers", "threads_per_worker"):
            if lc.get(key) is not None and int(lc[key]) < 1:
                raise ConfigError(f"launcher.{key}={lc[key]}: use 1 or more (or null for the default)")
        if int(lc.get("shards_per_worker", 1)) < 1:
            raise ConfigError(f"launcher.shards_per_worker={lc.shards_per_worker}: use 1 or more")
        device = resolve_local_device(cfg)
        if device == "gpu":
            if cfg.backend in CAFFE_LOADED and cfg.container.runtime == "none":
                require_gpu_caffe()  # the real blocker first: no GPU list helps a CPU-only build
            resolve_gpus(lc.gpus)  # raises when none is visible
        return device, 0

    def require_gpu_here(self) -> None:
        require_cuda_device()  # a CUDA build, a driver and a device here

    def default_shards(self, cfg) -> int:
        # more shards than workers: the pool hands them out as workers free up (no straggler)
        return worker_plan(cfg)["workers"] * int(cfg.launcher.get("shards_per_worker", 1))

    def execute(self, cfg, accepted: Callable) -> Dict:
        return launch_local(cfg, accepted, self)


def launch_local(cfg, accepted: Callable, launcher: LocalLauncher) -> Dict:
    run = prepare_run(cfg, launcher, explicit_shards=launcher.explicit_shards(cfg))
    wp = worker_plan(cfg)  # after prepare_run: cfg.device is resolved there
    if oversubscription(wp):
        log.warning("%s", oversubscription(wp))
    accepted(run)
    own_todo = run.missing_shards()
    todo = pass_missing(run)  # this run's shards, and a sweep companion's (sharedpass.py)
    log.info("%s; local: %d worker(s) x %d thread(s)%s", plan_summary(run), wp["workers"], wp["threads"],
             f", GPUs {','.join(wp['gpus'])}" if wp["gpus"] else "")
    t0 = time.time()
    failed: Dict[int, str] = {}
    results: Dict[int, Dict] = {}
    if todo:
        procs = min(wp["workers"], len(todo))
        gpus = wp["gpus"][:procs] or [None] * procs  # one GPU per worker, for all its shards
        tty = sys.stderr.isatty()
        view = _ProgressView(run, todo, bool(cfg.launcher.progress) and tty,
                             0.0 if tty or not cfg.launcher.progress else float(cfg.launcher.log_interval_s))
        stderr = _WorkerStderr(str(run.rundir.logs_dir))
        os.makedirs(stderr.folder, exist_ok=True)
        # the workers' log records, logged here by one thread (in order, above the progress bar)
        log_queue: "queue.Queue" = queue.Queue()
        listener = logging.handlers.QueueListener(log_queue, *log.handlers, respect_handler_level=True)
        listener.start()
        level = log.getEffectiveLevel() or logging.INFO
        pool = None
        pending: Dict = {}
        try:
            pool = launcher.pool(_init_worker, [(g, level, stderr.folder) for g in gpus], log_queue.put)
            pending = {i: pool.apply_async(_shard_entry, (cfg, i, wp["threads"]), i) for i in todo}
            while pending:
                # wakes at once when a worker dies; a worker that cannot start fails the run (raises)
                deaths = pool.wait(0.25)
                stderr.pump(pool.pids, view.write)
                if deaths:
                    # one bad file kills every worker within a few ms: one line names them all
                    threading.Event().wait(0.3)
                    deaths += pool.wait(0)
                    raise _died(run, deaths, stderr)
                # the same per-shard states `caffe-runner status` shows, read once per poll
                states = {i: shard_state(run, i, time.time()) for i in todo}
                for i in list(pending):
                    ar = pending[i]
                    if ar.ready():
                        del pending[i]
                        try:
                            results[i] = ar.get()
                        except TaskError as e:
                            # reported once, in the error that ends the launch
                            failed[i] = str(e)
                view.update(sum(s["done"] for s in states.values()),
                            sum(s["state"] == "done" for s in states.values()))
        except KeyboardInterrupt as e:
            if pool is not None:
                pool.terminate()
            _mark_stopped(run, pending)
            view.close()
            done = len(run.done_shards())
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            raise type(e)(
                f"{what}: {done} of {run.num_shards} shards are complete and the others keep their last "
                f"flushed batch in {run.rundir.shards_dir}; rerun the same command to resume") from None
        except BaseException:
            if pool is not None:
                pool.terminate()
            _mark_stopped(run, pending)
            raise
        else:
            # every shard has finished, so the workers are idle: they end when told
            pool.close()
        finally:
            view.close()
            listener.stop()
            pids = pool.pids if pool is not None else []
            stderr.pump(pids, view.write, whole=True)
            stderr.tidy(pids)
    elapsed = time.time() - t0
    if failed:
        raise ShardFailedError(
            f"{len(failed)} of {run.num_shards} shards failed ({'; '.join(f'shard {i}: {m}' for i, m in sorted(failed.items()))}); "
            f"completed shards are kept in {run.rundir.shards_dir}: rerun the same command to do only the rest")
    summary = {"run_dir": str(run.rundir.path), "elapsed_s": elapsed, "shards": results,
               "num_shards": run.num_shards, "already_complete": run.num_shards - len(todo)}
    if cfg.output.merge:
        if not own_todo and merged_is_current(run):  # nothing of it ran or changed: keep the file readers hold
            summary["merged"] = str(run.rundir.merged)
            summary["blob_shapes"] = _blob_shapes(summary["merged"])
            summary["stats"] = current_stats(run)
            return summary
        summary["merged"] = str(merge_run(run))
        summary["blob_shapes"] = _blob_shapes(summary["merged"])
    summary["stats"] = write_stats(run, elapsed if todo else None)
    return summary


def _died(run, deaths: Sequence[Death], stderr: _WorkerStderr) -> ShardFailedError:
    """The error that stops the run when workers died; their shards' status says it too."""
    # a worker killed between its shard's last rename and its report had nothing left to lose:
    # it was as good as idle, and its complete shard is not "failed"
    found = [(None if d.task is None or run.shard_done(d.task) else d.task, d, caffe_last_words(stderr.tail(d.pid)),
              stderr.path(d.pid)) for d in deaths]
    for shard, d, words, path in found:
        if shard is not None:
            _record_death(run, shard, death_message([(shard, d, words, path)], run.num_shards), path, d.how)
    done = len(run.done_shards())
    return ShardFailedError(
        f"{death_message(found, run.num_shards)}; the run stopped: {done} of {run.num_shards} shards are complete "
        f"and the others keep their last flushed batch in {run.rundir.shards_dir}: rerun the same command to resume"
        f"{_isolation_note(run, [s for s, _, _, _ in found if s is not None])}")


def _isolation_note(run, shards: Sequence[int]) -> str:
    """What the rerun does with the shards among these whose process died twice (isolate.py)."""
    poison = sorted(s for s in shards if shard_deaths(_events_of(run, s)) >= POISON_AFTER_DEATHS)
    if not poison:
        return ""
    which, its = ((f"shard {poison[0]} has", "its") if len(poison) == 1 else
                  (f"shards {', '.join(map(str, poison))} have", "their"))
    return (f"; {which} died {POISON_AFTER_DEATHS} times or more: the rerun decodes {its} images one by one in "
            "child processes and records the image that kills the process as a failure")


def _blob_shapes(merged: str) -> Dict:
    with open_merged(merged) as f:
        return {f[f"features/{k}"].attrs["blob"]: f[f"features/{k}"].shape[1:] for k in f["features"]}
