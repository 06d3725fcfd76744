"""One kind of lock: flock on a file that names its holder while it is held.

  launch.lock        in the run directory: the process launching (or retrying) the run
  shards/<n>.lock    the task writing that shard (a requeued task and its predecessor)
  merge.lock         in the run directory: the process writing features.h5

The holder writes one line into the file once it has the lock ("caffe-runner merge pid 12 on
node2 Slurm job 345_1 since 2026-12-05 15:04:00") and (launch, merge) empties it before letting
go, so whoever is refused can say who holds it. flock is released by the kernel when the holder dies (kill -9,
OOM, a lost node's locks are dropped by the file server), so a dead holder never blocks a
rerun; the line may then still name it, which is why only a refused lock reads the line.

flock must work across the nodes that share the run directory. Where it fails outright (Lustre
mounted with noflock: ENOSYS; NFS without a lock manager: ENOLCK) every lock here raises
NoFlockError, a one-line ConfigError naming the fix, and plan time probes it (probe_flock)
before anything is written. Where flock is node-local (Lustre localflock, NFS local_lock=all)
it succeeds and excludes nothing across nodes: no call on one host can tell. So no lock is what
keeps a shard correct: each attempt at a shard writes its own file and the first commit stands
(write.py); a shard's lock only saves the work of a second attempt. Its holder line carries the
taker's attempt id, which the holder reads back before each batch and before its commit
(FileLock.still_held): a line naming another attempt means a second one took the shard (the
lock did not exclude it) and this one stops early.

Fault injection: CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS=1 (read in _node_local_locks only) makes
every flock private to its host, as Lustre localflock or NFS local_lock=flock do: the flock is
taken on a per-host shadow file (.node-local-flock/<host>/<name> beside the lock), while the
holder line is written to and read from the shared lock file. The dev cluster's nodes have their
own hostnames, so its tasks then see each other's holder lines but never each other's locks.

A probe (lock_holder) takes a shared flock for an instant; a taker that finds only shared locks
(probes) on the file tries again instead of reporting it held (_PROBE_PATIENCE_S).
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError, RunnerError
from ..jobs.slurm import job_id_from_env
from ..faults import FAULT_NODE_LOCAL_LOCKS, gate, switch

PathLike = Union[str, os.PathLike]
# what flock gives where the file system does not do it (noflock, no lock manager, some FUSE)
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
_HOLDER_BYTES = 512
# how long a taker keeps trying while only probes (shared flocks, held for an instant) are on the file
_PROBE_PATIENCE_S = 5.0


class LockHeld(RunnerError):
    """The lock is held by someone else; `holder` names them (callers say what to do)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder}")


class PlantedLockError(ConfigError):
    """The lock's name is taken by something that is not a plain file of its own (a symlink, a
    hard link to another file, a pipe): refused before anything is written through it."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path} is {what}, not a lock file caffe-runner made (it makes them as plain files): "
                         f"someone planted it there; check what it is, remove it (rm {path}) and run again; "
                         "nothing was written")


# no symlink followed (a planted merge.lock -> ~/.bashrc), no hang on a planted pipe
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_lock_file(path: PathLike) -> int:
    """The lock file at `path` opened read-write (made if missing, mode 0644 less the umask),
    never through a symlink, never truncated here: PlantedLockError for anything but a plain
    file with one name."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            raise PlantedLockError(path, f"a symlink (to {target})") from None
        raise
    st = os.fstat(fd)
    why = None if st.st_nlink == 1 and stat.S_ISREG(st.st_mode) else (
        f"a hard link to a file with {st.st_nlink} names" if stat.S_ISREG(st.st_mode) else
        f"not a regular file ({stat.filemode(st.st_mode)})")
    if why:
        os.close(fd)
        raise PlantedLockError(path, why)
    return fd


class NoFlockError(ConfigError):
    """The file system refuses flock: nothing can be run there safely."""

    def __init__(self, folder: Path, e: OSError):
        name = errno.errorcode.get(e.errno, str(e.errno))
        super().__init__(
            f"{folder} is on a file system without working flock ({name}: {e.strerror}): caffe-runner needs it "
            "to keep one launch, one writer per shard and one merge per run. Choose an output.dir on a file "
            "system whose flock works across the nodes (Lustre mounted with -o flock, GPFS, BeeGFS, NFSv4), or "
            "ask the admins to enable flock there; nothing was written")


def attempt_host() -> str:
    """This host as attempt ids name it: the short host name, in [A-Za-z0-9_-]."""
    host = socket.gethostname().split(".")[0] or "host"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in host)


def attempt_id() -> str:
    """A fresh id for one attempt at a shard: short host name, pid and a random part (unique
    across nodes and across the pids a node reuses). Names the attempt's partial file and is in
    its holder line."""
    return f"{attempt_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def holder_line(what: str, attempt: Optional[str] = None) -> str:
    """Who takes a lock now, as its file names them (one line)."""
    job = job_id_from_env(os.environ)
    return (f"{what} pid {os.getpid()} on {socket.gethostname()}{' Slurm job ' + job if job else ''} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}{' attempt ' + attempt if attempt else ''}")


def _node_local_locks() -> bool:
    """The fault switch NODE_LOCAL_LOCKS (runner/faults.py; read here only): flock private to each host."""
    return switch(FAULT_NODE_LOCAL_LOCKS) not in ("", "0")


