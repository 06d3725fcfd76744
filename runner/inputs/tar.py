"""input.tar=...: tar shards in the webdataset layout (no tar is unpacked to disk).

Members are grouped into samples by key as webdataset does: `dir/key.jpg`, `dir/key.cls`,
`dir/key.json` form the sample `dir/key` (the key ends at the first dot of the file name).
A sample's image is its member whose extension is one of input.extensions; its `.cls`
member (an integer as text) is its label (-1 without one). Planning reads each tar's
headers once and records (tar, offset, size) of every image member in the manifest; a task
reads each of its samples with one positioned read and decodes it from memory.

The sample's name is TAR_FILE_NAME/KEY. Tars must be uncompressed (offsets into a .tar.gz
cannot be read without decompressing everything before them).
"""
from __future__ import annotations

import glob
import itertools
import os
import re
import tarfile
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..store.manifest import Manifest, write_manifest
from .base import NO_LABEL, InputKind, Item, Reader, check_names, expand

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(spec: str) -> List[str]:
    """shards-{000..002}.tar -> shards-000.tar, shards-001.tar, shards-002.tar (zero padding kept)."""
    parts = _BRACE.split(spec)
    if len(parts) == 1:
        return [spec]
    texts, ranges = parts[0::3], list(zip(parts[1::3], parts[2::3]))
    choices = []
    for lo, hi in ranges:
        width = len(lo)
        choices.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(t + c for t, c in zip(texts, combo)) + texts[-1])
    return out


def tar_paths(spec: str) -> List[str]:
    """The tar files input.tar names: a brace range, a glob, one tar, or a list file."""
    spec = os.path.expanduser(str(spec))
    if _BRACE.search(spec):
        paths = expand_braces(spec)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"input.tar={spec}: {len(missing)} of {len(paths)} tar files do not exist "
                              f"(first: {missing[0]}); check the range")
    elif any(ch in spec for ch in "*?["):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise ConfigError(f"input.tar={spec} matches no file: check the pattern")
    elif os.path.isfile(spec) and (spec.endswith(".tar") or tarfile.is_tarfile(spec)):
        paths = [spec]
    elif os.path.isfile(spec):
        base = os.path.dirname(os.path.abspath(spec))
        with open(spec) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"input.tar list {spec} names {len(missing)} missing tar file(s) (first: {missing[0]})")
    else:
        raise ConfigError(f"input.tar={spec} does not exist: give a tar, a glob (shards/*.tar), a brace "
                          "range (shards-{000000..000099}.tar) or a file listing the tars")
    return [os.path.abspath(p) for p in paths]


def _truncated(path: str, why: str) -> ConfigError:
    return ConfigError(f"tar shard {path} is truncated or corrupt ({why}): copy it again or re-create it, "
                       "or leave it out of input.tar")


