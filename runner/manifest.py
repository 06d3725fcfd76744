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

from . import log
from .errors import ConfigError
from .listing import describe, walk_images

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
    # a folder: files seen, listed and skipped by reason (listing.Listing.record)
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


def list_dir(root: bytes, extensions: Sequence[str], follow_symlinks: bool = True) -> List[bytes]:
    """Paths relative to root, recursively, with one of the extensions (case-insensitive);
    listing.walk_images also counts what it skips, and follows symlinked folders."""
    return walk_images(root, extensions, follow_symlinks).names


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


def read_list(list_file: bytes, root: Optional[bytes], labels: str = "auto", linenos: Optional[List[int]] = None
              ) -> Tuple[bytes, List[bytes], Optional[List[int]]]:
    """Paths (and labels) from a text file, in the file's order: one per line, or NUL-separated
    when the file holds a NUL (for names with newlines: `find -print0 > list`; no labels).
    Blank lines and '#' lines are skipped.

    labels: "auto" reads Caffe's "path label" lines when every line ends with a blank and an
    integer and plain paths when none does (a mix is an error that names a line); "yes"
    requires labels; "no" takes each whole line as a path (for names like "IMG 2019").
    linenos, when given, receives each name's line number (entry number when NUL-separated)."""
    if labels not in ("auto", "yes", "no"):
        raise ConfigError(f"input.list_labels={labels!r}: use auto, yes or no")
    with open(list_file, "rb") as f:
        data = f.read()
    shown = os.fsdecode(list_file)
    if b"\0" in data:
        if labels == "yes":
            raise ConfigError(f"input.list {shown} is NUL-separated, which carries no labels: "
                              "use 'path label' lines, or set input.list_labels=no")
        items = [(p, i + 1) for i, p in enumerate(q for q in data.split(b"\0") if q)]
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
        if linenos is not None:
            linenos.append(lineno)
    return base, names, out_labels


def write_manifest(run_dir: Path, root: bytes, names: Sequence[bytes], source: str,
                   labels: Optional[Sequence[int]] = None, kind: str = "files", origin: str = "dir",
                   has_labels: Optional[bool] = None, arrays: Optional[Dict[str, np.ndarray]] = None,
                   tars: Sequence[str] = (), listing: Optional[Dict] = None) -> Manifest:
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
    if listing is not None:
        meta["listing"] = listing
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    # a manifest without a run.json is a listing an earlier attempt left (refused plan, crash)
    if mdir.exists():
        shutil.rmtree(mdir)
    os.replace(tmp, mdir)
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


def input_kinds(input_cfg) -> List[str]:
    return [k for k in ("dir", "list", "lmdb", "tar") if input_cfg.get(k)]


def _check_one_input(input_cfg) -> None:
    kinds = input_kinds(input_cfg)
    if len(kinds) != 1:
        raise ConfigError("give exactly one of input.dir=DIR (listed recursively), input.list=FILE (one path "
                          "per line, optionally 'path label'), input.lmdb=PATH (Caffe Datum LMDB) or "
                          "input.tar=GLOB (tar shards)" + (f"; got {', '.join('input.' + k for k in kinds)}"
                                                           if kinds else ""))


def _list_files(input_cfg) -> Tuple[bytes, List[bytes], str, Optional[List[int]], str, Optional[Dict]]:
    """(root, names, source, labels, origin, listing) of a directory (sorted) or a list file (its
    order); listing: what a folder's walk saw and skipped (listing.Listing.record)."""
    labels = None
    record = None
    if input_cfg.dir:
        root = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.dir)))
        if not os.path.isdir(root):
            raise ConfigError(f"input.dir {os.fsdecode(root)!r} is not a directory: check the path "
                              "(or use input.list=FILE for a list of paths)")
        listing = walk_images(root, input_cfg.extensions, input_cfg.follow_symlinks)
        names, record = listing.names, listing.record()
        source = f"dir:{os.fsdecode(root)}"
        origin = "dir"
        if listing.skipped:
            log.warning("input.dir %s: %s", os.fsdecode(root), describe(record))
    else:
        lst = os.fsencode(os.path.abspath(os.path.expanduser(input_cfg.list)))
        if not os.path.isfile(lst):
            raise ConfigError(f"input.list {os.fsdecode(lst)!r} does not exist: give a text file "
                              "with one image path per line")
        r = os.fsencode(os.path.expanduser(input_cfg.root)) if input_cfg.root else None
        linenos: List[int] = []
        root, names, labels = read_list(lst, r, str(input_cfg.get("list_labels", "auto")), linenos)
        source = f"list:{os.fsdecode(lst)}"
        origin = "list"
        _check_names(names, source, check_dups=False)  # check_list_duplicates names the lines

        def check(names, linenos, labelled):
            check_list_duplicates(names, linenos, os.fsdecode(lst), labelled)
            check_list_resolves(names, root, os.fsdecode(lst), r is not None)

        try:
            check(names, linenos, labels is not None)
        except ConfigError as e:
            if labels is None or input_cfg.get("list_labels", "auto") != "auto":
                raise
            # "IMG 2019" read as path "IMG", label 2019: would the whole lines do?
            whole_lines: List[int] = []
            _, whole, _ = read_list(lst, r, "no", whole_lines)
            try:
                check(whole, whole_lines, False)
            except ConfigError:
                raise e from None
            raise ConfigError(f"{e}; read as whole lines the paths are fine: set input.list_labels=no (the lines "
                              "end with a number that is part of the name, not a label)") from None
        return root, names, source, labels, origin, None
    _check_names(names, source, input_cfg.extensions, listing=record)
    return root, names, source, labels, origin, record


