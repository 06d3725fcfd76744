"""input.dir=DIR (a folder, listed recursively and sorted) or input.list=FILE (a text file of
paths, in its own order: Caffe lists are ordered, labels and splits depend on it).

Files are opened and read inside the decode threads (parallel reads on a cluster file system).
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..store.manifest import Manifest, display_name, write_manifest
from .base import NO_LABEL, InputKind, Item, Reader, check_names, expand, first_duplicates
from .listing import describe, walk_images
from .. import log


def list_dir(root: bytes, extensions: Sequence[str], follow_symlinks: bool = True) -> List[bytes]:
    """Paths relative to root, recursively, with one of the extensions (case-insensitive);
    listing.walk_images also counts what it skips, and follows symlinked folders."""
    return walk_images(root, extensions, follow_symlinks).names


UTF8_BOM = b"\xef\xbb\xbf"
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
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"input.list {shown} is UTF-16 text (a Windows 'Unicode' file): save it as UTF-8, "
                          "e.g. iconv -f UTF-16 -t UTF-8")
    data = data.removeprefix(UTF8_BOM)  # Windows editors start UTF-8 text with one: not part of the first path
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


def path_key(root: bytes, name: bytes) -> bytes:
    """What two spellings of one listed path share (pure, no file system access): the path
    joined to the root and normalised (`./`, `//`, `a/../`, an absolute path under the root).
    A symlink to a listed file is another path: both are extracted, each under its own name."""
    return os.path.normpath(os.path.join(root, name))


def check_list_duplicates(names: Sequence[bytes], linenos: Sequence[int], list_name: str, labelled: bool,
                          root: bytes = b"/") -> None:
    keys = [path_key(root, n) for n in names]
    n, shown = first_duplicates(keys, linenos)
    if not n:
        return
    by_line = dict(zip(linenos, names))
    where = "; ".join(f"{display_name(by_line[a])!r} on lines {a} and {b}" if by_line[a] == by_line[b] else
                      f"{display_name(by_line[a])!r} on line {a} and {display_name(by_line[b])!r} on line {b}, "
                      "the same file" for _, a, b in shown)
    # by path, not by whole line: two lines of one path with different labels are duplicates too
    fix = ("awk '{p=$0; sub(/[ \t]+[-+]?[0-9]+$/, \"\", p)} !seen[p]++' keeps each path's first line, "
           "check that its label is the right one" if labelled else "awk '!seen[$0]++' keeps the order")
    spelled = any(by_line[a] != by_line[b] for _, a, b in shown)
    raise ConfigError(f"input.list {list_name} names {n} image(s) more than once ({where}): every image must "
                      f"appear once; remove the repeated lines" + (
                          " (spelled differently, so remove them by hand)" if spelled else f" ({fix})"))


LIST_SAMPLE = 20  # listed paths looked up before any work, to catch a wrong root


def check_list_resolves(names: Sequence[bytes], root: bytes, list_name: str, root_given: bool) -> None:
    """Relative list paths resolve against input.root, else the list file's folder; when most of
    the first LIST_SAMPLE do not exist there, the root is wrong: stop before any work (each would
    be recorded as 'listed but not found'), naming the folder and input.root."""
    sample = list(names[:LIST_SAMPLE])
    missing = [n for n in sample if not os.path.lexists(os.path.join(root, n))]
    if not sample or len(missing) * 2 <= len(sample):
        return
    cwd = os.getcwd()
    in_cwd = sum(os.path.lexists(os.path.join(os.fsencode(cwd), n)) for n in missing)
    hint = (f"they exist under the current folder: add input.root={cwd}" if in_cwd * 2 > len(missing) and
            os.fsencode(cwd) != root else "set input.root=FOLDER, the folder the list's paths are relative to "
                                          "(Caffe's root_folder)")
    against = "input.root" if root_given else "the list file's folder (input.root is not set)"
    raise ConfigError(f"input.list {list_name}: {len(missing)} of the first {len(sample)} listed paths do not exist "
                      f"under {os.fsdecode(root)} ({against}), e.g. {display_name(missing[0])!r}: {hint}")


class FileReader(Reader):
    """Files named by a directory listing or a list file."""

    def __init__(self, manifest: Manifest, decoder):
        self.m, self.decoder = manifest, decoder
        if manifest.origin == "list":
            decoder.missing_reason = "listed but not found"
        self.stats: Dict[str, object] = {}

    def items(self, start: int, stop: int) -> Iterator[Item]:
        names = self.m.read_slice(start, stop)
        labels = self.m.read_labels(start, stop)
        for k, n in enumerate(names):
            lab = int(labels[k]) if labels is not None else NO_LABEL
            yield Item(start + k, n, lab, partial(self.decoder.load, self.m.path_of(n)))


class Files(InputKind):
    name = "files"
    fields = ("dir", "list")
    path_fields = ("dir", "list", "root")
    usage = ("input.dir=DIR (listed recursively)", "input.list=FILE (one path per line, optionally 'path label')")

    def source(self, ic) -> str:
        if ic.dir:
            return "dir:" + expand(ic.dir)
        labels = ic.get("list_labels", "auto")
        return "list:" + expand(ic.list) + ("" if labels == "auto" else f" labels={labels}")

    def _list(self, ic) -> Tuple[bytes, List[bytes], str, Optional[List[int]], str, Optional[Dict]]:
        """(root, names, source, labels, origin, listing) of a directory (sorted) or a list file (its
        order); listing: what a folder's walk saw and skipped (listing.Listing.record)."""
        labels = None
        record = None
        if ic.dir:
            root = os.fsencode(expand(ic.dir))
            if not os.path.isdir(root):
                raise ConfigError(f"input.dir {os.fsdecode(root)!r} is not a directory: check the path "
                                  "(or use input.list=FILE for a list of paths)")
            listing = walk_images(root, ic.extensions, ic.follow_symlinks)
            names, record = listing.names, listing.record()
            source = f"dir:{os.fsdecode(root)}"
            origin = "dir"
            if listing.skipped:
                log.warning("input.dir %s: %s", os.fsdecode(root), describe(record))
        else:
            lst = os.fsencode(expand(ic.list))
            if os.path.isdir(lst):
                raise ConfigError(f"input.list {os.fsdecode(lst)!r} is a folder: use input.dir={os.fsdecode(lst)} "
                                  "for a folder of images, or give input.list a text file with one image path per line")
            if not os.path.isfile(lst):
                raise ConfigError(f"input.list {os.fsdecode(lst)!r} does not exist: give a text file "
                                  "with one image path per line")
            r = os.fsencode(os.path.expanduser(ic.root)) if ic.root else None
            linenos: List[int] = []
            root, names, labels = read_list(lst, r, str(ic.get("list_labels", "auto")), linenos)
            source = f"list:{os.fsdecode(lst)}"
            origin = "list"
            check_names(names, source, check_dups=False)  # check_list_duplicates names the lines
            self._check_list(ic, lst, r, root, names, linenos, labels)
            return root, names, source, labels, origin, None
        check_names(names, source, ic.extensions, listing=record)
        return root, names, source, labels, origin, record

    @staticmethod
    def _check_list(ic, lst: bytes, r: Optional[bytes], root: bytes, names, linenos, labels) -> None:
        """Duplicates (by line) and a wrong root (most of the first paths missing); when labels
        were guessed (auto) and whole lines would pass, the fix is input.list_labels=no."""
        def check(names, linenos, labelled):
            check_list_duplicates(names, linenos, os.fsdecode(lst), labelled, root)
            check_list_resolves(names, root, os.fsdecode(lst), r is not None)

        try:
            check(names, linenos, labels is not None)
        except ConfigError as e:
            if labels is None or ic.get("list_labels", "auto") != "auto":
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

    def build(self, run_dir: Path, ic) -> Manifest:
        root, names, source, labels, origin, record = self._list(ic)
        return write_manifest(run_dir, root, names, source, labels, origin=origin, listing=record)

    def relist(self, ic) -> Tuple[bytes, List[bytes], str]:
        root, names, source, _, _, _ = self._list(ic)
        return root, names, source

    def stamp(self, ic) -> Dict[str, int]:
        """A list file: its size and mtime. A folder: how many files match, a digest of their
        names and their newest mtime (an added, removed, renamed or rewritten image changes one;
        folders' own mtimes do not count: a run folder created inside the input changes them)."""
        if ic.list:
            st = os.stat(os.path.expanduser(ic.list))
            return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        root = os.fsencode(expand(ic.dir))
        # the listing's own walk: the same files counted, symlinked folders followed alike
        listing = walk_images(root, ic.extensions, ic.follow_symlinks, stamp=True)
        count, newest = len(listing.names), listing.newest_mtime_ns
        names = hashlib.sha256(b"\0".join(listing.names)).hexdigest()[:16]
        return {"count": count, "mtime_ns": int(newest), "names": names}

    def node_read_paths(self, ic) -> List[Path]:
        # a list's relative paths are under input.root, or under the list file's folder
        paths = [ic.dir, ic.list, ic.list and os.path.dirname(expand(ic.list)), ic.root]
        return [Path(expand(p)) for p in paths if p]

    def reader(self, manifest: Manifest, decoder) -> Reader:
        return FileReader(manifest, decoder)


KIND = Files()
