"""stats.json: what a run produced, at a glance (images, rows, failures by reason, throughput,
elapsed, per shard), read from the complete shard files, and the on-screen summary made
from it. Written when a run is merged (locally, by the Slurm merge job, by `merge`)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import FailureShareError, shell_quote
from .atomic import atomic_write_text
from .h5 import open_h5

STATS_JSON = "stats.json"
TOP_REASONS = 5


def reason_kind(reason: str) -> str:
    """Failure reasons carry details (sizes, library messages): group them by what comes
    before the first ':' ("too large: 20000x20000 = ..." -> "too large")."""
    return reason.split(":", 1)[0].strip() or reason


def top_reasons(by_reason: Dict[str, int], top: int = TOP_REASONS) -> List[Tuple[int, str]]:
    """(count, reason) lines that add up to every failure: the `top` most frequent reasons, then
    one line for the rest ("N other reasons (K kinds)"), or the last reason by name when it is
    the only one left."""
    reasons = sorted(by_reason.items(), key=lambda kv: -kv[1])
    if len(reasons) <= top + 1:
        return [(k, why) for why, k in reasons]
    rest = reasons[top:]
    return [(k, why) for why, k in reasons[:top]] + [(sum(k for _, k in rest), f"other reasons ({len(rest)} kinds)")]


# failure reasons that can be transient (the storage, not the image): `retry` retries them by default
TRANSIENT = ("file not found", "listed but not found", "permission denied", "read error", "cannot open",
             "broken symlink")
# one reason for at least this share of the images is worth a line of its own in the summary
ONE_REASON_SHARE = 0.01


def is_transient(reason: str) -> bool:
    return reason.startswith(TRANSIENT)


def one_reason_note(stats: Dict, run_dir: str) -> Optional[str]:
    """The summary's warning when many images failed for one reason (pure): at least
    ONE_REASON_SHARE of the images and at least 2 of them. A storage reason (a file system that
    fails reads) is not the images' fault: the note says how to read them again."""
    done = stats["rows"] + stats["failures"]
    if not stats["failures"] or not stats["failures_by_reason"]:
        return None
    why, k = max(stats["failures_by_reason"].items(), key=lambda kv: kv[1])
    if k < 2 or k < ONE_REASON_SHARE * done:
        return None
    what = (f"the storage, not the images: fix it, then `caffe-runner retry {shell_quote(run_dir)}` reads them again"
            if is_transient(why) else "check a few of them (failures/names in features.h5)")
    return f"WARNING: {k} of {done} images ({failure_share(done, k):.0%}) failed for one reason, {why!r}: {what}"


def failure_share(images: int, failures: int) -> float:
    return failures / images if images else 0.0


# what a GPU shard records (extract._gpu_attrs, selfcheck.SelfCheck.attrs), shown per shard
GPU_ATTRS = ("gpu", "cudnn", "tf32", "cudnn_workspace_mb", "selfcheck_max_rel_diff", "selfcheck_blob",
             "selfcheck_tolerance", "selfcheck_cpu_s")


def _gpu_figures(attrs) -> Dict:
    out = {}
    for k in GPU_ATTRS:
        if k in attrs:
            v = attrs[k]
            out[k] = v.item() if hasattr(v, "item") else (v.decode() if isinstance(v, bytes) else v)
    return out


def collect_stats(run, elapsed_s: Optional[float] = None) -> Dict:
    """Totals and per-shard figures from the run's complete shard files."""

    rd, n = run.rundir, run.num_shards
    shards: List[Dict] = []
    reasons: Counter = Counter()
    rows = failures = 0
    for i in range(n):
        path = run.shard_path(i)
        if not run.shard_done(i):
            shards.append({"shard": i, "complete": False})
            continue
        with open_h5(path, "r") as f:
            a = f.attrs
            r, fl = int(a["rows"]), int(a["n_failures"])
            reasons.update(reason_kind(x) for x in f["failures/reason"].asstr()[:])
            shards.append({"shard": i, "complete": True, "rows": r, "failures": fl,
                           "elapsed_s": round(float(a.get("elapsed_s", 0.0)), 3),
                           "images_per_s": round(float(a.get("images_per_s", 0.0)), 3),
                           "host": str(a.get("host", "")), "device": str(a.get("device", "")),
                           "job_id": str(a.get("job_id", "")), **_gpu_figures(a)})
        rows += r
        failures += fl
    busy = sum(s.get("elapsed_s", 0.0) for s in shards)
    done = rows + failures
    return {
        "run_dir": str(rd.path),
        "images": int(run.plan["count"]),
        "rows": rows,
        "failures": failures,
        "failure_share": round(failure_share(done, failures), 6),
        "failures_by_reason": dict(reasons.most_common()),
        # the limit of the command that merged the run (a rerun may raise it): what status judges by
        "max_failure_fraction": failure_limit(getattr(run, "cfg", None)),
        "shards_complete": sum(1 for s in shards if s["complete"]),
        "num_shards": n,
        # wall-clock of the launch that finished the run (null when the shards ran elsewhere)
        "elapsed_s": round(elapsed_s, 3) if elapsed_s else None,
        "images_per_s": round(done / elapsed_s, 3) if elapsed_s else None,
        # summed per-shard extraction time (model load excluded)
        "shard_seconds": round(busy, 3),
        "shards": shards,
        # `caffe-runner retry`: what was tried again and with what result (retries.json has each one)
        "retries": _retries_summary(Path(rd.path)),
    }


