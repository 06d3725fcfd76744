"""Row 13: stragglers on the 3-node dev cluster (slurm/dev-cluster, at DEV_CLUSTER_PORT_BASE):
one node 3x slower, a run's wall time over the same run on equal nodes, for one shard per task
and for shards_per_task 2, 4 and 8 with tasks taking the free shards. `--only stragglers` runs
it alone; a full run includes it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from .common import REPO, median

DEV_CLUSTER = REPO / "slurm" / "dev-cluster"

SIM_NET = """
name: "sim"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


def _dev_cluster(state: str, nodes: int) -> Dict[str, str]:
    """slurm/dev-cluster up (DEV_CLUSTER_PORT_BASE from the environment): what `env` exports."""
    up = subprocess.run(["bash", str(DEV_CLUSTER), "up", "--nodes", str(nodes), "--state-dir", state],
                        capture_output=True, text=True, timeout=300)
    m = re.search(r"^export (.*)$", up.stdout, re.M)
    if up.returncode != 0 or not m:
        subprocess.run(["bash", str(DEV_CLUSTER), "down", "--state-dir", state, "--wipe"], timeout=120)
        raise RuntimeError(f"dev cluster did not come up:\n{up.stdout}\n{up.stderr}")
    return dict(kv.split("=", 1) for kv in m.group(1).split())


SHARDS_PER_TASK_TRIED = (2, 4, 8)


DEFAULT_SHARDS_PER_TASK = 8  # runner/schema.py SlurmLauncherConf.shards_per_task: this row chose it


