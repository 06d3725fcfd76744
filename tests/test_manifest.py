"""Listing the input once: recursion, extensions, sorting, list files, slices."""
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner.schema import InputConf
from runner.errors import ConfigError
from runner.inputs import build_manifest
from runner.inputs.files import list_dir, read_list
from runner.store.manifest import iter_names, load_manifest

pytestmark = pytest.mark.unit


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_list_dir_recursive_sorted_by_extension(tmp_path):
    for rel in ["b.jpg", "a/c.JPEG", "a/b/d.png", "z.txt", "a/e.gif", "noext", "a/.hidden.jpg"]:
        _touch(tmp_path / rel)
    os.symlink("missing.jpg", tmp_path / "broken.jpg")
    os.symlink(tmp_path / "a", tmp_path / "linkdir")  # not descended: no loops, no doubles
    names = list_dir(os.fsencode(tmp_path), ["jpg", "jpeg", "png", "gif"])
    assert names == sorted(names)
    assert names == [b"a/.hidden.jpg", b"a/b/d.png", b"a/c.JPEG", b"a/e.gif", b"b.jpg", b"broken.jpg"]


def test_list_dir_keeps_odd_names(tmp_path):
    odd = [b"with space.jpg", b"quote'\".jpg", b"new\nline.jpg", "caf\u00e9.jpg".encode(), b"bad\xff\xfe.jpg"]
    for n in odd:
        _touch(tmp_path / os.fsdecode(n))
    assert list_dir(os.fsencode(tmp_path), ["jpg"]) == sorted(odd)


def test_read_list_keeps_order_relative_absolute_and_nul(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"# comment\nb.jpg\n\n" + os.fsencode(tmp_path) + b"/a.jpg\n/elsewhere/x.jpg\r\n")
    root, names, labels = read_list(os.fsencode(lst), None)
    assert root == os.fsencode(tmp_path)
    assert names == [b"b.jpg", b"a.jpg", b"/elsewhere/x.jpg"] and labels is None  # the list's order
    nul = tmp_path / "list0"
    nul.write_bytes(b"x\ny.jpg\0a.jpg\0")
    _, names, labels = read_list(os.fsencode(nul), b"/data")
    assert names == [b"x\ny.jpg", b"a.jpg"] and labels is None


def test_read_list_caffe_labels(tmp_path):
    """Caffe's "path label" lines: split at the last blank (paths may hold spaces)."""
    lst = tmp_path / "train.txt"
    lst.write_bytes(b"z/b.jpg 3\nmy photo 2019.jpg 0\na.jpg\t-1\nIMG 2019 7\n")
    _, names, labels = read_list(os.fsencode(lst), None)
    assert names == [b"z/b.jpg", b"my photo 2019.jpg", b"a.jpg", b"IMG 2019"]
    assert labels == [3, 0, -1, 7]
    # "no": every whole line is a path
    _, names, labels = read_list(os.fsencode(lst), None, "no")
    assert names[1] == b"my photo 2019.jpg 0" and labels is None
    # a mix is ambiguous: say which lines differ and how to decide
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"a.jpg 1\nb.jpg\n")
    with pytest.raises(ConfigError, match=r"line 1.*line 2.*input.list_labels=no"):
        read_list(os.fsencode(mixed), None)
    with pytest.raises(ConfigError, match=r"line 2: b'b.jpg' does not end with an integer label"):
        read_list(os.fsencode(mixed), None, "yes")
    _, names, labels = read_list(os.fsencode(mixed), None, "no")
    assert names == [b"a.jpg 1", b"b.jpg"]


def test_manifest_stores_labels_in_list_order(tmp_path):
    lst = tmp_path / "val.txt"
    lst.write_text("c.jpg 2\na.jpg 0\nb b.jpg 1\n")
    for n in ("c.jpg", "a.jpg", "b b.jpg"):  # listed paths must mostly exist (a wrong root is refused)
        _touch(tmp_path / n)
    m = build_manifest(tmp_path / "run", OmegaConf.structured(InputConf(list=str(lst))))
    m = load_manifest(tmp_path / "run")
    assert m.labels and m.origin == "list"
    assert m.read_slice(0, 3) == [b"c.jpg", b"a.jpg", b"b b.jpg"]
    assert m.read_labels(1, 3).tolist() == [0, 1]


def test_manifest_roundtrip_and_slices(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(50):
        _touch(imgs / f"d{i % 3}" / f"{i:03d}.jpg")
    cfg = OmegaConf.structured(InputConf(dir=str(imgs)))
    m = build_manifest(tmp_path / "run", cfg)
    assert m.count == 50
    m2 = load_manifest(tmp_path / "run")
    allnames = list(iter_names(m2, chunk=7))
    assert allnames == sorted(allnames) and len(allnames) == 50
    assert m2.read_slice(10, 17) == allnames[10:17]
    assert m2.read_slice(5, 5) == []
    assert os.path.exists(m2.path_of(allnames[0]))
    offsets = np.load(tmp_path / "run" / "manifest" / "offsets.npy")
    assert offsets[0] == 0 and len(offsets) == 51


def test_manifest_errors(tmp_path):
    with pytest.raises(ConfigError, match="is not a directory"):
        build_manifest(tmp_path / "r", OmegaConf.structured(InputConf(dir=str(tmp_path / "nope"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        build_manifest(tmp_path / "r", OmegaConf.structured(InputConf(dir=str(tmp_path / "empty"))))
    with pytest.raises(ConfigError, match="exactly one of"):
        build_manifest(tmp_path / "r", OmegaConf.structured(InputConf()))
    lst = tmp_path / "dup.txt"
    lst.write_text("a.jpg\na.jpg\n")
    with pytest.raises(ConfigError, match="more than once"):
        build_manifest(tmp_path / "r", OmegaConf.structured(InputConf(list=str(lst))))
    with pytest.raises(ConfigError, match="does not exist"):
        build_manifest(tmp_path / "r", OmegaConf.structured(InputConf(list=str(tmp_path / "none.txt"))))
