"""The manifest's storage format: the input listed once and stored in the run directory.

Each input kind lists itself (runner/inputs/): a directory sorted, a list file in its own
order, an LMDB in key order, tar shards in tar order; this module only stores and reads it.

Layout (run_dir/manifest/):
  paths.bin    every name (path relative to the root, LMDB key, TAR/KEY) as raw bytes (file
               names need not be UTF-8 and may hold newlines), concatenated
  offsets.npy  uint64[n + 1]: name i is paths.bin[offsets[i]:offsets[i + 1]]
  labels.npy   int64[n], only when the labels are known at listing time (list "path label"
               lines, tar `.cls` members); -1 where a sample has none
  samples.npy  int64[n, 3], tar input only: (tar number, data offset, size) of the image member
  meta.json    root, count, source, kind (files | lmdb | tar), labels, tars
A task reads only its slice of offsets (memory-mapped) and its byte range of paths.bin, so
what it reads is O(n / num_shards), not O(n).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_text, remove_stale_temps
from ..errors import ConfigError

MANIFEST_DIR = "manifest"


@dataclass(frozen=True)
class Manifest:
    dir: Path
    root: bytes
    count: int
    # files (a folder or a list) | lmdb | tar
    kind: str = "files"
    # the run has a `labels` dataset (from the list, the tar's .cls members, or the Datums)
    labels: bool = False
    # "list" or "dir" for kind=files: a listed file that is missing was never there
    origin: str = "dir"
    # tar input: the tar files, numbered as in samples.npy
    tars: tuple = ()
    # a folder: files seen, listed and skipped by reason (inputs/listing.py: Listing.record)
    listing: Optional[Dict] = None

    def read_labels(self, start: int, stop: int) -> Optional[np.ndarray]:
        """labels[start:stop] when stored at listing time, else None."""
        path = self.dir / "labels.npy"
        if not path.exists():
            return None
        return np.array(np.load(path, mmap_mode="r")[start:stop], dtype=np.int64)

    def read_samples(self, start: int, stop: int) -> np.ndarray:
        """Tar input: (tar number, offset, size) rows [start, stop)."""
        return np.array(np.load(self.dir / "samples.npy", mmap_mode="r")[start:stop], dtype=np.int64)

    def path_of(self, name: bytes) -> bytes:
        return os.path.join(self.root, name) if self.root else name

    def read_slice(self, start: int, stop: int) -> List[bytes]:
        """Names [start, stop), reading only that part of the files."""
        if not 0 <= start <= stop <= self.count:
            raise ValueError(f"slice [{start}, {stop}) outside manifest of {self.count}")
        if start == stop:
            return []
        offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        offs = np.array(offsets[start:stop + 1], dtype=np.int64)
        with open(self.dir / "paths.bin", "rb") as f:
            f.seek(int(offs[0]))
            blob = f.read(int(offs[-1] - offs[0]))
        rel = offs - offs[0]
        return [blob[rel[i]:rel[i + 1]] for i in range(len(rel) - 1)]


def write_manifest(run_dir: Path, root: bytes, names: Sequence[bytes], source: str,
                   labels: Optional[Sequence[int]] = None, kind: str = "files", origin: str = "dir",
                   has_labels: Optional[bool] = None, arrays: Optional[Dict[str, np.ndarray]] = None,
                   tars: Sequence[str] = (), listing: Optional[Dict] = None) -> Manifest:
    mdir = Path(run_dir) / MANIFEST_DIR
    mdir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(mdir)  # listings killed mid-write (the launch lock makes this the one writer)
    has_labels = labels is not None if has_labels is None else has_labels
    with atomic_path(mdir) as tmp:
        tmp.mkdir()
        offsets = np.zeros(len(names) + 1, dtype=np.uint64)
        with open(tmp / "paths.bin", "wb") as f:
            pos = 0
            for i, n in enumerate(names):
                f.write(n)
                pos += len(n)
                offsets[i + 1] = pos
        np.save(tmp / "offsets.npy", offsets)
        if labels is not None:
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        for name, arr in (arrays or {}).items():
            np.save(tmp / f"{name}.npy", arr)
        meta = {"root": os.fsdecode(root), "count": len(names), "source": source, "version": 1,
                "kind": kind, "labels": bool(has_labels), "origin": origin, "tars": list(tars)}
        if listing is not None:
            meta["listing"] = listing
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # a manifest without a run.json is a listing an earlier attempt left (refused plan, crash)
        if mdir.exists():
            shutil.rmtree(mdir)
    return Manifest(mdir, root, len(names), kind, bool(has_labels), origin, tuple(tars), listing)


def load_manifest(run_dir: Path) -> Manifest:
    mdir = Path(run_dir) / MANIFEST_DIR
    try:
        meta = json.loads((mdir / "meta.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no manifest ({mdir}/meta.json): is it a caffe-runner run "
                          "directory? Start a run with `caffe-runner input.dir=... output.dir=...`")
    return Manifest(mdir, os.fsencode(meta["root"]), int(meta["count"]), meta.get("kind", "files"),
                    bool(meta.get("labels", False)), meta.get("origin", "dir"), tuple(meta.get("tars", ())),
                    meta.get("listing"))


def extend_manifest(run_dir: Path, keep: int, new_names: Sequence[bytes]) -> Manifest:
    """Keep the first `keep` entries and append `new_names` (input.relist): entries already
    listed keep their positions, so completed shards stay valid. Each file is replaced whole."""
    m = load_manifest(run_dir)
    if m.labels or m.kind != "files":
        raise ConfigError("input.relist=true does not extend a run with labels (a 'path label' list): "
                          "use a new output.dir for the longer list")
    offsets = np.load(m.dir / "offsets.npy", mmap_mode="r")
    end = int(offsets[keep])
    new_off = np.empty(keep + len(new_names) + 1, dtype=np.uint64)
    new_off[:keep + 1] = offsets[:keep + 1]
    pos = end
    with open(m.dir / "paths.bin", "r+b") as f:
        f.truncate(end)
        f.seek(end)
        for i, n in enumerate(new_names):
            f.write(n)
            pos += len(n)
            new_off[keep + 1 + i] = pos
        f.flush()
        os.fsync(f.fileno())  # the names are on disk before the offsets that reach them
    with atomic_path(m.dir / "offsets.npy") as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
            np.save(f, new_off)
    meta = json.loads((m.dir / "meta.json").read_text())
    meta["count"] = keep + len(new_names)
    atomic_write_text(m.dir / "meta.json", json.dumps(meta, indent=1))
    return Manifest(m.dir, m.root, meta["count"], m.kind, m.labels, m.origin, m.tars)


def iter_names(m: Manifest, chunk: int = 100_000) -> Iterator[bytes]:
    for s in range(0, m.count, chunk):
        yield from m.read_slice(s, min(m.count, s + chunk))


def display_name(name: bytes) -> str:
    """UTF-8 text for the `names` dataset; bytes that are not UTF-8 appear as \\xNN
    (the exact bytes are kept in `names_raw`)."""
    return name.decode("utf-8", errors="backslashreplace")
