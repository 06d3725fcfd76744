"""`caffe-runner report RUN_DIR`: one self-contained HTML file that draws the run.

Read only from the run directory (events/, status/, shards/, stats.json, retries.json, run.json,
.hydra/, submissions.json, logs/commands.jsonl), so it works for local and Slurm runs, finished
or still running, requeued or resumed. A run made before events/ existed is drawn from its shard
files (one attempt per shard: the file's time and its elapsed_s).

Charts are matplotlib figures rendered to SVG and inlined (text kept as text, no fonts or
scripts embedded): the file needs no network and no JavaScript. Dense marks (a timeline of more
than RASTER_ABOVE attempts, the per-task rate map) are rasterized inside the SVG so a
1,000-shard report stays small enough to mail.
"""
from __future__ import annotations

import html
import io
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..store.atomic import atomic_write_text
from ..store.events import attempts as group_attempts, events_path, read_commands, read_events, read_jsonl
from ..errors import shown
from ..jobs.slurm import query_jobs, state_alive
from ..store.stats import reason_kind
from ..store.h5 import open_h5

RASTER_ABOVE = 300       # timeline bars drawn as an image above this many attempts
LINES_UP_TO = 12         # per-task rate: one line per task up to this many, a map above
RATE_BINS = 120
SLOWEST = 5
EXAMPLES = 3
# shard attributes that are bookkeeping, not figures worth a column in the report
_NOT_FIGURES = {"rows", "n_failures", "next", "start", "stop", "shard", "num_shards", "pid", "manifest_count",
                "format_version", "complete", "resumed"}
COLORS = {"finished": "#2e7d32", "failed": "#c62828", "killed": "#8e0000", "requeued": "#6a1b9a",
          "ended": "#ef6c00", "running": "#1565c0", "stalled": "#f9a825"}
OUTCOME_TEXT = {"finished": "finished", "failed": "failed", "killed": "killed by Slurm",
                "requeued": "requeued (resumes when Slurm restarts it)",
                "ended": "stopped (killed, requeued or preempted)", "running": "running now",
                "stalled": "stalled (beats, no progress)"}
FAILED_OUTCOMES = ("failed", "killed")


# ---- what the run directory says --------------------------------------------------------

def _shard_attempts(run, i: int, now: float, st: Dict) -> List[Dict]:
    """Attempts at shard i from its event log, or one made from its file (older runs)."""
    final = run.shard_path(i)
    state = st["state"]
    att = group_attempts(read_events(events_path(run.rundir.path, final.stem)))
    if att and state in ("running", "stalled") and att[-1]["outcome"] == "ended":
        att[-1]["outcome"] = state
        if state == "stalled":
            att[-1]["error"] = st.get("note")
        att[-1]["end"] = now
        # the heartbeat is fresher than the last progress line
        beat_t = now - float(st.get("age_s") or 0.0)
        if beat_t > max((t for t, _ in att[-1]["samples"]), default=0):
            att[-1]["samples"].append((beat_t, int(st["done"])))
    elif att and att[-1]["outcome"] == "ended" and (st.get("cause") or state == "requeued"):
        # the attempt stopped without a word; Slurm's word (status) says how
        if state == "requeued":
            att[-1]["outcome"] = "requeued"
        else:
            att[-1]["outcome"], att[-1]["error"] = "killed", st.get("error")
    if not att and final.exists():

        with open_h5(final, "r") as f:
            a = f.attrs
            end = final.stat().st_mtime
            el = float(a.get("elapsed_s", 0.0)) + float(a.get("load_s", 0.0))
            n = int(a.get("rows", 0)) + int(a.get("n_failures", 0))
            att = [{"start": end - el, "end": end, "outcome": "finished", "kind": "started",
                    "host": str(a.get("host", "")), "job_id": str(a.get("job_id", "")),
                    "gpu": str(a.get("visible_gpus", "")), "device": str(a.get("device", "")), "restart": 0,
                    "done0": 0, "samples": [(end - el, 0), (end, n)], "rows": int(a.get("rows", 0)),
                    "failures": int(a.get("n_failures", 0))}]
    for a in att:
        a["shard"] = i
    return att


