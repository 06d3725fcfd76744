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
it succeeds and excludes nothing across nodes: no call on one host can tell, so the README
says the run directory must be on a file system with cluster-wide flock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError, RunnerError

PathLike = Union[str, os.PathLike]
# what flock gives where the file system does not do it (noflock, no lock manager, some FUSE)
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
_HOLDER_BYTES = 512


class LockHeld(RunnerError):
    """The lock is held by someone else; `holder` names them (callers say what to do)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {holder}")


class NoFlockError(ConfigError):
    """The file system refuses flock: nothing can be run there safely."""

    def __init__(self, folder: Path, e: OSError):
        name = errno.errorcode.get(e.errno, str(e.errno))
        super().__init__(
            f"{folder} is on a file system without working flock ({name}: {e.strerror}): caffe-runner needs it "
            "to keep one launch, one writer per shard and one merge per run. Choose an output.dir on a file "
            "system whose flock works across the nodes (Lustre mounted with -o flock, GPFS, BeeGFS, NFSv4), or "
            "ask the admins to enable flock there; nothing was written")


def holder_line(what: str) -> str:
    """Who takes a lock now, as its file names them (one line)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID")
    return (f"{what} pid {os.getpid()} on {socket.gethostname()}{' Slurm job ' + job if job else ''} "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")


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


class FileLock:
    """An exclusive, non-blocking flock on `path` (made if missing) that names its holder.

        with FileLock(run_dir / "merge.lock", "caffe-runner merge"):
            ...            # raises LockHeld(path, holder) when another process holds it
    """

    def __init__(self, path: PathLike, what: str, clear: bool = True):
        """clear: empty the file on release, so a free lock names nobody (launch, merge). A
        shard's lock keeps its last line instead: shards are many, and on a disk filled by
        the run, emptying them frees blocks that let a rerun pass the plan's write probe."""
        self.path, self.what, self.clear = Path(path), what, clear
        self.fd: Optional[int] = None

    def acquire(self) -> "FileLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock(fd, fcntl.LOCK_EX, self.path):
                raise LockHeld(self.path, _read_holder(fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder_line(self.what) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

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
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(path: PathLike) -> Optional[str]:
    """Who holds the lock at `path`, or None when nobody does (or there is no such file). A
    shared lock is tried and dropped at once: it never blocks the holder or a later taker."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if not _flock(fd, fcntl.LOCK_SH, path):
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
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
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX, probe)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
