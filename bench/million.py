"""Row 15: a million-image simulated run, step by step (issue 37, fact 11).

Each size N (default 100,000 and 1,000,000) is run through the steps a user runs, each as the
CLI runs it, in a process of its own: plan (runner.run.plan.prepare_run, as the CLI calls it: the
listing, the manifest, run.json), run (the local launcher, output.merge=false),
merge, verify, status, export (--format h5). For each: wall time and the peak memory of the
largest process (ru_maxrss of the step's process tree). Then for each step the ratio of its
time at the largest N over 10x its time at the N before (issue 37's bar: <= 1.5), and the same
for peak memory.

The images: N hard links (folders of 1,000) to 32 tiny JPEGs (24-32 px), listed in input.list:
each path is its own file to the runner (stat, open, decode), without writing N JPEGs.
backend=simulated, simulated_batch_s=0: what is measured is the runner's own cost per image
(listing, decoding tiny files, HDF5 writes, heartbeats), not a net's.

    python bench/million.py [--sizes 100000 1000000] [--work DIR] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fscalls import SIM_NET, linked_images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS = ("plan", "run", "merge", "verify", "status", "export")

PLAN = """
import sys
from runner.run.config import compose
from runner.launch.registry import launcher_for
from runner.run.plan import prepare_run
cfg = compose(sys.argv[1:])
prepare_run(cfg, launcher_for(cfg))
"""


def timed(cmd: List[str], env=None) -> Dict:
    """Run cmd in a fresh process tree: {s, peak_rss_mb, rc} (the wrapper reads its children's
    ru_maxrss: the largest process of the tree)."""
    wrapper = ("import json, resource, subprocess, sys, time\n"
               "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
               "stderr=subprocess.PIPE, text=True)\n"
               "print(json.dumps({'s': time.perf_counter() - t, 'rc': r.returncode, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "'err': r.stderr[-1500:]}))")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])


def one_size(work: Path, n: int, workers: int) -> Dict:
    lst = linked_images(work, n, tag="million")
    run = work / f"million-run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    proto = work / "sim.prototxt"
    proto.write_text(SIM_NET)
    args = [f"input.list={lst}", f"output.dir={run}", "device=cpu", "backend=simulated", "simulated_batch_s=0",
            "batch_size=64", "model=res10_ssd", f"model.prototxt={proto}", f"model.weights={proto}",
            "model.name=sim", "model.default_blobs=[pool]", f"launcher.workers={workers}",
            "launcher.threads_per_worker=1", "decode.workers=1"]
    cli = [sys.executable, "-m", "runner"]
    cmds = {"plan": [sys.executable, "-c", PLAN, *args],
            "run": cli + args + ["output.merge=false"],
            "merge": cli + ["merge", str(run)],
            "verify": cli + ["verify", str(run)],
            "status": cli + ["status", str(run)],
            "export": cli + ["export", str(run), str(work / f"export-{n}.h5")]}
    out: Dict = {"images": n}
    env = dict(os.environ, GLOG_minloglevel="2")
    for step in STEPS:
        r = timed(cmds[step], env)
        if r["rc"] not in (0,):
            raise RuntimeError(f"{step} at {n:,} images: exit {r['rc']}\n{r['err']}")
        out[step] = {"s": round(r["s"], 2), "peak_rss_mb": round(r["peak_rss_mb"], 1)}
        print(f"  {n:>9,} images  {step:7} {r['s']:8.1f} s  {r['peak_rss_mb']:7.0f} MB", flush=True)
    out["images_per_s_run"] = round(n / out["run"]["s"], 1)
    (work / f"export-{n}.h5").unlink(missing_ok=True)
    shutil.rmtree(run, ignore_errors=True)
    return out


def million_bench(work: Path, sizes=(100_000, 1_000_000), workers: int = 2) -> Dict:
    out: Dict = {"sizes": list(sizes), "workers": workers}
    for n in sizes:
        out[str(n)] = one_size(work, n, workers)
    if len(sizes) >= 2:
        a, b = str(sizes[-2]), str(sizes[-1])
        k = sizes[-1] / sizes[-2]
        out["time_ratio_over_linear"] = {s: round(out[b][s]["s"] / (k * max(out[a][s]["s"], 1e-3)), 3) for s in STEPS}
        out["rss_ratio"] = {s: round(out[b][s]["peak_rss_mb"] / out[a][s]["peak_rss_mb"], 3) for s in STEPS}
        out["within_1_5x_linear"] = all(v <= 1.5 for v in out["time_ratio_over_linear"].values())
    return out


def print_million_row(r: Dict) -> None:
    sizes = r["sizes"]
    print(f"\n15 a simulated run step by step ({r['workers']} workers), time (s) / peak MB:")
    for s in STEPS:
        cells = "  ".join(f"{n:>9,}: {r[str(n)][s]['s']:7.1f} s {r[str(n)][s]['peak_rss_mb']:6.0f} MB" for n in sizes)
        ratio = r.get("time_ratio_over_linear", {}).get(s)
        print(f"   {s:7} {cells}" + (f"   time / (linear): {ratio:.2f}" if ratio is not None else ""))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/million.py")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "caffe-runner-bench"))
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    r = million_bench(work, a.sizes, a.workers)
    print(json.dumps(r, indent=1))
    print_million_row(r)


if __name__ == "__main__":
    main()
