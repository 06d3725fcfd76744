"""`caffe-runner verify RUN_DIR`: prove nothing was lost or doubled.

Every manifest entry must appear exactly once, as a feature row or a recorded failure,
under its own name; every shard file must be complete and of this run's config; the
merged file, when present, must agree with the shards (a view's sources all readable);
and the input must not hold images the run never listed. With content=True (`verify --content`)
every dataset of every shard is read and hashed against the checksums recorded when the shard
was committed (write.py: content_sha256): a file changed or damaged since fails. One shard file open at a time;
memory bounded by the largest shard's index, not by the run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..run.changes import describe_change, input_change_advice, stamp_changed
from ..errors import shell_quote
from ..inputs import input_stamp
from ..store.manifest import display_name, load_manifest
from ..run.plan import load_run_dir
from ..store.stats import read_retries
from .merge import NAME_CHUNK_ROWS, check_sources
from .write import content_digests, dataset_name
from ..store.h5 import open_h5


def _check_content(f, path: Path, i: int, problems: List[str]) -> bool:
    """The shard's datasets against the checksums recorded at its commit; False when it has
    none (written by a version before they were recorded)."""
    rec = f.attrs.get("content_sha256")
    if rec is None:
        return False
    try:
        want = json.loads(rec)
        got = content_digests(f, sorted(want))
    except Exception as e:
        problems.append(f"shard {i}: content cannot be checked ({type(e).__name__}: {e}): delete {path.name} and "
                        "rerun the extraction")
        return True
    bad = [k for k in sorted(want) if got[k] != want[k]]
    if bad:
        problems.append(f"shard {i}: {path.name} differs from the checksums recorded when it was committed "
                        f"({', '.join(bad)}): delete it and rerun the extraction")
    return True


def _opened(path: Path, problems: List[str], what: str, fix: str):
    """The HDF5 file open for reading, or None with a problem recorded (not HDF5, truncated,
    unreadable: h5py raises several kinds)."""
    try:
        return open_h5(path, "r")
    except Exception as e:
        problems.append(f"{what} cannot be opened ({e}): {fix}")
        return None


def _check_shard(path: Path, i: int, run, manifest, problems: List[str],
                 unchecked: Optional[List[int]] = None) -> None:
    start, stop = run.shard_range(i)
    f = _opened(path, problems, f"shard {i}: {path.name}", "delete it and rerun the extraction")
    if f is None:
        return
    with f:
        a = f.attrs
        if not bool(a.get("complete", False)):
            problems.append(f"shard {i}: {path.name} is not marked complete")
        if a.get("fingerprint") != run.plan["fingerprint"]:
            problems.append(f"shard {i}: written with another config (fingerprint differs from run.json)")
        if (int(a.get("start", -1)), int(a.get("stop", -1))) != (start, stop):
            problems.append(f"shard {i}: covers [{a.get('start')}, {a.get('stop')}) but the plan says [{start}, {stop})")
        if unchecked is not None and not _check_content(f, path, i, problems):
            unchecked.append(i)
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
                    problems.append(f"shard {i}: row for manifest entry {j} is named "
                                    f"{display_name(bytes(name))!r}, expected {display_name(names[j - start])!r}")
                    break


def _row_digest(x: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest()


def _check_merged(run, problems: List[str]) -> None:
    path = run.rundir.merged
    f = _opened(path, problems, "features.h5", f"run `caffe-runner merge {shell_quote(run.rundir.path)}`")
    if f is None:
        return
    with f:
        try:
            check_sources(path, f)
        except Exception as e:
            problems.append(f"features.h5: {e}")
            return
        blobs = [dataset_name(b) for b in run.plan["blobs"]]
        n_rows, n_fail = len(f["index"]), len(f["failures/index"])
        for ds in blobs:
            if len(f[f"features/{ds}"]) != n_rows:
                problems.append(f"features.h5: blob {ds} has a different number of rows than names")
                return
        # pass 1, one shard open at a time: its index and failures against the merged ones (in
        # chunks), and a digest of its last row per blob
        digests = []
        pos = fpos = 0
        for i in range(run.num_shards):
            with open_h5(run.shard_path(i), "r") as s:
                for name, off, total in (("index", pos, n_rows), ("failures/index", fpos, n_fail)):
                    n = len(s[name])
                    if off + n > total:
                        problems.append(f"features.h5: holds fewer {name} entries than the shards "
                                        f"(stale merge?): rerun `caffe-runner merge {shell_quote(run.rundir.path)}`")
                        return
                    for a in range(0, n, NAME_CHUNK_ROWS):
                        b = min(n, a + NAME_CHUNK_ROWS)
                        if not np.array_equal(s[name][a:b], f[name][off + a:off + b]):
                            problems.append(f"features.h5: its {name} differs from shard {i}'s (stale merge?): "
                                            f"rerun `caffe-runner merge {shell_quote(run.rundir.path)}`")
                            return
                rows = len(s["index"])
                if rows:
                    digests.append((i, pos + rows - 1,
                                    {ds: _row_digest(s[f"features/{ds}"][rows - 1]) for ds in blobs}))
                pos += rows
                fpos += len(s["failures/index"])
        if (pos, fpos) != (n_rows, n_fail):
            problems.append(f"features.h5: holds {n_rows} rows and {n_fail} failures, the shards {pos} and {fpos} "
                            f"(stale merge?): rerun `caffe-runner merge {shell_quote(run.rundir.path)}`")
            return
        # pass 2: the merged file shows each shard's data (a view with a lost source shows NaN)
        for i, row, want in digests:
            for ds in blobs:
                if _row_digest(f[f"features/{ds}"][row]) != want[ds]:
                    problems.append(f"features.h5: blob {ds} does not show shard {i}'s data "
                                    f"(source missing or changed?): rerun `caffe-runner merge {shell_quote(run.rundir.path)}`")
                    return


def _check_input(run, problems: List[str], notes: List[str]) -> None:
    """Images added to (or changed in) the input since it was listed are not in the run."""
    old = run.plan.get("input_stamp")
    if old is None:
        return
    # a retry read the input again (files fixed for it): its stamp is what the run covers now
    retried = [h.get("input_stamp") for h in read_retries(run.rundir.path) or [] if h.get("input_stamp") and h.get("recovered")]
    old = retried[-1] if retried else old
    now = input_stamp(run.cfg.input)
    if now is None:
        notes.append("the input is not reachable from here: not checked for images added since listing")
    elif stamp_changed(old, now):
        missing, advice = input_change_advice(old, now)
        if missing:
            problems.append(f"the input changed since it was listed ({describe_change(old, now)}): the run may not "
                            f"cover it; {advice}")
        else:
            notes.append(f"the input changed since it was listed ({describe_change(old, now)}): {advice}")


def verify(run_dir: Path, notes: List[str] = None, content: bool = False) -> List[str]:
    problems: List[str] = []
    unchecked: Optional[List[int]] = [] if content else None  # shards without recorded checksums
    notes = notes if notes is not None else []
    run = load_run_dir(run_dir)
    manifest = load_manifest(run.rundir.path)
    if manifest.count != run.plan["count"]:
        problems.append(f"manifest holds {manifest.count} entries but run.json says {run.plan['count']}")
        return problems
    advice = None
    for i in range(run.num_shards):
        p = run.shard_path(i)
        if not p.exists():
            if advice is None:
                from ..run.status import finish_advice

                advice = finish_advice(run)
            state = "in progress or interrupted" if run.partial_paths(i) else "missing"
            problems.append(f"shard {i}: {p.name} is {state}: {advice}")
            continue
        _check_shard(p, i, run, manifest, problems, unchecked)
    if unchecked:
        notes.append(f"{len(unchecked)} shard(s) (e.g. {unchecked[0]}) hold no checksums (written before caffe-runner "
                     "recorded them): their content was not checked")
    if not problems and run.rundir.merged.exists():
        _check_merged(run, problems)
    _check_input(run, problems, notes)
    listing = run.plan.get("listing") or manifest.listing or {}
    if listing.get("skipped"):  # "every image once" is of the listed ones: say what was left out
        notes.append(skipped_note(listing))
    return problems


def skipped_note(listing: Dict) -> str:
    """What the listing left out, and the way to include it only where there is one (pure): a
    run folder inside the input is never part of it, whatever input.extensions says."""
    from ..inputs.listing import describe

    fix = "; add extensions with input.extensions=[...] to include them" if listing.get("skipped_by_extension") else ""
    return f"input: {describe(listing)}{fix}"
