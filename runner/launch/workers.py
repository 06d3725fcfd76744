"""The local launcher's worker processes: spawned without the user's main module, and watched
while they start.

multiprocessing's spawn runs the parent's main module again in every child (so that the child
can unpickle functions defined there): spawn.get_preparation_data sends `init_main_from_path`
(a script, or `<stdin>`) or `init_main_from_name` (`python -m`), and the child executes it
before it does anything else. A script that calls `extract()` without an
`if __name__ == "__main__":` guard would call it again in every worker, and `<stdin>` cannot be
read again at all. Our workers run only runner's own functions, so they are started without
those two keys: they never import the user's main module, whatever it is (a script, stdin, a
notebook kernel, `python -m`).

multiprocessing.Pool never notices a worker that dies (bpo-22393): it starts a replacement, and
the task the dead one held stays pending for ever. WorkerWatch watches every process the pool
makes, from start to end, through public means: the processes' sentinels and exit codes, and a
queue on which each worker says it is ready and which task it is running. A worker that dies
while starting (its initializer raised, an import failed) is one error naming the cause (Pool
would replace it forever); a death after that is reported with the task it was running.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import connection, context, popen_spawn_posix, spawn
from typing import Callable, Dict, Iterator, List, Optional, Set

from ..errors import RunnerError
from ..lastwords import describe_exit

_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")
_launching = threading.local()
_original_preparation_data = spawn.get_preparation_data


def _preparation_data(name):
    data = _original_preparation_data(name)
    if getattr(_launching, "without_main", False):
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


class WorkerStartError(RunnerError):
    """A worker process died before it could run a shard (environment, import, initializer)."""


class _Popen(popen_spawn_posix.Popen):
    def _launch(self, process_obj):
        # popen_spawn_posix looks the function up in `spawn` at call time; the replacement
        # changes nothing unless this thread is starting one of our workers
        spawn.get_preparation_data = _preparation_data
        _launching.without_main = True
        try:
            super()._launch(process_obj)
        finally:
            _launching.without_main = False


class WorkerProcess(context.SpawnProcess):
    _start_method = "spawn"

    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


class WorkerContext(context.SpawnContext):
    """A spawn context whose processes never import the parent's main module, and which
    remembers every process it made (Pool's replacements included)."""

    def __init__(self):
        super().__init__()
        self.started: List[WorkerProcess] = []

    def Process(self, *args, **kwargs) -> WorkerProcess:  # what Pool calls to make a worker
        p = WorkerProcess(*args, **kwargs)
        self.started.append(p)
        return p


# in a worker: the watch's queue (set by its initializer), on which it says what it runs
_said = None


def _watched_init(said, init: Callable, *args) -> None:
    """Pool initializer: run `init`, then tell the launcher this worker is ready (or why not).
    The queue is a SimpleQueue: put() has written to the pipe when it returns, so a worker
    killed right after has still said it."""
    global _said
    try:
        init(*args)
    except BaseException as e:
        # the launcher prints the cause once; a traceback per replacement worker would bury it
        said.put((os.getpid(), "error", f"{type(e).__name__}: {e}"))
        os._exit(1)
    _said = said
    said.put((os.getpid(), "ready", None))


@contextmanager
def running(task) -> Iterator[None]:
    """In a worker: tell the launcher which task this process runs until the block ends (a
    death in it is that task's)."""
    if _said is not None:
        _said.put((os.getpid(), "task", task))
    try:
        yield
    finally:
        if _said is not None:
            _said.put((os.getpid(), "task", None))


def _ended(p) -> bool:
    """Whether process p has ended, and its exit code known. Its sentinel is readable once the
    process has closed its files, a moment before it can be reaped: join() waits that moment."""
    if p.exitcode is not None:
        return True
    try:
        if not connection.wait([p.sentinel], 0):
            return False
    except ValueError:  # not started yet
        return False
    p.join(5)
    # Pool's own thread may have reaped it first (our waitpid then finds no child): its exit
    # code is being recorded by that thread
    deadline = time.monotonic() + 5
    while p.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.exitcode is not None


@dataclass(frozen=True)
class Death:
    """A worker that died after it said it was ready."""
    pid: int
    exitcode: int
    task: object  # what it was running (None: it was idle)

    @property
    def how(self) -> str:
        return describe_exit(self.exitcode)


class WorkerWatch:
    """Every worker of a pool, from start to end. check() raises WorkerStartError when one died
    before it was ready (Pool would start another, which would die the same way) and returns
    the workers that died since, with the task each was running."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.queue = ctx.SimpleQueue()
        self.ready: Set[int] = set()
        self.tasks: Dict[int, object] = {}
        self.reported: Set[int] = set()

    def initializer(self, init: Callable, initargs: tuple):
        return _watched_init, (self.queue, init) + tuple(initargs)

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, less when a worker dies meanwhile."""
        sentinels = []
        for p in self.ctx.started:
            try:
                if p.exitcode is None:
                    sentinels.append(p.sentinel)
            except ValueError:  # made by Pool, not started yet
                continue
        if sentinels:
            connection.wait(sentinels, timeout)
        else:
            threading.Event().wait(timeout)

    def _drain(self) -> Optional[str]:
        """Read what the workers said; the first start error, if any."""
        error = None
        while not self.queue.empty():
            pid, kind, value = self.queue.get()
            if kind == "error":
                error = error or f"a worker process (pid {pid}) failed while starting: {value}"
            elif kind == "ready":
                self.ready.add(pid)
            elif kind == "task":
                self.tasks[pid] = value
        return error

    def check(self) -> List[Death]:
        dead = [p for p in self.ctx.started if p.pid is not None and p.pid not in self.reported and _ended(p)]
        # read after: all a dead worker said (ready, its task) is in the pipe by now
        error = self._drain()
        deaths = []
        for p in dead:
            self.reported.add(p.pid)
            if p.pid in self.ready:
                # an idle worker ending cleanly is a pool retiring it (maxtasksperchild), not a death
                if p.exitcode != 0 or self.tasks.get(p.pid) is not None:
                    deaths.append(Death(p.pid, p.exitcode, self.tasks.get(p.pid)))
            elif error is None:
                error = (f"a worker process (pid {p.pid}) "
                         f"{'was ' + describe_exit(p.exitcode) if p.exitcode < 0 else f'exited with code {p.exitcode}'}"
                         " while starting, before it ran any shard (its Python error, if any, is printed above): "
                         "check that `python -c 'import runner.extract'` works in this environment, then rerun "
                         "the same command")
        # a death after the start comes first: a replacement that cannot start (no GPU left for
        # it) is its consequence, not the news
        if deaths:
            return deaths
        if error is not None:
            if "while starting:" in error:
                error += "; nothing was extracted by it: fix the cause and rerun the same command"
            raise WorkerStartError(error)
        return []


# the tracker's warning when the launcher was killed (kill -9) with its queues' semaphores still
# registered: it unlinks them itself, so the warning is noise the user cannot act on
_TRACKER_QUIET = "ignore:resource_tracker:UserWarning"


def start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (before the first queue or worker would) with
    its "leaked semaphore objects" warning off. The tracker takes the interpreter's -W options
    from sys.warnoptions when it starts; they are restored at once, so the workers and the
    caller's own warnings are untouched. A tracker already running is left as it is."""
    import sys
    from multiprocessing import resource_tracker

    sys.warnoptions.append(_TRACKER_QUIET)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(_TRACKER_QUIET)
