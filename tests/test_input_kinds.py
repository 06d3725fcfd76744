"""Every input kind behind the one interface (runner/inputs/), without pycaffe: the same five
labelled images as a list file, an LMDB and a tar shard, listed into a manifest and read back
through the kind's reader with a fake decoder. A new kind fails here until it has a maker.
The real decoders and Datums: tests/test_inputs.py."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner import inputs
from runner.errors import ConfigError
from runner.inputs import lmdb as lmdb_kind
from runner.store.manifest import load_manifest
from runner.schema import InputConf

pytestmark = pytest.mark.unit

NAMES = ["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpg"]
LABELS = [3, 1, 4, 1, 5]


def payload(name: str) -> bytes:
    return f"pixels of {name}".encode()


class FakeDecoder:
    """Returns the bytes it was given (or read) as the image: what the reader fed it."""
    missing_reason = "not found"

    def load(self, path):
        with open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8), None

    def load_bytes(self, data):
        return np.frombuffer(data, dtype=np.uint8), None


class FileOnlyDecoder:
    """caffe_io's decoder: it opens files by name only."""
    missing_reason = "not found"

    def load(self, path):
        return None, "unused"


class FakeDatum:
    """A stand-in for caffe_pb2.Datum (pycaffe's), with the fields the reader uses."""

    def ParseFromString(self, raw: bytes):
        d = json.loads(raw)
        self.data, self.float_data = d["data"].encode("latin-1"), []
        self.encoded, self.label = True, d["label"]
        self.channels = self.height = self.width = 0


def make_files(tmp: Path):
    for n in NAMES:
        (tmp / "imgs" / n).parent.mkdir(exist_ok=True)
        (tmp / "imgs" / n).write_bytes(payload(n))
    lst = tmp / "imgs" / "train.txt"
    lst.write_text("".join(f"{n} {lab}\n" for n, lab in zip(NAMES, LABELS)))
    return InputConf(list=str(lst)), [n.encode() for n in NAMES]


def make_lmdb(tmp: Path, monkeypatch):
    import lmdb

    monkeypatch.setattr(lmdb_kind, "_datum_class", lambda: FakeDatum)
    env = lmdb.open(str(tmp / "db"), map_size=1 << 24)
    keys = [f"{i:08d}_{n}".encode() for i, n in enumerate(NAMES)]
    with env.begin(write=True) as txn:
        for k, n, lab in zip(keys, NAMES, LABELS):
            txn.put(k, json.dumps({"data": payload(n).decode("latin-1"), "label": lab}).encode())
    env.close()
    return InputConf(lmdb=str(tmp / "db")), keys


def make_tar(tmp: Path):
    path = tmp / "shard-000000.tar"
    with tarfile.open(path, "w") as tf:
        for n, lab in zip(NAMES, LABELS):
            key = n.rsplit(".", 1)[0]
            for member, data in ((n, payload(n)), (f"{key}.cls", str(lab).encode())):
                ti = tarfile.TarInfo(member)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return InputConf(tar=str(path)), [f"shard-000000.tar/{n.rsplit('.', 1)[0]}".encode() for n in NAMES]


def make(kind: str, tmp: Path, monkeypatch):
    makers = {"files": lambda: make_files(tmp), "lmdb": lambda: make_lmdb(tmp, monkeypatch),
              "tar": lambda: make_tar(tmp)}
    assert kind in makers, f"input kind {kind!r} has no maker here: add one (the same five images)"
    conf, names = makers[kind]()
    return OmegaConf.structured(conf), names


@pytest.mark.parametrize("kind", [k.name for k in inputs.KINDS])
def test_every_kind_lists_and_reads_through_one_interface(kind, tmp_path, monkeypatch):
    ic, names = make(kind, tmp_path, monkeypatch)
    assert inputs.selected(ic).name == kind
    inputs.build_manifest(tmp_path / "run", ic)
    m = load_manifest(tmp_path / "run")
    assert (m.kind, m.count, m.labels) == (kind, 5, True)
    reader = inputs.open_reader(m, FakeDecoder())
    try:
        got = list(reader.items(1, 4))  # a task's slice: entries 1..3 only
        images = [it.job() for it in got]  # in decode threads, before the reader closes
    finally:
        reader.close()
    assert [it.index for it in got] == [1, 2, 3]
    assert [it.name for it in got] == names[1:4]
    assert [it.label for it in got] == LABELS[1:4]
    assert [(img.tobytes(), why) for img, why in images] == [(payload(n), None) for n in NAMES[1:4]]


@pytest.mark.parametrize("kind", [k.name for k in inputs.KINDS])
def test_every_kind_stamps_and_names_what_nodes_read(kind, tmp_path, monkeypatch):
    ic, _ = make(kind, tmp_path, monkeypatch)
    stamp = inputs.input_stamp(ic)
    assert stamp and stamp["mtime_ns"] > 0
    assert stamp == inputs.input_stamp(ic), "stable while nothing changes"
    paths = inputs.node_read_paths(ic)
    assert paths and all(p.is_absolute() and p.exists() for p in paths)
    src = inputs.input_source(ic)
    assert src.startswith(kind if kind != "files" else "list:"), src


@pytest.mark.parametrize("kind", [k.name for k in inputs.KINDS if k.from_memory])
def test_caffe_io_is_refused_for_inputs_decoded_from_memory(kind, tmp_path, monkeypatch):
    ic, _ = make(kind, tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=rf"caffe_io reads image files by name; input.{kind} "):
        inputs.refuse_caffe_io(ic, "caffe_io")
    inputs.refuse_caffe_io(ic, "opencv")
    inputs.build_manifest(tmp_path / "run", ic)
    with pytest.raises(ConfigError, match="use model.preprocess.mode=opencv"):
        inputs.open_reader(load_manifest(tmp_path / "run"), FileOnlyDecoder())


def test_files_kind_takes_caffe_io(tmp_path, monkeypatch):
    ic, _ = make("files", tmp_path, monkeypatch)
    inputs.refuse_caffe_io(ic, "caffe_io")


def test_node_read_paths_cover_root_list_folder_and_every_tar(tmp_path):
    """What a node must read: the list, its folder and input.root; the tars' folder (what the
    Slurm check left out before)."""
    ic = OmegaConf.structured(InputConf(list=str(tmp_path / "l" / "train.txt"), root=str(tmp_path / "data")))
    assert inputs.node_read_paths(ic) == [tmp_path / "l" / "train.txt", tmp_path / "l", tmp_path / "data"]
    ic = OmegaConf.structured(InputConf(tar="~/shards/part-{000..009}.tar"))
    assert inputs.node_read_paths(ic) == [Path(os.path.expanduser("~/shards"))]
    ic = OmegaConf.structured(InputConf(tar=str(tmp_path / "web" / "*.tar")))
    (tmp_path / "web").mkdir()
    assert inputs.node_read_paths(ic) == [tmp_path / "web"]


def test_exactly_one_input_is_asked_for_naming_every_kind(tmp_path):
    with pytest.raises(ConfigError) as e:
        inputs.selected(OmegaConf.structured(InputConf(dir="/a", lmdb="/b")))
    msg = str(e.value)
    assert msg.startswith("give exactly one of input.dir=DIR") and msg.endswith("; got input.dir, input.lmdb")
    for k in inputs.KINDS:
        for f in k.fields:
            assert f"input.{f}=" in msg
    assert " or input.tar=GLOB (tar shards)" in msg