def read_members(path: str) -> List[Tuple[str, int, int]]:
    """(name, data offset, size) of the regular files in one uncompressed tar, headers only."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"\x28\xb5\x2f\xfd":
            raise ConfigError(f"tar shard {path} is compressed: samples are read by offset, which needs an "
                              "uncompressed tar (decompress it, e.g. `gunzip`, or write .tar shards)")
        f.seek(0)
        out = []
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for ti in tf:
                    if ti.isfile():
                        if ti.offset_data + ti.size > size:
                            raise _truncated(path, f"member {ti.name} needs bytes up to {ti.offset_data + ti.size}"
                                                   f" but the file has {size}")
                        out.append((ti.name, ti.offset_data, ti.size))
                end = tf.offset
        except tarfile.TarError as e:
            raise _truncated(path, str(e)) from e
        # a complete tar ends with zero blocks; a cut at a member boundary leaves none
        f.seek(end)
        tail = f.read(512)
        if len(tail) < 512 or tail.strip(b"\0"):
            raise _truncated(path, f"no end-of-archive marker after byte {end}")
    return out


def list_tars(spec: str, extensions: Sequence[str]):
    """(tar paths, names, samples int64[n, 3] (tar, offset, size), labels or None)."""
    exts = {e.lower().lstrip(".") for e in extensions}
    tars = tar_paths(spec)
    names: List[bytes] = []
    rows: List[Tuple[int, int, int]] = []
    labels: List[int] = []
    any_label = False
    for t, path in enumerate(tars):
        samples: Dict[str, Dict[str, Tuple[int, int]]] = {}
        for name, off, size in read_members(path):
            m = _KEY.match(name)
            if not m:
                continue
            samples.setdefault(m.group(1), {})[m.group(2)] = (off, size)
        tname = os.path.basename(path)
        with open(path, "rb") as f:
            for key, members in samples.items():
                img = next(((o, s) for suf, (o, s) in members.items() if suf.lower() in exts), None)
                if img is None:  # e.g. key.seg.png: the last part of the suffix
                    img = next(((o, s) for suf, (o, s) in members.items()
                                if suf.rsplit(".", 1)[-1].lower() in exts), None)
                label = NO_LABEL
                if "cls" in members:
                    o, s = members["cls"]
                    text = os.pread(f.fileno(), min(s, 64), o).strip()
                    if re.fullmatch(rb"[+-]?[0-9]+", text):
                        label, any_label = int(text), True
                names.append(f"{tname}/{key}".encode())
                rows.append((t, img[0], img[1]) if img else (t, -1, -1))
                labels.append(label)
    samples_arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return tars, names, samples_arr, (labels if any_label else None)


class TarReader(Reader):
    def __init__(self, manifest: Manifest, decoder):
        KIND.check_decoder(decoder)
        self.m, self.decoder = manifest, decoder
        self.fds: Dict[int, int] = {}
        self.stats: Dict[str, object] = {}

    def _fd(self, t: int) -> int:
        if t not in self.fds:
            self.fds[t] = os.open(self.m.tars[t], os.O_RDONLY)
            self.stats["tars_opened"] = [os.path.basename(self.m.tars[i]) for i in sorted(self.fds)]
        return self.fds[t]

    def _load(self, t: int, offset: int, size: int):
        try:
            data = os.pread(self.fds[t], size, offset)
        except OSError as e:
            return None, f"read error in {self.m.tars[t]}: {e.strerror or e}"
        if len(data) < size:
            return None, (f"tar {os.path.basename(self.m.tars[t])} ends before this member "
                          f"({len(data)} of {size} bytes): it was truncated after listing")
        return self.decoder.load_bytes(data)

    def items(self, start: int, stop: int) -> Iterator[Item]:
        names = self.m.read_slice(start, stop)
        samples = self.m.read_samples(start, stop)
        labels = self.m.read_labels(start, stop)
        for k, name in enumerate(names):
            t, off, size = (int(v) for v in samples[k])
            lab = int(labels[k]) if labels is not None else NO_LABEL
            if off < 0:
                yield Item(start + k, name, lab, lambda: (None, "no image member in this sample (none of "
                                                                "input.extensions)"))
                continue
            try:
                self._fd(t)
            except OSError as e:
                reason = f"cannot open {self.m.tars[t]}: {e.strerror or e}"
                yield Item(start + k, name, lab, lambda r=reason: (None, r))
                continue
            yield Item(start + k, name, lab, partial(self._load, t, off, size))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


class Tar(InputKind):
    name = "tar"
    fields = ("tar",)
    path_fields = ("tar",)
    usage = ("input.tar=GLOB (tar shards)",)
    from_memory = True

    def source(self, ic) -> str:
        return "tar:" + str(ic.tar)

    def build(self, run_dir: Path, ic) -> Manifest:
        tars, names, samples, labels = list_tars(ic.tar, ic.extensions)
        source = f"tar:{ic.tar}"
        check_names(names, source)
        return write_manifest(run_dir, b"", names, source, labels, kind=self.name, arrays={"samples": samples},
                              tars=tars)

    def stamp(self, ic) -> Dict[str, int]:
        sts = [os.stat(p) for p in tar_paths(ic.tar)]
        return {"count": len(sts), "size": sum(int(st.st_size) for st in sts),
                "mtime_ns": max(int(st.st_mtime_ns) for st in sts)}

    def node_read_paths(self, ic) -> List[Path]:
        """The folder before any pattern character (a glob or a brace range), else the tar or
        the list file, and the folder holding the spec (a list's relative tars are under it)."""
        spec = str(ic.tar)
        head = expand(re.split(r"[*?\[{]", spec, maxsplit=1)[0])
        paths = [head if os.path.isdir(head) or head == expand(spec) else os.path.dirname(head)]
        paths.append(os.path.dirname(expand(spec)))
        return [Path(p) for p in paths]

    def reader(self, manifest: Manifest, decoder) -> Reader:
        return TarReader(manifest, decoder)


KIND = Tar()
