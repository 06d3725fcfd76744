"""All shards as one file (features.h5), a self-contained export, and the checks that keep a
view from lying.

Layouts of features.h5 (attrs["layout"]):
  view  the features are HDF5 virtual datasets over shards/ (no copy), the default at any shard
        count. HDF5 opens every source file a read touches and holds it open until the dataset
        is closed (measured, HDF5 2.0: a whole read of a view over 300 files holds 300 more
        descriptors; a view over views holds as many; a dataset reopened per slice holds one),
        and a source it cannot open (file gone, copied without shards/, open-file limit)
        silently reads as the fill value (NaN). Up to output.view_max_shards shards (128) a
        whole read fits any common limit (1,024; 256 on some nodes); above it the merge names
        the `ulimit -n` a plain reader needs. Every reader in this project opens it through
        open_merged(), which checks the sources and raises its own soft limit to what the view
        needs (up to the hard limit), else refuses.
        Sources are named through the run's own folder (view_dir, view.<id>/../shards/...): HDF5 looks for a
        relative source beside the view, then in the current folder, where another run's
        shards/ of the same shard count would match a plain `shards/...` name.
  copy  the features are copied: the file is self-contained (output.merge_copy=true,
        `merge --copy`, view_max_shards=0; export).
names, names_raw, index (and labels when the shards have them) and failures/ are always copied.

Memory and open files stay bounded whatever the run's size: one shard file is open at a
time, and every dataset is copied in chunks of at most CHUNK_BYTES.
`export` writes the same layout as a copy anywhere (or one 2-D .npy matrix per blob).

Single-writer: merge_run holds the run's merge.lock (locks.py) and writes features.h5 under a
unique temporary name, fsync'd and renamed (atomic.py); a second merge is refused naming the
first, and readers see the old file or the whole new one.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from .. import log
from ..store.atomic import atomic_path, commit, remove_stale_temps, temp_name
from ..errors import ConfigError, RunBusyError, RunnerError, ShardFailedError, UsageError, shell_quote, unwritable
from ..store.locks import FileLock, LockHeld
from ..store.private import check_private, private_files
from ..store.rundir import MERGE_LOCK, VIEW_DIR, probe_writable
from ..runtimes.identity import image_label
from .write import blobs_attr, dataset_name
from ..store.h5 import open_h5
from ..faults import gate

ROW_DATASETS = ("names", "names_raw", "index")
# per-row datasets carried when the shards have them (labels from a labelled input list)
OPTIONAL_ROW_DATASETS = ("labels",)
FAILURE_DATASETS = ("index", "names", "names_raw", "reason")
# run-level attributes copied from the first shard (an allow list: a shard's own statistics,
# host, pid, range or progress never pass for the run's)
RUN_ATTRS = ("caffe_runner_version", "model_name", "prototxt", "prototxt_sha256", "weights", "weights_sha256",
             "blobs", "preprocess", "backend", "engine", "input_source", "manifest_count", "config", "container",
             "container_runtime", "container_image", "container_image_id",
             "fingerprint", "format_version", "blob_shapes", "mean_file", "mean_file_sha256")
CHUNK_BYTES = 16 << 20
NAME_CHUNK_ROWS = 65536
# bytes of a JSON attribute before it is written compactly (HDF5's limit is 64 KB)
ATTR_BUDGET = 32 << 10
# file descriptors a reader needs beyond the view's sources (Python, h5py, the merged file)
FD_MARGIN = 64


def _open(path, mode="r"):
    return open_h5(path, mode)


@dataclass(frozen=True)
class _Source:
    path: Path
    rows: int
    n_failures: int


@dataclass(frozen=True)
class _Layout:
    blobs: List[str]                      # blob names in the requested order
    shapes: Dict[str, Tuple[int, ...]]    # per-row shape per dataset name
    dtypes: Dict[str, np.dtype]           # per dataset path
    attrs: Dict[str, object]
    row_datasets: Tuple[str, ...]
    fail_datasets: Tuple[str, ...] = FAILURE_DATASETS  # + labels when the shards have them


def _scan(paths: Sequence[Path]) -> Tuple[List[_Source], _Layout]:
    """Row counts of every file (one open at a time) and the layout of the first."""
    if not paths:
        raise RunnerError("nothing to merge: the run has no shard files")
    sources = []
    layout = None
    images: Dict[str, List[int]] = {}  # which image each shard ran in; more than one key: mixed
    ran: Dict[str, Dict[str, List[int]]] = {"backend": {}, "engine": {}}  # the same, per backend and engine
    for p in paths:
        with _open(p) as f:
            rows, nf = len(f["index"]), len(f["failures/index"])
            shard = int(f.attrs.get("shard", len(sources)))
            images.setdefault(image_label(f.attrs), []).append(shard)
            for k, by in ran.items():
                by.setdefault(str(f.attrs.get(k, "")), []).append(shard)
            if layout is None:
                blobs = blobs_attr(f.attrs)
                shapes = {dataset_name(b): f[f"features/{dataset_name(b)}"].shape[1:] for b in blobs}
                rowds = ROW_DATASETS + tuple(d for d in OPTIONAL_ROW_DATASETS if d in f)
                dtypes = {f"features/{d}": f[f"features/{d}"].dtype for d in shapes}
                dtypes.update({d: f[d].dtype for d in rowds})
                faild = FAILURE_DATASETS + tuple(d for d in OPTIONAL_ROW_DATASETS if f"failures/{d}" in f)
                dtypes.update({f"failures/{d}": f[f"failures/{d}"].dtype for d in faild})
                attrs = {k: f.attrs[k] for k in RUN_ATTRS if k in f.attrs}
                layout = _Layout(blobs, shapes, dtypes, attrs, rowds, faild)
            for d in layout.shapes:
                if len(f[f"features/{d}"]) != rows:
                    raise RunnerError(f"{p}: features/{d} has {len(f[f'features/{d}'])} rows but index has "
                                      f"{rows}: the shard is damaged; delete it and rerun the extraction")
        sources.append(_Source(Path(p), rows, nf))
    text = json.dumps(images)
    if len(text) > ATTR_BUDGET:  # an HDF5 attribute holds at most 64 KB: ranges, "0-19999,20005"
        text = json.dumps({k: _ranges(v) for k, v in images.items()})
    layout.attrs["container_images"] = text
    layout.attrs["blobs"] = list(layout.blobs)  # an array of strings, whatever the shards wrote
    for k, by in ran.items():
        said = agreed(by)
        if said:
            layout.attrs[k] = said
        else:
            layout.attrs.pop(k, None)
    return sources, layout


def agreed(by_value: Dict[str, List[int]]) -> str:
    """One attribute over the shards, truthfully (pure): {value: shards} -> the value when they
    all agree, else "mixed: A (shards 0-3); B (shard 4)"; "" when no shard recorded one (a run
    made before the attribute existed)."""
    if set(by_value) <= {""}:
        return ""
    if len(by_value) == 1:
        return next(iter(by_value))
    parts = [f"{v or 'not recorded'} (shard{'s' if len(ix) > 1 else ''} {_ranges(ix)})"
             for v, ix in sorted(by_value.items(), key=lambda kv: min(kv[1]))]
    return "mixed: " + "; ".join(parts)


def _ranges(ix: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    out, ix = [], sorted(ix)
    i = 0
    while i < len(ix):
        j = i
        while j + 1 < len(ix) and ix[j + 1] == ix[j] + 1:
            j += 1
        out.append(str(ix[i]) if i == j else f"{ix[i]}-{ix[j]}")
        i = j + 1
    return ",".join(out)


def _chunk_rows(shape: Tuple[int, ...], dtype: np.dtype) -> int:
    """Rows per copied chunk: CHUNK_BYTES of them, whatever the row size."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize))


