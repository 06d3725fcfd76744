"""Sweeps (`caffe-runner -m key=a,b ...`): one run directory per combination under output.dir,
named so that any shell takes the name as it is (letters, digits and `._+-` only: no
brackets, commas or '='), and `sweep.json` in the sweep folder mapping each name to its
overrides. A rerun of the same sweep finds its old folders through that mapping (or, for a
sweep started before the mapping existed, by the old `N_key=value,...` name), so it resumes.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..store.atomic import atomic_write_text
from ..store.h5 import open_h5

SWEEP_JSON = "sweep.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_value(value: str) -> str:
    """An override's value as shell-safe text (pure): [a,b] -> a+b, other characters -> '_'."""
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = "+".join(x.strip().strip("'\"") for x in v[1:-1].split(",") if x.strip())
    return _UNSAFE.sub("_", v.replace("=", "-")).strip("_") or "empty"


# keys whose values are names that may hold '/' (GoogLeNet's inception_3a/output), not paths
NAME_KEYS = ("output.blobs", "model.default_blobs")


def point_name(n: int, overrides: List[str], max_len: int = 200) -> str:
    """N_key-value__key-value (pure): the point's number, then its overrides that are not
    paths (they would make folders, and are rarely what a sweep varies), shell-safe."""
    parts = []
    for o in overrides:
        key, _, value = o.partition("=")
        if "/" in value and key.lstrip("+~") not in NAME_KEYS:
            continue
        parts.append(f"{_UNSAFE.sub('_', key.lstrip('+~'))}-{safe_value(value)}")
    name = f"{n}_{'__'.join(parts)}" if parts else str(n)
    return name[:max_len].rstrip("_-+.") or str(n)


def varying(points: List[List[str]]) -> List[List[str]]:
    """Each point's overrides that are not shared by every point (pure): what tells them apart."""
    common = set.intersection(*(set(p) for p in points)) if len(points) > 1 else set()
    return [[o for o in p if o not in common] for p in points]


def read_sweep(root: Path) -> Optional[Dict]:
    try:
        data = json.loads((Path(root) / SWEEP_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("points"), list) else None


def name_points(root: Path, points: List[List[str]], keys: List[str], legacy_names: List[str]) -> List[str]:
    """The folder of each point: the one sweep.json already maps its overrides to (a rerun of
    the same sweep), else an old-style folder of that name that holds a run, else a new
    shell-safe name from the overrides that differ between the points (made unique among the
    sweep's folders)."""
    root = Path(root)
    differ = varying(points)
    known = {p.get("key"): p.get("name") for p in (read_sweep(root) or {}).get("points", [])
             if isinstance(p, dict)}
    taken = {name for name in known.values() if name}
    names = []
    for n, (point, key, legacy) in enumerate(zip(points, keys, legacy_names)):
        name = known.get(key)
        if not name and (root / legacy / "run.json").exists():
            name = legacy
        if not name:
            name = base = point_name(n, differ[n])
            k = 2
            while name in taken or name in names:
                name = f"{base}.{k}"
                k += 1
        names.append(name)
        taken.add(name)
    return names


def sweep_points(root: Path) -> List[Tuple[str, Path]]:
    """(name, run directory) of every point sweep.json records, in its order; [] when none."""
    return [(str(p.get("name")), Path(root) / str(p.get("name")))
            for p in (read_sweep(root) or {}).get("points", []) if isinstance(p, dict)]


def check_sweep_root(root: Path, keys: List[str], legacy_names: List[str]) -> None:
    """A sweep's output.dir is new or empty, or holds this very sweep (the same points: it
    resumes), or is refused in one line before anything is written: a run directory (the points
    would hide inside it), another sweep (two definitions would mix in one sweep.json), or a
    folder holding anything else."""
    from ..errors import ConfigError

    root = Path(root)
    if not root.is_dir():
        return
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return
    fix = "give the sweep a new or empty output.dir"
    if (root / "run.json").exists():
        raise ConfigError(f"output.dir {root} is a run directory, not a sweep folder: {fix}")
    data = read_sweep(root)
    if data is not None:
        theirs = {p.get("key") for p in data["points"] if isinstance(p, dict)}
        if theirs != set(keys):
            raise ConfigError(f"output.dir {root} holds another sweep ({len(theirs)} point(s), not these "
                              f"{len(keys)}; its sweep.json lists them): {fix}, or run that sweep's own command "
                              f"to resume it")
        return
    if (root / SWEEP_JSON).exists():
        raise ConfigError(f"output.dir {root} holds a sweep.json that cannot be read: {fix} (or restore the file)")
    # a sweep started before sweep.json existed: only its old point folders
    if set(entries) <= set(legacy_names) and all((root / e / "run.json").exists() for e in entries):
        return
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise ConfigError(f"output.dir {root} is not empty and holds no sweep ({shown}): {fix}")


def record_sweep(root: Path, names: List[str], keys: List[str], points: List[List[str]]) -> None:
    """sweep.json: every point this sweep folder has held (name, overrides), newest last."""
    root = Path(root)
    old = (read_sweep(root) or {}).get("points", [])
    mine = {k for k in keys}
    kept = [p for p in old if isinstance(p, dict) and p.get("key") not in mine]
    pts = kept + [{"name": nm, "key": k, "overrides": pt} for nm, k, pt in zip(names, keys, points)]
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / SWEEP_JSON, json.dumps({"updated": time.time(), "points": pts}, indent=1))


