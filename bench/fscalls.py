"""Row 14: file-system calls per array task as the task count T grows (issue 37).

T tasks take the 8 T shards of one run (launcher.shards_per_task's default: shard i < T is task
i's own, the rest are taken as tasks free up, steal.py), with the simulated engine
(simulated_batch_s=0, two tiny JPEGs per shard): what is left is the tasks' metadata traffic.
Every call on the run directory is counted with strace (`-f -y -e trace=%file,getdents64,flock`:
opens, stats, renames, links, mkdirs, unlinks, directory listings and locks, each line naming its
path, kept when it names the run directory); imports and the Python library are not counted.

One parent process imports everything and plans the run, strace attaches to it, and it forks the
T tasks, at most `concurrency` at once (64: launcher.array_parallelism's default). heartbeat_s=30:
a task's beats between batches come with the time it lives, which on 2 shared cores grows with
the number of processes sharing them (not so on a cluster); a shard's forced beats (start,
first batch, end) are counted. Per-task calls = all calls on the run directory / T: on a shared file system every
one of them goes to the metadata server, so this is what the site pays per task.

    python bench/fscalls.py [--tasks 16 64 256] [--work DIR] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SIM_NET = """
name: "sim"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""
SHARDS_PER_TASK = 8
IMAGES_PER_SHARD = 2


def linked_images(work: Path, n: int, tag: str = "fscalls") -> Path:
    """A list of n distinct paths: hard links to 32 tiny JPEGs (made once, kept in `work`)."""
    from runner.ui.samples import write_corpus

    pics = work / f"{tag}-pics"
    if not (work / f"{tag}-pics.done").exists():
        write_corpus(pics, 32, seed=7, min_wh=(24, 24), max_wh=(32, 32), subdirs=1)
        (work / f"{tag}-pics.done").write_text("ok")
    files = sorted(pics.rglob("*.jpg"))
    links = work / f"{tag}-links"
    lst = work / f"{tag}-list-{n}.txt"
    # the folders of 1,000 made before (the last one perhaps not full)
    have = max(0, len(os.listdir(links)) - 1) * 1000 if links.exists() else 0
    folders = set()
    for k in range(min(have, n), n):
        d = links / f"{k // 1000:05d}"
        if d not in folders:
            d.mkdir(parents=True, exist_ok=True)
            folders.add(d)
        p = d / f"{k:07d}.jpg"
        if not p.exists():
            os.link(files[k % len(files)], p)
    with open(lst, "w") as f:
        for k in range(n):
            f.write(f"{links}/{k // 1000:05d}/{k:07d}.jpg\n")
    return lst


def _plan(work: Path, tasks: int):
    from runner.run.config import compose
    from runner.launch.registry import launcher_for
    from runner.run.plan import prepare_run

    shards = tasks * SHARDS_PER_TASK
    run = work / f"fscalls-run-{tasks}"
    shutil.rmtree(run, ignore_errors=True)
    proto = work / "sim.prototxt"
    proto.write_text(SIM_NET)
    cfg = compose([f"input.list={linked_images(work, shards * IMAGES_PER_SHARD)}", f"output.dir={run}",
                   "output.overwrite=true", "device=cpu", "backend=simulated", "simulated_batch_s=0",
                   f"batch_size={IMAGES_PER_SHARD}", "decode.workers=0", "model=res10_ssd",
                   f"model.prototxt={proto}", f"model.weights={proto}", "model.name=sim",
                   "model.default_blobs=[pool]", "heartbeat_s=30"])
    prepare_run(cfg, launcher_for(cfg), explicit_shards=shards)
    cfg.num_shards = tasks  # the array's task count, as a Slurm task's config has it
    return cfg, run


def _task(cfg, own: int) -> None:
    from runner.task.extract import run_shard
    from runner.task.steal import take_shards

    os.environ["SLURM_ARRAY_JOB_ID"], os.environ["SLURM_ARRAY_TASK_ID"] = "1", str(own)
    take_shards(cfg, own, run_shard, threads=1)


