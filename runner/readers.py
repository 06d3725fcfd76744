"""A task's slice of the input: manifest entries -> decode jobs, in manifest order.

Each reader yields Item(index, name, label, job); `job()` runs in a decode thread and returns
(image | None, reason | None). Files are opened and read inside the decode threads (parallel
reads on a cluster file system); an LMDB is read by one cursor over the task's key range
(lmdb_input.py); a tar sample is one positioned read at its recorded offset (tar_input.py).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np

from .manifest import NO_LABEL, Manifest


class Item(NamedTuple):
    index: int
    name: bytes
    label: int
    job: Callable[[], Tuple[Optional[np.ndarray], Optional[str]]]


class FileReader:
    """Files named by a directory listing or a list file."""

    def __init__(self, manifest: Manifest, decoder):
        self.m, self.decoder = manifest, decoder
        if manifest.origin == "list":
            decoder.missing_reason = "listed but not found"
        self.stats: Dict[str, object] = {}

    def items(self, start: int, stop: int) -> Iterator[Item]:
        names = self.m.read_slice(start, stop)
        labels = self.m.read_labels(start, stop)
        for k, n in enumerate(names):
            lab = int(labels[k]) if labels is not None else NO_LABEL
            yield Item(start + k, n, lab, partial(self.decoder.load, self.m.path_of(n)))

    def close(self) -> None:
        pass


def open_reader(manifest: Manifest, decoder):
    if manifest.kind == "lmdb":
        from .lmdb_input import LmdbReader

        return LmdbReader(manifest, decoder)
    if manifest.kind == "tar":
        from .tar_input import TarReader

        return TarReader(manifest, decoder)
    return FileReader(manifest, decoder)
