"""Decode and preprocess images.

Per image (in decode threads; OpenCV releases the GIL): read the bytes, check them, decode
with OpenCV (as Caffe's C++ data layer and cv2.dnn.blobFromImage do), resize and crop to the
net's input, as uint8 BGR. Per batch (vectorised): float conversion, channel order, scale,
mean subtraction, NCHW.

A file that cannot be decoded is never an exception here: `load` returns a short reason,
which the shard records as a failure before going on.
"""
from __future__ import annotations

import errno
import io
import os
import signal
import stat
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from ..faults import FAULT_CRASH_ON, FAULT_HANG_ON, gate, switch

_INTERP = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}

# leading bytes of files that are commonly misnamed as images
_NOT_IMAGE_HINTS = [
    (b"<!doctype html", "an HTML page"), (b"<html", "an HTML page"), (b"<?xml", "an XML file"),
    (b"{", "a JSON/text file"), (b"%pdf", "a PDF file"), (b"pk\x03\x04", "a ZIP archive"),
]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
REUSE_BUFFERS_UP_TO_BYTES = 256 << 20  # a 12-MP photo decodes to 36 MB, a 48-MP one to 144 MB


def reuse_large_buffers() -> bool:
    """Let freed full-size images be reused instead of mapped afresh for every decode.

    glibc serves allocations above its mmap threshold (at most 32 MB by default) with a new
    mmap, which the kernel zero-fills a page at a time on first touch and unmaps on free: a
    12-MP photo (36 MB decoded) cost 9,000 page faults and about 28 ms of system time on top of
    its 40 ms decode (make bench row 10). With the threshold raised, freed buffers stay in the
    process and are reused. One arena for the process: a decode thread would otherwise get an
    arena of its own, made of 64 MB heaps that a 36 MB image barely fits, and those heaps come
    and go (measured in the pipeline: 4,700-8,300 faults per camera photo with the threshold
    raised, 0.6 with one arena; decoding cost 53-59 ms per photo instead of 43). The decode
    threads' allocations are few and large, so sharing one arena's lock costs nothing measurable.
    The price: about one full-size image kept per decode thread. Call it before the process
    starts threads. Process-wide, glibc only (elsewhere a no-op); returns whether it was applied."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, REUSE_BUFFERS_UP_TO_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * REUSE_BUFFERS_UP_TO_BYTES)) and bool(mallopt(_M_ARENA_MAX, 1))


MB = 1 << 20


def _fault_on(var: str) -> Optional[bytes]:
    """A decoder fault switch's text (runner/faults.py: CRASH_ON, HANG_ON), or None when off."""
    return os.fsencode(switch(var)) or None


# what a listed path that is not a regular file is (fstat's type bits)
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def not_regular(mode: int) -> Optional[str]:
    """What a file of this st_mode is when it is not a regular file (pure), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


class DecodeFailure(Exception):
    """An image that cannot be used; the message is the recorded reason."""


@dataclass(frozen=True)
class Geometry:
    """Where a decoded image goes: resize (stretch or shorter side), then centre crop."""
    input_hw: Tuple[int, int]
    resize: str = "stretch"
    resize_size: Optional[int] = None
    interpolation: str = "linear"

    def resized_hw(self, h: int, w: int) -> Tuple[int, int]:
        ih, iw = self.input_hw
        if self.resize == "stretch":
            if self.resize_size:
                return max(self.resize_size, ih), max(self.resize_size, iw)
            return ih, iw
        if self.resize == "shorter_side":
            s = self.resize_size or min(ih, iw)
            if h <= w:
                return s, max(iw, int(round(w * s / h)))
            return max(ih, int(round(h * s / w))), s
        raise ValueError(f"model.preprocess.resize must be 'stretch' or 'shorter_side', got {self.resize!r}")


def sniff_not_image(data: bytes) -> Optional[str]:
    head = data[:64].lstrip().lower()
    for magic, what in _NOT_IMAGE_HINTS:
        if head.startswith(magic):
            return what
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in data[:256]):
        return "a text file"
    return None


def jpeg_truncated(data: bytes) -> bool:
    """True when a JPEG ends before its last scan does. (libjpeg only warns on a premature
    end, and OpenCV then returns a grey-filled image, which must not become a feature row.)
    Entropy-coded data escapes every 0xFF, so markers cannot appear inside it."""
    sos = data.rfind(b"\xff\xda")
    return sos < 0 or data.find(b"\xff\xd9", sos) < 0


_PLUGINS = []
# formats decoded by Pillow even where OpenCV reads them: OpenCV's AVIF reader ignores the EXIF
# orientation, Pillow (with pillow-heif for HEIF) applies it as it does for JPEG
_PILLOW_FIRST = ("AVIF", "HEIF")


def register_pillow_plugins() -> None:
    """HEIC/HEIF (phone photos) through pillow-heif's Pillow plug-in; AVIF is Pillow's own
    (11.3+). OpenCV reads neither, so they come through the Pillow fallback below."""
    if not _PLUGINS:
        _PLUGINS.append("tried")
        try:
            import pillow_heif
        except ImportError:  # a venv older than the dependency: JPEGs must still decode (HEIC then fails)
            return
        pillow_heif.register_heif_opener()


def header_size(data: bytes) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """(format, (width, height)) from the header only, without decoding pixels. Pillow's
    global Image.MAX_IMAGE_PIXELS is left as the caller's process has it (a notebook or a
    pipeline importing us keeps its own setting): an image above it is measured by Pillow's
    format plug-ins directly, and our own limit (decode.max_pixels) decides."""
    from PIL import Image

    register_pillow_plugins()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format, im.size
    except Image.DecompressionBombError:
        return _header_size_unchecked(data)
    except Exception:
        return None, None


def _header_size_unchecked(data: bytes) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """What Image.open does to read a header, without its decompression-bomb check: each
    registered format plug-in that accepts the first bytes tries to parse the header."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(prefix):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = factory(io.BytesIO(data), "")
            with im:
                return im.format, im.size
        except Exception:
            continue
    return None, None


