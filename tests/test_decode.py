"""Decoding each case of the corpus, without Caffe: failures carry a short reason, odd formats
decode to the right pixels."""
import os

import cv2
import numpy as np
import pytest

from corpus import make_corpus
from runner.engine.decode import Decoder, Geometry

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def _dec(exif=True, max_pixels=178956970):
    # a geometry that keeps the decoded size visible: no resize needed for the checks below
    return Decoder(Geometry((48, 64)), exif_orientation=exif, max_pixels=max_pixels)


def test_every_case_as_expected(corpus):
    root, expect = corpus
    d = _dec()
    for name, want in expect.items():
        img, why = d.load(os.path.join(os.fsencode(root), name))
        if want == "ok":
            assert why is None and img.shape == (48, 64, 3) and img.dtype == np.uint8, (name, why)
        else:
            assert img is None and why and want.lower() in why.lower(), (name, why)


def _raw(root, rel, **kw):
    d = _dec(**kw)
    return d.decode(d.read(os.path.join(os.fsencode(root), rel)))


def test_pixels_of_odd_formats(corpus):
    root, _ = corpus
    ref = cv2.imread(str(root / "formats/photo.tiff"))  # lossless reference, BGR
    np.testing.assert_allclose(_raw(root, b"formats/deep16.png"), ref, atol=1)       # 16 bit -> 8 bit
    np.testing.assert_array_equal(_raw(root, b"formats/alpha.png"), ref)             # colour kept, alpha dropped
    assert np.abs(_raw(root, b"formats/cmyk.jpg").astype(int) - ref).mean() < 6      # CMYK converted
    assert np.abs(_raw(root, b"formats/photo.webp").astype(int) - ref).mean() < 6
    assert np.abs(_raw(root, b"formats/palette.png").astype(int) - ref).mean() < 12
    gray = _raw(root, b"formats/gray.jpg")
    assert gray.shape == ref.shape and np.array_equal(gray[..., 0], gray[..., 2])
    gif = _raw(root, b"formats/anim.gif")
    assert gif.shape == (48, 64, 3) and gif[..., 2].mean() > 200 and gif[..., 0].mean() < 50  # first frame: red


def test_exif_orientation_option(corpus):
    root, _ = corpus
    assert _raw(root, b"formats/rotated.jpg").shape[:2] == (128, 96)               # applied (the default)
    assert _raw(root, b"formats/rotated.jpg", exif=False).shape[:2] == (96, 128)   # ignored


def test_bomb_limit_is_configurable(corpus):
    root, _ = corpus
    img, why = _dec(max_pixels=10_000).load(os.path.join(os.fsencode(root), b"good/astronaut.jpg"))
    assert img is None and "decode.max_pixels=10000" in why


def test_non_utf8_name_reads(corpus):
    root, _ = corpus
    img, why = _dec().load(os.path.join(os.fsencode(root), b"odd/latin1-\xe9t\xe9.jpg"))
    assert why is None
