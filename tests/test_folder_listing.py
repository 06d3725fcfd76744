"""Folder input leaves nothing out without a word (issue 20, item 2): what the listing skips is
counted by reason and kept in the run; symlinked folders are followed once each (loops
skipped); HEIC/HEIF and AVIF photos, encoded here from the real sample photos, are listed by
default and decoded."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner.schema import IMAGE_EXTENSIONS, InputConf

pytestmark = pytest.mark.unit


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _walk(root, **kw):
    from runner.inputs.listing import walk_images

    return walk_images(os.fsencode(root), kw.pop("extensions", IMAGE_EXTENSIONS), **kw)


def test_skipped_files_are_counted_by_extension_and_kind(tmp_path):
    from runner.inputs.listing import describe

    _touch(tmp_path / "a.jpg")
    for i in range(3):
        _touch(tmp_path / "raw" / f"{i}.jp2")
    for i in range(2):
        _touch(tmp_path / f"{i}.CR2")
    _touch(tmp_path / "README")
    os.mkfifo(tmp_path / "pipe.jpg")
    lst = _walk(tmp_path)
    assert lst.names == [b"a.jpg"]
    assert lst.by_extension == {".jp2": 3, ".cr2": 2, "(no extension)": 1} and lst.by_kind == {"FIFO": 1}
    assert describe(lst.record()) == ("8 files seen, 1 listed, 7 skipped: 3 .jp2, 2 .cr2, 1 (no extension) "
                                      "(not in input.extensions); 1 FIFO")


def test_symlinked_folders_are_followed_each_real_file_once(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "elsewhere"
    _touch(root / "a.jpg")
    _touch(root / "sub" / "b.jpg")
    _touch(outside / "c.jpg")
    _touch(outside / "deeper" / "d.jpg")
    os.symlink(outside, root / "linked")          # a folder elsewhere: followed
    os.symlink(outside, root / "linked_again")    # a second link to it: once only
    os.symlink(root, root / "sub" / "loop")       # a loop back to the root: skipped
    os.symlink(outside / "deeper", root / "a_deeper")  # sorts first: a part of the linked folder
    os.symlink(root / "a.jpg", root / "alias.jpg")     # a file symlink is a name of its own
    lst = _walk(root)
    assert lst.names == [b"a.jpg", b"a_deeper/d.jpg", b"alias.jpg", b"linked/c.jpg", b"sub/b.jpg"], lst.names
    assert lst.by_kind == {"symlinked folder already listed (a loop, or a second link to it)": 3}
    reals = [os.path.realpath(os.path.join(root, n.decode())) for n in lst.names if n != b"alias.jpg"]
    assert len(reals) == len(set(reals)), "each real file once"


def test_follow_symlinks_false_skips_symlinks_and_says_so(tmp_path):
    root = tmp_path / "in"
    _touch(root / "a.jpg")
    _touch(tmp_path / "out" / "c.jpg")
    os.symlink(tmp_path / "out", root / "linked")
    os.symlink(root / "a.jpg", root / "alias.jpg")
    lst = _walk(root, follow_symlinks=False)
    assert lst.names == [b"a.jpg"] and lst.by_kind == {"symlink (input.follow_symlinks=false)": 2}


def test_broken_symlinks_with_an_image_extension_are_listed(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    assert _walk(tmp_path).names == [b"broken.jpg"]  # recorded as a failure by the run


def test_listing_is_recorded_in_the_manifest_and_the_input_stamp_counts_alike(tmp_path):
    from runner.inputs import build_manifest, input_stamp
    from runner.store.manifest import load_manifest

    root = tmp_path / "in"
    _touch(root / "a.jpg")
    _touch(root / "b.jp2")
    _touch(tmp_path / "out" / "c.jpg")
    os.symlink(tmp_path / "out", root / "linked")
    cfg = OmegaConf.structured(InputConf(dir=str(root)))
    m = build_manifest(tmp_path / "run", cfg)
    assert m.count == 2 and load_manifest(tmp_path / "run").listing == {
        "seen": 3, "listed": 2, "skipped": 1, "skipped_by_extension": {".jp2": 1}, "skipped_by_kind": {}}
    assert input_stamp(cfg)["count"] == 2  # a resume does not take the symlinked folder for a change


def test_a_folder_of_only_skipped_files_says_what_it_saw(tmp_path):
    from runner.errors import ConfigError
    from runner.inputs import build_manifest

    for i in range(3):
        _touch(tmp_path / "in" / f"{i}.jp2")
    with pytest.raises(ConfigError, match=r"3 files seen, 0 listed, 3 skipped: 3 .jp2 \(not in input.extensions\)"):
        build_manifest(tmp_path / "run", OmegaConf.structured(InputConf(dir=str(tmp_path / "in"))))


# ---- HEIC/HEIF and AVIF: encoded here from the real sample photos --------------------------

def _encoded(photos, fmt, name="rocket.jpg", orientation=None):
    import pillow_heif
    from PIL import Image

    src = Image.open(photos / name).convert("RGB")
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    if fmt == "HEIF" and not orientation:
        # pillow-heif's own writer, no Pillow plug-in registered: the decoder must register it
        pillow_heif.from_pillow(src).save(buf, quality=90)
    else:
        if fmt == "HEIF":  # Pillow's save turns the EXIF orientation into HEIF's irot, as phones write it
            pillow_heif.register_heif_opener()
        src.save(buf, format=fmt, quality=90, **kw)
    return buf.getvalue()


def test_heic_heif_avif_are_default_extensions():
    assert {"heic", "heif", "avif"} <= set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heif_and_avif_decode_like_the_jpeg_they_were_made_from(photos, fmt):
    from runner.engine.decode import Decoder, Geometry

    d = Decoder(Geometry((64, 64)))
    ref = d.decode(_encoded(photos, "JPEG"))
    img = d.decode(_encoded(photos, fmt))
    assert img.shape == ref.shape and img.dtype == np.uint8
    assert np.abs(img.astype(int) - ref).mean() < 4, "lossy, but the same picture"
    # rotated as the JPEG with the same EXIF orientation is (OpenCV's AVIF reader would ignore it)
    ref6 = d.decode(_encoded(photos, "JPEG", orientation=6))
    img6 = d.decode(_encoded(photos, fmt, orientation=6))
    assert img6.shape == ref6.shape == (ref.shape[1], ref.shape[0], 3)
    assert np.abs(img6.astype(int) - ref6).mean() < 4


def test_heic_decodes_in_a_fresh_process(photos, tmp_path):
    """runner.engine.decode registers pillow-heif itself: in a task process nothing else may have
    (scikit-image's imageio registers it as a side effect, which hid this in-process)."""
    import subprocess
    import sys

    from conftest import REPO

    heic = tmp_path / "photo.heic"
    heic.write_bytes(_encoded(photos, "HEIF"))
    code = ("import sys; from runner.engine.decode import Decoder, Geometry; "
            "img, why = Decoder(Geometry((32, 32))).load(sys.argv[1].encode()); print(why or img.shape)")
    p = subprocess.run([sys.executable, "-c", code, str(heic)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.stdout.strip() == "(32, 32, 3)", p.stdout + p.stderr


def test_jpegs_decode_without_pillow_heif(photos):
    """A venv made before pillow-heif was a dependency (an older GPU venv) must still decode
    JPEGs: the HEIF plug-in is optional to everything but HEIC files."""
    import subprocess
    import sys

    from conftest import REPO

    jpg = next(photos.rglob("*.jpg"))
    code = ("import sys; sys.modules['pillow_heif'] = None; from runner.engine.decode import Decoder, Geometry; "
            "img, why = Decoder(Geometry((32, 32))).load(sys.argv[1].encode()); print(why or img.shape)")
    p = subprocess.run([sys.executable, "-c", code, str(jpg)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.stdout.strip() == "(32, 32, 3)", p.stdout + p.stderr