def attempt_word(att: Dict, word) -> Optional[Tuple[str, str]]:
    """(outcome, error) of an attempt that stopped without a word of its own, from Slurm's word on
    its job (a slurmjobs.JobWord; pure): the run it was (sacct -D keeps one record per run of a
    requeued job), e.g. ("killed", "killed by Slurm: CANCELLED (scancel)"); None when Slurm does
    not say how it ended."""
    runs = list(word.runs) or [word.state]
    r = int(att.get("restart") or 0)
    state = runs[r] if r < len(runs) else word.state
    if state in ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"):
        return "requeued", f"requeued by Slurm ({state})"
    if state == "COMPLETED" or state_alive(state):
        return None
    why = {"CANCELLED": "CANCELLED (scancel)", "NODE_FAIL": "NODE_FAIL (its node was lost)",
           "OUT_OF_MEMORY": "OUT_OF_MEMORY", "TIMEOUT": "TIMEOUT", "PREEMPTED": "PREEMPTED",
           "FAILED": f"FAILED, exit code {word.exit_code or '?'}"}.get(state, state)
    return "killed", f"killed by Slurm: {why}" + (f" on {word.node}" if word.node else "")


def _slurms_word_on_silent_attempts(attempts: List[Dict]) -> None:
    """Earlier attempts that stopped without a word (a scancel, a node lost) under a shard that has
    since moved on: how they ended, in Slurm's words (one batched query; left as they are where
    Slurm cannot say)."""
    silent = [a for a in attempts if a["outcome"] == "ended" and a.get("job_id")]
    if not silent:
        return
    word = query_jobs(str(a["job_id"]) for a in silent)
    for a in silent:
        w = word.jobs.get(str(a["job_id"]))
        said = attempt_word(a, w) if w is not None else None
        if said:
            a["outcome"], a["error"] = said


def _shard_file_facts(path: Path, reasons: Counter, examples: Dict[str, List[str]],
                      ran: Optional[Dict[str, Dict[str, List[int]]]] = None, shard: int = 0) -> Dict[str, float]:
    """Numeric attributes of a complete shard file (its quality and speed figures), its
    failures folded into `reasons` / `examples`, and its backend (as configured) and engine (as
    run) into `ran` ({attr: {value: shards}})."""

    figures: Dict[str, float] = {}
    with open_h5(path, "r") as f:
        figures["_rows"], figures["_failures"] = len(f["index"]), len(f["failures/index"])
        for k, by in (ran or {}).items():
            by.setdefault(str(f.attrs.get(k, "")), []).append(shard)
        for k, v in f.attrs.items():
            if k in _NOT_FIGURES:
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
                figures[k] = float(v)
        n = len(f["failures/reason"])
        for a in range(0, n, 65536):
            for name, why in zip(f["failures/names"].asstr()[a:a + 65536], f["failures/reason"].asstr()[a:a + 65536]):
                kind = reason_kind(why)
                reasons[kind] += 1
                ex = examples.setdefault(kind, [])
                if len(ex) < EXAMPLES:
                    ex.append(shown(f"{name} ({why})" if why != kind else name))
    return figures


