"""The manifest: the input listed once and stored in the run directory.

A directory is listed sorted; a list file keeps its own order (Caffe lists are ordered:
labels and splits depend on it); an LMDB is listed in key order; tar shards in tar order.

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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError

MANIFEST_DIR = "manifest"


NO_LABEL = -1  # a sample without a label (labels dataset)


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
            raise ConfigError(f"cannot list {os.fsdecode(e.filename)!r}: permission denied; fix the permissions "
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


_LABELLED = re.compile(rb"^(.*?)[ \t]+([+-]?[0-9]+)$")


def split_label(line: bytes, labels: str, lineno: int = 0, list_name: str = "") -> Tuple[bytes, Optional[int]]:
    """One line of a Caffe list: "path label", split at the last blank as Caffe does (paths may
    hold spaces). labels: "yes" (the last token must be an integer), "no" (the line is the path)."""
    if labels == "no":
        return line, None
    m = _LABELLED.match(line)
    if m is None:
        raise ConfigError(f"{list_name} line {lineno}: {line[:200]!r} does not end with an integer label; "
                          "fix the line, or set input.list_labels=no if the list holds paths only")
    return m.group(1), int(m.group(2))


def read_list(list_file: bytes, root: Optional[bytes], labels: str = "auto"
              ) -> Tuple[bytes, List[bytes], Optional[List[int]]]:
    """Paths (and labels) from a text file, in the file's order: one per line, or NUL-separated
    when the file holds a NUL (for names with newlines: `find -print0 > list`; no labels).
    Blank lines and '#' lines are skipped.

    labels: "auto" reads Caffe's "path label" lines when every line ends with a blank and an
    integer and plain paths when none does (a mix is an error that names a line); "yes"
    requires labels; "no" takes each whole line as a path (for names like "IMG 2019")."""
    if labels not in ("auto", "yes", "no"):
        raise ConfigError(f"input.list_labels={labels!r}: use auto, yes or no")
    with open(list_file, "rb") as f:
        data = f.read()
    shown = os.fsdecode(list_file)
    if b"\0" in data:
        if labels == "yes":
            raise ConfigError(f"input.list {shown} is NUL-separated, which carries no labels: "
                              "use 'path label' lines, or set input.list_labels=no")
        items = [(p, 0) for p in data.split(b"\0") if p]
        labels = "no"
    else:
        lines = [p.rstrip(b"\r") for p in data.split(b"\n")]
        items = [(p, i + 1) for i, p in enumerate(lines) if p.strip() and not p.lstrip().startswith(b"#")]
    if labels == "auto":
        flags = [_LABELLED.match(p) is not None for p, _ in items]
        if all(flags):
            labels = "yes"
        elif not any(flags):
            labels = "no"
        else:
            bad = next(i for (p, i), f in zip(items, flags) if not f)
            good = next(i for (p, i), f in zip(items, flags) if f)
            raise ConfigError(f"input.list {shown}: some lines end with an integer label (line {good}) and "
                              f"some do not (line {bad}): give every line a label, or set "
                              "input.list_labels=no to read each whole line as a path")
    base = root if root is not None else os.path.dirname(os.path.abspath(list_file))
    base = os.path.abspath(base)
    prefix = base.rstrip(b"/") + b"/"
    names: List[bytes] = []
    out_labels: Optional[List[int]] = [] if labels == "yes" else None
    for line, lineno in items:
        p, lab = split_label(line, labels, lineno, shown)
        if os.path.isabs(p) and p.startswith(prefix):
            p = p[len(prefix):]
        names.append(p)
        if out_labels is not None:
            out_labels.append(lab)
    return base, names, out_labels


def write_manifest(run_dir: Path, root: bytes, names: Sequence[bytes], source: str,
                   labels: Optional[Sequence[int]] = None, kind: str = "files", origin: str = "dir",
                   has_labels: Optional[bool] = None, arrays: Optional[Dict[str, np.ndarray]] = None,
                   tars: Sequence[str] = ()) -> Manifest:
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
    if labels is not None:
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
    for name, arr in (arrays or {}).items():
        np.save(tmp / f"{name}.npy", arr)
    has_labels = labels is not None if has_labels is None else has_labels
    meta = {"root": os.fsdecode(root), "count": len(names), "source": source, "version": 1,
            "kind": kind, "labels": bool(has_labels), "origin": origin, "tars": list(tars)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # a manifest without a run.json is a listing an earlier attempt left (refused plan, crash)
    if mdir.exists():
        shutil.rmtree(mdir)
    os.replace(tmp, mdir)
    return Manifest(mdir, root, len(names), kind, bool(has_labels), origin, tuple(tars))


def load_manifest(run_dir: Path) -> Manifest:
    mdir = Path(run_dir) / MANIFEST_DIR
    try:
        meta = json.loads((mdir / "meta.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} has no manifest ({mdir}/meta.json): is it a caffe-runner run "
                          "directory? Start a run with `caffe-runner input.dir=... output.dir=...`")
    return Manifest(mdir, os.fsencode(meta["root"]), int(meta["count"]), meta.get("kind", "files"),
                    bool(meta.get("labels", False)), meta.get("origin", "dir"), tuple(meta.get("tars", ())))


def input_kinds(input_cfg) -> List[str]:
    return [k for k in ("dir", "list", "lmdb", "tar") if input_cfg.get(k)]


def _check_one_input(input_cfg) -> None:
    kinds = input_kinds(input_cfg)
    if len(kinds) != 1:
        raise ConfigError("give exactly one of input.dir=DIR (listed recursively), input.list=FILE (one path "
                          "per line, optionally 'path label'), input.lmdb=PATH (Caffe Datum LMDB) or "
                          "input.tar=GLOB (tar shards)" + (f"; got {', '.join('input.' + k for k in kinds)}"
                                                           if kinds else ""))


def _list_files(input_cfg) -> Tuple[bytes, List[bytes], str, Optional[List[int]], str]:
    """(root, names, source, labels, origin) of a directory (sorted) or a list file (its order)."""
    labels = None
    if input_cfg.dir:
        root = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.dir)))
        if not os.path.isdir(root):
            raise ConfigError(f"input.dir {os.fsdecode(root)!r} is not a directory: check the path "
                              "(or use input.list=FILE for a list of paths)")
        names = list_dir(root, input_cfg.extensions, input_cfg.follow_symlinks)
        source = f"dir:{os.fsdecode(root)}"
        origin = "dir"
    else:
        lst = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.list)))
        if os.path.isdir(lst):
            raise ConfigError(f"input.list {os.fsdecode(lst)!r} is a folder: use input.dir={os.fsdecode(lst)} for "
                              "a folder of images, or give input.list a text file with one image path per line")
        if not os.path.isfile(lst):
            raise ConfigError(f"input.list {os.fsdecode(lst)!r} does not exist: give a text file "
                              "with one image path per line")
        r = os.fsencode(os.path.expanduser(input_cfg.root)) if input_cfg.root else None
        root, names, labels = read_list(lst, r, str(input_cfg.get("list_labels", "auto")))
        source = f"list:{os.fsdecode(lst)}"
        origin = "list"
    _check_names(names, source, input_cfg.extensions if origin == "dir" else ())
    return root, names, source, labels, origin


def _check_names(names, source, exts=()) -> None:
    if not names:
        where = source[source.index(':') + 1:]
        if source.startswith("list:"):  # a list is read as it is: extensions play no part
            raise ConfigError(f"input.list {where!r} names no images (it is empty, or holds only blank lines): "
                              "give a list with one image path per line")
        what = f" (extensions: {','.join(exts)})" if exts else ""
        raise ConfigError(f"no images found in {where}{what}; "
                          "check the path" + (", or set input.extensions=[...]" if exts else ""))
    dups = len(names) - len(set(names))
    if dups:
        raise ConfigError(f"the input names {dups} image(s) more than once; every image must "
                          "appear once: deduplicate the list (e.g. awk '!seen[$0]++' keeps the order)")


def list_input(input_cfg) -> Tuple[bytes, List[bytes], str]:
    """(root, names, source) of a folder or a list file (what input.relist re-reads)."""
    _check_one_input(input_cfg)
    if input_cfg.get("lmdb") or input_cfg.get("tar"):
        raise ConfigError("input.relist=true re-lists input.dir or input.list; an LMDB or tar shards are "
                          "listed once: use a new output.dir for a changed database or new shards")
    root, names, source, _, _ = _list_files(input_cfg)
    return root, names, source


def build_manifest(run_dir: Path, input_cfg) -> Manifest:
    """List the input once (directory, list file, LMDB or tar shards) and store it in the run directory."""
    _check_one_input(input_cfg)
    if input_cfg.get("lmdb"):
        from .lmdb_input import list_lmdb

        root, names = list_lmdb(input_cfg.lmdb)
        source = f"lmdb:{os.fsdecode(root)}"
        _check_names(names, source)
        return write_manifest(run_dir, root, names, source, None, kind="lmdb", has_labels=True)
    if input_cfg.get("tar"):
        from .tar_input import list_tars

        tars, names, samples, labels = list_tars(input_cfg.tar, input_cfg.extensions)
        source = f"tar:{input_cfg.tar}"
        _check_names(names, source)
        return write_manifest(run_dir, b"", names, source, labels, kind="tar", arrays={"samples": samples},
                              tars=tars)
    root, names, source, labels, origin = _list_files(input_cfg)
    return write_manifest(run_dir, root, names, source, labels, origin=origin)


def input_stamp(input_cfg) -> Optional[Dict[str, int]]:
    """A cheap fingerprint of the input as it is now, to notice a change since listing without
    a full re-listing: for a folder, how many files match and the newest mtime among them and
    their folders (an added, removed, renamed or rewritten image changes one of the two); for
    a list file, its size and mtime. None when the input cannot be read from here."""
    try:
        if input_cfg.get("lmdb"):
            p = os.path.expanduser(input_cfg.lmdb)
            st = os.stat(os.path.join(p, "data.mdb") if os.path.isdir(p) else p)
            return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        if input_cfg.get("tar"):
            from .tar_input import tar_paths

            sts = [os.stat(p) for p in tar_paths(input_cfg.tar)]
            return {"count": len(sts), "size": sum(int(st.st_size) for st in sts),
                    "mtime_ns": max(int(st.st_mtime_ns) for st in sts)}
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
    except (OSError, ConfigError):
        return None


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
    tmp = m.dir / ".offsets.tmp.npy"
    np.save(tmp, new_off)
    os.replace(tmp, m.dir / "offsets.npy")
    meta = json.loads((m.dir / "meta.json").read_text())
    meta["count"] = keep + len(new_names)
    (m.dir / ".meta.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(m.dir / ".meta.tmp", m.dir / "meta.json")
    return Manifest(m.dir, m.root, meta["count"], m.kind, m.labels, m.origin, m.tars)


def iter_names(m: Manifest, chunk: int = 100_000) -> Iterator[bytes]:
    for s in range(0, m.count, chunk):
        yield from m.read_slice(s, min(m.count, s + chunk))


def display_name(name: bytes) -> str:
    """UTF-8 text for the `names` dataset; bytes that are not UTF-8 appear as \\xNN
    (the exact bytes are kept in `names_raw`)."""
    return name.decode("utf-8", errors="backslashreplace")
