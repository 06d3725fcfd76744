"""The run directory is the truth about a run: every state below is read from files in it,
so status, resume and verify work without Slurm accounting and after any crash.

  run.json                 plan: fingerprint, shard count, model files and sha256, config
  manifest/                the input, listed once (manifest.py; each kind lists itself, inputs/)
  shards/<name>.h5         complete shard files (the completion marker)
  shards/<name>.h5.partial.<attempt>  a shard in progress, one file per attempt (resumable)
  status/<name>.json       heartbeat: state, progress, rate, host, job, log path
  features.h5              merged view of all shards
  view.<12 hex>/           an empty folder only this run has: features.h5 names its sources
                           view.<id>/../shards/..., so it never reads another run's (merge.py)
  launch.lock, merge.lock  who launches the run, who writes features.h5 (locks.py)
Files are put in place by atomic.py's protocol (unique temporary name, fsync, rename, fsync
the folder): after a host crash each is either the old one or the complete new one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .atomic import atomic_write_text, is_temp_of
from ..errors import ConfigError
from ..jobs.inflight import refuse_if_live
from .liveness import pid_start
from .locks import lock_holder
from .shard import shard_name
from .h5 import open_h5

RUN_JSON = "run.json"
LAUNCH_LOCK = "launch.lock"  # held (flock) by the process launching the run
MERGE_LOCK = "merge.lock"  # held (flock) by the process writing features.h5


# what every command reads from run.json, with its type
_PLAN_KEYS = {"fingerprint": str, "identity": dict, "num_shards": int, "count": int, "blobs": list,
              "input_hw": list, "channels": int, "model": dict, "config_yaml": str}


def plan_shape_problem(plan) -> Optional[str]:
    """What makes a parsed run.json unusable (a missing key, a wrong type), or None."""
    if not isinstance(plan, dict):
        return f"holds a JSON {type(plan).__name__}, not the run's plan (an object)"
    for key, kind in _PLAN_KEYS.items():
        if key not in plan:
            return f"has no {key!r}"
        if not isinstance(plan[key], kind) or isinstance(plan[key], bool):
            return f"its {key!r} is {type(plan[key]).__name__}, not {kind.__name__}"
    if plan["num_shards"] < 1 or plan["count"] < 0:
        return f"num_shards={plan['num_shards']}, count={plan['count']}"
    segs = plan.get("segments")
    if segs is not None and not (isinstance(segs, list) and all(
            isinstance(g, dict) and all(isinstance(g.get(k), int) for k in ("first", "num_shards", "start", "count"))
            for g in segs)):
        return "its 'segments' are not a list of {first, num_shards, start, count}"
    return None


class DamagedPlanError(ConfigError):
    """run.json exists but cannot be used: every command says so in one line."""

    def __init__(self, path: Path, why: str):
        self.path = path
        super().__init__(f"{path} is damaged ({why}): it is the run's plan and cannot be rebuilt from the shards; "
                         "restore it if you have a copy, or start the run over with the same command plus "
                         "output.overwrite=true (or a new output.dir)")


def partial_of(final: Path, attempt: Optional[str] = None) -> Path:
    """The name a shard file has while one attempt writes it (the one place that spells it):
    shard-IIIII-of-NNNNN.h5.partial.<attempt> (locks.attempt_id: host.pid.random). Without
    an attempt: the one name every attempt shared before attempts had their own files (a
    run interrupted then still resumes from it)."""
    final = Path(final)
    return final.with_name(final.name + ".partial" + (f".{attempt}" if attempt else ""))


_ATTEMPT = re.compile(r"\.partial(\.[A-Za-z0-9_-]+\.[0-9]+\.[0-9a-f]+)?")


def partials_of(final: Path, names: Optional[List[str]] = None) -> List[Path]:
    """Every attempt's partial file of the shard file `final` (oldest name first); `names`: the
    folder's entries when the caller has listed it already (one listing for many shards)."""
    final = Path(final)
    if names is None:
        try:
            names = os.listdir(final.parent)
        except FileNotFoundError:
            return []
    n = len(final.name)
    return [final.parent / e for e in sorted(names)
            if e.startswith(final.name) and _ATTEMPT.fullmatch(e, n)]


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    @property
    def status_dir(self) -> Path:
        return self.path / "status"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def merged(self) -> Path:
        return self.path / "features.h5"

    def merged_done(self, plan: Dict) -> bool:
        """features.h5 is the merge of this run (the plan's fingerprint) and holds every planned
        image once, as a row or a failure: what "merged" means, not that a file of that name exists
        (a merge killed before its rename leaves none; one of an older plan, a relisted run's,
        counts fewer). Read from its attributes: one small open."""

        try:
            with open_h5(self.merged, "r") as f:
                a = f.attrs
                return (int(a.get("rows", -1)) + int(a.get("n_failures", 0)) == int(plan["count"])
                        and a.get("fingerprint") == plan.get("fingerprint"))
        except (OSError, KeyError, ValueError, TypeError):
            return False

    def shard_path(self, index: int, num_shards: int) -> Path:
        return self.shards_dir / f"{shard_name(index, num_shards)}.h5"

    def heartbeat_path(self, index: int, num_shards: int) -> Path:
        return self.status_dir / f"{shard_name(index, num_shards)}.json"

    def lock_path(self, index: int, num_shards: int) -> Path:
        return self.shards_dir / f"{shard_name(index, num_shards)}.lock"

    def read_plan(self) -> Dict:
        path = self.path / RUN_JSON
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a caffe-runner run directory (no {RUN_JSON}): "
                              "give the output.dir of a run") from None
        except (UnicodeDecodeError, IsADirectoryError) as e:
            raise DamagedPlanError(path, f"not a text file: {e}") from None
        try:
            plan = json.loads(text)
        except json.JSONDecodeError as e:
            raise DamagedPlanError(path, "empty" if not text.strip() else f"not valid JSON: {e}") from None
        why = plan_shape_problem(plan)
        if why:
            raise DamagedPlanError(path, why)
        return plan

    def write_plan(self, plan: Dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / RUN_JSON, json.dumps(plan, indent=1, sort_keys=True))

    def read_heartbeat(self, index: int, num_shards: int) -> Optional[Dict]:
        try:
            return json.loads(self.heartbeat_path(index, num_shards).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_heartbeat(self, index: int, num_shards: int, beat: Dict) -> None:
        beat = dict(beat, updated=time.time())
        # atomic but not fsync'd: beats come every heartbeat_s (2 s) from each task's forward
        # loop, and an fsync there costs about 10 ms on this ext4 and more on a busy Lustre or NFS
        # server; a beat lost to a host crash is harmless (read_heartbeat reads an empty or
        # missing file as no beat, status then asks about the task), unlike run.json or a shard
        # the folder is made on the first beat that finds it missing, not looked up at every beat
        # (a mkdir per beat is one more call on a shared metadata server)
        try:
            atomic_write_text(self.heartbeat_path(index, num_shards), json.dumps(beat), durable=False)
        except FileNotFoundError:
            self.status_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.heartbeat_path(index, num_shards), json.dumps(beat), durable=False)