def collect(run_dir: Path) -> Dict:
    """Everything the report shows, as plain data (no drawing)."""
    from ..results.merge import agreed
    from ..run.plan import load_run_dir
    from ..run.status import run_status

    run = load_run_dir(run_dir)
    rd = run.rundir.path
    now = time.time()
    st = run_status(rd)  # with Slurm's word on tasks that fell silent
    attempts: List[Dict] = []
    reasons: Counter = Counter()
    examples: Dict[str, List[str]] = {}
    figures: Dict[int, Dict[str, float]] = {}
    ran: Dict[str, Dict[str, List[int]]] = {"backend": {}, "engine": {}}
    for s in st["shards"]:
        i = s["shard"]
        attempts += _shard_attempts(run, i, now, s)
        if s["state"] == "done":
            figures[i] = _shard_file_facts(run.shard_path(i), reasons, examples, ran, i)
            # a complete shard's file is the truth (a heartbeat may be missing or older than a retry)
            s["rows"], s["failures"] = int(figures[i].pop("_rows")), int(figures[i].pop("_failures"))
    st["rows"], st["failures"] = sum(s["rows"] for s in st["shards"]), sum(s["failures"] for s in st["shards"])
    if (rd / "submissions.json").exists():
        _slurms_word_on_silent_attempts(attempts)
    stats = _read_json(rd / "stats.json") or {}
    return {
        "run_dir": str(rd), "generated": now, "plan": run.plan, "status": st, "attempts": attempts,
        "reasons": dict(reasons.most_common()), "examples": examples, "figures": figures, "stats": stats,
        "retries": _read_json(rd / "retries.json") or [], "commands": read_commands(rd),
        "submissions": _read_json(rd / "submissions.json") or [],
        "overrides": _read_text(rd / ".hydra" / "overrides.yaml"),
        "merged_attrs": _merged_attrs(run.rundir.merged),
        # as the complete shards recorded them ("mixed: ..." when they differ); the backend as
        # configured before any shard is complete
        "ran": {"backend": agreed(ran["backend"]) or str(run.cfg.get("backend") or ""),
                "engine": agreed(ran["engine"])},
    }


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _merged_attrs(path: Path) -> Dict[str, str]:
    if not path.exists():
        return {}

    try:
        with open_h5(path, "r") as f:
            return {k: str(f.attrs[k]) for k in ("blob_shapes", "container_images", "layout", "device")
                    if k in f.attrs}
    except OSError:
        return {}


# ---- arithmetic (pure) -----------------------------------------------------------------

def rate_segments(att: Dict) -> List[Tuple[float, float, int]]:
    """(t0, t1, images) between consecutive progress samples of one attempt."""
    s = sorted(att["samples"])
    return [(a[0], b[0], b[1] - a[1]) for a, b in zip(s, s[1:]) if b[0] > a[0] and b[1] >= a[1]]


def binned_rate(segments: Sequence[Tuple[float, float, int]], edges: np.ndarray) -> np.ndarray:
    """Images/s in each bin of `edges`: every segment's images spread evenly over its time span."""
    out = np.zeros(len(edges) - 1)
    for t0, t1, n in segments:
        lo = np.clip(edges[:-1], t0, t1)
        hi = np.clip(edges[1:], t0, t1)
        out += n * (hi - lo) / (t1 - t0)
    return out / np.diff(edges)


def shard_rates(attempts: Sequence[Dict]) -> Dict[int, Dict]:
    """Per shard: images done, seconds spent in all its attempts, images/s over them."""
    out: Dict[int, Dict] = {}
    for a in attempts:
        d = out.setdefault(a["shard"], {"images": 0, "seconds": 0.0, "attempts": 0, "hosts": set()})
        d["seconds"] += max(0.0, a["end"] - a["start"])
        d["attempts"] += 1
        if a["samples"]:
            d["images"] += max(0, max(n for _, n in a["samples"]) - a["done0"])
        if a.get("host"):
            d["hosts"].add(str(a["host"]))
    for d in out.values():
        d["rate"] = d["images"] / d["seconds"] if d["seconds"] > 0 else 0.0
    return out


def figure_summary(figures: Dict[int, Dict[str, float]]) -> List[Dict]:
    """Per numeric shard attribute: min, median, max and the shards at the extremes."""
    keys = sorted({k for f in figures.values() for k in f})
    out = []
    for k in keys:
        vals = [(v[k], i) for i, v in figures.items() if k in v and np.isfinite(v[k])]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        out.append({"name": k, "n": len(vals), "min": lo[0], "min_shard": lo[1], "median": statistics.median(
            v for v, _ in vals), "max": hi[0], "max_shard": hi[1]})
    return out