def straggler_bench(work: Path, tasks: int = 6, nodes: int = 3, slow: float = 3.0, batches_per_task: int = 150,
                    batch: int = 4, batch_s: float = 0.1, repeats: int = 1) -> Dict:
    """Row 13: a Slurm run on the 3-node dev cluster (simulated engine: batch_s of sleep per batch,
    `slow` times that on node2) over the same run with three equal nodes, for today's design
    (one shard per task, no taking) and shards_per_task 2, 4 and 8 with tasks taking the free shards.
    Wall time: from the command's start to the last shard's "finished" event (the merge job,
    the same for all, is left out)."""

    from runner.store.events import read_events
    from runner.ui.samples import write_corpus

    n = tasks * batches_per_task * batch
    pics = work / "straggler-pics"
    if not (work / "straggler-pics.done").exists():
        write_corpus(pics, n, seed=5, min_wh=(40, 40), max_wh=(64, 64))
        (work / "straggler-pics.done").write_text("ok")
    lst = work / "straggler-list.txt"
    text = "\n".join(sorted(str(p) for p in pics.rglob("*.jpg"))[:n]) + "\n"
    if not lst.exists() or lst.read_text() != text:
        lst.write_text(text)
    proto = work / "sim.prototxt"
    proto.write_text(SIM_NET)
    state = tempfile.mkdtemp(prefix="crbench-", dir="/tmp")
    env = dict(os.environ, **_dev_cluster(state, nodes))
    # the default (4) is chosen by this row: the tail shrinks with more, smaller shards, and each
    # shard costs a file, a lock and a heartbeat more (the equal-nodes wall shows that price)
    designs = {"one_shard_per_task": ["launcher.shards_per_task=1", "launcher.take_free_shards=false"],
               **{f"shards_per_task_{k}_taking": [f"launcher.shards_per_task={k}", "launcher.take_free_shards=true"]
                  for k in SHARDS_PER_TASK_TRIED}}
    out: Dict = {"tasks": tasks, "nodes": nodes, "slow_node": f"node2 x{slow:g}", "images": n,
                 "batch_size": batch, "simulated_batch_s": batch_s, "rounds": repeats}
    walls: Dict[str, Dict[str, List[float]]] = {name: {"equal": [], "slow": []} for name in designs}
    ratios: Dict[str, List[float]] = {name: [] for name in designs}
    try:
        # rounds outside, designs inside: each round measures every design under the same load
        for rnd in range(repeats):
            for name, extra in designs.items():
                wall = {}
                for label, hosts in (("equal", ""), ("slow", f"node2:{slow:g}")):
                    run = work / f"straggler-{name}-{label}"
                    shutil.rmtree(run, ignore_errors=True)  # every run starts from nothing
                    args = [sys.executable, "-m", "runner", f"input.list={lst}", f"output.dir={run}",
                            "output.overwrite=true", f"num_shards={tasks}", "launcher=slurm", "launcher.wait=true",
                            "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.gpus_per_task=0",
                            "launcher.timeout_min=30", "device=cpu", "backend=simulated",
                            f"simulated_batch_s={batch_s}", f"batch_size={batch}", "decode.workers=1",
                            "model=res10_ssd", f"model.prototxt={proto}", f"model.weights={proto}", "model.name=sim",
                            "model.default_blobs=[pool]", "heartbeat_s=1", *extra]
                    t0 = time.time()
                    p = subprocess.run(args, capture_output=True, text=True,
                                       env=dict(env, CAFFE_RUNNER_SIM_SLOW_HOSTS=hosts), timeout=1800)
                    if p.returncode != 0:
                        raise RuntimeError(f"{name} {label}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                    ends, taken = [], 0
                    for f in (run / "events").glob("*.jsonl"):
                        evs = read_events(f)
                        ends += [e["t"] for e in evs if e["event"] == "finished"]
                        taken += sum(1 for e in evs if e["event"] in ("started", "resumed") and "own_shard" in e)
                    wall[label] = max(ends) - t0
                    walls[name][label].append(round(wall[label], 1))
                    out[f"{name}_{label}_shards_taken"] = taken
                    print(f"  round {rnd + 1}: {name:26} {label:5} {wall[label]:6.1f} s  ({taken} shards taken "
                          "from the queue)", flush=True)
                ratios[name].append(round(wall["slow"] / wall["equal"], 3))
        for name in designs:
            for label in ("equal", "slow"):
                out[f"{name}_{label}_wall_s"] = median(walls[name][label])
                out[f"{name}_{label}_wall_s_all"] = walls[name][label]
            out[f"{name}_ratio"] = round(median(ratios[name]), 3)
            out[f"{name}_ratios_all"] = ratios[name]
    finally:
        subprocess.run(["bash", str(DEV_CLUSTER), "down", "--state-dir", state, "--wipe"], timeout=120)
    # the best any balancing can do: the slow node's tasks do 1/slow of a fast task's work
    per_node = tasks / nodes
    bound = tasks / (tasks - per_node + per_node / slow)
    out["capacity_bound_ratio"] = round(bound, 3)
    # the same on the walls measured: only the compute part (n / batch / tasks batches of batch_s
    # per task) stretches; submission, task start and imports do not
    compute_s = n / batch / tasks * batch_s
    eq = median([out[f"{name}_equal_wall_s"] for name in designs])
    out["compute_s_per_task_equal"] = round(compute_s, 2)
    out["wall_bound_ratio"] = round((eq + compute_s * (bound - 1)) / eq, 3)
    return out


def print_straggler_row(r: Dict) -> None:
    print(f"\n13 stragglers: {r['tasks']} tasks on {r['nodes']} nodes, {r['slow_node']}: wall(slow) / wall(equal)")
    def walls(name: str) -> str:
        return f"(equal {r[name + '_equal_wall_s']:.1f} s, slow {r[name + '_slow_wall_s']:.1f} s)"

    print(f"   one shard per task (before):      {r['one_shard_per_task_ratio']:.2f}   {walls('one_shard_per_task')}")
    for k in SHARDS_PER_TASK_TRIED:
        name = f"shards_per_task_{k}_taking"
        if f"{name}_ratio" in r:
            now = " (the default)" if k == DEFAULT_SHARDS_PER_TASK else ""
            print(f"   {k} shards per task, taking{now}: {r[name + '_ratio']:.2f}   {walls(name)}")
    print(f"   a perfect split: {r['capacity_bound_ratio']:.2f} of the compute"
          + (f", {r['wall_bound_ratio']:.2f} of the wall (the fixed start-up does not stretch)"
             if "wall_bound_ratio" in r else ""))
