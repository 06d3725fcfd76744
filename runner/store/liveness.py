"""Is the task that writes a shard alive? Judged from its heartbeat (status/<shard>.json) in a way
that holds across hosts.

The writing side (Heart): a task beats from a thread of its own every `interval_s`, so a long
model load or a long batch never looks like death; each beat records its interval, a sequence
number, the host, the pid and the pid namespace (/proc/self/ns/pid) it was written from.

The reading side (judge_beat): a pid means something only on the beat's own host AND in its own pid
namespace (a container, or a node's namespace on the dev cluster, has pids of its own): there
it decides. Elsewhere the beat's age decides, measured against the beat's own interval
(STALE_BEATS of them), not a fixed figure.

Clock skew. The age is `now - max(beat's own timestamp, the file's mtime)`: on a shared file
system the mtime comes from the file server (NFS) or the writer, and taking the newer of the two
makes a writer whose clock runs behind look no older than the server saw it. A beat "from the
future" (writer ahead) is aged by its mtime when the server stamped it, else counts as fresh.
What remains of a skew (up to MAX_SKEW_S) can only make a
beat look stale early, and a stale beat is not a verdict: for a Slurm run it means "ask Slurm",
whose word decides; only where no one can be asked is a beat declared dead, and then only past
STALE_BEATS intervals plus MAX_SKEW_S. So a modest skew changes no state, only (for runs Slurm
cannot be asked about) how soon a dead task is noticed.

One clock for a reader that looks more than once (a `wait`, `status --watch`, a task waiting for
a dead holder): BeatWatch remembers, on the reader's own monotonic clock, since when each beat
has not changed (its sequence number). A beat dated in the future (a writer clock ahead, and on
Lustre the mtime too) thus counts as written when the reader first saw it at the latest, and a
dead task on a node whose clock runs ahead is named within the usual bound (STALE_BEATS
intervals plus MAX_SKEW_S) of that, not after the skew.

Pid identity: a beat records its process's start time (/proc/PID/stat, field 22, in clock ticks
since the host booted): a pid reused on the same host by another process is not "alive".

Heartbeat rate: every beat of every task is a create and a rename on the shared file system's
metadata server. A task beats every heartbeat_s while its shard's length is unknown, then every
shard_time / BEATS_PER_SHARD (never less often than MAX_BEAT_S): short shards beat fast, a
thousand tasks on hour-long shards do not beat every 2 s (beat_interval_for_shard).
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
BEATS_PER_SHARD = 50   # once a shard's length is known, about this many beats over it


def pid_start(pid: int) -> Optional[int]:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), None
    when it does not run or /proc cannot tell. With the pid it names one process: a pid the
    kernel reuses comes with another start time."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22: fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


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


def beat_interval_for_shard(heartbeat_s: float, shard_s: Optional[float]) -> float:
    """The beat interval once the shard's length `shard_s` is known (pure): shard_s /
    BEATS_PER_SHARD, but never shorter than beat_interval_s(heartbeat_s) nor longer than
    MAX_BEAT_S. Unknown length: beat_interval_s(heartbeat_s)."""
    base = beat_interval_s(heartbeat_s)
    if not shard_s or shard_s <= 0:
        return base
    return max(base, min(MAX_BEAT_S, float(shard_s) / BEATS_PER_SHARD))


def _written_at(beat: Dict, mtime: Optional[float], now: float) -> float:
    """When a beat was written, as well as this reader can tell (pure): the newer of its own
    timestamp and its file's mtime; but a beat stamped ahead of `now` by more than MAX_SKEW_S
    (a writer clock ahead) whose mtime is not (a file server that stamps the time, as NFS does)
    was written at its mtime."""
    updated = float(beat.get("updated") or 0.0)
    if mtime is not None and updated > now + MAX_SKEW_S and float(mtime) <= now + MAX_SKEW_S:
        return float(mtime)
    return max(updated, float(mtime or 0.0))


def beat_age_s(beat: Dict, mtime: Optional[float], now: float) -> float:
    """How old a beat is (pure), from _written_at: so even a reader that looks once names a
    dead task on a node whose clock runs ahead where the server stamps the mtime. Both ahead (a
    client-stamped mtime, as on Lustre): 0 s old, written now at most (BeatWatch then ages it
    on the reader's clock; clock_ahead_s says by how much a one-shot reader cannot tell)."""
    return max(0.0, now - _written_at(beat, mtime, now))


def clock_ahead_s(beat: Dict, mtime: Optional[float], now: float) -> float:
    """By how much a beat is dated ahead of `now`, past MAX_SKEW_S (pure); 0 when beat_age_s
    can age it."""
    ahead = _written_at(beat, mtime, now) - now
    return ahead if ahead > MAX_SKEW_S else 0.0


class BeatWatch:
    """A reader's memory of the beats it has seen, on its own monotonic clock: since when each
    beat (by key: a shard) has shown the same sequence number. age() is the larger of the
    timestamps' age (beat_age_s) and the time this reader has seen the beat unchanged, so a beat
    dated in the future still ages from when the reader first saw it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.seen: Dict[object, tuple] = {}

    def age(self, key, beat: Dict, mtime: Optional[float], now: float) -> float:
        sig = (beat.get("seq"), beat.get("updated"), beat.get("pid"), beat.get("host"))
        t = self.clock()
        last = self.seen.get(key)
        if last is None or last[0] != sig:
            self.seen[key] = (sig, t)
            unchanged = 0.0
        else:
            unchanged = t - last[1]
        if len(self.seen) > 100_000:  # a long-lived reader watching many runs
            self.seen = {key: self.seen[key]}
        return max(beat_age_s(beat, mtime, now), unchanged)


# the watch of this process: readers that look again (wait loops, status --watch) age the beats
# they saw on their own clock (one per process: a one-shot `status` sees each beat once)
WATCH = BeatWatch()


def stale_after_s(beat: Dict) -> float:
    """Age past which a beat is stale (pure): STALE_BEATS of its own interval."""
    return STALE_BEATS * float(beat.get("interval_s") or LEGACY_INTERVAL_S)


def judge_beat(beat: Dict, age_s: float, host: str, pidns: str, pid_alive: Callable[..., bool]) -> str:
    """A running beat's verdict (pure but for pid_alive(pid, start): start is the beat's
    pid_start, None in beats written before it was recorded):
      "alive"  its pid runs (the same process: its start time), checked on its own host and pid namespace
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
            start = beat.get("pid_start")
            alive = pid_alive(int(pid)) if start is None else pid_alive(int(pid), int(start))
            return "alive" if alive else "dead"
    return "fresh" if age_s <= stale_after_s(beat) else "stale"


