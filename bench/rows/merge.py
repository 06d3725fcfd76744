"""Row 9: merge, verify and export (h5, and embeddings: npy + parquet) at scale: 100 vs 1,000
shards, and 100,000 vs 1,000,000 (and 4,000,000) rows, on synthetic runs written by the real
ShardWriter (tests/synthetic.py): each step's time and its own peak memory, each in a fresh
process. `--only merge` runs it alone; a full run includes it.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Dict

from .common import REPO, in_child


def scale_step(run_dir: str, what: str, out: str = "") -> Dict:
    """One of merge / verify / export on a synthetic run, in a fresh process (clean peak RSS)."""
    from runner.results.merge import export_run, merge_run
    from runner.run.plan import load_run_dir
    from runner.results.verify import verify

    t0 = time.perf_counter()
    if what == "merge":
        merge_run(load_run_dir(run_dir))
    elif what == "verify":
        problems = verify(Path(run_dir))
        assert not problems, problems[:3]
    elif what == "embeddings":  # export --format embeddings (npy + parquet parts)
        from runner.results.embeddings import export_embeddings
        from runner.results.merge import export_sources

        run = load_run_dir(run_dir)
        export_embeddings(export_sources(run), Path(out), None, run.plan["blobs"])
    else:
        export_run(load_run_dir(run_dir), Path(out))
    return {"s": time.perf_counter() - t0}


def _make_synthetic(run_dir: str, rows: int, shards: int, dim: int, view_max_shards: int) -> Dict:
    sys.path.insert(0, str(REPO / "tests"))  # tests/synthetic.py: a run's shards without a net
    from synthetic import make_run

    make_run(Path(run_dir), rows, shards, dim=dim, fail_every=97, view_max_shards=view_max_shards)
    return {}


# label: (rows, shards, view_max_shards). Pairs differ in one thing only: 10x the shards at the
# same shard size and layout (a copy), or 10x the rows at the same shard size and layout (a view)
SCALES = {"shards_100": (10_000, 100, 0), "shards_1000": (100_000, 1000, 128),
          "rows_100k": (100_000, 1, 128), "rows_1M": (1_000_000, 10, 128), "rows_4M": (4_000_000, 40, 128)}


STEPS = ("merge", "verify", "export", "embeddings")


def merge_bench(work: Path, dim: int = 64) -> Dict:
    """Row 9: each scale made once, then merge, verify, export, each in a fresh process."""
    import h5py  # here, not at the top: every spawned child imports this module

    out: Dict[str, Dict] = {}
    for label, (rows, shards, view_max) in SCALES.items():
        run = work / f"scale-{label}"
        if not (run / ".done").exists() or (run / ".done").read_text() != f"{rows} {shards} {view_max}":
            shutil.rmtree(run, ignore_errors=True)
            in_child(_make_synthetic, 1, run_dir=str(run), rows=rows, shards=shards, dim=dim,
                     view_max_shards=view_max)
            (run / ".done").write_text(f"{rows} {shards} {view_max}")
        (run / "features.h5").unlink(missing_ok=True)
        r = {"rows": rows, "shards": shards, "row_bytes": dim * 4}
        for what in STEPS:
            res = in_child(scale_step, 1, run_dir=str(run), what=what,
                           out=str(work / ("export-emb" if what == "embeddings" else "export.h5")))
            r[what] = {"s": round(res["s"], 2), "peak_rss_mb": round(res["peak_rss_mb"], 1)}
        (work / "export.h5").unlink(missing_ok=True)
        shutil.rmtree(work / "export-emb", ignore_errors=True)
        with h5py.File(run / "features.h5", "r") as f:
            r["layout"] = str(f.attrs["layout"])
        out[label] = r
    out["rss_ratio"] = {f"{what}_{a}_over_{b}": round(out[a][what]["peak_rss_mb"] / out[b][what]["peak_rss_mb"], 3)
                        for a, b in (("shards_1000", "shards_100"), ("rows_1M", "rows_100k"), ("rows_4M", "rows_1M"))
                        for what in STEPS}
    return out


def print_merge_table(m: Dict) -> None:
    print(f"\n{'#':2} {'scale':<34} {'layout':<6} " + " ".join(f"{w:>16}" for w in STEPS))
    for label, r in m.items():
        if label == "rss_ratio":
            continue
        cells = [f"{r[w]['s']:.1f} s {r[w]['peak_rss_mb']:.0f} MB" if w in r else "" for w in STEPS]
        print(f"9  {r['shards']:>5} shards, {r['rows']:>9,d} rows        {r['layout']:<6} "
              + " ".join(f"{c:>16}" for c in cells))
    print("9  peak RSS ratios (flat: ~1.0): " + ", ".join(f"{k} {v}" for k, v in m["rss_ratio"].items()))
