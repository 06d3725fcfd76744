"""A file's digest (a leaf: the model checks, the plan's pins and the downloads all hash with it)."""
from __future__ import annotations

import hashlib


def file_hash(path, algorithm: str = "sha256", bufsize: int = 1 << 20) -> str:
    """The hex digest of a file's bytes, read in bufsize chunks (a caffemodel may be hundreds of MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