def _point_facts(d: Path) -> Dict:
    """What a point's run directory says of it (model, blobs and their dimensions, pooling,
    images/s), for the sweep's table; what cannot be read is left out."""
    facts: Dict = {}
    try:
        plan = json.loads((d / "run.json").read_text())
        facts.update(model=plan.get("model", {}).get("name"), blobs=list(plan.get("blobs") or []),
                     pooling=plan.get("identity", {}).get("output", {}).get("pooling"))
    except (OSError, ValueError, AttributeError):
        return facts
    try:

        with open_h5(d / "features.h5", "r") as f:
            facts["dims"] = {b: "x".join(map(str, f["features"][b.replace("/", "__")].shape[1:]))
                             for b in facts["blobs"]}
    except (OSError, KeyError):
        pass
    try:
        facts["rate"] = json.loads((d / "stats.json").read_text()).get("images_per_s")
    except (OSError, ValueError):
        pass
    return facts


def sweep_status(root: Path) -> List[Dict]:
    """Each point of the sweep folder with its run's state (status of each run directory) and
    what tells it apart (model, blobs, dimensions, pooling), with its images/s."""
    from ..errors import RunnerError
    from .status import run_status

    rows = []
    for p in (read_sweep(root) or {}).get("points", []):
        d = Path(root) / str(p.get("name"))
        row = {"name": p.get("name"), "overrides": p.get("overrides"), "run_dir": str(d)}
        if not (d / "run.json").exists():
            row.update(state="not started", done=0, images=None)
        else:
            try:
                st = run_status(d, use_sacct=False)
                row.update(state=st["state"], done=st["done"], images=st["images"], failures=st["failures"])
            except RunnerError as e:
                row.update(state="unreadable", error=str(e))
            row.update(_point_facts(d))
        rows.append(row)
    return rows


def format_sweep_status(root: Path, rows: List[Dict]) -> str:
    """One table: a row per point, a column for each fact that is known for some point; the
    overrides column shows only those that differ between the points."""
    differ = varying([list(r.get("overrides") or []) for r in rows]) if rows else []

    def blobs(r):
        dims = r.get("dims") or {}
        return ", ".join(f"{b} {dims[b]}" if b in dims else b for b in r.get("blobs") or [])

    cols = [("point", [str(r["name"]) for r in rows]),
            ("state", [str(r["state"]) for r in rows]),
            ("images", [f"{r['done']}/{r['images']} images" if r.get("images") is not None else "" for r in rows]),
            ("failed", [str(r["failures"]) if r.get("failures") is not None else "" for r in rows]),
            ("img/s", [f"{r['rate']:.1f}" if r.get("rate") else "" for r in rows]),
            ("model", [str(r.get("model") or "") for r in rows]),
            ("blobs", [blobs(r) for r in rows]),
            ("pooling", [str(r.get("pooling") or "") for r in rows]),
            ("differs", [" ".join(d) for d in differ])]
    cols = [(h, v) for h, v in cols if h in ("point", "state") or any(v)]
    widths = [max([len(h)] + [len(x) for x in v]) for h, v in cols]
    lines = [f"{root}: sweep of {len(rows)} point(s) ({SWEEP_JSON})",
             "  " + "  ".join(h.ljust(w) for (h, _), w in zip(cols, widths)).rstrip()]
    for i in range(len(rows)):
        lines.append("  " + "  ".join(v[i].ljust(w) for (_, v), w in zip(cols, widths)).rstrip())
    return "\n".join(lines)