def lost(beat: Dict, age_s: float, host: str = "") -> bool:
    """A stale beat no one else can vouch for is dead past the skew allowance (pure); a beat
    from this host (another pid namespace: a container) shares our clock and has none."""
    return age_s > stale_after_s(beat) + (0.0 if host and beat.get("host") == host else MAX_SKEW_S)


def last_beat(write: Callable[[Dict], None], base: Dict, **fields) -> Dict:
    """Write a shard's last beat, the one no Heart writes: a task's last word (failed, requeued)
    or a launcher's record of a worker that died without one. The base beat's fields (the
    shard's previous beat) with `fields` over them and the next sequence number, so a watcher
    sees it change. A disk error is ignored: a last word must not fail anything else."""
    beat = dict(base, **fields)
    beat["seq"] = int(base.get("seq") or 0) + 1
    beat["updated"] = time.time()
    try:
        write(beat)
    except OSError:
        pass
    return beat


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
        self.heartbeat_s = heartbeat_s
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(),
                      "pid_start": pid_start(os.getpid())}
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def beat(self, fields: Dict) -> None:
        with self.lock:
            self.fields = dict(fields)
            self._write()

    def pace(self, shard_s: Optional[float]) -> None:
        """Beat at the rate the shard's expected length `shard_s` calls for (beat_interval_for_shard)."""
        self.interval_s = beat_interval_for_shard(self.heartbeat_s, shard_s)

    def update(self, fields: Dict) -> None:
        """The fields the next beat carries, without writing now."""
        with self.lock:
            self.fields = dict(fields)

    def _write(self) -> None:
        self.seq += 1
        self.last = time.time()
        quiet = {}
        if self.fields.get("moved_t") is not None:  # how long the count has not moved, on this clock alone
            quiet = {"quiet_s": round(max(0.0, self.last - float(self.fields["moved_t"])), 3)}
        try:
            self.write_fn(dict(self.fields, **self.where, **quiet, seq=self.seq, interval_s=self.interval_s))
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