def _forked_tasks(cfg, tasks: int, concurrency: int) -> int:
    """Fork the T tasks, at most `concurrency` at once; the number that failed."""
    running: Dict[int, int] = {}
    failed = 0
    nxt = 0
    while nxt < tasks or running:
        while nxt < tasks and len(running) < concurrency:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _task(cfg, nxt)
                except BaseException as e:  # noqa: BLE001  (the child's word, then its end)
                    print(f"task {nxt}: {type(e).__name__}: {e}", file=sys.stderr)
                    code = 1
                os._exit(code)
            running[pid] = nxt
            nxt += 1
        pid, status = os.wait()
        running.pop(pid, None)
        failed += int(status != 0)
    return failed


CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\(")


def count_calls(log: Path, run_dir: Path) -> Dict[str, int]:
    """{syscall: count} of the strace lines that name a path under run_dir (pure but for the read)."""
    needle = str(run_dir)
    out: Dict[str, int] = {}
    with open(log, errors="replace") as f:
        for line in f:
            if needle not in line or "resumed>" in line:
                continue
            m = CALL.match(line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def measure(work: Path, tasks: int, concurrency: int) -> Dict:
    """One T: plan, then the T tasks under strace; calls per task, by kind."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    from runner.task import extract, steal  # noqa: F401  (imported before strace attaches)
    from runner.run.plan import load_run_dir
    from runner.task.identity import configure_threads

    configure_threads(1)  # cv2 and the BLAS env, imported now rather than in every child
    cfg, run = _plan(work, tasks)
    log = work / f"fscalls-{tasks}.strace"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", "trace=%file,getdents64,flock", "-o", str(log),
                               "-p", str(os.getpid())], stderr=subprocess.PIPE)
    time.sleep(1.0)  # strace attaches (it cannot say when; a late attach only misses calls: none happen yet)
    t0 = time.time()
    failed = _forked_tasks(cfg, tasks, concurrency)
    wall = time.time() - t0
    tracer.send_signal(signal.SIGINT)
    tracer.wait(60)
    calls = count_calls(log, run)
    total = sum(calls.values())
    r = load_run_dir(run)
    done = len(r.done_shards())
    if not os.environ.get("FSCALLS_KEEP_LOG"):
        log.unlink(missing_ok=True)
    return {"tasks": tasks, "shards": tasks * SHARDS_PER_TASK, "done": done, "failed_tasks": failed,
            "wall_s": round(wall, 1), "calls": total, "calls_per_task": round(total / tasks, 1),
            "calls_per_shard": round(total / (tasks * SHARDS_PER_TASK), 1),
            "by_call_per_task": {k: round(v / tasks, 1) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}


def fscalls_bench(work: Path, tasks=(16, 64, 256), concurrency: int = 64) -> Dict:
    """Each T in a fresh process (a clean strace and no caches from the T before)."""
    out: Dict = {"shards_per_task": SHARDS_PER_TASK, "images_per_shard": IMAGES_PER_SHARD,
                 "concurrency": concurrency}
    for t in tasks:
        p = subprocess.run([sys.executable, __file__, "--one", str(t), "--work", str(work), "--concurrency",
                            str(concurrency)], capture_output=True, text=True, timeout=3600,
                           cwd=Path(__file__).resolve().parent.parent)
        if p.returncode != 0:
            raise RuntimeError(f"T={t}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        out[f"T{t}"] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  T={t:4d}: {out[f'T{t}']['calls_per_task']:9.1f} calls per task "
              f"({out[f'T{t}']['wall_s']} s)", flush=True)
    per = [out[f"T{t}"]["calls_per_task"] for t in tasks]
    out["ratio_largest_over_smallest"] = round(per[-1] / per[0], 3)
    out["flat_within_1_5x"] = max(per) / min(per) <= 1.5
    return out


def print_fscalls_row(r: Dict) -> None:
    ts = [k for k in r if k.startswith("T") and isinstance(r[k], dict)]
    cells = ", ".join(f"T={r[k]['tasks']}: {r[k]['calls_per_task']:.0f}" for k in ts)
    print(f"\n14 file-system calls per task ({r['shards_per_task']} shards per task, simulated engine): {cells}; "
          f"largest/smallest {r['ratio_largest_over_smallest']:.2f} (target <= 1.5)")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/fscalls.py")
    ap.add_argument("--tasks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "caffe-runner-bench"))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.one:
        print(json.dumps(measure(work, a.one, a.concurrency)))
        return
    r = fscalls_bench(work, a.tasks, a.concurrency)
    print(json.dumps(r, indent=1))
    print_fscalls_row(r)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