def _flock_path(path: Path) -> Path:
    """The file whose flock stands for `path`'s: itself, or under the fault switch a shadow of
    it private to this host (made if missing)."""
    if not _node_local_locks():
        return path
    shadow = path.parent / ".node-local-flock" / (socket.gethostname() or "host")
    shadow.mkdir(parents=True, exist_ok=True)
    return shadow / path.name


def _flock(fd: int, op: int, path: Path) -> bool:
    """flock; False when another holds it (non-blocking), NoFlockError where it is not supported."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            raise NoFlockError(path.parent, e) from None
        raise
    return True


def _read_holder(fd: int) -> str:
    return os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip() or "another process"


def read_holder_line(path: PathLike) -> str:
    """The holder line in the lock file as it is now ("" when empty or missing): opened afresh,
    so that an NFS client revalidates what another node wrote (close-to-open consistency)."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return ""
    try:
        return os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)


def _take(fd: int, path: Path) -> bool:
    """LOCK_EX on fd, without blocking on a holder; True when taken. A probe (lock_holder) holds a
    shared lock for an instant: while nothing but shared locks are on the file this keeps
    trying (bounded), so a probe never makes a free lock look held."""
    deadline = time.monotonic() + _PROBE_PATIENCE_S
    pause = 0.0001
    while True:
        if _flock(fd, fcntl.LOCK_EX, path):
            return True
        if not _flock(fd, fcntl.LOCK_SH, path):
            return False  # an exclusive holder: taken
        fcntl.flock(fd, fcntl.LOCK_UN)  # only probes are on it
        gate("lock-probed")
        if time.monotonic() > deadline:
            return False
        time.sleep(pause * (0.5 + random.random()))  # two takers meeting here do not stay in step
        pause = min(pause * 2, 0.01)


class FileLock:
    """An exclusive, non-blocking flock on `path` (made if missing) that names its holder.

        with FileLock(run_dir / "merge.lock", "caffe-runner merge"):
            ...            # raises LockHeld(path, holder) when another process holds it
    """

    def __init__(self, path: PathLike, what: str, clear: bool = True, attempt: Optional[str] = None,
                 force: bool = False):
        """clear: empty the file on release, so a free lock names nobody (launch, merge). A
        shard's lock keeps its last line instead: shards are many, and on a disk filled by
        the run, emptying them frees blocks that let a rerun pass the plan's write probe.
        attempt: the taker's attempt id (attempt_id()), written into its holder line.
        force: a held lock is broken instead of refused (its holder is known to be dead while the
        file server still keeps its lock: an NFSv4 lease, a Lustre eviction): the holder line is
        written all the same, and the flock is taken as soon as the server lets it go
        (still_held). Only where duplicate work is harmless (a shard: first-commit-wins)."""
        self.path, self.what, self.clear, self.attempt = Path(path), what, clear, attempt
        self.force = force
        self.broken = False  # holds the holder line but not (yet) the flock
        self.fd: Optional[int] = None
        self.flock_fd: Optional[int] = None  # the shadow's, under the node-local fault switch

    def acquire(self) -> "FileLock":
        fd = open_lock_file(self.path)
        target = _flock_path(self.path)
        try:
            lfd = fd if target == self.path else open_lock_file(target)
        except BaseException:
            os.close(fd)
            raise
        try:
            if not _take(lfd, self.path):
                if not self.force:
                    raise LockHeld(self.path, _read_holder(fd))
                self.broken = True
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_line(self.what, self.attempt) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            if lfd != fd:
                os.close(lfd)
            raise
        self.fd, self.flock_fd = fd, (lfd if lfd != fd else None)
        return self

    def still_held(self) -> Optional[str]:
        """None while the lock file still names this attempt; else the line that names who took
        the shard since (a lock that did not exclude them: node-local flock). Only for a lock
        taken with an attempt id."""
        if self.broken and self.fd is not None:  # the dead holder's lock may have been let go since
            try:
                self.broken = not _flock(self.flock_fd if self.flock_fd is not None else self.fd, fcntl.LOCK_EX,
                                         self.path)
            except NoFlockError:
                pass
        line = read_holder_line(self.path)
        if self.attempt and f" attempt {self.attempt}" in f"{line} ":
            return None
        return line or "nobody (the lock file was emptied or removed)"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.clear:
                os.ftruncate(self.fd, 0)  # released: it names nobody
        except OSError:
            pass  # a full or read-only disk must not turn a release into a failure
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            if self.flock_fd is not None:
                os.close(self.flock_fd)
            self.fd = self.flock_fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(path: PathLike) -> Optional[str]:
    """Who holds the lock at `path`, or None when nobody does (or there is no such file). A
    shared lock is tried and dropped at once: it never blocks the holder or a later taker."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return None
    try:
        target = _flock_path(path)
        if target != path:
            try:
                lfd = os.open(target, os.O_RDONLY | _OPEN_FLAGS)
            except OSError:
                return None  # never taken on this host
        else:
            lfd = fd
        try:
            if not _flock(lfd, fcntl.LOCK_SH, path):
                return _read_holder(fd)
            fcntl.flock(lfd, fcntl.LOCK_UN)
            return None
        finally:
            if lfd != fd:
                os.close(lfd)
    except NoFlockError:  # nobody can hold a lock there (a launch would have been refused)
        return None
    finally:
        os.close(fd)


def probe_flock(folder: PathLike) -> None:
    """Raise NoFlockError when flock fails in `folder` (made if missing): at plan time, before
    any work, rather than as a traceback from the first lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".flock-test-{socket.gethostname()}-{os.getpid()}"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX, probe)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
