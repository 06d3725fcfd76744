"""`caffe-runner verify RUN_DIR`: prove nothing was lost or doubled.

Every manifest entry must appear exactly once, as a feature row or a recorded failure,
under its own name; every shard file must be complete and of this run's config; the
merged view, when present, must agree with the shards.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import h5py
import numpy as np

from .manifest import load_manifest
from .plan import load_run_dir
from .shard import shard_bounds
from .write import dataset_name


def _check_shard(path: Path, i: int, run, manifest, problems: List[str]) -> None:
    n = run.num_shards
    start, stop = shard_bounds(manifest.count, n, i)
    try:
        f = h5py.File(path, "r", locking=False)
    except Exception as e:
        problems.append(f"shard {i}: {path.name} cannot be opened ({e}): delete it and rerun the extraction")
        return
    with f:
        a = f.attrs
        if not bool(a.get("complete", False)):
            problems.append(f"shard {i}: {path.name} is not marked complete")
        if a.get("fingerprint") != run.plan["fingerprint"]:
            problems.append(f"shard {i}: written with another config (fingerprint differs from run.json)")
        if (int(a.get("start", -1)), int(a.get("stop", -1))) != (start, stop):
            problems.append(f"shard {i}: covers [{a.get('start')}, {a.get('stop')}) but the plan says [{start}, {stop})")
        try:
            idx = f["index"][:]
            fidx = f["failures/index"][:]
            rows = len(idx)
            for b in run.plan["blobs"]:
                d = f[f"features/{dataset_name(b)}"]
                if len(d) != rows:
                    problems.append(f"shard {i}: blob {b} has {len(d)} rows but {rows} names")
            for name in ("names", "names_raw"):
                if len(f[name]) != rows:
                    problems.append(f"shard {i}: {name} has {len(f[name])} entries but index has {rows}")
            raw = f["names_raw"][:]
            fraw = f["failures/names_raw"][:]
            if run.plan.get("labels") or "labels" in f:  # aligned with the rows and the failures
                for name, want in (("labels", rows), ("failures/labels", len(fidx))):
                    if name not in f or len(f[name]) != want:
                        problems.append(f"shard {i}: {name} missing or not aligned ({want} expected)")
        except Exception as e:
            problems.append(f"shard {i}: unreadable ({type(e).__name__}: {e})")
            return
    allidx = np.concatenate([idx, fidx]).astype(np.int64)
    uniq, counts = np.unique(allidx, return_counts=True)
    doubled = uniq[counts > 1]
    if len(doubled):
        problems.append(f"shard {i}: {len(doubled)} manifest entries appear more than once (e.g. {doubled[:5].tolist()})")
    expected = np.arange(start, stop)
    missing = np.setdiff1d(expected, uniq)
    if len(missing):
        problems.append(f"shard {i}: {len(missing)} manifest entries missing (e.g. {missing[:5].tolist()})")
    extra = np.setdiff1d(uniq, expected)
    if len(extra):
        problems.append(f"shard {i}: {len(extra)} entries outside its range (e.g. {extra[:5].tolist()})")
    if len(idx) > 1 and np.any(np.diff(idx) <= 0):
        problems.append(f"shard {i}: feature rows are not in manifest order")
    if not len(doubled) and not len(missing) and not len(extra):
        names = manifest.read_slice(start, stop)
        for arr, ix in ((raw, idx), (fraw, fidx)):
            for name, j in zip(arr, ix):
                if bytes(name) != names[j - start]:
                    problems.append(f"shard {i}: row for manifest entry {j} is named {bytes(name)!r}, "
                                    f"expected {names[j - start]!r}")
                    break


def _check_merged(run, problems: List[str]) -> None:
    path = run.rundir.merged
    try:
        f = h5py.File(path, "r", locking=False)
    except Exception as e:
        problems.append(f"features.h5 cannot be opened ({e}): run `caffe-runner merge {run.rundir.path}`")
        return
    with f:
        idx = f["index"][:]
        parts, fparts = [], []
        for i in range(run.num_shards):
            with h5py.File(run.rundir.shard_path(i, run.num_shards), "r", locking=False) as s:
                parts.append(s["index"][:])
                fparts.append(s["failures/index"][:])
                rows = len(parts[-1])
                if rows:
                    # a virtual dataset silently shows fill values for a missing source: compare data
                    for b in run.plan["blobs"]:
                        ds = dataset_name(b)
                        pos = sum(len(p) for p in parts[:-1])
                        if not np.array_equal(s[f"features/{ds}"][rows - 1], f[f"features/{ds}"][pos + rows - 1],
                                              equal_nan=True):
                            problems.append(f"features.h5: blob {b} does not show shard {i}'s data "
                                            f"(source missing or moved?): rerun `caffe-runner merge`")
        want = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if not np.array_equal(idx, want):
            problems.append("features.h5: its rows differ from the shards' rows (stale merge?): "
                            f"rerun `caffe-runner merge {run.rundir.path}`")
        fwant = np.concatenate(fparts) if fparts else np.zeros(0, np.int64)
        if not np.array_equal(f["failures/index"][:], fwant):
            problems.append("features.h5: its failures differ from the shards' failures")
        for b in run.plan["blobs"]:
            if len(f[f"features/{dataset_name(b)}"]) != len(idx):
                problems.append(f"features.h5: blob {b} has a different number of rows than names")


def verify(run_dir: Path) -> List[str]:
    problems: List[str] = []
    run = load_run_dir(run_dir)
    manifest = load_manifest(run.rundir.path)
    if manifest.count != run.plan["count"]:
        problems.append(f"manifest holds {manifest.count} entries but run.json says {run.plan['count']}")
        return problems
    for i in range(run.num_shards):
        p = run.rundir.shard_path(i, run.num_shards)
        if not p.exists():
            partial = p.with_name(p.name + ".partial")
            state = "in progress or interrupted" if partial.exists() else "missing"
            problems.append(f"shard {i}: {p.name} is {state}: rerun the extraction (same command) to complete it")
            continue
        _check_shard(p, i, run, manifest, problems)
    if not problems and run.rundir.merged.exists():
        _check_merged(run, problems)
    return problems
