"""Listing a folder of images: what is listed, and what is not and why.

Every file the walk meets is either listed (its extension is in input.extensions) or counted
as skipped with its reason: by extension (".heic 3"), or by kind (a FIFO, a socket, a device, a
symlink with input.follow_symlinks=false, a symlinked folder already listed). The counts go
into the run (run.json, manifest/meta.json), the plan summary, `status` and `verify`, so
nothing is left out without a word.

Symlinked folders are followed with input.follow_symlinks=true. Each real folder is walked once
(by device and inode): a loop, or a second link to a folder already listed, is skipped and
counted, so each real file is listed once. The real tree is walked first, then the symlinked
folders in path order, so which path names a doubly reachable folder does not depend on the
order the file system returns entries in.

A caffe-runner folder met by the walk (a run directory: it holds launch.lock or run.json; a
sweep folder: sweep.json) is left out and counted: an output.dir inside its own input.dir
must not list the run's own files, nor change the input's stamp as the run writes them.
"""
from __future__ import annotations

import heapq
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import ConfigError
from ..store.rundir import LAUNCH_LOCK, RUN_JSON

NO_EXTENSION = "(no extension)"
# skip reasons by kind (the extension ones are the extension itself, e.g. ".heic")
KIND_FIFO = "FIFO"
KIND_SOCKET = "socket"
KIND_DEVICE = "device file"
KIND_SYMLINK = "symlink (input.follow_symlinks=false)"
KIND_SEEN_FOLDER = "symlinked folder already listed (a loop, or a second link to it)"
KIND_RUN_FOLDER = "caffe-runner run or sweep folder (output.dir is never part of the input)"
KIND_UNREADABLE = "symlinked folder that could not be read"
# a folder holding one of these is caffe-runner's own (sweep.SWEEP_JSON sits in a layer above)
RUN_MARKERS = (LAUNCH_LOCK, RUN_JSON, "sweep.json")


def is_runner_folder(path: bytes) -> bool:
    """A run directory or a sweep folder (one of RUN_MARKERS in it)."""
    return any(os.path.lexists(os.path.join(path, os.fsencode(m))) for m in RUN_MARKERS)


@dataclass
class Listing:
    names: List[bytes] = field(default_factory=list)  # relative paths, sorted
    by_extension: Dict[str, int] = field(default_factory=dict)  # skipped: ".jp2" -> 3
    by_kind: Dict[str, int] = field(default_factory=dict)       # skipped: "FIFO" -> 1
    newest_mtime_ns: int = 0   # of the listed files (with stamp=True)

    @property
    def skipped(self) -> int:
        return sum(self.by_extension.values()) + sum(self.by_kind.values())

    @property
    def seen(self) -> int:
        return len(self.names) + self.skipped

    def record(self) -> Dict:
        """What the run keeps (run.json, manifest/meta.json)."""
        return {"seen": self.seen, "listed": len(self.names), "skipped": self.skipped,
                "skipped_by_extension": dict(sorted(self.by_extension.items(), key=lambda kv: (-kv[1], kv[0]))),
                "skipped_by_kind": dict(sorted(self.by_kind.items(), key=lambda kv: (-kv[1], kv[0])))}


def describe(record: Optional[Dict], limit: int = 5) -> str:
    """'7 files seen, 1 listed, 6 skipped: 3 .heic, 3 .jp2 (not in input.extensions)'."""
    if not record:
        return ""
    text = f"{record['seen']} files seen, {record['listed']} listed, {record['skipped']} skipped"
    parts = []
    ext = list(record.get("skipped_by_extension", {}).items())
    if ext:
        shown = ", ".join(f"{n} {e}" for e, n in ext[:limit]) + (
            f", {sum(n for _, n in ext[limit:])} other" if len(ext) > limit else "")
        parts.append(f"{shown} (not in input.extensions)")
    parts += [f"{n} {k}" for k, n in record.get("skipped_by_kind", {}).items()]
    return text + (": " + "; ".join(parts) if parts else "")


def _extension(name: bytes) -> str:
    dot = name.rfind(b".")
    if dot < 0 or dot == len(name) - 1:
        return NO_EXTENSION
    return "." + os.fsdecode(name[dot + 1:]).lower()


def _kind(mode: int) -> Optional[str]:
    if stat.S_ISFIFO(mode):
        return KIND_FIFO
    if stat.S_ISSOCK(mode):
        return KIND_SOCKET
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return KIND_DEVICE
    return None


def walk_images(root: bytes, extensions: Sequence[str], follow_symlinks: bool = True,
                stamp: bool = False) -> Listing:
    """Paths relative to root, recursively, whose extension is in `extensions`
    (case-insensitive), and the count of everything else met, by reason. Broken symlinks with
    an image extension are listed, so the run records them as failures."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    out = Listing()
    visited = set()
    st = os.stat(root)
    visited.add((st.st_dev, st.st_ino))
    linked: List[bytes] = []  # symlinked folders, walked after the real tree, in path order
    real = [b""]

    def skip(table: Dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def walk(stack: List[bytes]) -> None:
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
                    if entry.is_symlink():
                        if not follow_symlinks:
                            skip(out.by_kind, KIND_SYMLINK)
                            continue
                        if entry.is_dir(follow_symlinks=True):
                            heapq.heappush(linked, rel)
                            continue
                        target_mode = None
                        try:
                            target_mode = entry.stat(follow_symlinks=True).st_mode
                        except OSError:
                            pass  # broken: listed by extension, recorded as a failure by the run
                        if target_mode is not None and _kind(target_mode):
                            skip(out.by_kind, _kind(target_mode))
                            continue
                    elif entry.is_dir(follow_symlinks=False):
                        s = entry.stat(follow_symlinks=False)
                        if (s.st_dev, s.st_ino) in visited:  # reached before through a symlinked folder
                            skip(out.by_kind, KIND_SEEN_FOLDER)
                            continue
                        if is_runner_folder(entry.path):
                            skip(out.by_kind, KIND_RUN_FOLDER)
                            continue
                        visited.add((s.st_dev, s.st_ino))
                        stack.append(rel)
                        continue
                    elif not entry.is_file(follow_symlinks=False):
                        skip(out.by_kind, _kind(entry.stat(follow_symlinks=False).st_mode) or "other file type")
                        continue
                    ext = _extension(entry.name)
                    if ext not in exts:
                        skip(out.by_extension, ext)
                        continue
                    out.names.append(rel)
                    if stamp:
                        out.newest_mtime_ns = max(out.newest_mtime_ns, entry.stat(follow_symlinks=False).st_mtime_ns)

    walk(real)
    while linked:
        rel = heapq.heappop(linked)
        try:
            s = os.stat(os.path.join(root, rel))
        except OSError as e:  # it was a folder a moment ago: gone, or its target's path lost permission
            skip(out.by_kind, f"{KIND_UNREADABLE} ({e.strerror or type(e).__name__})")
            continue
        if (s.st_dev, s.st_ino) in visited:
            skip(out.by_kind, KIND_SEEN_FOLDER)
            continue
        if is_runner_folder(os.path.join(root, rel)):
            skip(out.by_kind, KIND_RUN_FOLDER)
            continue
        visited.add((s.st_dev, s.st_ino))
        walk([rel])
    out.names.sort()
    return out
