"""Issue 29, items 1-15 ("what a new user trips over"), checked in-process on the functions that
make the decision (the fast layer: no pycaffe, no cluster). The end-to-end halves are in
test_third_contact_e2e.py."""
from __future__ import annotations

import os

import pytest

from runner.errors import ConfigError

pytestmark = pytest.mark.unit


def _list_cfg(**kw):
    from omegaconf import OmegaConf

    from runner.schema import InputConf

    return OmegaConf.structured(InputConf(**kw))


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"\xff\xd8 not decoded here")


# ---- item 1: a run directory inside its own input is left out of it ----------------------

@pytest.mark.parametrize("marker", ["launch.lock", "run.json", "sweep.json"])
def test_a_run_or_sweep_folder_inside_the_input_is_left_out_and_counted(tmp_path, marker):
    from runner.inputs.listing import KIND_RUN_FOLDER, describe, walk_images

    _images(tmp_path / "in", ["a.jpg", "sub/b.jpg"])
    run = tmp_path / "in" / "run"
    _images(run / "shards", ["x.jpg"])  # an image-looking file inside: still not input
    (run / marker).write_text("")
    listing = walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert listing.names == [b"a.jpg", b"sub/b.jpg"]
    assert listing.by_kind == {KIND_RUN_FOLDER: 1}
    assert "1 caffe-runner run or sweep folder (output.dir is never part of the input)" in describe(listing.record())


def test_the_input_stamp_ignores_what_a_run_inside_it_writes(tmp_path):
    import time

    from runner.inputs import input_stamp

    _images(tmp_path / "in", ["a.jpg", "b.jpg"])
    run = tmp_path / "in" / "run"
    run.mkdir()
    (run / "launch.lock").write_text("")
    ic = _list_cfg(dir=str(tmp_path / "in"))
    before = input_stamp(ic)
    time.sleep(0.01)  # mtimes must be able to differ (ns clocks): a write below must not count
    (run / "shards").mkdir()
    (run / "shards" / "shard-00000-of-00001.h5").write_bytes(b"x")
    (run / "status").mkdir()
    assert input_stamp(ic) == before


def test_a_symlinked_run_folder_is_left_out_too(tmp_path):
    from runner.inputs.listing import KIND_RUN_FOLDER, walk_images

    _images(tmp_path / "in", ["a.jpg"])
    _images(tmp_path / "elsewhere", ["r.jpg"])
    (tmp_path / "elsewhere" / "run.json").write_text("{}")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere")
    listing = walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert listing.names == [b"a.jpg"] and listing.by_kind == {KIND_RUN_FOLDER: 1}


# ---- item 2: a UTF-8 byte-order mark is not part of the first path ------------------------

def test_a_list_with_a_utf8_bom_keeps_its_first_image(tmp_path):
    from runner.inputs import build_manifest

    _images(tmp_path / "imgs", ["img_0000.jpg", "img_0001.jpg"])
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfimgs/img_0000.jpg\r\nimgs/img_0001.jpg\r\n")
    m = build_manifest(tmp_path / "run", _list_cfg(list=str(tmp_path / "l.txt")))
    assert m.read_slice(0, 2) == [b"imgs/img_0000.jpg", b"imgs/img_0001.jpg"]


def test_a_labelled_list_with_a_bom_reads_its_first_label(tmp_path):
    from runner.inputs.files import read_list

    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfa.jpg 3\nb.jpg 4\n")
    _, names, labels = read_list(os.fsencode(tmp_path / "l.txt"), None)
    assert names == [b"a.jpg", b"b.jpg"] and labels == [3, 4]


def test_a_utf16_list_is_refused_with_the_fix(tmp_path):
    from runner.inputs.files import read_list

    (tmp_path / "l.txt").write_bytes("a.jpg\nb.jpg\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="UTF-16.*save it as UTF-8"):
        read_list(os.fsencode(tmp_path / "l.txt"), None)


# ---- item 3: one file spelled two ways is a duplicate --------------------------------------

@pytest.mark.parametrize("first,second", [("imgs/img_0001.jpg", "imgs/./img_0001.jpg"),
                                          ("imgs/sub/../img_0002.jpg", "imgs/img_0002.jpg"),
                                          ("imgs//img_0001.jpg", "imgs/img_0001.jpg"),
                                          ("imgs/img_0001.jpg", "{root}/imgs/./img_0001.jpg")])
def test_two_spellings_of_one_listed_path_are_refused_naming_both(tmp_path, first, second):
    from runner.inputs import build_manifest

    _images(tmp_path / "imgs", ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg", "sub/x.jpg"])
    second = second.format(root=tmp_path)
    (tmp_path / "l.txt").write_text(f"imgs/img_0000.jpg\n{first}\n{second}\n")
    with pytest.raises(ConfigError) as e:
        build_manifest(tmp_path / "run", _list_cfg(list=str(tmp_path / "l.txt")))
    msg = str(e.value)
    assert "names 1 image(s) more than once" in msg and "line 2" in msg and "line 3" in msg, msg
    assert "the same file" in msg and "spelled differently" in msg, msg


def test_a_symlink_to_a_listed_file_is_its_own_image(tmp_path):
    from runner.inputs import build_manifest

    _images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "imgs" / "link.jpg").symlink_to(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "l.txt").write_text("imgs/a.jpg\nimgs/b.jpg\nimgs/link.jpg\n")
    assert build_manifest(tmp_path / "run", _list_cfg(list=str(tmp_path / "l.txt"))).count == 3


# ---- item 15: a symlinked folder that cannot be read is counted, with the reason ----------

def test_a_symlinked_folder_whose_stat_fails_is_counted_as_skipped(tmp_path, monkeypatch):
    """The folder is there when the walk meets the link and gone when its turn comes (a
    network mount dropping, a target deleted meanwhile); the stat is made to fail on cue:
    the file system cannot be timed to fail between two calls of one walk."""
    from runner.inputs import listing

    _images(tmp_path / "in", ["a.jpg"])
    _images(tmp_path / "target", ["t.jpg"])
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "target")
    real_stat = os.stat

    def stat(path, *a, **kw):
        if os.fsdecode(path).endswith("/linked"):
            raise OSError(5, "Input/output error")
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(listing.os, "stat", stat)
    out = listing.walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert out.names == [b"a.jpg"]
    assert out.by_kind == {f"{listing.KIND_UNREADABLE} (Input/output error)": 1}
    assert out.skipped == 1
