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

A worker that dies while starting (its initializer raised, an import failed) would be replaced
by Pool forever; StartWatch turns it into one error naming the cause.
"""
from __future__ import annotations

import os
import queue
import threading
from multiprocessing import context, popen_spawn_posix, spawn
from typing import Callable, List

from ..errors import RunnerError

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


def _watched_init(ready_queue, init: Callable, *args) -> None:
    """Pool initializer: run `init`, then tell the launcher this worker is ready (or why not)."""
    try:
        init(*args)
    except BaseException as e:
        # the launcher prints the cause once; a traceback per replacement worker would bury it
        ready_queue.put((os.getpid(), f"{type(e).__name__}: {e}"))
        ready_queue.close()
        ready_queue.join_thread()
        os._exit(1)
    ready_queue.put((os.getpid(), None))


class StartWatch:
    """Knows which workers said they are ready; check() raises WorkerStartError when one died
    before that (Pool would start another, which would die the same way)."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.queue = ctx.Queue()
        self.ready = set()

    def initializer(self, init: Callable, initargs: tuple):
        return _watched_init, (self.queue, init) + tuple(initargs)

    def _drain(self) -> None:
        while True:
            try:
                pid, error = self.queue.get_nowait()
            except queue.Empty:
                return
            if error is not None:
                raise WorkerStartError(f"a worker process (pid {pid}) failed while starting: {error}; "
                                       "nothing was extracted by it: fix the cause and rerun the same command")
            self.ready.add(pid)

    def check(self) -> None:
        self._drain()
        dead = [p for p in self.ctx.started if p.exitcode is not None and p.pid not in self.ready]
        if not dead:
            return
        # its last words may still be in the pipe: read them before blaming an unknown cause
        threading.Event().wait(0.2)
        self._drain()
        p = dead[0]
        raise WorkerStartError(
            f"a worker process (pid {p.pid}) exited with code {p.exitcode} while starting, before it ran any "
            "shard (its Python error, if any, is printed above): check that `python -c 'import runner.extract'` "
            "works in this environment, then rerun the same command")


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
