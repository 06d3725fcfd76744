"""`make bench` after its split by row (issue 38): bench/bench.py is a driver over bench/rows/.
The driver still parses its flags, every printer still prints its rows from a results.json, and
the rows' measurements still run in spawned children that import them from their modules (row 9
on a small synthetic run, rows 2/10's decode cost on a few JPEGs). No pycaffe, no Slurm."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rows.common import in_child, in_children, together_rate
from rows.extract import print_table
from rows.forward import print_forward_row
from rows.gpu import print_gpu_rows
from rows.limits import decode_one_thread, print_limits
from rows.merge import STEPS, _make_synthetic, print_merge_table, scale_step
from rows.stragglers import print_straggler_row
from rows.sweep import print_sweep_row

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

OPTIONS = ("--images", "--repeats", "--threads", "--work", "--out", "--camera-images", "--pipeline-batches",
           "--cache", "--quick", "--gpu-feeding-only", "--million", "--million-sizes", "--only")
ONLY = ("all", "extract", "merge", "limits", "forward", "stragglers", "fscalls", "million", "sweep")


def test_driver_help_lists_every_flag():
    p = subprocess.run([sys.executable, "bench/bench.py", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert set(re.findall(r"^  (--[a-z-]+)", p.stdout, re.M)) == set(OPTIONS), p.stdout
    assert "{" + ",".join(ONLY) + "}" in p.stdout, p.stdout


def test_printers_print_every_row_of_the_committed_results():
    """bench/results.json holds every row as measured: each printer, from its own module, prints
    its rows (a name a printer lost in the move would fail here)."""
    from fscalls import print_fscalls_row
    from million import print_million_row

    r = json.loads((REPO / "bench" / "results.json").read_text())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(r)
        print_limits(r["limits_only"])
        print_merge_table(r["merge_scale"])
        print_forward_row(r["forward_vs_sgemm"])
        print_straggler_row(r["stragglers"])
        print_sweep_row(r["sweep"])
        print_gpu_rows(r["gpu_feeding"])
        print_fscalls_row(r["fscalls_per_task"])
        print_million_row(r["million"])
    printed = {m.group(1) for m in re.finditer(r"^(\d+)[ .]", out.getvalue(), re.M)}
    assert printed == {str(n) for n in range(1, 17)}, out.getvalue()


def test_merge_row_steps_run_in_children_on_a_small_synthetic_run(tmp_path, monkeypatch):
    """Row 9 as merge_bench runs it, small: the synthetic run made in a child (tests/synthetic.py,
    which the bench's children find without pytest's sys.path), then each step in a fresh child
    reporting its time and its own peak memory."""
    tests = Path(__file__).resolve().parent
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != tests])  # as bench.py has it
    run = tmp_path / "scale"
    in_child(_make_synthetic, 1, run_dir=str(run), rows=300, shards=3, dim=8, view_max_shards=128)
    for what in STEPS:
        res = in_child(scale_step, 1, run_dir=str(run), what=what,
                       out=str(tmp_path / ("export-emb" if what == "embeddings" else "export.h5")))
        assert res["s"] > 0 and res["peak_rss_mb"] > 0, (what, res)
    assert (run / "features.h5").exists() and (tmp_path / "export.h5").exists()
    assert any((tmp_path / "export-emb").iterdir())


def test_decode_cost_runs_in_children_started_together(tmp_path):
    """Rows 2/10's decode measurement in two children behind one barrier, as extract.py runs it."""
    from runner.ui.samples import write_corpus

    paths = [str(p) for p in write_corpus(tmp_path, 4, seed=3, min_wh=(320, 240), max_wh=(400, 300), subdirs=1)]
    rs = in_children(decode_one_thread, 2, 1, paths=paths, reduced=False)
    assert [r["images"] for r in rs] == [4, 4]
    assert together_rate(rs) > 0 and all(r["images_per_cpu_s"] > 0 for r in rs)