# ---- drawing ------------------------------------------------------------------------------

def _svg(fig, salt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with _rc(salt):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    import re

    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML
    return re.sub(r"<metadata>.*?</metadata>", "", text, count=1, flags=re.S)


def _rc(salt: str):
    import matplotlib

    # text as text (no glyph paths), ids unique per figure (several SVGs share one document)
    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9})


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_timeline(attempts: Sequence[Dict], t0: float, num_shards: int) -> str:
    plt = _mpl()
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    h = min(9.0, 1.2 + 0.22 * num_shards)
    fig, ax = plt.subplots(figsize=(10, h))
    polys, colors = [], []
    for a in attempts:
        x0, x1 = a["start"] - t0, max(a["end"] - t0, a["start"] - t0 + 1e-3)
        y = a["shard"]
        polys.append([(x0, y - 0.38), (x1, y - 0.38), (x1, y + 0.38), (x0, y + 0.38)])
        colors.append(COLORS[a["outcome"]])
    pc = PolyCollection(polys, facecolors=colors, edgecolors="white" if len(polys) <= RASTER_ABOVE else "none",
                        linewidths=0.5)
    pc.set_gid("timeline-bars")
    if len(polys) > RASTER_ABOVE:
        pc.set_rasterized(True)
    ax.add_collection(pc)
    resumed = [(a["start"] - t0, a["shard"]) for a in attempts if a["kind"] == "resumed"]
    if resumed and len(resumed) <= RASTER_ABOVE:
        ax.plot([x for x, _ in resumed], [y for _, y in resumed], "k>", ms=4, label="resumed")
    # a shard taken by a task that was started for another one (steal.py)
    taken = [(a["start"] - t0, a["shard"]) for a in attempts if a.get("own_shard") is not None]
    if taken and len(taken) <= RASTER_ABOVE:
        ax.plot([x for x, _ in taken], [y for _, y in taken], "w*", ms=6, mec="k", mew=0.4,
                label="taken by a task that finished its own")
        resumed = resumed or taken
    t_end = max((a["end"] for a in attempts), default=t0 + 1) - t0
    ax.set_xlim(0, max(t_end, 1e-3) * 1.02)
    ax.set_ylim(num_shards - 0.5, -0.5)
    ax.set_xlabel("seconds since the first task started")
    ax.set_ylabel("shard")
    if num_shards <= 40:
        ax.set_yticks(range(num_shards))
    present = [k for k in COLORS if any(a["outcome"] == k for a in attempts)]
    handles = [Patch(color=COLORS[k], label=OUTCOME_TEXT[k]) for k in present]
    if resumed:
        handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, frameon=False, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig, "timeline")


