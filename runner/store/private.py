"""A run directory only its owner can write.

What others can write there, they can make the user run: submitit's task files under
RUN/logs (*_submitted.pkl, *_result.pkl) are unpickled by the array tasks, by `retry` and by a
waiting launcher, and the control files (run.json, submissions.json, retries.json, the
manifest) steer what those do. So:
- everything a launch or a retry creates (the run directory itself, logs/, the control files,
  and the shard files its tasks write) is made without group/other write, whatever the
  user's umask (clusters often set 002): the process umask gains 022 for the command, and
  local workers and Slurm tasks inherit it (sbatch passes the submitter's umask on);
- a run directory that someone else can already write (a folder made group-writable by
  hand, a run made by an older version under umask 002, an entry owned by another user) is
  refused before anything reads it, naming the fix.
Shard files and heartbeats (shards/, status/) are data that no code is loaded from: their own
modes are not checked (a big run holds many), the folders holding them are.

The folders above the run directory matter as much: whoever can write a parent can rename the
run directory away and put their own in its place. So every folder the path passes through, up
to /, is checked as OpenSSH's StrictModes checks the folders above ~/.ssh (safe_path in its
misc.c): owned by the user or root, and not writable by group or others, except that a folder
with the sticky bit (/tmp, a scratch space) is fine, since there others cannot rename or remove
what they do not own (and each folder below it is checked for its owner). Symlinks on the way are
followed as the kernel follows them, and the folders they lead through are checked too.
Every command that writes in a run directory checks this first: an extraction (and a sweep),
retry, merge (the command, a local run's last step, the Slurm merge job), export and report.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from ..errors import ConfigError

# folders whose files are data (many of them): their files' modes are not checked
_DATA_DIRS = ("shards", "status")


def foreign_write(st: os.stat_result, me: int) -> Optional[str]:
    """Why someone other than `me` can write a file or folder with this stat, or None.
    (root can write anything anyway: a root-owned entry gives nobody more.)"""
    if st.st_uid not in (me, 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"mode {stat.filemode(st.st_mode)}"
    return None


def unsafe_folder(st: os.stat_result, me: int) -> Optional[str]:
    """Why a folder ABOVE the run directory with this stat lets someone other than `me` swap
    what is in it, or None (StrictModes; a sticky folder is fine: see the module docstring)."""
    if st.st_uid not in (me, 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"mode {stat.filemode(st.st_mode)}, no sticky bit"
    return None


_MAX_LINKS = 40  # as the kernel's ELOOP


def unsafe_parent(path: Path, me: Optional[int] = None) -> Optional[Tuple[Path, str]]:
    """(folder, why) for the first folder above `path` (from / down, through every symlink on the
    way) that others can write, or None. The part of `path` that does not exist yet is not looked
    at: it is made private."""
    me = os.getuid() if me is None else me
    todo = list(Path(os.path.abspath(path)).parts[1:])
    cur, links = Path("/"), 0
    checked = set()

    def check(folder: Path) -> Optional[Tuple[Path, str]]:
        if folder in checked:
            return None
        checked.add(folder)
        why = unsafe_folder(os.stat(folder), me)
        return (folder, why) if why else None

    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            cur = cur.parent
            continue
        bad = check(cur)  # the folder holding `name` (a folder, a symlink, or where it will be made)
        if bad:
            return bad
        nxt = cur / name
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            break
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                break  # a loop: opening it fails with its own error
            target = os.readlink(nxt)
            if os.path.isabs(target):
                cur = Path("/")
            todo = list(Path(target).parts[1 if os.path.isabs(target) else 0:]) + todo
            continue
        if not stat.S_ISDIR(st.st_mode) or not todo:
            break  # the run directory itself (or a file in its place): check_private's walk
        cur = nxt
    return None


def _entries(run_dir: Path) -> Iterator[Tuple[Path, os.stat_result]]:
    """The run directory, every folder below it, and every file outside the data folders."""
    yield run_dir, os.lstat(run_dir)
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        data = any(part in _DATA_DIRS for part in rel.parts)  # a run's, or a sweep point's
        for name in dirs + ([] if data else files):
            p = Path(root) / name
            try:
                st = os.lstat(p)
            except FileNotFoundError:  # removed meanwhile
                continue
            if not stat.S_ISLNK(st.st_mode):  # a link's own mode means nothing; its folder is checked
                yield p, st


def writable_by_others(run_dir: Path, me: Optional[int] = None) -> List[Tuple[Path, str]]:
    """(path, why) for each entry of run_dir that someone other than `me` can write."""
    me = os.getuid() if me is None else me
    return [(p, why) for p, st in _entries(Path(run_dir)) for why in [foreign_write(st, me)] if why]


def check_private(run_dir: Path, what: str = "output.dir") -> None:
    """Refuse a run directory that others can write (one line, the fix named). A folder that
    does not exist yet passes: it is made private."""
    run_dir = Path(os.path.abspath(run_dir))
    check_parents(run_dir, what)
    if not run_dir.is_dir() or os.statvfs(run_dir).f_flag & os.ST_RDONLY:
        return  # nothing there yet, or nobody can write there (the launch says it cannot either)
    bad = writable_by_others(run_dir)
    if not bad:
        return
    p, why = bad[0]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    owned = any(w.startswith("owned") for _, w in bad)
    fix = f"`chmod -R go-w {run_dir}`" + (" and remove (or take over) what another user owns there" if owned else "")
    raise ConfigError(f"{what} {run_dir} can be written by others ({p} {why}{more}): whoever can write there "
                      f"can run code as you through the task files submitit unpickles from its logs/; "
                      f"{fix}, then run again")


def check_parents(path: Path, what: str = "output.dir") -> None:
    """Refuse `path` when a folder above it lets others swap it (one line, the fix named)."""
    bad = unsafe_parent(Path(path))
    if not bad:
        return
    folder, why = bad
    if why.startswith("owned"):
        fix = f"choose a place under a folder that only you (or root) own, or have {folder} owned by you or root"
    else:
        fix = (f"`chmod go-w {folder}` (or `chmod +t {folder}`, as /tmp is, if others must add files there), "
               f"or choose a place under a folder only you can write")
    raise ConfigError(f"{what} {path}: the folder {folder} above it can be written by others ({why}): whoever can "
                      f"write there can put their own folder in its place and run code as you through the task files "
                      f"submitit unpickles from its logs/; {fix}, then run again")


@contextmanager
def private_files():
    """Files and folders made meanwhile (by this process and the workers or Slurm tasks it
    starts) get no group/other write, whatever the user's umask; the umask is restored after."""
    old = os.umask(0o022)
    os.umask(old | 0o022)
    try:
        yield
    finally:
        os.umask(old)