def _copy(dst, pos: int, src, n: int, step: int) -> None:
    for a in range(0, n, step):
        b = min(n, a + step)
        dst[pos + a:pos + b] = src[a:b]


def _dataset_chunks(total: int, shape, dtype):
    row = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return (int(max(1, min(total, 4096, (1 << 20) // row))),) + tuple(shape)


def view_dir(run_dir: Path) -> str:
    """The name of the run's own empty folder view.<12 hex> (made once, then kept), through which
    a view names its sources: `view.<id>/../shards/shard-...`. HDF5 looks for a relative source
    beside the view and then in the process's current folder; shard file names are the same in
    every run with the same shard count, so a view naming `shards/shard-...` read another run's
    shards from there when its own were gone (HDF5 1.14 and 2.0, tests/test_door_closed.py). A
    path through a folder only this run has resolves nowhere else (the kernel needs the folder to
    take its `..`). A folder, not a symlink: audits of a run directory (`find RUN -perm /022`) see
    no rwxrwxrwx link. Only for the merge's one writer (merge.lock held)."""
    run_dir = Path(run_dir)
    for e in os.scandir(run_dir):
        if VIEW_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
            return e.name
    name = f"view.{secrets.token_hex(6)}"
    tmp = temp_name(run_dir / name)
    os.mkdir(tmp, 0o755)
    os.chmod(tmp, 0o755)  # whatever the umask: check_private would refuse a group-writable one
    commit(tmp, run_dir / name)
    return name


def write_merged(out: Path, paths: Sequence[Path], layout_kind: str, extra_attrs: Optional[Dict] = None,
                 via: Optional[str] = None) -> Path:
    """Write `out` from shard files `paths` in their order, by atomic.py's protocol (a unique
    temporary name beside it, fsync'd, renamed, the folder fsync'd): a reader, a crash or a
    second writer never sees half a file under `out`.
    layout_kind: "view" (virtual features, relative source paths) or "copy"; via: for a view, the
    name of the run's own folder (view_dir) to name the sources through (view.<id>/../shards/...)."""
    out = Path(out)
    sources, lay = _scan(paths)
    total = sum(s.rows for s in sources)
    total_f = sum(s.n_failures for s in sources)
    # the HDF5 file is closed (inner) before atomic_path commits it (outer)
    # "x": made new (O_EXCL), so never written through a symlink planted at the temporary name
    with atomic_path(out) as tmp, _open(tmp, "x") as o:
        g = o.create_group("features")
        for ds, shape in lay.shapes.items():
            dt = lay.dtypes[f"features/{ds}"]
            if layout_kind == "view":
                vl = h5py.VirtualLayout(shape=(total,) + shape, dtype=dt)
                pos = 0
                for s in sources:
                    if s.rows:
                        # relative: the run directory can be moved or mounted elsewhere
                        rel = os.path.relpath(s.path, out.parent)
                        if via:
                            rel = os.path.join(via, os.pardir, rel)
                        vl[pos:pos + s.rows] = h5py.VirtualSource(rel, f"features/{ds}", shape=(s.rows,) + shape)
                    pos += s.rows
                g.create_virtual_dataset(ds, vl, fillvalue=np.nan)
            else:
                g.create_dataset(ds, shape=(total,) + shape, dtype=dt,
                                 chunks=_dataset_chunks(total, shape, dt) if total else None)
        for i, b in enumerate(lay.blobs):
            g[dataset_name(b)].attrs["blob"] = b
        o["feats"] = h5py.SoftLink(f"/features/{dataset_name(lay.blobs[0])}")
        for d in lay.row_datasets:
            o.create_dataset(d, shape=(total,), dtype=lay.dtypes[d], chunks=(min(total, NAME_CHUNK_ROWS),) if total else None)
        fg = o.create_group("failures")
        for d in lay.fail_datasets:
            fg.create_dataset(d, shape=(total_f,), dtype=lay.dtypes[f"failures/{d}"],
                              chunks=(min(total_f, NAME_CHUNK_ROWS),) if total_f else None)
        # one shard file open at a time, each dataset copied in bounded chunks
        rows_ds = [(d, _chunk_rows(shape, lay.dtypes[d])) for d, shape in
                   ([(f"features/{ds}", shape) for ds, shape in lay.shapes.items()] if layout_kind != "view" else [])]
        rows_ds += [(d, NAME_CHUNK_ROWS) for d in lay.row_datasets]
        fail_ds = [f"failures/{d}" for d in lay.fail_datasets]
        dst = {d: o[d] for d, _ in rows_ds}
        dst.update({d: o[d] for d in fail_ds})
        pos = fpos = 0
        for s in sources:
            if s.rows or s.n_failures:
                with _open(s.path) as f:
                    if s.rows:
                        for d, step in rows_ds:
                            _copy(dst[d], pos, f[d], s.rows, step)
                    if s.n_failures:
                        for d in fail_ds:
                            _copy(dst[d], fpos, f[d], s.n_failures, NAME_CHUNK_ROWS)
            pos += s.rows
            fpos += s.n_failures
        for k, v in lay.attrs.items():
            o.attrs[k] = v
        o.attrs.update({"rows": total, "n_failures": total_f, "num_shards": len(sources), "layout": layout_kind})
        for k, v in (extra_attrs or {}).items():
            o.attrs[k] = v
    return out


def merged_is_current(run) -> bool:
    """features.h5 already merges this run's complete shards as they are: written after the last
    of them, of this run (fingerprint), every planned image in it once. A rerun of a complete run
    then leaves it alone (readers holding it open keep reading the same file)."""
    merged = Path(run.rundir.merged)
    try:
        m = merged.stat().st_mtime_ns
        if any(os.stat(run.shard_path(i)).st_mtime_ns > m for i in range(run.num_shards)):
            return False
        with open_h5(merged, "r") as f:
            counted = f["index"].shape[0] + f["failures/index"].shape[0]
            return counted == int(run.plan["count"]) and f.attrs.get("fingerprint") == run.plan.get("fingerprint")
    except (OSError, KeyError):
        return False


def merge_run(run, out: Optional[Path] = None, copy: bool = False) -> Path:
    """Merge every shard of `run` into run_dir/features.h5 (a view up to view_max_shards shards,
    else a copy). Refuses, naming them, while shards are missing. Single-writer: the run's merge
    lock is held throughout; a second merge (a hand-run `merge`, a second merge job) is refused
    naming the first (RunBusyError, exit 2) and changes nothing. A run directory others can write
    (or whose parents they can) is refused first (private.py): the command, a local run's last
    step and the Slurm merge job alike."""
    check_private(Path(run.rundir.path), "the run directory")
    with private_files():  # features.h5, its folder, stats: the user's alone, whatever the umask
        return _merge_run(run, out, copy)


def _merge_run(run, out: Optional[Path], copy: bool) -> Path:
    lock = FileLock(Path(run.rundir.path) / MERGE_LOCK, "caffe-runner merge")
    try:
        lock.acquire()
    except LockHeld as e:
        raise RunBusyError(f"{run.rundir.path} is being merged by {e.holder}: wait for it to finish (it writes "
                           f"{run.rundir.merged}; caffe-runner status {shell_quote(run.rundir.path)}); nothing was changed",
                           holder=e.holder) from None
    except OSError as e:
        raise unwritable("the run directory", run.rundir.path, e, "merge as a user who can write there, or "
                         "write a self-contained copy elsewhere: caffe-runner export RUN_DIR OUT.h5") from None
    try:
        gate("merge-locked")  # tests hold a merge here, its lock taken (runner/faults.py)
        return _merge_locked(run, out, copy)
    finally:
        lock.release()


def _merge_locked(run, out: Optional[Path], copy: bool = False) -> Path:
    # temporaries of merges killed mid-write (kill -9, a lost node): this is the one writer now
    remove_stale_temps(run.rundir.merged)
    missing = run.missing_shards()
    if missing:
        from ..run.status import finish_advice

        raise ShardFailedError(
            f"{len(missing)} of {run.num_shards} shards are not complete ({', '.join(map(str, missing[:10]))}"
            f"{'...' if len(missing) > 10 else ''}): {finish_advice(run)}, then merge; "
            f"`caffe-runner status {shell_quote(run.rundir.path)}` says why")
    output = run.cfg.output if "output" in run.cfg else {}
    limit = int(output.get("view_max_shards", 128))
    kind = "copy" if copy or output.get("merge_copy", False) or limit == 0 else "view"
    via = view_dir(run.rundir.path) if kind == "view" else None
    out = write_merged(out or run.rundir.merged, run.shard_paths(), kind, via=via)
    log.info("merged %d shards into %s (%s)", run.num_shards, out,
             "a view over shards/" if kind == "view" else "a self-contained copy")
    if kind == "view" and run.num_shards > limit:
        log.warning("%s is a view over %d shard files (more than output.view_max_shards=%d): a read of all its rows "
                    "holds them all open at once, so plain h5py needs `ulimit -n %d` or more (caffe-runner's own "
                    "readers and Run.features() raise their limit themselves); a self-contained copy: caffe-runner "
                    "merge --copy %s", out, run.num_shards, limit, view_open_files(run.num_shards),
                    shell_quote(run.rundir.path))
    return out


def view_open_files(n_sources: int) -> int:
    """File descriptors a whole read of a view over n_sources files needs (measured with HDF5 2.0:
    one per source touched by one read, held until the dataset is closed, plus the reader's own)."""
    return n_sources + FD_MARGIN


def view_sources(f: h5py.File) -> List[str]:
    """Source file names of the virtual feature datasets, as stored (relative to the file)."""
    names: List[str] = []
    for ds in f["features"].values():
        if ds.is_virtual:
            names.extend(m.file_name for m in ds.virtual_sources())
    return list(dict.fromkeys(names))


def check_sources(path: Path, f: h5py.File) -> None:
    """A view whose sources cannot all be opened reads as NaN where they are missing: refuse."""
    sources = view_sources(f)
    if not sources:
        return
    base = Path(path).resolve().parent
    outside = [s for s in sources if os.path.isabs(s) or not os.path.realpath(base / s).startswith(str(base) + os.sep)]
    if outside:
        raise RunnerError(
            f"{path} is a view that reads {len(outside)} source(s) from outside its own folder (e.g. {outside[0]}): "
            f"it is not a file caffe-runner's merge wrote for that folder; merge the run again (caffe-runner merge "
            f"RUN_DIR) or read a self-contained copy (caffe-runner export RUN_DIR OUT.h5)")
    missing = [s for s in sources if not os.access(base / s, os.R_OK)]
    if missing:
        raise RunnerError(
            f"{path} is a view over {len(sources)} shard files and {len(missing)} of them cannot be read "
            f"(e.g. {missing[0]}): their rows would read as NaN. Keep features.h5 in its run directory (with "
            f"shards/ and {Path(missing[0]).parts[0]}/), or make a "
            f"self-contained file where the shards are: caffe-runner export RUN_DIR OUT.h5")
    need = view_open_files(len(sources))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and need > soft:
        if hard == resource.RLIM_INFINITY or need <= hard:  # ours to raise, up to the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
            return
        raise RunnerError(
            f"{path} is a view over {len(sources)} shard files, more than this process may open at once "
            f"(ulimit -Hn {hard}): rows past the limit would read as NaN. Read it where the limit allows "
            f"(ulimit -n {need}) or read a self-contained copy: caffe-runner export RUN_DIR OUT.h5")


def open_merged(path: Path) -> h5py.File:
    """Open features.h5 (or any file merge wrote) for reading, after checking a view's sources."""
    f = _open(path)
    try:
        check_sources(Path(path), f)
    except BaseException:
        f.close()
        raise
    return f


# ---- export --------------------------------------------------------------------------

def export_sources(run) -> List[Path]:
    """Where to read the run's rows from: the shards, or a features.h5 that is already a copy."""
    missing = run.missing_shards()
    if not missing:
        return run.shard_paths()
    merged = run.rundir.merged
    if merged.exists():
        with _open(merged) as f:
            if not view_sources(f):
                return [merged]
    from ..run.status import finish_advice

    raise ShardFailedError(f"{len(missing)} of {run.num_shards} shards are missing ({missing[:10]}): "
                           f"{finish_advice(run)}, then export")


def export_run(run, out: Path, fmt: str = "h5") -> Path:
    """A self-contained copy of the run's result: "h5" (the features.h5 layout, features
    copied) or "npy" (a folder: one 2-D float matrix per blob, flattened, plus index.npy,
    labels.npy when the input has labels, names.txt and failures.tsv). Streamed: one source open at a time, bounded chunks."""
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    paths = export_sources(run)
    if fmt not in ("h5", "npy"):
        raise RunnerError(f"--format {fmt}: use h5 or npy")
    if fmt == "npy":
        _check_npy_target(out)
    _check_export_target(out if fmt == "npy" else out.parent)
    if fmt == "h5":
        return write_merged(out, paths, "copy")
    return _export_npy(out, paths)


def _check_export_target(folder: Path) -> None:
    """Before any copying: the target folder can be made and written (one line, not h5py's
    traceback from deep in the copy)."""
    try:
        probe_writable(folder)
    except OSError as e:
        raise unwritable("the export target", folder, e, "give an OUT in a folder you can write") from None


NPY_FIXED = ("index.npy", "labels.npy", "names.txt", "failures.tsv", "blobs.json")


def _planted(path: Path, st: os.stat_result) -> Optional[str]:
    """What makes an entry at an export file's name one we must not write through, or None."""
    if stat.S_ISLNK(st.st_mode):
        return f"a symlink (to {os.readlink(path)})"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({stat.filemode(st.st_mode)})"
    if st.st_nlink > 1:
        return f"a hard link to a file with {st.st_nlink} names"
    return None


def _refuse_planted(path: Path, why: str):
    return ConfigError(f"export target {path} is {why}: export writes plain files of its own and never through "
                       f"a link someone planted; remove it (rm {shell_quote(path)}) or give another OUT; nothing "
                       "was written")


def _check_npy_target(out: Path) -> None:
    """--format npy writes into the folder OUT: refused, before anything is written, when OUT is a
    symlink or holds, under a name export writes, anything but a plain file of its own."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_planted(out, f"a symlink (to {os.readlink(out)})")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"export --format npy writes a folder, and {out} is a file: give a new folder")
    for e in os.scandir(out):
        if e.name in NPY_FIXED or e.name.endswith(".npy"):
            why = _planted(Path(e.path), e.stat(follow_symlinks=False))
            if why:
                raise _refuse_planted(Path(e.path), why)


class _Folder:
    """The export folder, opened once without following a symlink: every file is made in it
    through its descriptor (a folder swapped meanwhile is not written into), none through a link."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refuse_planted(path, "a symlink") from None
            raise

    def open(self, name: str, text: bool = False):
        """`name` in the folder for writing from its start (made, or a plain file of ours emptied)."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                         dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _refuse_planted(self.path / name, "a symlink") from None
            raise
        why = _planted(self.path / name, os.fstat(fd))
        if why:
            os.close(fd)
            raise _refuse_planted(self.path / name, why)
        os.ftruncate(fd, 0)  # only now: a plain file with one name, ours
        os.set_blocking(fd, True)
        return open(fd, "w", encoding="utf-8") if text else open(fd, "wb")

    def close(self) -> None:
        os.close(self.fd)


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _npy_writer(folder: _Folder, name: str, dtype, shape):
    """An open .npy file with its header written; rows are appended in order (no memory map:
    resident memory stays one chunk, whatever the matrix size)."""
    f = folder.open(name)
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(shape)})
    return f


def _export_npy(out: Path, paths: Sequence[Path]) -> Path:
    sources, lay = _scan(paths)
    total = sum(s.rows for s in sources)
    folder = _Folder(out)
    try:
        _write_npy(folder, sources, lay, total)
    finally:
        folder.close()
    return out


def _write_npy(folder: _Folder, sources: Sequence[_Source], lay: _Layout, total: int) -> None:
    mats = {ds: _npy_writer(folder, f"{ds}.npy", lay.dtypes[f"features/{ds}"], (total, int(np.prod(shape))))
            for ds, shape in lay.shapes.items()}
    index = _npy_writer(folder, "index.npy", np.int64, (total,))
    # a labelled input (list "path label", Datum, tar .cls): labels.npy beside index.npy, and
    # a label column in failures.tsv, as the h5 export keeps labels and failures/labels
    labelled = "labels" in lay.row_datasets
    labels = _npy_writer(folder, "labels.npy", np.int64, (total,)) if labelled else None
    try:
        with folder.open("names.txt", text=True) as names, folder.open("failures.tsv", text=True) as fails:
            fails.write("index\tname\treason" + ("\tlabel" if labelled else "") + "\n")
            for s in sources:
                with _open(s.path) as f:
                    for ds, shape in lay.shapes.items():
                        step = _chunk_rows(shape, lay.dtypes[f"features/{ds}"])
                        src = f[f"features/{ds}"]
                        for a in range(0, s.rows, step):
                            mats[ds].write(np.ascontiguousarray(src[a:min(s.rows, a + step)]).tobytes())
                    for a in range(0, s.rows, NAME_CHUNK_ROWS):
                        b = min(s.rows, a + NAME_CHUNK_ROWS)
                        index.write(f["index"][a:b].astype("<i8").tobytes())
                        if labels is not None:
                            labels.write(f["labels"][a:b].astype("<i8").tobytes())
                        names.writelines(_escape(n) + "\n" for n in f["names"].asstr()[a:b])
                    for a in range(0, s.n_failures, NAME_CHUNK_ROWS):
                        b = min(s.n_failures, a + NAME_CHUNK_ROWS)
                        labs = f["failures/labels"][a:b] if labelled else [None] * (b - a)
                        for i, n, r, lab in zip(f["failures/index"][a:b], f["failures/names"].asstr()[a:b],
                                                f["failures/reason"].asstr()[a:b], labs):
                            fails.write(f"{int(i)}\t{_escape(n)}\t{_escape(r)}"
                                        + (f"\t{int(lab)}" if labelled else "") + "\n")
    finally:
        for m in list(mats.values()) + [index] + ([labels] if labels is not None else []):
            m.close()
    with folder.open("blobs.json", text=True) as f:
        f.write(json.dumps({dataset_name(b): {"blob": b, "shape": list(lay.shapes[dataset_name(b)])}
                            for b in lay.blobs}, indent=1))
