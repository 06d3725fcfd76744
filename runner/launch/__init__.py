"""Launchers: the same run_shard on this machine (local) or as a Slurm array (slurm).

launch() is the one entry of the CLI and the Python API. Around the launcher it keeps the
run directory clean: a non-empty folder that is not a run is refused, one launch at a time
holds the directory (launch.lock), a command that fails before its plan is accepted leaves
nothing behind, and the record of the command (.hydra/) is written only once the plan is
accepted, so a refused command changes nothing in an existing run.

May import: everything but runner.ui and runner.api (nothing below imports a launcher:
registry.py imports the implementations by name when a launch starts).
"""
from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from .. import log
from ..store.atomic import is_temp_of
from ..errors import ConfigError, RunBusyError, shell_quote, unwritable
from ..store.locks import FileLock, LockHeld
from ..store.private import check_private, private_files
from .base import Launcher
from .registry import launcher_for

from ..store.rundir import LAUNCH_LOCK as LOCK_NAME, MERGE_LOCK
# what a run directory may hold; anything else in a folder without run.json is someone's data
# (features.h5.tmp: the fixed temporary name merges used before atomic.py)
_RUN_ENTRIES = {"run.json", "manifest", "shards", "status", "logs", "features.h5", "features.h5.tmp", "stats.json",
                "submissions.json", ".hydra", LOCK_NAME, MERGE_LOCK,
                "events", "report.html", "retries.json", "retry"}


def _ours(name: str) -> bool:
    """A run's entry, or a temporary one of a run's entry (a writer killed mid-write), or a probe."""
    return name in _RUN_ENTRIES or name.startswith((".write-test", ".flock-test")) or \
        any(is_temp_of(name, e) for e in _RUN_ENTRIES)


def check_run_dir(path: Path) -> None:
    """Refuse a non-empty folder that is not a run directory (naming what is in it)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"output.dir {path} is a file: give a folder for the run (it is created if missing)")
    if (path / "run.json").exists():
        return
    foreign = sorted(e.name for e in path.iterdir() if not _ours(e.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"output.dir {path} is not empty and holds no run ({shown}): give a new or empty "
                          "folder, e.g. output.dir=" + str(path / "caffe-run"))


@contextmanager
def launch_lock(path: Path):
    """One launch per run directory at a time; the loser is told who holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path / LOCK_NAME, "caffe-runner")
        lock.acquire()
    except LockHeld as e:
        raise RunBusyError(f"output.dir {path} is in use by {e.holder}: wait for it to finish "
                           f"(caffe-runner status {shell_quote(path)}) or use another output.dir", holder=e.holder) from None
    except OSError as e:
        raise unwritable("output.dir", path, e, "choose another output.dir (a folder you can write)") from None
    try:
        yield
    finally:
        lock.release()  # released: it names nobody (and a run's files end as they were)


class CommandRecord:
    """Once the plan is accepted (accepted(run), called by the launcher): record the command
    (Hydra's .hydra/ layout) and keep a log of launches in logs/launch.log until close()."""

    def __init__(self, overrides: Sequence[str]):
        self.overrides = list(overrides)
        self.handler: Optional[logging.Handler] = None

    def accepted(self, run) -> None:
        d = Path(run.rundir.path)
        hydra_dir = d / ".hydra"
        hydra_dir.mkdir(exist_ok=True)
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
        (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.overrides)))
        from ..store.events import record_command

        record_command(d, "extract", self.overrides)  # every launch; .hydra/ keeps only the last
        run.rundir.logs_dir.mkdir(exist_ok=True)
        if self.handler is None:
            h = logging.FileHandler(run.rundir.logs_dir / "launch.log")
            h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(h)
            self.handler = h

    def close(self) -> None:
        if self.handler is not None:
            log.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def _remove_leftovers(path: Path, existed: bool, before: List[str]) -> None:
    """A command that failed before its plan was accepted leaves the folder as it found it."""
    if (path / "run.json").exists() or not path.exists():
        return
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for e in path.iterdir():
        if e.name not in before:
            shutil.rmtree(e, ignore_errors=True) if e.is_dir() else e.unlink(missing_ok=True)


def _in_run_dir(cfg, overrides: Sequence[str], launcher: Optional[Launcher], work: Callable):
    """work(launcher, record) in the run directory cfg names: checked (a run's folder, private),
    held (launch.lock), and left as it was found when work fails before its plan is accepted."""
    launcher = launcher or launcher_for(cfg)
    path = Path(os.path.abspath(os.path.expanduser(cfg.output.dir)))
    check_run_dir(path)
    check_private(path)  # before anything in it is read: others must not be able to write there
    existed = path.exists()
    before = [e.name for e in path.iterdir()] if existed else []
    record = CommandRecord(overrides)
    try:
        with private_files(), launch_lock(path):
            try:
                return work(launcher, record)
            except BaseException:
                _remove_leftovers(path, existed, before)
                raise
    finally:
        record.close()


def launch(cfg, overrides: Sequence[str] = (), launcher: Optional[Launcher] = None) -> Dict:
    """Run (launcher=local) or submit (launcher=slurm) the run cfg describes. `launcher`
    replaces the one the config names (tests give one with a fake executor)."""
    return _in_run_dir(cfg, overrides, launcher, lambda la, record: la.execute(cfg, record.accepted))


def prepare(cfg, overrides: Sequence[str] = (), launcher: Optional[Launcher] = None):
    """Plan the run cfg describes (its input listed, run.json written; an existing run of the
    same config is resumed as it is) without running anything: a sweep plans the points a shared
    pass writes before the pass starts (sharedpass.py)."""
    from ..run.plan import prepare_run

    def plan(la: Launcher, record: CommandRecord):
        run = prepare_run(cfg, la, explicit_shards=la.explicit_shards(cfg))
        record.accepted(run)
        return run

    return _in_run_dir(cfg, overrides, launcher, plan)