def draw_rates(attempts: Sequence[Dict], t0: float, num_shards: int) -> Tuple[str, Optional[np.ndarray]]:
    """Images/s of the whole run over time, and per task (lines, or a map for many tasks)."""
    plt = _mpl()
    t_end = max((a["end"] for a in attempts), default=t0 + 1)
    edges = np.linspace(t0, max(t_end, t0 + 1e-3), RATE_BINS + 1)
    per = {}
    for a in attempts:
        segs = rate_segments(a)
        if segs:
            per.setdefault(a["shard"], []).extend(segs)
    total = binned_rate([s for v in per.values() for s in v], edges)
    many = len(per) > LINES_UP_TO
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.6 if not many else 3.2 + min(5.0, 0.02 * num_shards + 2)),
                             sharex=True, gridspec_kw={"height_ratios": [1, 1.3 if many else 1]})
    x = (edges[:-1] + edges[1:]) / 2 - t0
    ax = axes[0]
    ax.fill_between(x, total, step="mid", alpha=0.3, color="#1565c0")
    line, = ax.plot(x, total, drawstyle="steps-mid", color="#1565c0", lw=1.2)
    line.set_gid("rate-run")
    ax.set_ylabel("images/s (run)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if not many:
        for i in sorted(per):
            ln, = ax.plot(x, binned_rate(per[i], edges), drawstyle="steps-mid", lw=1, label=f"shard {i}")
            ln.set_gid(f"rate-shard-{i}")
        if per:
            ax.legend(fontsize=7, ncol=min(6, len(per)), loc="upper right", frameon=False)
        ax.set_ylabel("images/s (task)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    else:
        grid = np.full((num_shards, RATE_BINS), np.nan)
        for i, segs in per.items():
            r = binned_rate(segs, edges)
            grid[i] = np.where(r > 0, r, np.nan)
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(0, edges[-1] - t0, num_shards - 0.5, -0.5))
        im.set_gid("rate-map")
        fig.colorbar(im, ax=ax, label="images/s (task)", pad=0.01)
        ax.set_ylabel("shard")
    ax.set_xlabel("seconds since the first task started")
    return _svg(fig, "rates"), total


def draw_shard_rates(rates: Dict[int, Dict], slow: Sequence[int], num_shards: int) -> str:
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(10, 2.6))
    xs = sorted(rates)
    ys = [rates[i]["rate"] for i in xs]
    colors = ["#c62828" if i in slow else "#607d8b" for i in xs]
    bars = ax.bar(xs, ys, width=0.9 if num_shards <= 200 else 1.0, color=colors, linewidth=0)
    for i, b in zip(xs, bars):
        b.set_gid(f"shard-rate-{i}")
        b.set_rasterized(len(xs) > 200)
    if ys:
        med = float(np.median(ys))
        ax.axhline(med, color="k", lw=0.8, ls="--", label=f"median {med:.1f} images/s")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("shard")
    ax.set_ylabel("images/s (its attempts)")
    ax.set_xlim(-0.6, num_shards - 0.4)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig, "shardrates")


