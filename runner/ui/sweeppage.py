"""A sweep's one page and its export (report SWEEP, export SWEEP): the table `status SWEEP`
shows, each point's own report linked, the CKA matrix between the points; every point's file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

from ..store.atomic import atomic_write_text
from .compare import COMPARE_JSON, COMPARE_SVG, compare, format_table
from ..errors import RunnerError
from ..results.merge import export_run
from ..run.plan import load_run_dir
from .report import write_report
from ..run.sweep import format_sweep_status, sweep_points, sweep_status

SWEEP_REPORT = "report.html"


def write_sweep_report(root: Path, out: Optional[Path] = None) -> Path:
    """One page for the whole sweep: the table `status SWEEP` shows, each point's own report
    (written beside its run) linked, and the CKA matrix between the points (compare.json /
    compare.svg, made here when every point is done and it is missing or older than a point)."""
    import html

    root = Path(root)
    out = Path(out) if out else root / SWEEP_REPORT
    rows = sweep_status(root)
    links = {}
    for r in rows:
        d = Path(r["run_dir"])
        if (d / "run.json").exists():
            try:
                links[r["name"]] = os.path.relpath(write_report(d), out.parent)
            except (RunnerError, OSError) as e:
                r["report_error"] = str(e)
    note = ""
    done = rows and all(r.get("state") == "merged" for r in rows)
    cj = root / COMPARE_JSON
    newest = max((Path(r["run_dir"], "features.h5").stat().st_mtime for r in rows
                  if Path(r["run_dir"], "features.h5").exists()), default=0.0)
    if done and (not cj.exists() or cj.stat().st_mtime < newest):
        try:
            compare(root)
        except RunnerError as e:
            note = f"not computed: {e}"
    elif not done:
        note = "not computed: not every point is merged yet (caffe-runner compare SWEEP once they are)"
    e = html.escape
    table = format_sweep_status(root, rows).splitlines()[1:]
    head = table[0].split()
    body = []
    for r, line in zip(rows, table[1:]):
        name = str(r["name"])
        cell = f'<a href="{e(links[name])}">{e(name)}</a>' if name in links else e(name)
        body.append(f"<tr><td>{cell}</td><td><pre>{e(line.strip()[len(name):].strip())}</pre></td></tr>")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {e(root.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em} td{padding:2px 8px;vertical-align:top} "
             "pre{margin:0}</style></head><body>",
             f"<h1>Sweep {e(str(root))}</h1><p>{len(rows)} point(s); each point's name links to its own report.</p>",
             f"<table><tr><th>point</th><th><pre>{e('  '.join(head[1:]))}</pre></th></tr>{''.join(body)}</table>",
             "<h2>Linear CKA between the points</h2>"]
    if (root / COMPARE_SVG).exists() and cj.exists() and not note:
        result = json.loads(cj.read_text())
        parts += [(root / COMPARE_SVG).read_text(), f"<pre>{e(format_table(result))}</pre>"]
    else:
        parts.append(f"<p>{e(note or 'not computed')}</p>")
    parts.append("</body></html>")
    atomic_write_text(out, "\n".join(parts))
    return out


def export_sweep(root: Path, out: Path, fmt: str, refuse_running) -> List[Path]:
    """Every point of the sweep exported into folder `out` (OUT/POINT.h5, or OUT/POINT/ as npy),
    each point checked first (refuse_running: one in progress is refused before anything is
    written)."""
    runs = [(name, load_run_dir(d)) for name, d in sweep_points(root)]
    for _, run in runs:
        refuse_running(run, "export")
    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    out.mkdir(parents=True, exist_ok=True)
    return [export_run(run, out / (f"{name}.h5" if fmt == "h5" else name), fmt) for name, run in runs]