def first_duplicates(names: Sequence[bytes], linenos: Sequence[int], limit: int = 3
                     ) -> Tuple[int, List[Tuple[bytes, int, int]]]:
    """(how many entries repeat an earlier one, the first `limit` as (name, first line, line))."""
    first: Dict[bytes, int] = {}
    shown: List[Tuple[bytes, int, int]] = []
    n = 0
    for name, line in zip(names, linenos):
        if name in first:
            n += 1
            if len(shown) < limit:
                shown.append((name, first[name], line))
        else:
            first[name] = line
    return n, shown


def check_list_duplicates(names: Sequence[bytes], linenos: Sequence[int], list_name: str, labelled: bool) -> None:
    n, shown = first_duplicates(names, linenos)
    if not n:
        return
    where = "; ".join(f"{display_name(name)!r} on lines {a} and {b}" for name, a, b in shown)
    # by path, not by whole line: two lines of one path with different labels are duplicates too
    fix = ("awk '{p=$0; sub(/[ \t]+[-+]?[0-9]+$/, \"\", p)} !seen[p]++' keeps each path's first line, "
           "check that its label is the right one" if labelled else "awk '!seen[$0]++' keeps the order")
    raise ConfigError(f"input.list {list_name} names {n} image(s) more than once ({where}): every image must "
                      f"appear once; remove the repeated lines ({fix})")


LIST_SAMPLE = 20  # listed paths looked up before any work, to catch a wrong root


def check_list_resolves(names: Sequence[bytes], root: bytes, list_name: str, root_given: bool) -> None:
    """Relative list paths resolve against input.root, else the list file's folder; when most of
    the first LIST_SAMPLE do not exist there, the root is wrong: stop before any work (each would
    be recorded as 'listed but not found'), naming the folder and input.root."""
    sample = list(names[:LIST_SAMPLE])
    missing = [n for n in sample if not os.path.lexists(os.path.join(root, n))]
    if not sample or len(missing) * 2 <= len(sample):
        return
    shown = os.fsdecode(root)
    cwd = os.getcwd()
    in_cwd = sum(os.path.lexists(os.path.join(os.fsencode(cwd), n)) for n in missing)
    hint = (f"they exist under the current folder: add input.root={cwd}" if in_cwd * 2 > len(missing) and
            os.fsencode(cwd) != root else "set input.root=FOLDER, the folder the list's paths are relative to "
                                          "(Caffe's root_folder)")
    against = "input.root" if root_given else "the list file's folder (input.root is not set)"
    raise ConfigError(f"input.list {list_name}: {len(missing)} of the first {len(sample)} listed paths do not exist "
                      f"under {shown} ({against}), e.g. {display_name(missing[0])!r}: {hint}")


def _check_names(names, source, exts=(), check_dups: bool = True, listing: Optional[Dict] = None) -> None:
    if not names:
        what = f" ({describe(listing)})" if listing and listing.get("seen") else (
            f" (extensions: {','.join(exts)})" if exts else "")
        raise ConfigError(f"no images found in {source[source.index(':') + 1:]}{what}; "
                          "check the path" + (", or set input.extensions=[...]" if exts else ""))
    dups = len(names) - len(set(names)) if check_dups else 0
    if dups:
        n, shown = first_duplicates(names, range(1, len(names) + 1))
        where = "; ".join(f"{display_name(name)!r} at entries {a} and {b}" for name, a, b in shown)
        raise ConfigError(f"the input names {dups} image(s) more than once ({where}); every image must "
                          "appear once")


def list_input(input_cfg) -> Tuple[bytes, List[bytes], str]:
    """(root, names, source) of a folder or a list file (what input.relist re-reads)."""
    _check_one_input(input_cfg)
    if input_cfg.get("lmdb") or input_cfg.get("tar"):
        raise ConfigError("input.relist=true re-lists input.dir or input.list; an LMDB or tar shards are "
                          "listed once: use a new output.dir for a changed database or new shards")
    root, names, source, _, _, _ = _list_files(input_cfg)
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
    root, names, source, labels, origin, record = _list_files(input_cfg)
    return write_manifest(run_dir, root, names, source, labels, origin=origin, listing=record)


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
        # the listing's own walk: the same files counted, symlinked folders followed alike
        listing = walk_images(root, input_cfg.extensions, input_cfg.follow_symlinks, stamp=True)
        count, newest = len(listing.names), listing.newest_mtime_ns
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
