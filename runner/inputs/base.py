"""What every input kind shares: the `Item` a reader yields, the label of a sample without
one, and the small interface each kind implements (runner/inputs/<kind>.py).

A kind is chosen by the config field(s) it owns (input.dir / input.list, input.lmdb,
input.tar); the registry in runner/inputs/__init__.py is the one place that knows them all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..store.manifest import Manifest, display_name
from .listing import describe

NO_LABEL = -1  # a sample without a label (labels dataset)


class Item(NamedTuple):
    index: int
    name: bytes
    label: int
    job: Callable[[], Tuple[Optional[np.ndarray], Optional[str]]]


def expand(path) -> str:
    """A configured path as the runner uses it: ~ expanded, absolute."""
    return os.path.abspath(os.path.expanduser(str(path)))


def first_duplicates(names: Sequence[bytes], linenos: Sequence[int], limit: int = 3
                     ) -> Tuple[int, List[Tuple[bytes, int, int]]]:
    """(how many entries repeat an earlier one, the first `limit` as (name, first line, line))."""
    first: Dict[bytes, int] = {}
    shown: List[Tuple[bytes, int, int]] = []
    n = 0
    for name, line in zip(names, linenos):
        if name in first:
            n += 1
            if len(shown) < limit:
                shown.append((name, first[name], line))
        else:
            first[name] = line
    return n, shown


def check_names(names: Sequence[bytes], source: str, exts: Sequence[str] = (), check_dups: bool = True,
                listing: Optional[Dict] = None) -> None:
    """A listing is refused when it found nothing or names an image twice (a list file's
    duplicates are named with their lines by files.check_list_duplicates)."""
    if not names:
        where = source[source.index(':') + 1:]
        if source.startswith("list:"):  # a list is read as it is: extensions play no part
            raise ConfigError(f"input.list {where!r} names no images (it is empty, or holds only blank lines): "
                              "give a list with one image path per line")
        what = f" ({describe(listing)})" if listing and listing.get("seen") else (
            f" (extensions: {','.join(exts)})" if exts else "")
        raise ConfigError(f"no images found in {where}{what}; "
                          "check the path" + (", or set input.extensions=[...]" if exts else ""))
    dups = len(names) - len(set(names)) if check_dups else 0
    if dups:
        n, shown = first_duplicates(names, range(1, len(names) + 1))
        where = "; ".join(f"{display_name(name)!r} at entries {a} and {b}" for name, a, b in shown)
        raise ConfigError(f"the input names {dups} image(s) more than once ({where}); every image must "
                          "appear once")


def caffe_io_refusal(field: str) -> str:
    """The one message for model.preprocess.mode=caffe_io with an input decoded from memory."""
    return (f"model.preprocess.mode=caffe_io reads image files by name; input.{field} is decoded from memory: "
            "use model.preprocess.mode=opencv (Caffe's data layer semantics)")


class Reader:
    """A task's slice of the input: manifest entries -> decode jobs, in manifest order.
    `items(start, stop)` yields Item(index, name, label, job); `job()` runs in a decode thread
    and returns (image | None, reason | None). `stats` is what the task read (kept in the shard)."""

    stats: Dict[str, object]

    def items(self, start: int, stop: int) -> Iterator[Item]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InputKind:
    """One kind of input. Subclasses set the class attributes and implement the methods."""

    # the manifest's `kind` (meta.json): which kind reads a stored run back
    name: str = ""
    # the InputConf fields that select this kind (one of them is set)
    fields: Tuple[str, ...] = ()
    # InputConf fields holding paths (left out of a sweep point's folder name)
    path_fields: Tuple[str, ...] = ()
    # "input.dir=DIR (...)" per field, for the error that asks for exactly one input
    usage: Tuple[str, ...] = ()
    # images decoded from bytes in memory (not opened by name): caffe_io cannot read them
    from_memory: bool = False

    def configured(self, ic) -> Optional[str]:
        """The field of this kind that is set, or None."""
        return next((f for f in self.fields if ic.get(f)), None)

    def source(self, ic) -> str:
        """The input as the run's identity records it (a change of it is another run)."""
        raise NotImplementedError

    def build(self, run_dir: Path, ic) -> Manifest:
        """List the input and store it as the run's manifest."""
        raise NotImplementedError

    def stamp(self, ic) -> Dict[str, int]:
        """A cheap fingerprint of the input as it is now; may raise OSError or ConfigError."""
        raise NotImplementedError

    def node_read_paths(self, ic) -> List[Path]:
        """The paths a compute node (or a container) must be able to read; never raises."""
        raise NotImplementedError

    def reader(self, manifest: Manifest, decoder) -> Reader:
        raise NotImplementedError

    def relist(self, ic) -> Tuple[bytes, List[bytes], str]:
        """(root, names, source) as listed now, for input.relist=true."""
        raise ConfigError("input.relist=true re-lists input.dir or input.list; an LMDB or tar shards are "
                          "listed once: use a new output.dir for a changed database or new shards")

    def check_decoder(self, decoder) -> None:
        """A reader's guard for callers that skip the plan (the plan refuses the config first)."""
        if self.from_memory and not hasattr(decoder, "load_bytes"):
            raise ConfigError(caffe_io_refusal(self.fields[0]))  # plan.validate refused it already
