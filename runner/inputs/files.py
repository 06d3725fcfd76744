"""input.dir=DIR (a folder, listed recursively and sorted) or input.list=FILE (a text file of
paths, in its own order: Caffe lists are ordered, labels and splits depend on it).

Files are opened and read inside the decode threads (parallel reads on a cluster file system).
"""
from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from ..manifest import Manifest, write_manifest
from .base import NO_LABEL, InputKind, Item, Reader, check_names, expand


def matches(name: bytes, exts: Sequence[bytes]) -> bool:
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
                elif matches(entry.name, exts) and (
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

    def _list(self, ic) -> Tuple[bytes, List[bytes], str, Optional[List[int]], str]:
        """(root, names, source, labels, origin) of a directory (sorted) or a list file (its order)."""
        labels = None
        if ic.dir:
            root = os.fsencode(expand(ic.dir))
            if not os.path.isdir(root):
                raise ConfigError(f"input.dir {os.fsdecode(root)!r} is not a directory: check the path "
                                  "(or use input.list=FILE for a list of paths)")
            names = list_dir(root, ic.extensions, ic.follow_symlinks)
            source = f"dir:{os.fsdecode(root)}"
            origin = "dir"
        else:
            lst = os.fsencode(expand(ic.list))
            if not os.path.isfile(lst):
                raise ConfigError(f"input.list {os.fsdecode(lst)!r} does not exist: give a text file "
                                  "with one image path per line")
            r = os.fsencode(os.path.expanduser(ic.root)) if ic.root else None
            root, names, labels = read_list(lst, r, str(ic.get("list_labels", "auto")))
            source = f"list:{os.fsdecode(lst)}"
            origin = "list"
        check_names(names, source, ic.extensions)
        return root, names, source, labels, origin

    def build(self, run_dir: Path, ic) -> Manifest:
        root, names, source, labels, origin = self._list(ic)
        return write_manifest(run_dir, root, names, source, labels, origin=origin)

    def relist(self, ic) -> Tuple[bytes, List[bytes], str]:
        root, names, source, _, _ = self._list(ic)
        return root, names, source

    def stamp(self, ic) -> Dict[str, int]:
        """A list file: its size and mtime. A folder: how many files match and the newest mtime
        among them and their folders (an added, removed, renamed or rewritten image changes one)."""
        if ic.list:
            st = os.stat(os.path.expanduser(ic.list))
            return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        root = os.fsencode(expand(ic.dir))
        exts = [e.lower().lstrip(".").encode() for e in ic.extensions]
        count, newest = 0, os.stat(root).st_mtime_ns
        stack = [root]
        while stack:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
                    elif matches(entry.name, exts) and (
                            entry.is_file(follow_symlinks=ic.follow_symlinks) or entry.is_symlink()):
                        count += 1
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
        return {"count": count, "mtime_ns": int(newest)}

    def node_read_paths(self, ic) -> List[Path]:
        # a list's relative paths are under input.root, or under the list file's folder
        paths = [ic.dir, ic.list, ic.list and os.path.dirname(expand(ic.list)), ic.root]
        return [Path(expand(p)) for p in paths if p]

    def reader(self, manifest: Manifest, decoder) -> Reader:
        return FileReader(manifest, decoder)


KIND = Files()
