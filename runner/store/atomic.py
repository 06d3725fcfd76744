"""Putting a file (or a folder) in place so that a crash never leaves one that looks complete.

The one protocol, used for every file the run trusts (run.json, shard files, features.h5,
stats.json, submissions.json, retries.json, the manifest, downloaded model files ...):
  1. write to a unique temporary name in the target's own folder (a rename is atomic only
     within one file system; host, pid and a random part keep two writers on two nodes apart);
  2. flush and fsync the file;
  3. rename it over the final name;
  4. fsync the folder, so the rename itself survives.
Without 2, ext4, XFS, Lustre and NFS may persist the rename before the data: after a host crash
the final name holds nothing, or garbage. Without 4, a completed file can vanish again. A
failure at any step removes the temporary file and leaves the final name as it was.

`durable=False` skips the two fsyncs (the rename stays atomic) for files whose loss is harmless
and which are written often (heartbeats, see rundir.write_heartbeat).
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
_SUFFIX = ".tmp"
# what link() gives where the file system has no hard links
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


def temp_name(final: PathLike) -> Path:
    """A fresh temporary name beside `final`: hidden, unique across hosts and processes."""
    final = Path(final)
    host = socket.gethostname().split(".")[0] or "host"
    return final.with_name(f".{final.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{_SUFFIX}")


def is_temp_of(name: str, final_name: str) -> bool:
    """Whether a folder entry `name` is a temporary name temp_name() gives for `final_name`."""
    return name.startswith(f".{final_name}.") and name.endswith(_SUFFIX)


def remove_stale_temps(final: PathLike) -> int:
    """Remove temporary files (or folders) of `final` that writers killed mid-write left. Only
    for a caller that holds the lock making it the one writer of `final`; returns how many."""
    final = Path(final)
    n = 0
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return 0
    for e in entries:
        if is_temp_of(e.name, final.name):
            _remove(Path(e.path))
            n += 1
    return n


def fsync_dir(folder: PathLike) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: PathLike) -> None:
    """fsync a file written by someone else (h5py, numpy, a downloader) after they closed it;
    a folder: every file and folder in it, deepest first. (Linux flushes an inode's dirty pages
    through any descriptor, a read-only one too.)"""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                fsync_path(os.path.join(root, name))
            fsync_dir(root)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: PathLike, final: PathLike, durable: bool = True) -> Path:
    """Steps 2-4 for a file (or folder) already written and closed at `tmp`: fsync it, rename
    it to `final`, fsync the folder. Also for a fixed temporary name that a lock guards (a
    shard's .partial file, renamed to the shard when complete)."""
    tmp, final = Path(tmp), Path(final)
    if durable:
        fsync_path(tmp)
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)
    return final


def commit_first(tmp: PathLike, final: PathLike) -> bool:
    """Like commit(), but the first writer stands: `tmp` is fsync'd and linked to `final`, which
    fails (False, `tmp` left as it is) when `final` exists, whoever put it there. link() failing
    with EEXIST is atomic on every file system (NFS's classic "create if absent"), so of two
    writers racing for one name exactly one wins and the other learns it. True: `final` is
    `tmp`'s file, durable, and the name `tmp` is gone."""
    tmp, final = Path(tmp), Path(final)
    fsync_path(tmp)
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # a file system without hard links (some FUSE and SMB mounts): a rename unless the name
        # exists, which two writers in the same instant could both pass (the later one's file wins)
        if os.path.lexists(final):
            return False
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return True
    fsync_dir(final.parent)
    os.unlink(tmp)
    fsync_dir(final.parent)
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def atomic_path(final: PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final` for the caller to write (a file, or a folder it
    makes); on leaving the block, commit() it to `final`. On an exception (in the block or in
    the commit) the temporary is removed and `final` is left as it was."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        commit(tmp, final, durable)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes, durable: bool = True, mode: int = 0o666) -> None:
    """`data` as the whole content of `path`, by the protocol above (mode as open() gives,
    less the umask)."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)
