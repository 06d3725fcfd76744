"""input.lmdb=PATH: a Caffe LMDB of Datum records, as convert_imageset writes them.

Names are the keys, in the database's key order; the label is the Datum's. Planning lists
the keys once (values are not read). A task positions one cursor on its first key and reads
its key range only, in a read-only, lock-free environment (lock=False: no lock file is
created or taken, so hundreds of tasks can read one database on a shared file system, as
long as nothing writes to it meanwhile).

Records:
- encoded (convert_imageset --encoded): the image file's bytes, decoded from memory by the
  same decoder as files, so features equal a folder run's on the same images exactly;
- raw (the default of convert_imageset): uint8 C x H x W pixels in BGR order, already resized
  by convert_imageset (--resize_height/--resize_width). They are not decoded again: the
  pixels go straight to the model's geometry. Where they already have the size the model's
  preprocessing resizes to (e.g. 256x256 for caffenet), only the centre crop is applied, as
  Caffe's data layer does; otherwise they are resized once more from the stored pixels.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from ..errors import ConfigError
from ..store.manifest import Manifest, write_manifest
from .base import NO_LABEL, InputKind, Item, Reader, check_names, expand


def open_env(path):
    """Read-only, without a lock file (see the module docstring)."""
    import lmdb

    p = os.path.abspath(os.path.expanduser(os.fsdecode(path)))
    if not os.path.exists(p):
        raise ConfigError(f"input.lmdb {p!r} does not exist: give the LMDB folder (holding data.mdb) "
                          "that convert_imageset wrote")
    try:
        return lmdb.open(p, subdir=os.path.isdir(p), readonly=True, lock=False, readahead=False,
                         meminit=False, max_readers=1)
    except lmdb.Error as e:
        raise ConfigError(f"input.lmdb {p!r} is not a readable LMDB database ({e}): give the folder "
                          "that holds data.mdb") from e


def _datum_class():
    from ..engine.model import caffe_pb2

    return caffe_pb2().Datum


def list_lmdb(path) -> Tuple[bytes, List[bytes]]:
    """(absolute path, keys in key order); checks that the first record is a Caffe Datum."""
    env = open_env(path)
    try:
        with env.begin(buffers=False) as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
            if keys:
                first = txn.get(keys[0])
                d = _datum_class()()
                try:
                    d.ParseFromString(first)
                except Exception as e:
                    raise ConfigError(f"input.lmdb {path}: record {keys[0]!r} is not a Caffe Datum ({e}); "
                                      "this reads databases written by convert_imageset / caffe.io.array_to_datum")
                if not d.data and not d.float_data:
                    raise ConfigError(f"input.lmdb {path}: record {keys[0]!r} holds no image data")
        root = os.fsencode(os.path.abspath(os.path.expanduser(os.fsdecode(path))))
    finally:
        env.close()
    return root, keys


def raw_pixels(data: bytes, c: int, h: int, w: int) -> np.ndarray:
    """A raw Datum's C x H x W uint8 pixels (BGR, as convert_imageset stores them) -> H x W x 3 BGR."""
    from ..engine.decode import DecodeFailure

    if c not in (1, 3):
        raise DecodeFailure(f"raw Datum with {c} channels (1 or 3 are supported)")
    if len(data) != c * h * w:
        raise DecodeFailure(f"raw Datum holds {len(data)} bytes, but {c}x{h}x{w} needs {c * h * w}")
    if h < 1 or w < 1:
        raise DecodeFailure("raw Datum has no pixels")
    img = np.frombuffer(data, dtype=np.uint8).reshape(c, h, w).transpose(1, 2, 0)
    if c == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def _failed(reason: str):
    return lambda: (None, reason)


class LmdbReader(Reader):
    def __init__(self, manifest: Manifest, decoder):
        KIND.check_decoder(decoder)
        self.m, self.decoder = manifest, decoder
        self.env = None
        # what this task read: the proof that it stayed in its key range
        self.stats: Dict[str, object] = {}

    def items(self, start: int, stop: int) -> Iterator[Item]:
        names = self.m.read_slice(start, stop)
        if not names:
            return
        Datum = _datum_class()
        self.env = open_env(self.m.root)
        seeks = records = 0
        with self.env.begin(buffers=False) as txn:
            cur = txn.cursor()
            here = False
            for k, name in enumerate(names):
                if not (here and cur.key() == name):
                    seeks += 1
                    here = cur.set_key(name)
                if not here:
                    yield Item(start + k, name, NO_LABEL, _failed("key not in the LMDB (database changed after listing?)"))
                    continue
                value = cur.value()
                records += 1
                self.stats = dict(first_key=names[0].decode("utf-8", "backslashreplace"),
                                  last_key=name.decode("utf-8", "backslashreplace"), records=records, seeks=seeks)
                d = Datum()
                try:
                    d.ParseFromString(value)
                except Exception as e:
                    yield Item(start + k, name, NO_LABEL, _failed(f"not a Caffe Datum record ({str(e)[:100]})"))
                else:
                    yield Item(start + k, name, int(d.label), self._job(d))
                here = cur.next()

    def _job(self, d):
        if d.encoded:
            return partial(self.decoder.load_bytes, d.data)
        if not d.data:
            return _failed("float Datum (float_data) is not supported: store uint8 images")
        return partial(self.decoder.load_pixels, partial(raw_pixels, d.data, d.channels, d.height, d.width))

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


class Lmdb(InputKind):
    name = "lmdb"
    fields = ("lmdb",)
    path_fields = ("lmdb",)
    usage = ("input.lmdb=PATH (Caffe Datum LMDB)",)
    from_memory = True

    def source(self, ic) -> str:
        return "lmdb:" + expand(ic.lmdb)

    def build(self, run_dir: Path, ic) -> Manifest:
        root, names = list_lmdb(ic.lmdb)
        source = f"lmdb:{os.fsdecode(root)}"
        check_names(names, source)
        return write_manifest(run_dir, root, names, source, None, kind=self.name, has_labels=True)

    def stamp(self, ic) -> Dict[str, int]:
        p = os.path.expanduser(ic.lmdb)
        st = os.stat(os.path.join(p, "data.mdb") if os.path.isdir(p) else p)
        return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}

    def node_read_paths(self, ic) -> List[Path]:
        return [Path(expand(ic.lmdb))]  # the folder holding data.mdb, or the database file

    def reader(self, manifest: Manifest, decoder) -> Reader:
        return LmdbReader(manifest, decoder)


KIND = Lmdb()
