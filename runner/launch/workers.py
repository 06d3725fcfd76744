"""The local launcher's worker processes: a small pool of our own, every death seen and named.

Why not multiprocessing.Pool, as the first design had it. Its spawn start method runs the
parent's main module again in every worker (so that the worker can unpickle functions defined
there): a script that calls `extract()` without an `if __name__ == "__main__":` guard would
call it again in every worker, and `<stdin>` or a notebook cannot be run again at all. Nothing
public turns that off (ProcessPoolExecutor spawns the same way); avoiding it meant patching
CPython's private spawn code, which any release may change. And Pool never notices a worker
that dies (bpo-22393): it starts a replacement and the task the dead one held stays pending
for ever, while the dead worker may hold the lock of the queue every worker shares, so that
Pool.terminate() and a log queue's listener can block for ever too.

So each worker is a child process of ours (runner/task/child.py): `python -c` importing this module
and running worker_main, never the user's main module, whatever it is. It speaks pickled
messages on its own two pipes, shared with no other process: the pool hands a task to a worker
that is free (the next shard to whichever worker frees up first, as Pool's apply_async did),
so it knows which task each worker holds; a death is the worker's pipe ending, then its exit
code, seen within a poll and named with that task. A worker that fails while starting (its
initializer raised, an import failed) is one error naming the cause, and no worker is ever
replaced: a run whose worker died stops, and the rerun resumes.
"""
from __future__ import annotations

import logging
import logging.handlers
import pickle
import queue
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

from ..task import child
from ..errors import RunnerError
from ..store.lastwords import describe_exit


class WorkerStartError(RunnerError):
    """A worker process died before it could run a shard (environment, import, initializer)."""


@dataclass(frozen=True)
class Death:
    """A worker that died after it said it was ready."""
    pid: int
    exitcode: int
    task: object  # what it was running (None: it was idle)

    @property
    def how(self) -> str:
        return describe_exit(self.exitcode)


# ---- in a worker -------------------------------------------------------------------------

class _Launcher:
    """A worker's way to the launcher: one message at a time on its pipe (the main thread's
    replies and other threads' log records share it)."""

    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()

    def say(self, kind: str, value) -> None:
        data = child.dumps((kind, value))
        with self.lock:
            self.out.write(data)
            self.out.flush()

    def put_nowait(self, record: logging.LogRecord) -> None:  # a queue, for logging's QueueHandler
        self.say("log", record)


_launcher: Optional[_Launcher] = None  # in a worker: set by worker_main


def log_handler() -> logging.Handler:
    """In a worker (its initializer): a handler that sends each record to the launcher, which
    logs it with its own handlers (the lines are printed above its progress bar)."""
    if _launcher is None:
        raise RuntimeError("log_handler() is for a worker of WorkerPool")
    return logging.handlers.QueueHandler(_launcher)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def worker_main() -> int:
    """A worker: (initializer, args) in, then ("ready", None) or ("error", why) out; then
    (function, args) in and ("done", value) or ("failed", "Type: message") out, until the
    launcher closes its pipe."""
    global _launcher
    inp, out = child.pipes()
    _launcher = launcher = _Launcher(out)
    try:
        init, args = child.recv(inp)
        init(*args)
    except BaseException as e:  # noqa: BLE001  any of it: the launcher prints the cause once
        launcher.say("error", _error(e))
        return 1
    launcher.say("ready", None)
    while True:
        try:
            task = child.recv_bytes(inp)
        except EOFError:
            return 0
        try:
            fn, args = pickle.loads(task)  # (a function this process cannot import fails its task)
            reply = ("done", fn(*args))
            child.dumps(reply)  # a value that cannot be pickled fails the task, not the worker
        except Exception as e:  # noqa: BLE001  handed back to the launcher, as Pool did
            reply = ("failed", _error(e))
        launcher.say(*reply)


# ---- in the launcher -------------------------------------------------------------------

class Result:
    """A task handed to the pool (what Pool.apply_async returned: ready(), get())."""

    def __init__(self, fn: Callable, args: tuple, label: object):
        self.fn, self.args, self.label = fn, args, label
        self._done = False
        self._value = None
        self._error: Optional[str] = None

    def ready(self) -> bool:
        return self._done

    def get(self):
        """The task's value; TaskError("Type: message") when it raised."""
        if not self._done:
            raise RuntimeError("the task has not finished")
        if self._error is not None:
            raise TaskError(self._error)
        return self._value


