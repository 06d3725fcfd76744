"""No poison shard: a shard whose process died twice is decoded image by image in child processes.

A decoder that crashes on one crafted file (a segfault in native code), or one image whose
decoding the kernel's out-of-memory killer ends, kills the whole task, and every task that takes
the shard after it: with tasks taking free shards (steal.py) one such image would kill every
task of an array in turn. So the shard's own event log (events.py) is read when an attempt
starts: every earlier attempt that began ("started", "resumed") and then died counts, i.e. one
that has no end line (a process killed without a word: SIGSEGV, SIGKILL, a lost node) or whose
end line is the launcher's "failed" record of a worker it saw die (`died`: the signal). Attempts
that ended in words ("finished", a Python "failed", "requeued", "lost"), or that the local
launcher stopped itself after another worker's death or a Ctrl-C ("stopped"), do not count.

Once POISON_AFTER_DEATHS attempts died (one, for a task that took the shard from another:
isolate_attempt), the next one runs with an IsolatedDecoder: every image
is decoded (read, checked, decoded, resized) by the same decoder in a child process, one image
at a time per decode thread. A child that dies takes only its image with it: that image is
recorded as a failure naming the signal (and "out of memory" when the OOM killer of the task's
cgroup killed it), a fresh child takes the next image, and the shard completes. Each child
returns the very pixels the decoder would have returned in the task itself, and the forward
runs in the task as always, so every other row is the row of a normal run (same engine, same
threads). The normal path costs one read of the shard's (bounded) event log per attempt.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import cv2

from . import child
from ..engine.decode import reuse_large_buffers
from ..errors import RunnerError
from ..store.events import ATTEMPT_EVENTS, read_events
from ..store.lastwords import describe_exit, signal_hint

POISON_AFTER_DEATHS = 2
# a shard a task takes from another (steal.py) after one death: a task reaches another's stretch
# last (tasks claim their own stretch first), so at the run's tail no third task may be left to
# take it after a second death; isolating the second attempt costs only speed
POISON_AFTER_DEATHS_TAKEN = 1


def isolate_attempt(died: int, taken: bool) -> bool:
    """Whether this attempt decodes image by image (pure): its shard died twice, or once when
    this task took it from another."""
    return died >= (POISON_AFTER_DEATHS_TAKEN if taken else POISON_AFTER_DEATHS)
# end lines of an attempt that did not die ("stopped": the local launcher stopped its worker)
ENDED_IN_WORDS = ("finished", "failed", "requeued", "lost", "stopped")
REASON = "crashed the decoder"  # what a failure's reason starts with (stats.reason_kind groups by it)


def died_attempts(events: Iterable[Dict]) -> int:
    """How many attempts of a shard died (pure), from its event lines in order: an attempt that
    began and has no end line before the next one began (or before the log ends: the caller
    holds the shard's lock, so no earlier attempt is alive), or that ends with a "failed" line
    carrying `died` (a launcher's record of a worker it saw die)."""
    died = 0
    open_ = False
    for e in events:
        ev = e.get("event")
        if ev in ATTEMPT_EVENTS:
            died += open_
            open_ = True
        elif open_ and ev in ENDED_IN_WORDS:
            died += bool(ev == "failed" and e.get("died"))
            open_ = False
    return died + open_


def attempt_open(events: Iterable[Dict]) -> bool:
    """Whether the last attempt in a shard's event lines has no end line yet (pure)."""
    open_ = False
    for e in events:
        ev = e.get("event")
        if ev in ATTEMPT_EVENTS:
            open_ = True
        elif ev in ENDED_IN_WORDS:
            open_ = False
    return open_


def shard_deaths(events_file: Path) -> int:
    return died_attempts(read_events(events_file))


def _cgroup_counter(path: str, key: str) -> Optional[int]:
    try:
        with open(path) as f:
            for ln in f:
                k, _, v = ln.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        return None
    return None


def oom_kills() -> Optional[int]:
    """The kernel's count of OOM kills in this process's memory cgroup (cgroup v2 memory.events,
    v1 memory.oom_control; both count the cgroup's descendants), or None where neither can be
    read. Inside a cgroup namespace the process's own cgroup is the mount's root."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for ln in lines:
        hid, ctrls, path = (ln.split(":", 2) + ["", ""])[:3]
        if "memory" in ctrls.split(","):
            base, name, key = "/sys/fs/cgroup/memory", "memory.oom_control", "oom_kill"
        elif hid == "0" and not ctrls:
            base, name, key = "/sys/fs/cgroup", "memory.events", "oom_kill"
        else:
            continue
        for folder in (os.path.join(base, path.lstrip("/")), base):
            n = _cgroup_counter(os.path.join(folder, name), key)
            if n is not None:
                return n
    return None


def death_reason(returncode: int, oom: bool) -> str:
    """The failure recorded for the image a child died decoding (pure)."""
    if returncode < 0 and -returncode == signal.SIGKILL and oom:
        return (f"{REASON}: killed by SIGKILL from the out-of-memory killer (out of memory: decoding this image "
                "needs more memory than the task has; decode.max_pixels or decode.max_file_mb bound it)")
    hint = signal_hint(returncode)
    return f"{REASON}: its process was {describe_exit(returncode)}" + (f" ({hint})" if hint else "")


# ---- the child ---------------------------------------------------------------------------

_READY = "ready"


def child_main() -> int:
    """One decoder, one image at a time: (kind, argument) in, (image, reason) out. Dies with
    its parent (PR_SET_PDEATHSIG); writes nothing else to the parent's pipe (child.pipes)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    inp, out = child.pipes()
    cv2.setNumThreads(1)  # as configure_threads does in the task: the same pixels
    reuse_large_buffers()
    decoder = child.recv(inp)
    child.send(out, _READY)
    while True:
        try:
            kind, arg = child.recv(inp)
        except EOFError:
            return 0
        if kind == "load":
            res = decoder.load(arg)
        elif kind == "bytes":
            res = decoder.load_bytes(arg)
        else:
            res = decoder.load_pixels(arg)
        child.send(out, res)


class _Died(Exception):
    def __init__(self, returncode: int):
        self.returncode = returncode


class _Child:
    """A child process holding a copy of the decoder."""

    def __init__(self, decoder):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.p = child.start(__name__, child_main.__name__, env)
        try:
            child.send(self.p.stdin, decoder)
            ready = child.recv(self.p.stdout)
        except (OSError, EOFError):
            ready = None
        if ready != _READY:
            rc = self.p.wait()
            raise RunnerError(f"the child process that decodes a shard image by image did not start "
                              f"({describe_exit(rc)}; its error is above, on this task's stderr): this shard "
                              "cannot be run isolated; rerun, and report it if it happens again")

    def call(self, msg) -> Tuple:
        try:
            child.send(self.p.stdin, msg)
            return child.recv(self.p.stdout)
        except (OSError, EOFError):
            raise _Died(self.p.wait()) from None

    def close(self) -> None:
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


class IsolatedDecoder:
    """The decoder's interface (load, load_bytes, load_pixels), each image decoded in a child
    process: one child per calling thread, replaced when it dies. close() ends them all."""

    def __init__(self, decoder):
        self.inner = decoder
        self._local = threading.local()
        self._children: List[_Child] = []
        self._lock = threading.Lock()
        self.deaths = 0  # children that died on an image

    @property
    def missing_reason(self) -> str:
        return getattr(self.inner, "missing_reason", "file not found")

    @missing_reason.setter
    def missing_reason(self, value: str) -> None:  # the reader sets it before the first image
        self.inner.missing_reason = value

    def load(self, path: bytes):
        return self._call(("load", path))

    def load_bytes(self, data: bytes):
        return self._call(("bytes", data))

    def load_pixels(self, get_pixels):
        try:
            pickle.dumps(get_pixels)
        except Exception:  # not sendable: the pixels are made here, the fitting done there
            return self._call(("pixels", _Pixels(get_pixels())))
        return self._call(("pixels", get_pixels))

    def _call(self, msg):
        proc = getattr(self._local, "child", None)
        if proc is None:
            proc = _Child(self.inner)
            with self._lock:
                self._children.append(proc)
            self._local.child = proc
            self._local.oom0 = oom_kills()
        try:
            return proc.call(msg)
        except _Died as d:
            oom0, oom1 = self._local.oom0, oom_kills()
            self._local.child = None
            with self._lock:
                self._children.remove(proc)
                self.deaths += 1
            proc.close()
            return None, death_reason(d.returncode, oom0 is not None and oom1 is not None and oom1 > oom0)

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, []
        for c in children:
            c.close()


class _Pixels:
    """get_pixels() for pixels already made (picklable)."""

    def __init__(self, pixels):
        self.pixels = pixels

    def __call__(self):
        return self.pixels

