"""HDF5 output: one file per shard, streamed batch by batch (merge.py joins them).

Shard file (shards/shard-IIIII-of-NNNNN.h5):
  features/<blob>   float32|float16 [rows, ...]   one dataset per blob
  feats             soft link to the first blob (the classic layout: h5f['feats'][:])
  names             UTF-8 str [rows]  path relative to the input root (classic h5f['names'][:])
  names_raw         bytes [rows]      the exact path bytes (names need not be UTF-8)
  index             int64 [rows]      the row's position in the manifest
  labels            int64 [rows]      the image's label (list "path label", Datum, tar .cls; -1: none),
                                      only when the input has labels; also failures/labels
  failures/{index,names,names_raw,reason}   images that could not be used, and why
  attrs             model files + sha256, blobs (an array of strings; a JSON string before issue
                    35: blobs_attr reads both), preprocessing, resolved config, backend (as
                    configured) and engine (what computed the rows), progress

While it is written the file is named *.h5.partial.<attempt>: every attempt at a shard (a
requeued task, a task taking a free shard, a second node whose flock did not exclude it) writes
its own file. Each batch is flushed and the attrs `next`, `rows`, `n_failures` say how far it
got, so the next attempt resumes from the last flushed batch: it copies the committed rows of
the most advanced partial file into its own. When complete the file is fsync'd and linked to
*.h5: link() fails when the name exists, so the first attempt to commit stands and a later one
discards its own file, naming the winner (ShardLostError). A crash (even of the host) never
leaves a complete-looking file, and no two attempts ever write into one file. Duplicate work is
thus harmless by construction (MapReduce's backup tasks); the shard's lock only saves it: the
holder reads its attempt id back from the lock file before each batch and before the commit,
and stops early when another attempt has taken the shard since (guard).

Checksums: each dataset's content is hashed as it is written (sha256 over the rows' bytes in
the stored dtype; strings as length-prefixed UTF-8 or raw bytes) and recorded at the commit in
the attr `content_sha256` (JSON {dataset: hex}); `caffe-runner verify --content` recomputes
them (content_digests).

HDF5 is not crash-safe: a process killed between two flushes (Ctrl-C's terminate, scancel,
a time limit, the OOM killer) can leave chunks that point at global-heap strings that never
reached the disk. Writing into such a file again fails ("bad heap index"), so a resume never
writes into the old file: it reads the committed rows back into a fresh one and swaps it in.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import log
from ..store.atomic import commit, commit_first, fsync_path
from ..errors import RunnerError, ShardBusyError, ShardLostError
from ..engine.features import pooled_shape, postprocess  # noqa: F401  (moved to features.py; old import path)
from ..store.locks import FileLock, LockHeld, attempt_host, attempt_id
from ..store.rundir import partial_of, partials_of, pid_alive
from ..store.h5 import open_h5

STR = h5py.string_dtype("utf-8")
RAW = h5py.string_dtype("ascii")  # stored as the exact bytes; HDF5 does not check them
FORMAT_VERSION = 1
# a resume copies ~64 MB of features a slice; strings (a 16-byte handle each) 256k at a time
COPY_SLICE_BYTES, COPY_SLICE_ROWS = 64 << 20, 1 << 18


def blobs_attr(attrs) -> List[str]:
    """The blob names a shard (or features.h5) records in attrs["blobs"]: an array of strings,
    or, in files written before issue 35, a JSON string (iterating it gave characters)."""
    v = attrs["blobs"]
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        return [str(b) for b in json.loads(v)]
    return [b.decode() if isinstance(b, bytes) else str(b) for b in np.atleast_1d(v)]


def dataset_name(blob: str) -> str:
    """HDF5 names cannot hold '/', which Caffe blob names often do (pool5/7x7_s1)."""
    return blob.replace("/", "__")


class ShardLock:
    """An exclusive lock per shard (a requeued task and its predecessor racing for the same
    shard): the loser stops with a message naming the holder. Only saves work: where flock does
    not exclude across nodes, `check` (the writer's guard) finds another attempt's line."""

    def __init__(self, path: Path, attempt: Optional[str] = None, force: bool = False):
        """force: break the lock of a holder known to be dead (FileLock)."""
        self.path = Path(path)
        self.attempt = attempt or attempt_id()
        self.lock = FileLock(self.path, "shard task", clear=False, attempt=self.attempt, force=force)

    def check(self) -> None:
        """Raise ShardLostError when the lock file names another attempt than this one."""
        other = self.lock.still_held()
        if other is not None:
            raise ShardLostError(f"shard {self.path.stem} was taken by another attempt since this one took it "
                                 f"({other}): this attempt ({self.attempt}) stops and discards its file", other)

    def __enter__(self):
        try:
            self.lock.acquire()
        except LockHeld as e:
            raise ShardBusyError(f"shard {self.path.stem} is being written by {e.holder}; this process "
                                 "stops and leaves it alone (if that process is gone, rerun)") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _storage_problem(e: BaseException) -> Optional[Tuple[str, str]]:
    """(what, what to do) when writing failed for want of space or permission."""
    text, code = str(e), getattr(e, "errno", None)
    if "No space left" in text or code == errno.ENOSPC:
        return "no space left on device", "free space"
    if "quota exceeded" in text or code == errno.EDQUOT:
        return "disk quota exceeded", "free space or raise the quota"
    if "ermission" in text or code == errno.EACCES:
        return "permission denied", "fix the output folder's permissions"
    return None


def _failed_dealloc_flush(exc: BaseException) -> bool:
    """h5py freeing an object after a failed write (a full disk): HDF5 tries to flush it and
    fails again. Cython prints that once through sys.excepthook and once through
    sys.unraisablehook, a traceback per freed object: noise repeating the error the writer
    already raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (isinstance(exc, (RuntimeError, OSError)) and "file write failed" in str(exc) and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith("_objects.pyx"))


def _quiet_failed_dealloc_flushes() -> None:
    """Drop those tracebacks (and only those) in this process."""
    if getattr(sys.excepthook, "_caffe_runner", False):
        return
    prev_except, prev_unraisable = sys.excepthook, sys.unraisablehook

    def excepthook(etype, value, tb):
        if not _failed_dealloc_flush(value):
            prev_except(etype, value, tb)

    def unraisablehook(u):
        if u.exc_value is None or not _failed_dealloc_flush(u.exc_value):
            prev_unraisable(u)

    excepthook._caffe_runner = True
    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class _Unusable(Exception):
    """A partial file that cannot be resumed (its start-over reason)."""


def torn_counters(attrs) -> Optional[str]:
    """Why a file's progress counters cannot be one batch's commit, or None. Every batch adds
    its items to `next` and each of them to `rows` or `n_failures`, in one attrs update: a
    process that died inside that update (or a file closed under it) leaves them disagreeing."""
    rows, n_failures, nxt = (int(attrs.get(k, 0)) for k in ("rows", "n_failures", "next"))
    if rows + n_failures != nxt:
        return f"holds counters from two different batches (rows {rows} + failures {n_failures} != next {nxt})"
    return None


def _open(path, mode):
    return open_h5(path, mode)


def _digest_update(h, values) -> None:
    """Add a slice of a dataset's rows to its hash: numbers as their bytes in the stored dtype,
    strings (str as UTF-8, or bytes) each prefixed by its length. What h5py reads back hashes
    the same as what was written."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        h.update(np.ascontiguousarray(values).tobytes())
        return
    for v in values:
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def content_digests(f: h5py.File, names: Iterable[str]) -> Dict[str, str]:
    """sha256 of each named dataset of an open shard file, read a bounded slice at a time."""
    out = {}
    for name in names:
        d = f[name]
        h = hashlib.sha256()
        row_bytes = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * d.dtype.itemsize)
        step = max(1, min(COPY_SLICE_ROWS, COPY_SLICE_BYTES // row_bytes))
        for i in range(0, len(d), step):
            _digest_update(h, d[i:i + step])
        out[name] = h.hexdigest()
    return out


def attempt_over(path: Path) -> bool:
    """Whether the attempt that wrote the partial file `path` has surely ended: a file of the one
    name every attempt used before each had its own, an attempt of this host whose process is
    gone, or an earlier attempt of this process (a process makes one attempt at a time). Another
    host's attempt may still be writing (where the lock did not exclude it): its file is never
    removed or moved by another attempt that has not committed the shard."""
    suffix = path.name.split(".partial", 1)[-1]
    if not suffix:
        return True
    host, pid, _token = suffix[1:].rsplit(".", 2)
    return host == attempt_host() and (int(pid) == os.getpid() or not pid_alive(int(pid)))


def _stat_key(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ShardWriter:
    def __init__(self, final_path: Path, blob_shapes: Dict[str, Tuple[int, ...]], dtype: str,
                 attrs: Dict[str, object], fingerprint: str, batch_size: int, labels: bool = False,
                 attempt: Optional[str] = None, guard: Optional[Callable[[], None]] = None,
                 resume: bool = True, first_wins: bool = True):
        """attempt: this attempt's id (names its partial file; a fresh one if None); guard:
        called before each batch and before the commit, raises ShardLostError when another
        attempt took the shard (ShardLock.check); resume: from another attempt's partial file;
        first_wins: commit by link (the run's shards), or replace the final name (retry's
        staged files, which its own lock guards)."""
        self.final = Path(final_path)
        self.attempt = attempt or attempt_id()
        self.partial = partial_of(self.final, self.attempt)
        self.guard = guard
        self.first_wins = first_wins
        self.blobs = list(blob_shapes)
        self.blob_shapes = {b: tuple(s) for b, s in blob_shapes.items()}
        self.dtype = np.dtype(dtype)
        self.fingerprint = fingerprint
        self.batch_size = batch_size
        self.labels = bool(labels)
        self.f: Optional[h5py.File] = None
        self.rows = self.n_failures = self.next = 0
        self._sums = self._new_sums()
        _quiet_failed_dealloc_flushes()
        if resume and self._try_resume():
            return
        self._sums = self._new_sums()  # a resume given up after its copy leaves that copy's sums
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.f = self._create(self.partial, dict(attrs, attempt=self.attempt))

    def _new_sums(self) -> Dict[str, "hashlib._Hash"]:
        return {name: hashlib.sha256() for name in self._row_datasets() +
                ["failures/" + x for x in self._failure_datasets()]}

    def _try_resume(self) -> bool:
        """Resume from the most advanced usable partial file of an earlier attempt: its committed
        rows are copied into this attempt's own file. The files of attempts surely over (this
        host's, their process gone) are then removed; another host's stays until the shard is
        committed (its attempt may still run where the lock did not exclude it: removing its file
        could make both attempts lose). Until then a resumed shard's rows are on disk twice."""
        others = [p for p in partials_of(self.final) if p != self.partial]
        ranked = sorted(((nxt, str(p)) for p in others for nxt in [self._resumable(p)] if nxt is not None),
                        reverse=True)
        for _, src in ranked:
            if self._resume_from(Path(src)):
                fsync_path(self.partial)  # the committed rows, durable before the old files go
                for p in others:
                    if attempt_over(p):
                        p.unlink(missing_ok=True)
                return True
        return False

    def _resumable(self, path: Path) -> Optional[int]:
        """`next` of another attempt's partial file when it can be resumed from; else None, and
        a file of another config is removed, a damaged one moved aside."""
        try:
            src = _open(path, "r")
        except Exception as e:
            if path.exists():
                self._start_over(path, f"cannot be opened ({_first_line(e)})")
            return None  # gone: its attempt committed or discarded it meanwhile
        with src:
            if src.attrs.get("fingerprint") != self.fingerprint or "next" not in src.attrs:
                log.warning("partial shard %s was written with another config; starting the shard over", path)
                path.unlink(missing_ok=True)
                return None
            torn = torn_counters(src.attrs)  # resuming at `next` would write rows again, or skip some
            if torn:
                self._start_over(path, torn)
                return None
            return int(src.attrs["next"])

    def _resume_from(self, src_path: Path) -> bool:
        """Copy src_path's committed rows into this attempt's file. A file that changes during the
        copy (its attempt still writes it: a lock that did not exclude it) is copied once more;
        if it changes again this attempt starts the shard over."""
        for _ in range(2):
            before = _stat_key(src_path)
            try:
                src = _open(src_path, "r")
            except Exception as e:
                if src_path.exists():
                    return self._start_over(src_path, f"cannot be opened ({_first_line(e)})")
                return False
            with src:
                try:
                    # checked first: HDF5 can crash closing a file whose writes failed for want of space
                    need, free = src_path.stat().st_size, shutil.disk_usage(src_path.parent).free
                    if free < need:
                        raise self._no_room_error(src_path, f"only {free / 1e6:.1f} MB free", "free space", need)
                    t0 = time.perf_counter()
                    counts = self._copy_committed(src, self.partial)
                except RunnerError:
                    raise
                except _Unusable as e:
                    self.partial.unlink(missing_ok=True)
                    return self._start_over(src_path, str(e))
                except Exception as e:
                    self.partial.unlink(missing_ok=True)
                    problem = _storage_problem(e)
                    if problem:  # the copy could not be written (a quota): the old file is sound, keep it
                        raise self._no_room_error(src_path, *problem, src_path.stat().st_size) from e
                    if not src_path.exists():
                        return False
                    return self._start_over(src_path, f"cannot be read back ({_first_line(e)})")
            if _stat_key(src_path) == before:
                break
            self.partial.unlink(missing_ok=True)
        else:
            log.warning("partial shard %s changed while it was copied (another attempt still writes it); this "
                        "attempt starts the shard over", src_path)
            return False
        self.rows, self.n_failures, self.next = counts
        self.f = _open(self.partial, "r+")
        self.f.attrs["attempt"] = self.attempt
        if self.rows + self.n_failures >= 100_000:  # only worth a line when it took a while
            log.info("partial shard %s: %d committed rows copied into %s in %.1f s",
                     src_path.name, self.rows, self.partial.name, time.perf_counter() - t0)
        return True

    def _no_room_error(self, src: Path, why: str, fix: str, need: int) -> RunnerError:
        return RunnerError(f"cannot resume shard file {src}: its committed rows are copied into a fresh "
                           f"file beside it, which needs up to {need / 1e6:.1f} MB ({why}): {fix}, then rerun "
                           "the same command; the partial file is kept")

    def _start_over(self, path: Path, why: str) -> bool:
        if not attempt_over(path):  # its attempt may be writing it now: left alone
            log.warning("partial shard %s %s; not resumed from (its attempt may still be writing it)", path, why)
            return False
        bad = path.with_name(path.name + ".corrupt")
        log.warning("partial shard %s %s; moved to %s, starting the shard over", path, why, bad.name)
        try:
            os.replace(path, bad)
        except FileNotFoundError:
            pass
        return False

    def _copy_committed(self, src: h5py.File, dst_path: Path) -> Tuple[int, int, int]:
        """Copy what the last flush committed (attrs `rows`, `n_failures`) into a new file at
        dst_path, a bounded slice at a time; anything after it is dropped. Reading every
        committed row is also the check that the old file is sound."""
        rows, n_failures, nxt = (int(src.attrs[k]) for k in ("rows", "n_failures", "next"))
        sums = self._new_sums()
        dst = self._create(dst_path, dict(src.attrs))
        try:
            for names, n in ((self._row_datasets(), rows),
                             (["failures/" + x for x in self._failure_datasets()], n_failures)):
                for name in names:
                    s, d = src[name], dst[name]
                    if len(s) < n:
                        raise ValueError(f"{name} holds {len(s)} rows, {n} committed")
                    d.resize(n, axis=0)
                    row_bytes = max(1, int(np.prod(s.shape[1:], dtype=np.int64)) * s.dtype.itemsize)
                    step = max(1, min(COPY_SLICE_ROWS, COPY_SLICE_BYTES // row_bytes))
                    for i in range(0, n, step):
                        j = min(i + step, n)
                        values = s[i:j]
                        d[i:j] = values
                        _digest_update(sums[name], values)
            dst.attrs.update({"rows": rows, "n_failures": n_failures, "next": nxt,
                              "resumed": int(src.attrs.get("resumed", 0)) + 1})
            dst.flush()
        finally:
            dst.close()
        self._sums = sums
        return rows, n_failures, nxt

    def _row_datasets(self) -> List[str]:
        return [f"features/{dataset_name(b)}" for b in self.blobs] + ["names", "names_raw", "index"] + \
            (["labels"] if self.labels else [])

    def _failure_datasets(self) -> List[str]:
        return ["index", "names", "names_raw", "reason"] + (["labels"] if self.labels else [])

    def _create(self, path: Path, attrs: Dict[str, object]) -> h5py.File:
        f = _open(path, "w")
        feats = f.create_group("features")
        for b, shape in self.blob_shapes.items():
            row_bytes = max(1, int(np.prod(shape)) * self.dtype.itemsize)
            chunk_rows = int(max(1, min(max(self.batch_size, 1) * 4, (1 << 20) // row_bytes)))
            d = feats.create_dataset(dataset_name(b), shape=(0,) + tuple(shape), maxshape=(None,) + tuple(shape),
                                     dtype=self.dtype, chunks=(chunk_rows,) + tuple(shape))
            d.attrs["blob"] = b
        f["feats"] = h5py.SoftLink(f"/features/{dataset_name(self.blobs[0])}")
        for name, dt in (("names", STR), ("names_raw", RAW), ("index", np.int64)) + ((("labels", np.int64),)
                                                                                    if self.labels else ()):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        fail = f.create_group("failures")
        for name, dt in (("index", np.int64), ("names", STR), ("names_raw", RAW), ("reason", STR)) + (
                (("labels", np.int64),) if self.labels else ()):
            fail.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["fingerprint"] = self.fingerprint
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs.update({"rows": 0, "n_failures": 0, "next": 0, "complete": False})
        f.flush()
        return f

    def _append(self, d, values):
        n = len(d)
        d.resize(n + len(values), axis=0)
        d[n:] = values
        _digest_update(self._sums[d.name.lstrip("/")], values)

    def write_batch(self, n_items: int, indices: Sequence[int], names: Sequence[bytes],
                    features: Dict[str, np.ndarray], failures: Sequence[Tuple[int, bytes, str]],
                    labels: Optional[Dict[int, int]] = None) -> None:
        """Append one batch (rows and failures of `n_items` consecutive manifest entries), flush,
        then record the progress: a crash leaves at worst this batch to do again."""
        if self.guard is not None:
            self.guard()  # another attempt took the shard: stop here (ShardLostError)
        try:
            self._write_batch(n_items, indices, names, features, failures, labels or {})
        except (OSError, RuntimeError) as e:
            why, fix = _storage_problem(e) or (_first_line(e), "check the output folder's file system")
            raise RunnerError(f"cannot write shard file {self.partial} ({why}): {fix}, then rerun the same "
                              f"command: the shard resumes after its last complete batch ({self.next} images) "
                              f"and completed shards are kept") from e

    def _write_batch(self, n_items, indices, names, features, failures, labels) -> None:
        from ..store.manifest import display_name

        f = self.f
        if len(indices):
            for b in self.blobs:
                self._append(f[f"features/{dataset_name(b)}"], features[b].astype(self.dtype, copy=False))
            self._append(f["names"], [display_name(n) for n in names])
            self._append(f["names_raw"], list(names))
            self._append(f["index"], np.asarray(indices, np.int64))
            if self.labels:
                self._append(f["labels"], np.asarray([labels.get(i, -1) for i in indices], np.int64))
        if failures:
            self._append(f["failures/index"], np.asarray([i for i, _, _ in failures], np.int64))
            self._append(f["failures/names"], [display_name(n) for _, n, _ in failures])
            self._append(f["failures/names_raw"], [n for _, n, _ in failures])
            self._append(f["failures/reason"], [r for _, _, r in failures])
            if self.labels:
                self._append(f["failures/labels"], np.asarray([labels.get(i, -1) for i, _, _ in failures], np.int64))
        f.flush()
        self.rows += len(indices)
        self.n_failures += len(failures)
        self.next += n_items
        self._commit_progress()

    def _commit_progress(self) -> None:
        # after the data's flush: a crash before this one leaves the old counts, which resume exactly
        self.f.attrs.update({"rows": self.rows, "n_failures": self.n_failures, "next": self.next})
        self.f.flush()

    def set_done(self, done: int) -> None:
        """Record that the file covers the first `done` manifest entries of its range. For a
        shard rewritten whole out of order (retry): its rows and failures are appended with
        n_items=0, in manifest order, then this says how far they reach."""
        if not 0 <= int(done):
            raise ValueError(f"done={done}: a count of manifest entries")
        self.next = int(done)
        self._commit_progress()

    def finish(self, extra_attrs: Optional[Dict[str, object]] = None) -> Path:
        f = self.f
        for k, v in (extra_attrs or {}).items():
            f.attrs[k] = v
        f.attrs["content_sha256"] = json.dumps({k: h.hexdigest() for k, h in sorted(self._sums.items())})
        f.attrs["attempt"] = self.attempt
        f.attrs["complete"] = True
        f.close()
        self.f = None
        # fsync'd before the link (and the folder after it): a host crash never leaves a
        # complete-looking shard that holds nothing
        if not self.first_wins:
            return commit(self.partial, self.final)
        if self.guard is not None:
            self.guard()  # the last look before the commit: another attempt took the shard since
        return self._commit_first()

    def _committed_by(self, path: Path) -> Optional[str]:
        """Who committed `path` when it is this run's complete shard file, else None."""
        try:
            with _open(path, "r") as f:
                a = f.attrs
                if not bool(a.get("complete", False)) or a.get("fingerprint") != self.fingerprint:
                    return None
                who = str(a.get("attempt") or f"pid {a.get('pid')} on {a.get('host')}")
                job = a.get("job_id")
                return f"attempt {who}" + (f" (Slurm job {job})" if job else "")
        except Exception:
            return None

    def _commit_first(self) -> Path:
        """Link this attempt's file to the final name, the first commit standing. A file there that
        is not this run's complete shard (another config's, damaged) is moved aside first."""
        for _ in range(3):
            try:
                if commit_first(self.partial, self.final):
                    for p in partials_of(self.final):  # the other attempts' files: superseded
                        p.unlink(missing_ok=True)
                    return self.final
            except FileNotFoundError:  # our file was removed: another attempt committed and cleaned up
                pass
            winner = self._committed_by(self.final)
            if winner is not None:
                self.discard()
                raise ShardLostError(f"shard file {self.final.name} was committed first by {winner}; this attempt's "
                                     f"copy ({self.partial.name}) is discarded", winner)
            if not self.partial.exists():
                raise ShardLostError(f"shard file {self.final.name}: this attempt's copy ({self.partial.name}) was "
                                     "removed by another attempt, which did not commit (yet)", "another attempt")
            aside = self.final.with_name(f".{self.final.name}.replaced.{self.attempt}")
            try:
                os.rename(self.final, aside)
            except FileNotFoundError:
                continue
            if self._committed_by(aside) is not None:  # committed between our look and the move: put back
                try:
                    os.link(aside, self.final)
                except FileExistsError:
                    pass
            else:
                log.warning("%s was not a complete shard of this run (another config's, or damaged): replaced",
                            self.final)
            aside.unlink(missing_ok=True)
        raise RunnerError(f"cannot commit {self.partial.name} as {self.final}: the name keeps changing; rerun the "
                          "same command")

    def discard(self) -> None:
        """Close and remove this attempt's file (it lost the race, or yielded the shard)."""
        self.close()
        self.partial.unlink(missing_ok=True)

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except Exception:
                pass
            self.f = None
