"""Row 16 (issue 36): a sweep of 3 blobs of res10 in one shared pass against its deepest blob
alone, and against one run per blob (sweep.shared_pass=false): whole commands' wall time.
`--only sweep` runs it alone; a full run includes it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from .common import REPO, median


SWEEP_BLOBS = ["layer_128_1_sum", "layer_256_1_sum", "fc7"]  # res10's, shallow to deep


def sweep_bench(imgs: Path, work: Path, repeats: int) -> Dict:
    """Row 16 (issue 36): a sweep of 3 blobs of one model (one shared pass) against the run of
    its deepest blob alone on the same input, and the same sweep with sweep.shared_pass=false
    (one whole run per blob, as before), side by side in each round; whole commands' wall time."""
    base = [sys.executable, "-m", "runner", f"input.dir={imgs}", "output.pooling=avg", "launcher.progress=false"]
    blobs = ",".join(f"[{b}]" for b in SWEEP_BLOBS)
    cases = {"one_blob": base + [f"output.blobs=[{SWEEP_BLOBS[-1]}]"],
             "sweep_shared": base + ["-m", f"output.blobs={blobs}"],
             "sweep_alone": base + ["-m", f"output.blobs={blobs}", "sweep.shared_pass=false"]}
    walls: Dict[str, List[float]] = {k: [] for k in cases}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # no case always first
        for k in order:
            out = work / f"sweep-{k}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run(cases[k] + [f"output.dir={out}"], check=True, capture_output=True, cwd=REPO)
            walls[k].append(time.perf_counter() - t0)
        print(f"  sweep round {r + 1}/{repeats}: " + ", ".join(f"{k} {walls[k][-1]:.1f} s" for k in cases), flush=True)
    ratios = {k: [a / b for a, b in zip(walls[k], walls["one_blob"])] for k in ("sweep_shared", "sweep_alone")}
    return {"blobs": SWEEP_BLOBS, "walls_s": walls, "ratio_shared_median": median(ratios["sweep_shared"]),
            "ratio_alone_median": median(ratios["sweep_alone"]), "goal_ratio": 1.2}


def print_sweep_row(r: Dict) -> None:
    w = r["walls_s"]
    print(f"\n16. sweep of {len(r['blobs'])} blobs of res10 ({', '.join(r['blobs'])}, avg-pooled) vs its deepest "
          f"blob alone, wall time of the whole command (median of {len(w['one_blob'])} rounds):\n"
          f"    one blob {median(w['one_blob']):.1f} s; sweep, one shared pass {median(w['sweep_shared']):.1f} s "
          f"= {r['ratio_shared_median']:.2f}x (goal <= {r['goal_ratio']}x); sweep, one run per blob "
          f"(sweep.shared_pass=false) {median(w['sweep_alone']):.1f} s = {r['ratio_alone_median']:.2f}x")