_FILE_INFO_CACHE: Dict[tuple, Optional[Dict]] = {}


def shard_file_counts(path: Path, fingerprint: str) -> Optional[Dict[str, object]]:
    """{complete, next, rows, failures} as recorded in a shard file (complete or partial) of the
    run with this fingerprint; None when there is no such file, or it is another run's, or it
    cannot be read. Cached by the file's identity (inode, size, mtime): polling loops open an
    unchanged file once."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, fingerprint)
    if key in _FILE_INFO_CACHE:
        return _FILE_INFO_CACHE[key]

    try:
        with open_h5(path, "r") as f:
            a = f.attrs
            fp = a.get("fingerprint")
            fp = fp.decode() if isinstance(fp, bytes) else fp
            info = None if fp != fingerprint else {
                "complete": bool(a.get("complete", False)), "next": int(a.get("next", 0)),
                "rows": int(a.get("rows", 0)), "failures": int(a.get("n_failures", 0))}
    except Exception:  # not HDF5, truncated, unreadable (h5py raises several kinds)
        info = None
    if len(_FILE_INFO_CACHE) > 100_000:  # a long-lived process (a notebook) polling many runs
        _FILE_INFO_CACHE.clear()
    _FILE_INFO_CACHE[key] = info
    return info


def shard_file_of_run(path: Path, fingerprint: str) -> bool:
    """Whether `path` is a complete shard file written for the run with this fingerprint. A
    file's existence is not enough: one that survived a failed removal, or was copied in from
    another run, would otherwise be taken as done and merged."""
    info = shard_file_counts(path, fingerprint)
    return bool(info and info["complete"])


def launch_holder(run_dir: Path) -> Optional[str]:
    """Who holds run_dir's launch lock ("caffe-runner pid N on HOST since ..."), or None when
    no launch is in progress (never blocks the launcher)."""
    return lock_holder(Path(run_dir) / LAUNCH_LOCK)


# What a run directory holds besides run.json and the launch lock (held by whoever replaces
# the run): everything output.overwrite=true removes. Old attempts, job ids, retries and logs
# left behind would be read as the new run's (report, status, the next retry).
# the run's own folder through which features.h5 (a view) names its sources (merge.view_dir)
VIEW_DIR = re.compile(r"view\.[0-9a-f]{12}")
OLD_RUN_ENTRIES = ("shards", "status", "manifest", "events", "retry", "logs", ".hydra", "features.h5",
                   "features.h5.tmp", "stats.json", "submissions.json", "retries.json", "report.html")


def remove_old_run(run_dir: Path) -> None:
    """output.overwrite=true: remove the old run's files, or stop. Refused while the old run's
    Slurm jobs are queued or running (they would write into the new run). A file that survives
    (no permission, a busy NFS file) must not be mistaken for part of the new run."""
    refuse_if_live(run_dir, "output.overwrite=true")  # before anything is deleted
    failed: List[str] = []

    def note(_func, path, exc):
        exc = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(exc, FileNotFoundError):
            failed.append(f"{path} ({getattr(exc, 'strerror', None) or exc})")

    # temporaries a killed writer left of them first; submissions.json before run.json: kept
    # while anything of its run is, so a rerun still asks Slurm about those jobs; run.json last
    temps = tuple(e.name for e in run_dir.iterdir()
                  if any(is_temp_of(e.name, n) for n in OLD_RUN_ENTRIES + (RUN_JSON,))
                  or (VIEW_DIR.fullmatch(e.name) and e.is_dir()))  # the new run's view gets its own
    for name in temps + OLD_RUN_ENTRIES + (RUN_JSON,):
        if failed:
            break
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, onerror=note)
        else:
            try:
                p.unlink(missing_ok=True)
            except OSError as e:
                failed.append(f"{p} ({e.strerror})")
    if failed:
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        raise ConfigError(f"output.overwrite=true could not remove the old run's {failed[0]}{more}: remove "
                          f"{run_dir} by hand (check its permissions), or choose another output.dir")


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """Whether process `pid` runs here (a zombie does not); with `start` (liveness.pid_start of
    the process meant) only that process: a reused pid with another start time is not alive."""
    if start is not None:
        now = pid_start(pid)
        if now is not None and now != int(start):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def probe_writable(folder: Path) -> None:
    """Make `folder` if needed and write (then remove) a file in it: raises the OSError that
    a real write there would meet (read-only, immutable, full, no permission)."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    # never through a planted symlink, never truncating what is there (a stale probe: removed)
    probe.unlink(missing_ok=True)
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
        probe.unlink()
