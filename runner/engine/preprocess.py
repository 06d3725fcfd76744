"""Pixels -> net input: the model's preprocessing, vectorised per batch.

Two semantics, chosen by model.preprocess.mode:
- "opencv" (default): OpenCV decode, cv2.resize on uint8, then float (Caffe's C++ data layer
  and cv2.dnn.blobFromImage). Images arrive as uint8 BGR in 0..255.
- "caffe_io": caffe.io.load_image (scikit-image, RGB float in [0, 1]) and
  caffe.io.Transformer's resize (caffe.io.resize_image), for users moving from pycaffe
  scripts. Images arrive as float32 RGB in 0..1.
Then the same steps as caffe.io.Transformer.preprocess: channel order, raw scale, mean,
input scale, NCHW.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .decode import MB, Geometry, center_crop, not_regular


def load_mean_file(path: str) -> np.ndarray:
    """Mean image as float32 C x H x W from .npy or Caffe .binaryproto."""
    if path.endswith(".npy"):
        arr = np.load(path)
    else:
        from caffe.proto import caffe_pb2

        blob = caffe_pb2.BlobProto()
        with open(path, "rb") as f:
            blob.ParseFromString(f.read())
        if blob.HasField("shape") and len(blob.shape.dim):
            shape = tuple(blob.shape.dim)
        else:
            shape = (blob.num, blob.channels, blob.height, blob.width)
        arr = np.asarray(blob.data, dtype=np.float32).reshape(shape)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim == 1:
        arr = arr[:, None, None]
    if arr.ndim != 3:
        raise ValueError(f"mean file {path} has shape {arr.shape}; expected C x H x W")
    return arr


def fit_mean(mean_img: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A mean image of the pre-crop size gets the same centre crop as the images (Caffe's data
    layer); of the input size it is used as is; of any other size, its per-channel mean
    (what most pycaffe scripts do: mean.mean(1).mean(1))."""
    c, h, w = mean_img.shape
    ih, iw = geometry.input_hw
    if (h, w) == (ih, iw):
        return mean_img
    if geometry.resize == "stretch":
        rh, rw = geometry.resized_hw(ih, iw)
        if (h, w) == (rh, rw):
            y, x = (h - ih) // 2, (w - iw) // 2
            return mean_img[:, y:y + ih, x:x + iw]
    return mean_img.reshape(c, -1).mean(axis=1)


@dataclass
class Transform:
    """N x H x W x 3 images (source order, 0..source_max) -> float32 N x C x H x W net input."""
    swap_channels: bool = False        # source order differs from the net's
    scale_in: float = 1.0              # raw_scale / source_max
    mean: Optional[np.ndarray] = None  # C, or C x H x W, in the net's channel order
    scale: float = 1.0
    source_max: float = 255.0          # the decoded pixels' range is 0..source_max

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float32)
        if self.swap_channels:
            x = x[..., ::-1]
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        if self.scale_in != 1.0:
            x *= np.float32(self.scale_in)
        if self.mean is not None:
            x -= self.mean if self.mean.ndim == 3 else self.mean[:, None, None]
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        return x


def make_transform(pp, geometry: Geometry, channels: int = 3) -> Transform:
    order = pp.channel_order.upper()
    if order not in ("BGR", "RGB"):
        raise ValueError(f"model.preprocess.channel_order must be BGR or RGB, got {pp.channel_order!r}")
    source_order, source_max = ("RGB", 1.0) if pp.mode == "caffe_io" else ("BGR", 255.0)
    mean = None
    if pp.mean_file:
        mean = fit_mean(load_mean_file(pp.mean_file), geometry)
    elif pp.mean is not None:
        mean = np.asarray(list(pp.mean), dtype=np.float32)
        if mean.shape != (channels,):
            raise ValueError(f"model.preprocess.mean has {mean.size} values; the net takes {channels} channels")
    return Transform(order != source_order, float(pp.raw_scale) / source_max, mean, float(pp.scale), source_max)


class CaffeIODecoder:
    """preprocess.mode=caffe_io: caffe.io.load_image, then caffe.io.resize_image to the
    resize size and a centre crop (caffe.io.Transformer resizes straight to the input size
    when no resize_size is set)."""

    def __init__(self, geometry: Geometry, crop: bool = True, max_file_mb: float = 256.0,
                 follow_symlinks: bool = True):
        self.geometry = geometry
        self.crop = crop
        self.max_file_bytes = int(float(max_file_mb) * MB)
        self.max_file_mb = float(max_file_mb)
        self.follow_symlinks = follow_symlinks

    def _unreadable(self, path: bytes) -> Optional[str]:
        """caffe.io opens the path itself: what decode.max_file_mb, a file that is not a regular
        one or input.follow_symlinks=false refuse, checked first (by stat)."""
        import os

        try:
            st = os.stat(path, follow_symlinks=self.follow_symlinks)
        except OSError:
            return None  # caffe.io says why
        if stat.S_ISLNK(st.st_mode):
            return "a symlink, not followed (input.follow_symlinks=false; it was swapped in after the listing?)"
        what = not_regular(st.st_mode)
        if what:
            return "is a directory" if what == "a directory" else f"not a regular file: {what}"
        if st.st_size > self.max_file_bytes:
            return (f"too large: {st.st_size} bytes > decode.max_file_mb={self.max_file_mb:g} "
                    f"({self.max_file_bytes} bytes; raise it for larger files)")
        return None

    def load(self, path: bytes) -> Tuple[Optional[np.ndarray], Optional[str]]:
        import os

        import caffe.io

        why = self._unreadable(path)
        if why:
            return None, why
        try:
            img = caffe.io.load_image(os.fsdecode(path))
        except FileNotFoundError:
            return None, getattr(self, "missing_reason", "file not found")
        except Exception as e:
            return None, f"cannot decode ({type(e).__name__}: {str(e)[:160]})"
        h, w = img.shape[:2]
        rh, rw = self.geometry.resized_hw(h, w)
        if (h, w) != (rh, rw):
            img = caffe.io.resize_image(img, (rh, rw))
        return (center_crop(img, self.geometry.input_hw) if self.crop else img), None


def oversample(images: np.ndarray, crop_hw: Tuple[int, int]) -> np.ndarray:
    """N x H x W x C -> 10N crops (4 corners, centre, then their mirrors), as caffe.io.oversample."""
    n, h, w = images.shape[:3]
    ch, cw = crop_hw
    cy, cx = h / 2.0, w / 2.0
    boxes = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (int(cy - ch / 2.0), int(cx - cw / 2.0))]
    out = np.empty((n, 10, ch, cw) + images.shape[3:], dtype=images.dtype)
    for k, (y, x) in enumerate(boxes):
        out[:, k] = images[:, y:y + ch, x:x + cw]
    out[:, 5:] = out[:, :5, :, ::-1]
    return out.reshape((n * 10, ch, cw) + images.shape[3:])