class TaskError(RunnerError):
    """A task raised in its worker: `Type: message`, as the worker said it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(eq=False)
class _Worker:
    p: subprocess.Popen
    ready: bool = False
    task: Optional[Result] = None
    exitcode: Optional[int] = None
    stopping: bool = False  # ended by the pool: not a death
    reader: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.p.pid


class WorkerPool:
    """One worker per tuple of `initargs`, each started with `initializer(*initargs[k])` (what
    differs between the workers, as a GPU, is handed out here). apply_async() queues a
    task; wait() hands tasks to free workers and returns the workers that died since the last
    call, with the task each held, or raises WorkerStartError when one died before it was ready.
    Log records the workers send (log_handler) go to `on_log`."""

    def __init__(self, initializer: Callable, initargs: Sequence[tuple],
                 on_log: Optional[Callable[[logging.LogRecord], None]] = None):
        self.on_log = on_log or (lambda record: None)
        self._events: "queue.Queue" = queue.Queue()
        self._todo: List[Result] = []
        self._start_error: Optional[str] = None
        self.workers: List[_Worker] = []
        try:
            for args in initargs:
                w = _Worker(child.start(__name__, worker_main.__name__))
                self.workers.append(w)
                w.reader = threading.Thread(target=self._read, args=(w,), name=f"worker-{w.pid}", daemon=True)
                w.reader.start()
                self._send(w, (initializer, tuple(args)))
        except BaseException:
            self.terminate()
            raise

    @property
    def pids(self) -> List[int]:
        return [w.pid for w in self.workers]

    def _read(self, w: _Worker) -> None:
        """A worker's pipe, read to its end (the worker ended, or died): every message before
        its death, then its exit code."""
        try:
            while True:
                data = child.recv_bytes(w.p.stdout)
                try:
                    kind, value = pickle.loads(data)
                except Exception as e:  # noqa: BLE001  a value this process cannot unpickle
                    kind, value = "failed", f"the launcher could not read the task's value: {_error(e)}"
                if kind == "log":
                    try:
                        self.on_log(value)
                    except Exception:  # noqa: BLE001  a log line lost, never the worker's death
                        pass
                else:
                    self._events.put((w, kind, value))
        except (EOFError, OSError, ValueError):
            pass
        self._events.put((w, "ended", w.p.wait()))

    def _send(self, w: _Worker, msg) -> bool:
        try:
            child.send(w.p.stdin, msg)
            return True
        except (OSError, ValueError):  # it died (its reader says so) or was stopped
            return False

    def apply_async(self, fn: Callable, args: tuple = (), label: object = None) -> Result:
        """Queue fn(*args) for the next free worker; a death while it runs names `label`."""
        r = Result(fn, tuple(args), label)
        self._todo.append(r)
        self._hand_out()
        return r

    def _hand_out(self) -> None:
        for w in self.workers:
            if not self._todo:
                return
            if w.ready and w.task is None and w.exitcode is None and not w.stopping:
                r = self._todo.pop(0)
                if self._send(w, (r.fn, r.args)):
                    w.task = r
                else:
                    self._todo.insert(0, r)

    def wait(self, timeout: float) -> List[Death]:
        """Wait up to `timeout` seconds for what the workers say (less when one says something
        or dies), hand out tasks, and return the deaths seen (raises WorkerStartError)."""
        deaths: List[Death] = []
        try:
            events = [self._events.get(timeout=timeout)]
        except queue.Empty:
            events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for w, kind, value in events:
            if kind == "ready":
                w.ready = True
            elif kind == "error":
                if self._start_error is None:
                    self._start_error = f"a worker process (pid {w.pid}) failed while starting: {value}"
            elif kind in ("done", "failed") and w.task is not None:
                r, w.task = w.task, None
                r._done = True
                if kind == "done":
                    r._value = value
                else:
                    r._error = value
            elif kind == "ended":
                w.exitcode = value
                if w.stopping:
                    continue
                if w.ready:
                    deaths.append(Death(w.pid, value, w.task.label if w.task is not None else None))
                elif self._start_error is None:
                    self._start_error = (
                        f"a worker process (pid {w.pid}) "
                        f"{'was ' + describe_exit(value) if value < 0 else f'exited with code {value}'}"
                        " while starting, before it ran any shard (its Python error, if any, is printed above): "
                        "check that `python -c 'import runner.task.extract'` works in this environment, then rerun "
                        "the same command")
        self._hand_out()
        # a death after the start comes first: it is the news
        if deaths:
            return deaths
        if self._start_error is not None:
            error = self._start_error
            if "while starting:" in error:
                error += "; nothing was extracted by it: fix the cause and rerun the same command"
            raise WorkerStartError(error)
        return []

    def close(self, wait_s: float = 30.0) -> None:
        """Every task has finished: the workers end on their pipe's end (stopped, past wait_s)."""
        for w in self.workers:
            w.stopping = True
            try:
                w.p.stdin.close()
            except OSError:
                pass
        self._join(wait_s)

    def terminate(self, wait_s: float = 5.0) -> None:
        """Stop every worker now (SIGTERM; SIGKILL past wait_s), whatever it is doing."""
        for w in self.workers:
            w.stopping = True
            if w.p.poll() is None:
                w.p.terminate()
        self._join(wait_s)

    def _join(self, wait_s: float) -> None:
        for w in self.workers:
            try:
                w.p.wait(wait_s)
            except subprocess.TimeoutExpired:
                w.p.kill()
                w.p.wait()
            try:
                w.p.stdin.close()
            except OSError:
                pass
            if w.reader is not None:
                w.reader.join(wait_s)
            if w.reader is None or not w.reader.is_alive():  # (its read would hold the file's lock)
                w.p.stdout.close()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()