# ---- the page ---------------------------------------------------------------------------

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 12px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
th{border-bottom:1px solid #ccc}td.n,th.n{text-align:right}code,pre{font:12px ui-monospace,monospace}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:420px}.kv td:first-child{color:#555}
.state{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;background:#2e7d32}
.state.running,.state.incomplete{background:#1565c0}.state.stalled{background:#f9a825}.state.failed{background:#c62828}
figure{margin:8px 0}figure svg{max-width:100%;height:auto}.muted{color:#666}"""


def _e(x) -> str:
    return html.escape(str(x))


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _dur(s: float) -> str:
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _table(head: Sequence[str], rows: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
    h = "".join(f'<th class="n">{_e(c)}</th>' if k in numeric else f"<th>{_e(c)}</th>" for k, c in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if k in numeric else f"<td>{_e(c)}</td>"
                                    for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _command_line(rec: Dict) -> str:
    """The command as the user could type it again: the path quoting caffe-runner adds for
    Hydra is taken off (it adds it again), then quoted for the shell only where needed."""
    import shlex

    from ..run.overrides import as_typed

    head = {"extract": "caffe-runner", "retry": "caffe-runner retry"}.get(rec.get("what"), "caffe-runner " + str(
        rec.get("what", "")))
    return f"{head} {' '.join(shlex.quote(as_typed(a)) for a in rec.get('args', []))}".strip()


def render(data: Dict) -> str:
    plan, st, attempts = data["plan"], data["status"], data["attempts"]
    n = int(plan["num_shards"])
    t0 = min((a["start"] for a in attempts), default=data["generated"])
    t_last = max((a["end"] for a in attempts), default=t0)
    running = st["state"] in ("running", "incomplete")
    parts = [f"<h1>caffe-runner report: {_e(Path(data['run_dir']).name)}</h1>",
             f'<p><span class="state {_e(st["state"])}" id="run-state">{_e(st["state"])}</span> '
             f'<code>{_e(data["run_dir"])}</code> &middot; made {_e(_when(data["generated"]))}'
             + (" &middot; <b>the run was still in progress when this was made: rerun `caffe-runner report` "
                "for a later view</b>" if running else "") + "</p>"]
    done = st["done"]
    wall = t_last - t0 if attempts else 0.0
    summary = [("images", f"{st['images']:,}"), ("accounted for", f"{done:,} ({st['rows']:,} features, "
                                                                   f"{st['failures']:,} failures)"),
               ("shards", ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items())) + f" of {n}"),
               ("task attempts", f"{len(attempts)} ({sum(1 for a in attempts if a['outcome'] in FAILED_OUTCOMES)} failed, "
                                 f"{sum(1 for a in attempts if a['kind'] == 'resumed')} resumed, "
                                 f"{sum(1 for a in attempts if a.get('own_shard') is not None)} taken by a task "
                                 "started for another shard)"),
               ("first start / last event", f"{_when(t0)} / {_when(t_last)} ({_dur(wall)})" if attempts else "none"),
               ("throughput", f"{done / wall:.1f} images/s over the run's wall-clock" if wall > 0 else "")]
    parts.append('<table class="kv">' + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary)
                 + "</table>")

    parts.append("<h2>Timeline of task attempts</h2>")
    if attempts:
        parts.append(f'<figure id="timeline">{draw_timeline(attempts, t0, n)}</figure>')
        parts.append('<p class="muted">One row per shard, one bar per attempt (a process running it: a task, a '
                     "requeue, a rerun). Gaps are time a shard waited; an orange bar ended without finishing "
                     "(its work up to the last flushed batch was kept and resumed).</p>")
        parts.append(_attempt_table(attempts, t0))
    else:
        parts.append('<p id="timeline-empty">No task has started yet.</p>')

    parts.append("<h2>Images per second</h2>")
    rates = shard_rates(attempts)
    if any(rate_segments(a) for a in attempts):
        svg, _ = draw_rates(attempts, t0, n)
        parts.append(f'<figure id="rate">{svg}</figure>')
    else:
        parts.append('<p id="rate-empty">No progress recorded yet.</p>')
    if rates:
        order = sorted(rates, key=lambda i: rates[i]["rate"])
        slow = [i for i in order if rates[i]["images"] > 0][:min(SLOWEST, max(1, len(rates) // 4))]
        parts.append(f'<figure id="shard-rate">{draw_shard_rates(rates, slow, n)}</figure>')
        parts.append("<p>Slowest shards (images per second of their attempts, model load and waits inside "
                     "the task included):</p>")
        parts.append(_table(["shard", "images/s", "images", "time", "attempts", "host"],
                            [(i, f"{rates[i]['rate']:.2f}", rates[i]["images"], _dur(rates[i]["seconds"]),
                              rates[i]["attempts"], ", ".join(sorted(rates[i]["hosts"]))) for i in slow], (1, 2, 4)))

    parts.append("<h2>Failures by reason</h2>")
    if data["reasons"]:
        parts.append(_table(["reason", "images", "examples"],
                            [(k, v, "; ".join(data["examples"].get(k, []))) for k, v in data["reasons"].items()], (1,)))
        if running:
            parts.append('<p class="muted">Counted in complete shards only.</p>')
    else:
        parts.append("<p>No failed images" + (" in the complete shards" if running else "") + ".</p>")
    if data["retries"]:
        parts.append("<h2>Retries</h2>")
        parts.append(_table(["when", "retried", "now features", "still failing", "reasons retried"],
                            [(_when(r.get("t")), r.get("retried", 0), r.get("recovered", 0), r.get("still_failing", 0),
                              ", ".join(r.get("reasons", []))) for r in data["retries"]], (1, 2, 3)))

    parts.append("<h2>Per-shard figures</h2>")
    fs = figure_summary(data["figures"])
    if fs:
        parts.append('<p class="muted">Every numeric attribute the shard files record (speed, and quality checks '
                     "such as a GPU self-check's measured difference when the run made one).</p>")
        parts.append(_table(["figure", "shards", "min (shard)", "median", "max (shard)"],
                            [(f["name"], f["n"], f"{f['min']:.6g} ({f['min_shard']})", f"{f['median']:.6g}",
                              f"{f['max']:.6g} ({f['max_shard']})") for f in fs], (1,)))
    else:
        parts.append("<p>No complete shard yet.</p>")

    parts.append("<h2>What ran</h2>")
    m = plan.get("model", {})
    ident = [("model", m.get("name")), ("prototxt", f"{m.get('prototxt')} (sha256 {m.get('prototxt_sha256')})"),
             ("weights", f"{m.get('weights')} (sha256 {m.get('weights_sha256')})"),
             ("mean file", m.get("mean_file") and f"{m['mean_file']} (sha256 {m.get('mean_file_sha256')})"),
             ("blobs", ", ".join(plan.get("blobs", []))),
             ("blob shapes", data["merged_attrs"].get("blob_shapes", "")),
             ("input", plan.get("identity", {}).get("input")), ("input size", "x".join(map(str, plan.get("input_hw", [])))),
             ("backend", data.get("ran", {}).get("backend") or plan.get("identity", {}).get("backend")),
             ("engine", data.get("ran", {}).get("engine") or "not recorded (no complete shard says)"),
             ("devices", ", ".join(sorted({str(a.get("device")) for a in attempts if a.get("device")}))),
             ("hosts", ", ".join(sorted({str(a.get("host")) for a in attempts if a.get("host")}))),
             ("container images", "none (the host)" if set(st.get("container_images") or {"": 0}) == {""} else
              json.dumps(st.get("container_images"))),
             ("output", json.dumps(plan.get("identity", {}).get("output", {}))),
             ("fingerprint", plan.get("fingerprint"))]
    parts.append('<table class="kv">' + "".join(f"<tr><td>{_e(k)}</td><td><code>{_e(v)}</code></td></tr>"
                                                for k, v in ident if v) + "</table>")
    cmds = data["commands"]
    if cmds:
        parts.append("<p>Commands that made the run:</p><pre>" + "\n".join(
            f"# {_e(_when(c.get('t')))} {_e(c.get('user', ''))}@{_e(c.get('host', ''))}\n{_e(_command_line(c))}"
            for c in cmds) + "</pre>")
    elif data["overrides"]:
        parts.append(f"<p>Overrides of the last launch (.hydra/overrides.yaml):</p><pre>{_e(data['overrides'])}</pre>")
    if data["submissions"]:
        parts.append("<p>Slurm submissions:</p>" + _table(
            ["array job", "submitted", "tasks", "merge job"],
            [(s.get("array_job_id"), _when(s.get("submitted")), len(s.get("tasks", [])), s.get("merge_job_id") or "")
             for s in data["submissions"]]))
    parts.append(f"<details><summary>Resolved configuration</summary><pre>{_e(plan.get('config_yaml', ''))}</pre>"
                 "</details>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>caffe-runner report: {_e(Path(data['run_dir']).name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _attempt_table(attempts: Sequence[Dict], t0: float) -> str:
    rows = []
    for a in sorted(attempts, key=lambda a: (a["shard"], a["start"])):
        kind = a["kind"] + (f", taken by the task of shard {a['own_shard']}" if a.get("own_shard") is not None else "")
        rows.append((a["shard"], kind, OUTCOME_TEXT[a["outcome"]], f"{a['start'] - t0:.1f}",
                     _dur(a["end"] - a["start"]), a.get("host") or "", a.get("job_id") or "",
                     (a.get("device") or "") + (f" (GPU {a['gpu']})" if a.get("gpu") else ""),
                     "" if a.get("rows") is None else a["rows"], a.get("error") or ""))
    table = _table(["shard", "began", "outcome", "start s", "took", "host", "job", "device", "rows", "error"],
                   rows, (0, 3, 8))
    return f"<details><summary>All {len(rows)} attempts</summary>{table}</details>"


def write_report(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Collect, draw and write the report (to a temporary name, then renamed)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    atomic_write_text(out, render(collect(run_dir)))
    return out
