"""The per-shard event log: the history a heartbeat (overwritten every few seconds) forgets.

  events/<shard name>.jsonl   one JSON object per line, appended by the task that runs the shard:
    {"t": unix time, "event": "started" | "resumed" | "progress" | "finished" | "failed" | "requeued",
     "host", "pid", "job_id", "restart" (Slurm requeues), "gpu", "done", "rows", "failures", ...}

Each attempt at a shard (a process, a requeue, a resume) begins with "started" (or "resumed"
when the shard file already held committed rows) and ends with "finished", "failed" or
"requeued" (submitit requeued the task on timeout or preemption: not a failure), or "lost"
(another attempt committed the shard first or took it over; `other` names it: write.py); an
attempt killed without a word (scancel, kill -9, a node lost) simply stops, and readers end it
at its last line. "progress" lines give images/s over time. The local launcher ends an attempt
whose worker it saw die with "failed" carrying `died` (how), and one whose worker it stopped
itself (another worker died, Ctrl-C) with "stopped"; an attempt that decodes image by image
because earlier ones died (isolate.py) says so in its "started" line (`isolated`: how many died).

Bounded: progress lines come at most every PROGRESS_S seconds, the interval doubling after every
PROGRESS_STEP of them, and a file stops taking progress lines at MAX_LINES (attempt lines are
always written, up to HARD_MAX_LINES): a shard's log stays under ~150 KB whatever its length.
Appends are single write() calls of one line (O_APPEND), so a reader never sees half a line from
a live writer; a torn last line from a killed one is skipped.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

EVENTS_DIR = "events"
PROGRESS_S = 5.0
PROGRESS_STEP = 200
MAX_LINES = 1000
HARD_MAX_LINES = 1200
ATTEMPT_EVENTS = ("started", "resumed")
END_EVENTS = ("finished", "failed", "requeued")


def task_fields(ident) -> Dict[str, object]:
    """Who runs an attempt (a task.TaskIdentity), as its lines name it."""
    return {"host": ident.host, "pid": ident.pid, "job_id": ident.job_id, "restart": ident.restart_count,
            "gpu": ident.visible_gpus}


def events_path(run_dir: Path, shard_file_stem: str) -> Path:
    return Path(run_dir) / EVENTS_DIR / f"{shard_file_stem}.jsonl"


def progress_interval_s(progress_lines: int) -> float:
    """Seconds between progress lines once a log holds `progress_lines` of them (pure)."""
    return PROGRESS_S * (2 ** (progress_lines // PROGRESS_STEP))


class EventLog:
    """The appending side, one per task attempt. Never raises: the log is for people, and a
    full disk must not fail a shard because of it."""

    def __init__(self, path: Path, ident: Dict[str, object]):
        self.path = Path(path)
        self.ident = {k: v for k, v in ident.items() if v not in (None, "")}
        self.lines = self.progress_lines = 0
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    self.lines += 1
                    self.progress_lines += b'"progress"' in line
        except OSError:
            pass
        self.last_progress = 0.0

    def write(self, event: str, **fields) -> None:
        if self.lines >= HARD_MAX_LINES or (event == "progress" and self.lines >= MAX_LINES):
            return
        rec = {"t": round(time.time(), 3), "event": event, **self.ident, **fields}
        try:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder, made once (not looked up at every line)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(rec, default=str) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            return
        self.lines += 1
        if event == "progress":
            self.progress_lines += 1

    def progress(self, **fields) -> None:
        """A progress line when the interval has passed (callers may call it every batch)."""
        now = time.time()
        if now - self.last_progress >= progress_interval_s(self.progress_lines):
            self.last_progress = now
            self.write("progress", **fields)


def read_events(path: Path) -> List[Dict]:
    """Every well-formed line of one shard's log, in order (a torn last line is skipped)."""
    return [r for r in read_jsonl(path) if "t" in r and "event" in r]


def attempts(events: List[Dict]) -> List[Dict]:
    """Group one shard's events into attempts (pure): each has start, end, outcome
    ("finished", "failed", "requeued", or "ended" when the log just stops), host, job, gpu, and its
    progress samples [(t, done)]."""
    out: List[Dict] = []
    cur: Optional[Dict] = None
    for e in events:
        ev = e["event"]
        if ev in ATTEMPT_EVENTS or cur is None:
            if cur is not None:
                out.append(cur)
            cur = {"start": e["t"], "end": e["t"], "outcome": "ended", "kind": ev if ev in ATTEMPT_EVENTS else "started",
                   "host": e.get("host"), "pid": e.get("pid"), "job_id": e.get("job_id"),
                   "restart": e.get("restart", 0), "gpu": e.get("gpu"), "device": e.get("device"),
                   "done0": int(e.get("done", 0) or 0), "samples": [], "rows": None, "failures": None,
                   "own_shard": e.get("own_shard")}
        cur["end"] = max(cur["end"], e["t"])
        if "done" in e:
            cur["samples"].append((float(e["t"]), int(e["done"] or 0)))
        for k in ("rows", "failures", "device"):
            if e.get(k) is not None:
                cur[k] = e[k]
        if ev in END_EVENTS:
            cur["outcome"] = ev
            if ev == "failed":
                cur["error"] = e.get("error")
            out.append(cur)
            cur = None
    if cur is not None:
        out.append(cur)
    return out


def iter_shard_logs(run_dir: Path) -> Iterator[Path]:
    d = Path(run_dir) / EVENTS_DIR
    if d.is_dir():
        yield from sorted(d.glob("*.jsonl"))


COMMANDS = "commands.jsonl"


def record_command(run_dir: Path, what: str, args: List[str]) -> None:
    """logs/commands.jsonl: every command that changed the run (launches, retries), for the
    report; .hydra/overrides.yaml keeps only the last launch's."""
    import getpass
    import socket
    import sys

    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    rec = {"t": round(time.time(), 3), "what": what, "args": [str(a) for a in args], "host": socket.gethostname(),
           "user": user, "argv0": os.path.basename(sys.argv[0]) if sys.argv else ""}
    try:
        d = Path(run_dir) / "logs"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / COMMANDS, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError:
        pass


def read_commands(run_dir: Path) -> List[Dict]:
    return read_jsonl(Path(run_dir) / "logs" / COMMANDS)


def read_jsonl(path: Path) -> List[Dict]:
    out: List[Dict] = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return [r for r in out if isinstance(r, dict)]
