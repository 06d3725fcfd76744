"""A corpus of real-world trouble mixed among good photos: every case the 'Nothing lost'
issue names, made here from the scikit-image photos. make_corpus returns, per file name
(bytes, relative), either "ok" or a substring of the reason it must be recorded with."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import cv2
import numpy as np
from PIL import Image

from runner.ui.samples import write_samples


def _rgb(name="astronaut", size=(96, 128)):
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def make_corpus(root: Path) -> Dict[bytes, str]:
    root = Path(root)
    expect: Dict[bytes, str] = {}
    good = root / "good"
    for p in write_samples(good):
        expect[os.fsencode(p.relative_to(root))] = "ok"
    rgb = _rgb()
    odd = root / "odd"
    odd.mkdir(parents=True, exist_ok=True)

    def put(rel: str, data: bytes, what: str):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[os.fsencode(rel)] = what

    # --- failures, each with its reason
    put("bad/empty.jpg", b"", "empty file")
    jpeg = (good / "astronaut.jpg").read_bytes()
    put("bad/truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    put("bad/text.jpg", b"this is not an image, just some notes\n" * 10, "not an image")
    put("bad/page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML")
    put("bad/random.png", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "unsupported")
    png = (odd / "x.png")
    _save(png, Image.fromarray(rgb), "PNG")
    put("bad/truncated.png", png.read_bytes()[:300], "truncated")
    png.unlink()
    # a 20000 x 20000 black PNG is a few hundred KB compressed and 1.2 GB decoded
    big = np.zeros((20000, 20000), np.uint8)
    ok, enc = cv2.imencode(".png", big, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    del big
    put("bad/bomb.png", enc.tobytes(), "too large")
    os.symlink("does-not-exist.jpg", root / "bad" / "broken-link.jpg")
    expect[b"bad/broken-link.jpg"] = "broken symlink"
    # --- decoded correctly
    _save(root / "formats/gray.jpg", Image.fromarray(rgb).convert("L"), "JPEG", quality=95)
    _save(root / "formats/cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    _save(root / "formats/alpha.png", Image.fromarray(rgba, "RGBA"), "PNG")
    cv2.imwrite(str(root / "formats/deep16.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    _save(root / "formats/palette.png", Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE), "PNG")
    f1 = Image.new("RGB", (64, 48), (255, 0, 0))
    f2 = Image.new("RGB", (64, 48), (0, 0, 255))
    f1.save(root / "formats/anim.gif", save_all=True, append_images=[f2], duration=100, loop=0)
    _save(root / "formats/photo.webp", Image.fromarray(rgb), "WEBP", quality=90)
    _save(root / "formats/photo.tiff", Image.fromarray(rgb), "TIFF")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    _save(root / "formats/rotated.jpg", Image.fromarray(rgb), "JPEG", quality=95, exif=exif.tobytes())
    for n in ("gray.jpg", "cmyk.jpg", "alpha.png", "deep16.png", "palette.png", "anim.gif", "photo.webp",
              "photo.tiff", "rotated.jpg"):
        expect[os.fsencode(f"formats/{n}")] = "ok"
    # --- names that must round-trip
    names = [b"with space.jpg", b"quote'\"s.jpg", b"new\nline.jpg", "caf\u00e9 \u65e5\u672c.jpg".encode(),
             b"latin1-\xe9t\xe9.jpg"]
    for n in names:
        (odd / os.fsdecode(n)).write_bytes(jpeg)
        expect[b"odd/" + n] = "ok"
    return expect

