"""The manifest: the input listed once, sorted, stored in the run directory.

Layout (run_dir/manifest/):
  paths.bin    every path relative to the root as raw bytes (file names need not be UTF-8
               and may hold newlines), concatenated
  offsets.npy  uint64[n + 1]: path i is paths.bin[offsets[i]:offsets[i + 1]]
  meta.json    root, count, source
A task reads only its slice of offsets (memory-mapped) and its byte range of paths.bin, so
what it reads is O(n / num_shards), not O(n).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError

MANIFEST_DIR = "manifest"


@dataclass(frozen=True)
class Manifest:
    dir: Path
    root: bytes
    count: int

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


def _matches(name: bytes, exts: Sequence[bytes]) -> bool:
    dot = name.rfind(b".")
    return dot >= 0 and name[dot + 1:].lower() in exts


def list_dir(root: bytes, extensions: Sequence[str], follow_symlinks: bool = True) -> List[bytes]:
    """Paths relative to root, recursively, with one of the extensions (case-insensitive).

    Symlinks to files are kept even when broken, so the run records them as failures
    instead of silently dropping them; symlinked directories are not descended into
    (no loops)."""
    exts = [e.lower().lstrip(".").encode() for e in extensions]
    out: List[bytes] = []
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except PermissionError as e:
            raise ConfigError(f"cannot list {e.filename!r}: permission denied; fix the permissions "
                              "or give the readable files as input.list") from e
        with it:
            for entry in it:
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif _matches(entry.name, exts) and (
                        entry.is_file(follow_symlinks=follow_symlinks) or entry.is_symlink()):
                    out.append(rel)
    out.sort()
    return out


def read_list(list_file: bytes, root: Optional[bytes]) -> tuple[bytes, List[bytes]]:
    """Paths from a text file: one per line, or NUL-separated when the file holds a NUL
    (for names with newlines: `find -print0 > list`). Blank lines and '#' lines are skipped."""
    with open(list_file, "rb") as f:
        data = f.read()
    if b"\0" in data:
        items = [p for p in data.split(b"\0") if p]
    else:
        items = [p.rstrip(b"\r") for p in data.split(b"\n")]
        items = [p for p in items if p.strip() and not p.lstrip().startswith(b"#")]
    base = root if root is not None else os.path.dirname(os.path.abspath(list_file))
    base = os.path.abspath(base)
    prefix = base.rstrip(b"/") + b"/"
    names = []
    for p in items:
        if os.path.isabs(p) and p.startswith(prefix):
            p = p[len(prefix):]
        names.append(p)
    names.sort()
    return base, names


def write_manifest(run_dir: Path, root: bytes, names: Sequence[bytes], source: str) -> Manifest:
    mdir = Path(run_dir) / MANIFEST_DIR
    tmp = mdir.with_name(MANIFEST_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    offsets = np.zeros(len(names) + 1, dtype=np.uint64)
    with open(tmp / "paths.bin", "wb") as f:
        pos = 0
        for i, n in enumerate(names):
            f.write(n)
            pos += len(n)
            offsets[i + 1] = pos
    np.save(tmp / "offsets.npy", offsets)
    meta = {"root": os.fsdecode(root), "count": len(names), "source": source, "version": 1}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # a manifest without a run.json is a listing an earlier attempt left (refused plan, crash)
    if mdir.exists():
        shutil.rmtree(mdir)
    os.replace(tmp, mdir)
    return Manifest(mdir, root, len(names))


def load_manifest(run_dir: Path) -> Manifest:
    mdir = Path(run_dir) / MANIFEST_DIR
    try:
        meta = json.loads((mdir / "meta.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no manifest ({mdir}/meta.json): is it a caffe-runner run "
                          "directory? Start a run with `caffe-runner input.dir=... output.dir=...`")
    return Manifest(mdir, os.fsencode(meta["root"]), int(meta["count"]))


def list_input(input_cfg) -> Tuple[bytes, List[bytes], str]:
    """(root, sorted names, source) of the input: a directory listed recursively, or a list file."""
    if bool(input_cfg.dir) == bool(input_cfg.list):
        raise ConfigError("give exactly one of input.dir=DIR (listed recursively) or "
                          "input.list=FILE (one path per line)")
    if input_cfg.dir:
        root = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.dir)))
        if not os.path.isdir(root):
            raise ConfigError(f"input.dir {os.fsdecode(root)!r} is not a directory: check the path "
                              "(or use input.list=FILE for a list of paths)")
        names = list_dir(root, input_cfg.extensions, input_cfg.follow_symlinks)
        source = f"dir:{os.fsdecode(root)}"
    else:
        lst = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.list)))
        if not os.path.isfile(lst):
            raise ConfigError(f"input.list {os.fsdecode(lst)!r} does not exist: give a text file "
                              "with one image path per line")
        r = os.fsencode(os.path.expanduser(input_cfg.root)) if input_cfg.root else None
        root, names = read_list(lst, r)
        source = f"list:{os.fsdecode(lst)}"
    if not names:
        exts = ",".join(input_cfg.extensions)
        raise ConfigError(f"no images found in {source[source.index(':') + 1:]} (extensions: {exts}); "
                          "check the path, or set input.extensions=[...]")
    dups = len(names) - len(set(names))
    if dups:
        raise ConfigError(f"the input list names {dups} path(s) more than once; every image must "
                          "appear once: deduplicate the list (sort -u)")
    return root, names, source


def build_manifest(run_dir: Path, input_cfg) -> Manifest:
    """List the input once (directory or list file) and store it in the run directory."""
    root, names, source = list_input(input_cfg)
    return write_manifest(run_dir, root, names, source)


def input_stamp(input_cfg) -> Optional[Dict[str, int]]:
    """A cheap fingerprint of the input as it is now, to notice a change since listing without
    a full re-listing: for a folder, how many files match and the newest mtime among them and
    their folders (an added, removed, renamed or rewritten image changes one of the two); for
    a list file, its size and mtime. None when the input cannot be read from here."""
    try:
        if input_cfg.list:
            st = os.stat(os.path.expanduser(input_cfg.list))
            return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        root = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.dir)))
        exts = [e.lower().lstrip(".").encode() for e in input_cfg.extensions]
        count, newest = 0, os.stat(root).st_mtime_ns
        stack = [root]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
                    elif _matches(entry.name, exts) and (
                            entry.is_file(follow_symlinks=input_cfg.follow_symlinks) or entry.is_symlink()):
                        count += 1
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
        return {"count": count, "mtime_ns": int(newest)}
    except OSError:
        return None


def extend_manifest(run_dir: Path, keep: int, new_names: Sequence[bytes]) -> Manifest:
    """Keep the first `keep` entries and append `new_names` (input.relist): entries already
    listed keep their positions, so completed shards stay valid. Each file is replaced whole."""
    m = load_manifest(run_dir)
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
    tmp = m.dir / ".offsets.tmp.npy"
    np.save(tmp, new_off)
    os.replace(tmp, m.dir / "offsets.npy")
    meta = json.loads((m.dir / "meta.json").read_text())
    meta["count"] = keep + len(new_names)
    (m.dir / ".meta.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(m.dir / ".meta.tmp", m.dir / "meta.json")
    return Manifest(m.dir, m.root, meta["count"])


def iter_names(m: Manifest, chunk: int = 100_000) -> Iterator[bytes]:
    for s in range(0, m.count, chunk):
        yield from m.read_slice(s, min(m.count, s + chunk))


def display_name(name: bytes) -> str:
    """UTF-8 text for the `names` dataset; bytes that are not UTF-8 appear as \\xNN
    (the exact bytes are kept in `names_raw`)."""
    return name.decode("utf-8", errors="backslashreplace")