def _pil_decode(data: bytes, exif_orientation: bool) -> np.ndarray:
    """Fallback for what OpenCV does not read (e.g. some GIFs): first frame, as BGR uint8."""
    from PIL import Image, ImageOps

    register_pillow_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / 257.0, 0, 255).astype(np.uint8)
                return cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
            rgb = np.asarray(im.convert("RGB"))
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


class Decoder:
    """Turns a path into a uint8 BGR image of the geometry's output size, or a failure."""

    def __init__(self, geometry: Geometry, exif_orientation: bool = True,
                 max_pixels: int = 178956970, reduced_jpeg: bool = False, max_file_mb: float = 256.0,
                 follow_symlinks: bool = True):
        self.geometry = geometry
        self.exif_orientation = exif_orientation
        self.max_pixels = int(max_pixels)
        self.reduced_jpeg = reduced_jpeg
        self.max_file_mb = float(max_file_mb)
        self.max_file_bytes = int(self.max_file_mb * MB)
        # input.follow_symlinks=false holds at read time too: a symlink swapped in after the
        # listing is not opened (O_NOFOLLOW on the file itself)
        self.open_flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
        self.crash_on = _fault_on(FAULT_CRASH_ON)
        self.hang_on = _fault_on(FAULT_HANG_ON)
        self.interp = _INTERP[geometry.interpolation]
        # the reason recorded for a missing file: a listed name that was never there reads
        # "listed but not found" (set by the reader for list input)
        self.missing_reason = "file not found (deleted after listing?)"

    def read(self, path: bytes) -> bytes:
        """The file's bytes, when it is a regular file of at most decode.max_file_mb: a listed
        /dev/zero, a named pipe or a folder is a failure with its reason, never a read without
        end or a hang (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
        # tests hold a task mid-shard here, at a file they name (runner/faults.py; inert unset)
        gate("read-" + os.path.basename(os.fsdecode(path)))
        try:
            fd = os.open(path, self.open_flags)
        except FileNotFoundError:
            if os.path.islink(path):
                raise DecodeFailure("broken symlink (its target does not exist)")
            raise DecodeFailure(self.missing_reason)
        except PermissionError:
            raise DecodeFailure("permission denied")
        except OSError as e:
            if e.errno == errno.ELOOP and self.open_flags & os.O_NOFOLLOW:
                raise DecodeFailure("a symlink, not followed (input.follow_symlinks=false; it was swapped in "
                                    "after the listing?)")
            raise DecodeFailure(f"read error: {e.strerror or e}")
        try:
            st = os.fstat(fd)
            what = not_regular(st.st_mode)
            if what == "a directory":
                raise DecodeFailure("is a directory")
            if what:
                raise DecodeFailure(f"not a regular file: {what}")
            if st.st_size > self.max_file_bytes:
                raise DecodeFailure(self._too_many_bytes(st.st_size))
            data = self._read_at_most(fd, st.st_size)
        except OSError as e:
            raise DecodeFailure(f"read error: {e.strerror or e}")
        finally:
            os.close(fd)
        if not data:
            raise DecodeFailure("empty file (0 bytes)")
        return data

    def _read_at_most(self, fd: int, size: int) -> bytes:
        """The file's bytes, one read when its size is right; a file that grew past the cap
        since fstat is refused rather than read on."""
        chunks, n = [], 0
        want = size + 1  # one byte more: EOF is seen in the same call
        while True:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
            if n > self.max_file_bytes:
                raise DecodeFailure(self._too_many_bytes(n, growing=True))
            want = max(1 << 16, min(self.max_file_bytes + 1 - n, 1 << 24))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_many_bytes(self, n: int, growing: bool = False) -> str:
        return (f"too large: {'more than ' if growing else ''}{n} bytes > decode.max_file_mb={self.max_file_mb:g} "
                f"({self.max_file_bytes} bytes; raise it for larger files)")

    def _check_pixels(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise DecodeFailure(f"too large: {w}x{h} = {w * h} pixels > decode.max_pixels="
                                f"{self.max_pixels} (decompression-bomb limit)")

    def decode(self, data: bytes) -> np.ndarray:
        fmt, size = header_size(data)
        if size is not None:
            self._check_pixels(*size)
        if fmt == "JPEG" and jpeg_truncated(data):
            raise DecodeFailure("truncated JPEG (no end-of-image marker after the last scan)")
        flags = cv2.IMREAD_COLOR
        if fmt == "JPEG" and self.reduced_jpeg and size is not None:
            flags = self._reduced_flag(size)
        if not self.exif_orientation:
            flags |= cv2.IMREAD_IGNORE_ORIENTATION
        buf = np.frombuffer(data, dtype=np.uint8)
        img = None
        if fmt not in _PILLOW_FIRST:
            try:
                img = cv2.imdecode(buf, flags)
            except cv2.error:
                img = None
        if img is None and fmt is not None:
            try:
                img = _pil_decode(data, self.exif_orientation)
            except Exception as e:
                raise DecodeFailure(f"cannot decode {fmt} image: {str(e)[:120]}")
        if img is None:
            what = sniff_not_image(data)
            if what:
                raise DecodeFailure(f"not an image: looks like {what}")
            raise DecodeFailure("unsupported or corrupt image format (neither OpenCV nor Pillow reads it)")
        if size is None:  # a header Pillow cannot read: the limit applies to what OpenCV decoded
            self._check_pixels(img.shape[1], img.shape[0])
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise DecodeFailure("image has no pixels")
        return img

    def _reduced_flag(self, size: Tuple[int, int]) -> int:
        w, h = size
        th, tw = self.geometry.resized_hw(h, w)
        for k, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                        (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if h // k >= th and w // k >= tw:
                return flag
        return cv2.IMREAD_COLOR

    def fit(self, img: np.ndarray) -> np.ndarray:
        """Resize and centre-crop a decoded image to the net input (uint8 HxWx3)."""
        h, w = img.shape[:2]
        rh, rw = self.geometry.resized_hw(h, w)
        if (h, w) != (rh, rw):
            img = cv2.resize(img, (rw, rh), interpolation=self.interp)
        return center_crop(img, self.geometry.input_hw)

    def load(self, path: bytes) -> Tuple[Optional[np.ndarray], Optional[str]]:
        if self.crash_on is not None and self.crash_on in path:
            os.kill(os.getpid(), signal.SIGSEGV)  # fault injection (runner/faults.py): a decoder crashing on this file
        if self.hang_on is not None and self.hang_on in path:
            threading.Event().wait()  # fault injection (runner/faults.py): a decoder that never returns on this file
        return self._guard(lambda: self.fit(self.decode(self.read(path))))

    def load_bytes(self, data: bytes) -> Tuple[Optional[np.ndarray], Optional[str]]:
        """An encoded image already in memory (an LMDB record, a tar member)."""
        def run():
            if not data:
                raise DecodeFailure("empty image (0 bytes)")
            if len(data) > self.max_file_bytes:
                raise DecodeFailure(self._too_many_bytes(len(data)))
            return self.fit(self.decode(data))
        return self._guard(run)

    def load_pixels(self, get_pixels) -> Tuple[Optional[np.ndarray], Optional[str]]:
        """Pixels that need no decoding (a raw Datum): get_pixels() -> uint8 H x W x 3 BGR."""
        return self._guard(lambda: self.fit(get_pixels()))

    @staticmethod
    def _guard(fn) -> Tuple[Optional[np.ndarray], Optional[str]]:
        try:
            return fn(), None
        except DecodeFailure as e:
            return None, str(e)
        except Exception as e:  # never let one image stop a shard
            return None, f"unexpected {type(e).__name__}: {str(e)[:200]}"


def center_crop(img: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = hw
    if (h, w) == (ch, cw):
        return img
    if h < ch or w < cw:
        raise ValueError(f"cannot crop {h}x{w} to {ch}x{cw}")
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y:y + ch, x:x + cw]

