"""Command-line overrides made readable by Hydra's grammar before it sees them.

Hydra parses every value: `~`, `#`, `&`, `'`, `(`, `[`, `{` and `,` are syntax to it, so
ordinary paths (`input.dir=~/imgs`, `input.tar=dir/shards-{000..099}.tar`, a folder named
`a,b`) are refused with a lexer error. Path keys are therefore quoted here (after `~` is
expanded), a single value given where a list is expected becomes a one-element list
(`output.blobs=fc7`), and `--key=value` is taken as `key=value`. In a sweep (-m) a comma in a
path key still separates sweep values: a path holding a comma is then written quoted,
`key='a,b'`, and the error for what still cannot be read says exactly that.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Iterable, List, Optional, Set

from ..inputs import path_keys

# keys whose value is a file or folder path (or a tar pattern): never Hydra syntax; the input
# kinds name their own (inputs.path_keys)
PATH_KEYS = ("output.dir", "model.prototxt", "model.weights", "model.preprocess.mean_file", "container.image",
             *path_keys())

_SWEEP_FUNCS = ("choice(", "range(", "glob(", "interval(", "shuffle(", "sort(", "tag(")


def _list_fields(cls, prefix: str) -> Set[str]:
    """Schema fields typed List[...] / Optional[List[...]], as dotted keys."""
    out: Set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) is typing.Union else [t]
        t = args[0] if len(args) == 1 else t
        if typing.get_origin(t) in (list, List):
            out.add(prefix + f.name)
        elif dataclasses.is_dataclass(t):
            out |= _list_fields(t, f"{prefix}{f.name}.")
    return out


def list_keys() -> Set[str]:
    """Keys whose value is a list, read from the schema (both launchers' fields included)."""
    from ..schema import LocalLauncherConf, RunConf, SlurmLauncherConf

    keys = _list_fields(RunConf, "")
    keys |= _list_fields(LocalLauncherConf, "launcher.") | _list_fields(SlurmLauncherConf, "launcher.")
    return keys


def hydra_quote(value: str) -> str:
    """A single-quoted Hydra string that reads back as `value`: quotes are escaped, and so are
    the backslashes that precede a quote or end the string (the only ones Hydra reads as escapes)."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + escaped.replace("'", "\\'") + "'"


def _is_quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def normalize_override(override: str, multirun: bool = False, lists: Optional[Set[str]] = None) -> str:
    if override.startswith("--") and "=" in override:
        override = override[2:]  # --input.dir=x, as argparse-style tools write it
    if "=" not in override or override.startswith(("+", "~")):
        return override
    key, value = override.split("=", 1)
    if key in PATH_KEYS:
        if _is_quoted(value) or value == "" or value in ("null", "None"):
            return override
        if multirun and ("," in value or value.startswith(_SWEEP_FUNCS)):
            return override  # sweep values: Hydra splits them (a path with a comma: key='a,b')
        return f"{key}={hydra_quote(os.path.expanduser(value))}"
    if key in (lists if lists is not None else list_keys()):
        v = value.strip()
        if v and not v.startswith(("[", "'", '"')) and v not in ("null", "None") and "," not in v \
                and not v.startswith(_SWEEP_FUNCS) and "${" not in v:
            return f"{key}=[{v}]"  # output.blobs=fc7 -> [fc7]
    return override


def as_typed(override: str) -> str:
    """An override as the user can type it again (the inverse of normalize_override's quoting
    of a path key): `input.dir='my photos'` -> `input.dir=my photos`. Hydra's own parser reads
    the quoted value back, so every escape it wrote is undone exactly."""
    key, sep, value = override.partition("=")
    if not sep or key not in PATH_KEYS or not _is_quoted(value):
        return override
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(override).value()
    except Exception:
        return override
    return f"{key}={parsed}" if isinstance(parsed, str) else override


def normalize_overrides(overrides: Iterable[str], multirun: bool = False) -> List[str]:
    lists = list_keys()
    return [normalize_override(o, multirun, lists) for o in overrides]


def unreadable_override_message(override: str, detail: str) -> str:
    """What to write instead, for an override Hydra's grammar still cannot read."""
    if "=" not in override:
        return f"bad override {override!r} ({detail}): write key=value, e.g. output.dir=/scratch/run1"
    key, value = override.split("=", 1)
    if key in list_keys():
        how = (f"write the list whole, {key}=[a,b] (an item holding , [ ] or spaces quoted: "
               f"\"{key}=['a b',c]\")")
    elif "," in value and key in PATH_KEYS:
        how = (f"a comma in a path separates sweep values under -m: quote the path, as the shell passes it, "
               f"\"{key}={hydra_quote(value)}\"")
    else:
        how = (f"Hydra's grammar reads ~ # & ' ( ) [ ] {{ }} , and spaces in values as syntax: quote the value, "
               f"as the shell passes it, \"{key}={hydra_quote(value)}\" (a list: {key}=[a,b]; a sweep: -m {key}=a,b)")
    return f"{override}: {detail}; {how}"


def first_unreadable(overrides: Iterable[str]) -> Optional[str]:
    """The message for the first override Hydra's grammar cannot read, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except Exception as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            detail = re.sub(r"^Error parsing override '.*?'\s*", "", detail) or "Hydra cannot parse it"
            return unreadable_override_message(o, detail[:120])
    return None
