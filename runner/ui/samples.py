"""Real photos for the demo, tests and benchmarks: scikit-image ships them (no download).

  python -m runner.ui.samples DIR              the sample photos as JPEG/PNG
  python -m runner.ui.samples DIR --count N    N distinct photo-sized JPEGs made from them
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List

import numpy as np

from ..store.atomic import commit

# photos in the scikit-image wheel itself (others need a download)
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "camera", "coins", "clock", "moon", "page", "brick", "grass", "gravel", "text"]


def _photo(name: str) -> np.ndarray:
    """RGB or grayscale uint8."""
    import skimage.data

    return getattr(skimage.data, name)()


def _write(path: Path, img: np.ndarray, quality: int = 92) -> None:
    import cv2

    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"cannot write {path}")


def write_samples(out: Path) -> List[Path]:
    """The bundled sample photos (JPEG; the logo as PNG with alpha; the stereo pair in a subfolder)."""
    import skimage.data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        p = out / f"{name}.jpg"
        if not p.exists():
            _write(p, _photo(name))
        paths.append(p)
    (out / "stereo").mkdir(exist_ok=True)
    left, right, _ = skimage.data.stereo_motorcycle()
    for side, img in (("left", left), ("right", right)):
        p = out / "stereo" / f"motorcycle_{side}.jpg"
        if not p.exists():
            _write(p, img)
        paths.append(p)
    p = out / "logo.png"
    if not p.exists():
        _write(p, skimage.data.logo())
    paths.append(p)
    return sorted(paths)


def write_corpus(out: Path, count: int, seed: int = 0, min_wh=(500, 375), max_wh=(1600, 1200),
                 quality: int = 90, subdirs: int = 10) -> List[Path]:
    """`count` distinct photo-sized colour JPEGs: random crops, flips, scales and colour shifts
    of the real photos, in `subdirs` folders."""
    import cv2

    rng = np.random.default_rng(seed)
    sources = []
    for name in PHOTOS:
        img = _photo(name)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        sources.append(img)
    out = Path(out)
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = src[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        tw = int(rng.integers(min_wh[0], max_wh[0] + 1))
        th = int(np.clip(tw * rng.uniform(0.66, 0.8), min_wh[1], max_wh[1]))
        img = cv2.resize(np.ascontiguousarray(img), (tw, th), interpolation=cv2.INTER_CUBIC)
        gain = rng.uniform(0.8, 1.2, size=3)
        img = np.clip(img.astype(np.float32) * gain + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
        d = out / f"part{i % subdirs:02d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img{i:06d}.jpg"
        _write(p, img, quality)
        paths.append(p)
    return paths


CAMERA_VERSION = 1  # bump when write_camera_photo changes what it writes (cached sets are keyed by it)


def write_camera_photo(path: Path, index: int, seed: int = 0, wh=(4000, 3000), noise_sigma: float = 3.0,
                       quality: int = 90) -> Path:
    """A 12-MP JPEG with a phone photo's entropy (about 2.2 MB at the defaults): a real photo,
    cropped and upscaled, plus sensor-like noise (per-pixel luminance noise and weaker chroma
    noise at half resolution, as demosaicing correlates it). A plain upscale would compress to a
    few hundred KB and decode faster than a real camera file. Deterministic in (seed, index)."""
    import cv2

    rng = np.random.default_rng([seed, index])
    src = _photo(PHOTOS[index % 4])  # astronaut, chelsea, coffee, rocket: colour photos
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = np.ascontiguousarray(src[y:y + ch, x:x + cw, ::-1])  # BGR
    if rng.random() < 0.5:
        img = np.ascontiguousarray(img[:, ::-1])
    tw, th = wh
    big = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big *= rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    chroma = cv2.resize(rng.standard_normal((th // 2, tw // 2, 3), dtype=np.float32), (tw, th),
                        interpolation=cv2.INTER_LINEAR)
    big += noise_sigma * rng.standard_normal((th, tw, 1), dtype=np.float32) + (0.5 * noise_sigma) * chroma
    out = np.clip(big, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.jpg")
    if not cv2.imwrite(str(tmp), out, [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"cannot write {tmp}")
    # a killed generation never leaves a half-written photo under the final name; not fsync'd:
    # benchmarks make thousands in a row (an fsync costs ~10 ms here) and these are generated
    # test photos, not a run's state
    commit(tmp, path, durable=False)
    return path


def camera_photos(out: Path, count: int, seed: int = 0) -> List[Path]:
    """`count` camera photos in `out` (a cache: photos already there are kept, only missing ones
    are made, so a larger set extends a smaller one)."""
    out = Path(out)
    paths = []
    for i in range(count):
        p = out / f"cam{i:05d}.jpg"
        if not p.exists():
            write_camera_photo(p, i, seed)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m runner.ui.samples")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=0, help="make N photo-sized JPEGs instead of the samples")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    paths = write_corpus(Path(a.out), a.count, a.seed) if a.count else write_samples(Path(a.out))
    print(f"{len(paths)} images in {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