def is_sweep_dir(path: Path) -> bool:
    return not (Path(path) / "run.json").exists() and os.path.isfile(Path(path) / SWEEP_JSON)


# ---- sweep files (caffe-runner --sweep FILE) ---------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_./+-]+$")
SWEEP_FILE_KEYS = ("points", "models", "pooling", "overrides")


def override_value(v) -> str:
    """A YAML value as the override grammar reads it back (pure): lists as [a,b], strings
    quoted unless plain (blob names with ':', ' ', ',' or quotes stay one value)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{override_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _PLAIN.match(s) and s not in ("true", "false", "null"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _overrides_of(entry, where: str) -> List[str]:
    """A point's overrides from a mapping {key: value}, a list of 'key=value' or one string of them."""
    import shlex

    if isinstance(entry, dict):
        return [f"{k}={override_value(v)}" for k, v in entry.items()]
    if isinstance(entry, str):
        entry = shlex.split(entry)
    if isinstance(entry, list) and all(isinstance(o, str) and "=" in o for o in entry):
        return list(entry)
    raise ValueError(f"{where}: a mapping of key: value, or a list of key=value overrides, not {entry!r}")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def file_points(data) -> List[List[str]]:
    """The points of a sweep file (pure; raises ValueError naming what is wrong). Either
      points: [ {model: googlenet, output.blobs: [inception_3a/output]}, "model=caffenet ...", ...]
    or models crossed with their own blobs (one point per blob) and, optionally, poolings:
      models: {googlenet: [inception_3a/output, inception_4a/output],
               caffenet: {blobs: [conv5, fc7], overrides: {...}}}
      pooling: [avg, max]
    `overrides` (a mapping or list) applies to every point."""
    if not isinstance(data, dict):
        raise ValueError(f"a sweep file is a mapping with {' or '.join(SWEEP_FILE_KEYS[:2])}, not {type(data).__name__}")
    unknown = [k for k in data if k not in SWEEP_FILE_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(str, unknown))}: a sweep file has {', '.join(SWEEP_FILE_KEYS)}")
    if ("points" in data) == ("models" in data):
        raise ValueError("a sweep file has either `points` (a list) or `models` (each with its blobs), one of them")
    common = _overrides_of(data.get("overrides") or {}, "overrides")
    points: List[List[str]] = []
    if "points" in data:
        if not isinstance(data["points"], list) or not data["points"]:
            raise ValueError("`points` is a list of points, each a mapping of key: value")
        points = [_overrides_of(p, f"point {n}") for n, p in enumerate(data["points"])]
        if "pooling" in data:
            raise ValueError("`pooling` crosses `models` and their blobs: in `points`, give output.pooling per point")
    else:
        models = data["models"]
        if not isinstance(models, dict) or not models:
            raise ValueError("`models` maps a model preset (or a name of yours) to its blobs: "
                             "{googlenet: [inception_3a/output], caffenet: {blobs: [conv5], overrides: {...}}}")
        poolings = data.get("pooling")
        if poolings is not None and not isinstance(poolings, list):
            poolings = [poolings]
        for name, spec in models.items():
            if isinstance(spec, list):
                spec = {"blobs": spec}
            if not isinstance(spec, dict) or not isinstance(spec.get("blobs"), list) or not spec["blobs"]:
                raise ValueError(f"model {name}: a list of blobs, or a mapping with `blobs` (a list) and `overrides`")
            extra = [k for k in spec if k not in ("blobs", "overrides")]
            if extra:
                raise ValueError(f"model {name}: unknown key(s) {', '.join(map(str, extra))} (it has blobs, overrides)")
            own = _overrides_of(spec.get("overrides") or {}, f"model {name}'s overrides")
            head = [] if any(_key(o) == "model" for o in own) else [f"model={name}"]
            for blob in spec["blobs"]:
                for pool in poolings or [None]:
                    p = head + own + [f"output.blobs={override_value([str(blob)])}"]
                    points.append(p + ([f"output.pooling={override_value(pool)}"] if pool is not None else []))
    clash = sorted({_key(o) for o in common} & {_key(o) for p in points for o in p})
    if clash:
        raise ValueError(f"{', '.join(clash)} set both in `overrides` and in a point: set it in one place")
    return [common + p for p in points]