def read_retries(run_dir: Path) -> Optional[List[Dict]]:
    """retries.json: each `retry` of the run, oldest first; None when there is none (or unreadable)."""
    try:
        history = json.loads((Path(run_dir) / "retries.json").read_text())
    except (OSError, ValueError):
        return None
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else None


def _retries_summary(run_dir: Path) -> Optional[Dict]:
    history = read_retries(run_dir)
    if history is None:
        return None
    return {"count": len(history), "retried": sum(h.get("retried", 0) for h in history),
            "recovered": sum(h.get("recovered", 0) for h in history),
            "last": {k: history[-1].get(k) for k in ("t", "reasons", "retried", "recovered", "still_failing",
                                                     "still_failing_by_reason")} if history else None}


def write_stats(run, elapsed_s: Optional[float] = None) -> Dict:
    stats = collect_stats(run, elapsed_s)
    atomic_write_text(Path(run.rundir.path) / STATS_JSON, json.dumps(stats, indent=1))
    return stats


def current_stats(run) -> Dict:
    """stats.json of a run that is already merged and complete, as it is (its launch's elapsed
    time kept), with this command's failure limit; written anew when unreadable."""
    path = Path(run.rundir.path) / STATS_JSON
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return write_stats(run)
    limit = failure_limit(getattr(run, "cfg", None))
    if stats.get("max_failure_fraction", "unset") != limit:
        stats["max_failure_fraction"] = limit
        atomic_write_text(path, json.dumps(stats, indent=1))
    return stats


def format_summary(summary: Dict) -> str:
    """The end-of-run lines: where the result is, every image counted, the top failure reasons."""
    st = summary.get("stats") or {}
    lines = [f"run directory: {summary['run_dir']}"]
    if summary.get("merged"):
        lines.append(f"features:      {summary['merged']}")
    if st:
        lines.append(f"images:        {st['rows'] + st['failures']} ({st['rows']} extracted, {st['failures']} failed)")
        for b, s in (summary.get("blob_shapes") or {}).items():
            lines.append(f"blob {b}: {'x'.join(map(str, s))} per image")
        for k, why in top_reasons(st["failures_by_reason"]):
            lines.append(f"  failed: {k:>6} {why}")
        if st["failures"]:
            lines.append(f"  (names and reasons: failures/names, failures/reason in features.h5; "
                         f"{Path(summary['run_dir']) / STATS_JSON})")
            note = one_reason_note(st, summary["run_dir"])
            if note:
                lines.append(note)
        checks = [s["selfcheck_max_rel_diff"] for s in st.get("shards", []) if "selfcheck_max_rel_diff" in s]
        if checks:
            lines.append(f"GPU self-check: {len(checks)} shard(s) passed, GPU vs CPU at most {max(checks):.2g} "
                         "(max |gpu-cpu| / max |cpu|)")
    shards = summary.get("shards", {})
    lines.append(f"shards:        {summary.get('num_shards', len(shards))} ({len(shards)} run now, "
                 f"{summary.get('already_complete', 0)} already complete)")
    el = summary.get("elapsed_s") or 0
    done_now = sum(s.get("rows", 0) + s.get("failures", 0) for s in shards.values())
    if el > 0 and done_now:
        lines.append(f"throughput:    {done_now / el:.1f} images/s over {el:.1f} s (model load included)")
    return "\n".join(lines)


def failure_limit(cfg) -> Optional[float]:
    return cfg.run.max_failure_fraction if cfg is not None and "run" in cfg else None


def check_failure_share(cfg, stats: Optional[Dict]) -> None:
    """run.max_failure_fraction: a run where more images failed than that is a failed run."""
    limit = failure_limit(cfg)
    if stats and stats["failures"] and not stats["rows"]:  # whatever the limit: nothing to show for the run
        top = ", ".join(f"{k} {why}" for why, k in list(stats["failures_by_reason"].items())[:3])
        raise FailureShareError(f"none of the {stats['failures']} images could be extracted ({top}): check the "
                                f"input (the failures are recorded in {stats['run_dir']})")
    if limit is None or not stats:
        return
    done = stats["rows"] + stats["failures"]
    share = failure_share(done, stats["failures"])
    if share > float(limit):
        top = ", ".join(f"{k} {why}" for why, k in list(stats["failures_by_reason"].items())[:3])
        raise FailureShareError(
            f"{stats['failures']} of {done} images failed ({share:.1%} > run.max_failure_fraction={limit}; {top}): "
            f"the result is kept in {stats['run_dir']}; check the input, or raise run.max_failure_fraction "
            "(the default is 0.05; null: failed images never fail the run)")
