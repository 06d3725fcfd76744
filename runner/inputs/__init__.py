"""The input kinds, each one module behind the interface in base.py: files.py (input.dir,
input.list), lmdb.py (input.lmdb), tar.py (input.tar). This registry is the one place that
knows them all; the rest of the runner asks it, never a kind's config field.

A new kind: a module with an InputKind subclass, its field in schema.InputConf, a line in KINDS.

May import: runner (log, errors, schema), runner.store, runner.engine (lmdb's Datum decoding).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import ConfigError
from ..store.manifest import Manifest
from . import files, lmdb, tar
from .base import NO_LABEL, InputKind, Item, Reader, caffe_io_refusal

# in the order the fields are looked at (the first one set names the run's input)
KINDS: Tuple[InputKind, ...] = (files.KIND, lmdb.KIND, tar.KIND)
BY_NAME: Dict[str, InputKind] = {k.name: k for k in KINDS}

__all__ = ["KINDS", "NO_LABEL", "InputKind", "Item", "Reader", "build_manifest", "configured",
           "input_source", "input_stamp", "list_input", "node_read_paths", "open_reader", "path_keys",
           "refuse_caffe_io", "selected"]


def configured(ic) -> List[str]:
    """The input fields that are set (input.dir, input.list, ...), in KINDS order."""
    return [f for k in KINDS for f in k.fields if ic.get(f)]


def path_keys() -> Tuple[str, ...]:
    """input.* keys that hold paths (a sweep point's folder name leaves them out)."""
    return tuple(f"input.{f}" for k in KINDS for f in k.path_fields)


def selected(ic) -> InputKind:
    """The kind of the configured input; exactly one input field must be set."""
    fields = configured(ic)
    if len(fields) != 1:
        usage = ", ".join(u for k in KINDS for u in k.usage)
        usage = " or ".join(usage.rsplit(", ", 1))
        raise ConfigError(f"give exactly one of {usage}" + (f"; got {', '.join('input.' + f for f in fields)}"
                                                            if fields else ""))
    return next(k for k in KINDS if k.configured(ic))


def input_source(ic) -> str:
    """The input as the run's identity records it; the first field set when several are
    (listing refuses that later, with the message naming them)."""
    kind = next((k for k in KINDS if k.configured(ic)), None)
    if kind is None:
        raise ConfigError("no input: set input.dir=DIR (a folder of images, listed recursively), "
                          "input.list=FILE (one path per line), input.lmdb=PATH or input.tar=SHARDS")
    return kind.source(ic)


def build_manifest(run_dir: Path, ic) -> Manifest:
    """List the input once and store it in the run directory."""
    return selected(ic).build(run_dir, ic)


def list_input(ic) -> Tuple[bytes, List[bytes], str]:
    """(root, names, source) as listed now (what input.relist re-reads)."""
    return selected(ic).relist(ic)


def input_stamp(ic) -> Optional[Dict[str, int]]:
    """A cheap fingerprint of the input as it is now, to notice a change since listing without
    a full re-listing. None when the input cannot be read from here."""
    try:
        return selected(ic).stamp(ic)
    except (OSError, ConfigError):
        return None


def node_read_paths(ic) -> List[Path]:
    """The paths a compute node (or a container) must be able to read for the configured
    input: every input field that is set counts (never raises; the plan refuses several)."""
    out: List[Path] = []
    for k in KINDS:
        if k.configured(ic):
            for p in k.node_read_paths(ic):
                if p not in out:
                    out.append(p)
    return out


def open_reader(manifest: Manifest, decoder) -> Reader:
    """The reader of a stored run's input, chosen by the manifest's kind."""
    return BY_NAME[manifest.kind].reader(manifest, decoder)


def refuse_caffe_io(ic, mode) -> None:
    """model.preprocess.mode=caffe_io opens image files by name: refused for inputs decoded from memory."""
    for k in KINDS:
        field = k.configured(ic)
        if field and k.from_memory and mode == "caffe_io":
            raise ConfigError(caffe_io_refusal(field))
