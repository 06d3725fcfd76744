"""A sweep's shared pass (issue 36): points that differ only in what is kept of the net's output
(blobs, pooling, normalisation, dtype) are extracted by one pass. The first point's tasks decode
and forward once with every point's blobs, and write each point's own shard file, each with its
own post-processing, lock, heartbeat and events; the other points are its companions
(`sweep.companions`, set by the sweep). Each point stays a run of its own: resume, verify, retry
and merge work on it alone, and its rows are the rows the point run alone writes (the same
engine on the same batches: tests/test_sweep_file.py checks them bit for bit).

A companion whose plan is not the pass's (another model, input, shard count, or replaced since)
is left out with a warning; its own launch then extracts it alone.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from .. import log
from ..errors import RunnerError
from .plan import Run, load_run_dir

# what a point keeps of the net's output: the only keys in which points of one pass may differ
OUTPUT_KEYS = ("blobs", "pooling", "gem_p", "l2_normalize", "dtype", "dir", "overwrite")


def pass_key(cfg: Dict) -> str:
    """The extraction a point's config (a plain dict, resolved) needs, without what it keeps of
    the output (pure): points with one key share one pass."""
    c = json.loads(json.dumps(cfg, default=str))
    c.get("output", {}).update({k: None for k in OUTPUT_KEYS})
    c.get("model", {}).pop("default_blobs", None)  # the blobs chosen are in output.blobs' place
    c.pop("sweep", None)
    return json.dumps(c, sort_keys=True)


def why_not_shared(lead: Dict, other: Dict) -> Optional[str]:
    """Why the run planned as `other` cannot be written by `lead`'s pass, or None (pure: two
    run.json plans). Same model files and preprocessing, backend, decoding, input listing and
    shards; blobs and output post-processing may differ."""
    def extraction(plan):
        ident = {k: v for k, v in plan.get("identity", {}).items() if k not in ("blobs", "output")}
        stamp = plan.get("input_stamp") or {}
        return ident, plan.get("count"), plan.get("segments"), stamp.get("names"), plan.get("input_hw")

    a, b = extraction(lead), extraction(other)
    for what, x, y in zip(("model, backend or decoding", "image count", "shards", "input listing", "input size"),
                          a, b):
        if x != y:
            return f"its {what} differs"
    return None


def companions(run: Run) -> List[Run]:
    """The runs this run's tasks also write (cfg.sweep.companions), each checked against this
    run's plan; one that cannot be read or is not this pass's is left out (said once per task)."""
    dirs = list((run.cfg.get("sweep") or {}).get("companions") or [])
    out = []
    for d in dirs:
        try:
            other = load_run_dir(d)
        except RunnerError as e:
            log.warning("shared pass: companion %s left out (%s): its own launch extracts it", d, e)
            continue
        why = why_not_shared(run.plan, other.plan)
        if why:
            log.warning("shared pass: companion %s left out (%s): its own launch extracts it", d, why)
            continue
        out.append(other)
    return out


def pass_blobs(runs: List[Run]) -> List[str]:
    """Every blob any run of the pass keeps, in first-seen order: what the net is loaded for."""
    seen: List[str] = []
    for r in runs:
        seen += [b for b in r.plan["blobs"] if b not in seen]
    return seen


def pass_missing(run: Run) -> List[int]:
    """Shards some run of the pass (this run or a companion) still needs."""
    need = set(run.missing_shards())
    for c in companions(run):
        need.update(c.missing_shards())
    return sorted(need)
