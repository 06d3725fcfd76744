"""Is the task that writes a shard alive? Judged from its heartbeat (status/<shard>.json) in a way
that holds across hosts.

The writing side (Heart): a task beats from a thread of its own every `interval_s`, so a long
model load or a long batch never looks like death; each beat records its interval, a sequence
number, the host, the pid and the pid namespace (/proc/self/ns/pid) it was written from.

The reading side (judge): a pid means something only on the beat's own host AND in its own pid
namespace (a container, or a node's namespace on the dev cluster, has pids of its own): there
it decides. Elsewhere the beat's age decides, measured against the beat's own interval
(STALE_BEATS of them), not a fixed figure.

Clock skew. The age is `now - max(beat's own timestamp, the file's mtime)`: on a shared file
system the mtime comes from the file server (NFS) or the writer, and taking the newer of the two
makes a writer whose clock runs behind look no older than the server saw it. A beat "from the
future" (writer ahead) counts as fresh. What remains of a skew (up to MAX_SKEW_S) can only make a
beat look stale early, and a stale beat is not a verdict: for a Slurm run it means "ask Slurm",
whose word decides; only where no one can be asked is a beat declared dead, and then only past
STALE_BEATS intervals plus MAX_SKEW_S. So a modest skew changes no state, only (for runs Slurm
cannot be asked about) how soon a dead task is noticed.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Dict, Optional

STALE_BEATS = 3        # a beat older than this many of its own intervals is stale
MAX_SKEW_S = 60.0      # clock skew between nodes tolerated before a stale beat is declared dead
MAX_BEAT_S = 30.0      # the beat thread beats at least this often, whatever heartbeat_s says
LEGACY_INTERVAL_S = 40.0  # beats written before the interval was recorded (old runs: 120 s stale)


def pid_namespace() -> str:
    """This process's pid namespace ("pid:[4026531836]"); "" where /proc cannot tell."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def beat_interval_s(heartbeat_s: float) -> float:
    """The beat thread's interval (pure): heartbeat_s, but never longer than MAX_BEAT_S: a task
    must not be able to hide its death for an hour because heartbeat_s=3600."""
    return min(max(float(heartbeat_s), 0.05), MAX_BEAT_S)


def beat_age_s(beat: Dict, mtime: Optional[float], now: float) -> float:
    """How old a beat is (pure): by the newer of its own timestamp and its file's mtime; a beat
    stamped ahead of `now` (a writer clock ahead) is 0 s old."""
    t = max(float(beat.get("updated") or 0.0), float(mtime or 0.0))
    return max(0.0, now - t)


def stale_after_s(beat: Dict) -> float:
    """Age past which a beat is stale (pure): STALE_BEATS of its own interval."""
    return STALE_BEATS * float(beat.get("interval_s") or LEGACY_INTERVAL_S)


def judge(beat: Dict, age_s: float, host: str, pidns: str, pid_alive: Callable[[int], bool]) -> str:
    """A running beat's verdict (pure but for pid_alive):
      "alive"  its pid runs, checked on its own host and pid namespace
      "dead"   its pid is gone (same host and namespace)
      "fresh"  no pid to check from here; beaten within STALE_BEATS intervals
      "stale"  no pid to check; older than that: ask Slurm, or past MAX_SKEW_S more, dead."""
    pid = beat.get("pid")
    if pid:
        if "pidns" in beat:
            here = beat.get("host") == host and bool(beat["pidns"]) and beat["pidns"] == pidns
        else:  # a beat written before the namespace was recorded: its host, as before
            here = beat.get("host") == host
        if here:
            return "alive" if pid_alive(int(pid)) else "dead"
    return "fresh" if age_s <= stale_after_s(beat) else "stale"


def lost(beat: Dict, age_s: float, host: str = "") -> bool:
    """A stale beat no one else can vouch for is dead past the skew allowance (pure); a beat
    from this host (another pid namespace: a container) shares our clock and has none."""
    return age_s > stale_after_s(beat) + (0.0 if host and beat.get("host") == host else MAX_SKEW_S)


class Heart:
    """A task's heartbeat: beat(fields) writes now; a thread rewrites the latest fields every
    interval (with a new sequence number) until stop(). One lock: the forward loop's writer
    thread and the beat thread never write at once."""

    def __init__(self, write: Callable[[Dict], None], heartbeat_s: float, fields: Dict):
        self.write_fn = write
        self.interval_s = beat_interval_s(heartbeat_s)
        self.lock = threading.Lock()
        self.fields = dict(fields)
        self.seq = 0
        self.last = 0.0
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace()}
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def beat(self, fields: Dict) -> None:
        with self.lock:
            self.fields = dict(fields)
            self._write()

    def update(self, fields: Dict) -> None:
        """The fields the next beat carries, without writing now."""
        with self.lock:
            self.fields = dict(fields)

    def _write(self) -> None:
        self.seq += 1
        self.last = time.time()
        try:
            self.write_fn(dict(self.fields, **self.where, seq=self.seq, interval_s=self.interval_s))
        except OSError:
            pass  # a full disk must not fail the shard for want of a heartbeat; the next beat retries

    def start(self) -> "Heart":
        self.beat(self.fields)
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            with self.lock:
                if self._stop.is_set():
                    return
                if time.time() - self.last >= self.interval_s * 0.9:
                    self._write()

    def stop(self) -> None:
        """No more beats from the thread (before the task writes its last word: done, failed)."""
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
