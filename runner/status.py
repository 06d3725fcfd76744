"""`caffe-runner status RUN_DIR`: per-shard state from the run directory's files, so it works
where sacct is disabled; Slurm's view is added when sacct answers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from .inputs.listing import describe as describe_listing
from .plan import load_run_dir
from .rundir import launch_holder, pid_alive, shard_file_counts
from .stats import top_reasons

STALE_S = 120.0  # a running heartbeat older than this is "stalled"
# less free space than this where the run is: a shard stopped there ran out of it (a shard that
# stops on a full disk cannot write the heartbeat that would say so)
NO_SPACE_BYTES = 1 << 20
NO_SPACE = "no space left on device"


def out_of_space(path: Path) -> bool:
    try:
        s = os.statvfs(path)
    except OSError:
        return False
    return s.f_bavail * s.f_frsize < NO_SPACE_BYTES


def shard_state(run, i: int, now: float) -> Dict:
    start, stop = run.shard_range(i)
    hb = run.read_heartbeat(i) or {}
    st = {"shard": i, "total": stop - start, "done": int(hb.get("done", 0)), "rate": hb.get("rate"),
          "rows": int(hb.get("rows") or 0), "failures": int(hb.get("failures") or 0),
          "host": hb.get("host"), "pid": hb.get("pid"), "started": float(hb.get("started", 0)),
          "job_id": hb.get("job_id"), "log": hb.get("log"), "image": hb.get("image")}
    final = shard_file_counts(run.shard_path(i), run.plan["fingerprint"])
    if final and final["complete"]:
        st.update(state="done", done=stop - start, rows=final["rows"], failures=final["failures"])
        return st
    if hb.get("state") == "failed":
        st.update(state="failed", error=hb.get("error"))
    elif hb.get("state") == "running":
        age = now - float(hb.get("updated", 0))
        alive = pid_alive(int(hb["pid"])) if hb.get("host") == socket.gethostname() and hb.get("pid") else age < STALE_S
        st.update(state="running" if alive else "interrupted", age_s=round(age, 1))
    elif run.partial_path(i).exists():
        st.update(state="interrupted")
    else:
        st.update(state="pending")
    if st["state"] == "running":
        return st  # its heartbeat is the news; its partial file is being written
    # no process writes this shard: its files hold the truth, not a heartbeat written up to
    # heartbeat_s before a Ctrl-C, or one left by a shard file since deleted
    partial = shard_file_counts(run.partial_path(i), run.plan["fingerprint"])
    if partial:
        st.update(done=min(partial["next"], stop - start), rows=partial["rows"], failures=partial["failures"])
    else:
        st.update(done=0, rows=0, failures=0)
    if run.shard_path(i).exists():
        st["foreign_file"] = str(run.shard_path(i))  # another run's (or a damaged) file: replaced when run
    return st


def finish_advice(run) -> str:
    """What to do about shards that are not complete: wait for the run in progress (a second
    launch would be refused), or rerun the extraction's command."""
    holder = launch_holder(run.rundir.path)
    now = time.time()
    running = [i for i in run.missing_shards() if shard_state(run, i, now)["state"] == "running"]
    if holder or running:
        who = f"held by {holder}" if holder else f"{len(running)} shard(s) running"
        return (f"the run is still in progress ({who}): wait for it to finish "
                f"(`caffe-runner status {run.rundir.path}`)")
    return "rerun the extraction (same command) to finish them"


def _sacct(job_ids: List[str]) -> Optional[Dict[str, str]]:
    if not job_ids or not shutil.which("sacct"):
        return None
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(sorted(set(job_ids)))],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid.strip()] = state.strip()
    return states


def run_status(run_dir: Path, use_sacct: bool = True) -> Dict:
    run = load_run_dir(run_dir)
    now = time.time()
    shards = [shard_state(run, i, now) for i in range(run.num_shards)]
    counts: Dict[str, int] = {}
    for s in shards:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    if counts.get("interrupted") and out_of_space(run.rundir.path):
        for s in shards:
            if s["state"] == "interrupted":
                s["cause"] = NO_SPACE
    total = run.plan["count"]
    done = sum(s["done"] for s in shards)
    rate = sum(float(s["rate"] or 0) for s in shards if s["state"] == "running")
    eta = (total - done) / rate if rate > 0 else None
    state = "done" if counts.get("done", 0) == run.num_shards else (
        "failed" if counts.get("failed") else "running" if counts.get("running") else "incomplete")
    if state == "done" and run.rundir.merged.exists():
        state = "merged"
    result = {"run_dir": str(run.rundir.path), "state": state, "images": total, "done": done,
              "listing": run.plan.get("listing"),
              "rows": sum(s["rows"] for s in shards), "failures": sum(s["failures"] for s in shards),
              "rate": rate, "eta_s": eta, "counts": counts, "shards": shards}
    # which image each shard ran in ("" on the host); shards of one run from several images are flagged
    images: Dict[str, List[int]] = {}
    for s in shards:
        if s["image"] is not None:
            images.setdefault(s["image"], []).append(s["shard"])
    result["container_images"] = images
    stats_path = run.rundir.path / "stats.json"
    if stats_path.exists():  # written at merge: the failure reasons, grouped
        try:
            result["failures_by_reason"] = json.loads(stats_path.read_text()).get("failures_by_reason", {})
        except (OSError, ValueError):
            pass
    submissions = run.rundir.path / "submissions.json"
    if use_sacct and submissions.exists():
        jobs = json.loads(submissions.read_text())
        ids = [j["job_id"] for sub in jobs for j in sub.get("tasks", [])]
        result["slurm"] = _sacct([i.split("_")[0] for i in ids])
    return result


def format_status(st: Dict) -> str:
    lines = [f"{st['run_dir']}: {st['state']}, {st['done']}/{st['images']} images"
             + (f" ({st['rows']} extracted, {st['failures']} failed)" if st["done"] else "")
             + (f", {st['rate']:.1f} img/s, ETA {st['eta_s']:.0f} s" if st.get("eta_s") else "")]
    if (st.get("listing") or {}).get("skipped"):  # what the folder's listing left out, and why
        lines.append(f"  input: {describe_listing(st['listing'])}")
    for k, why in top_reasons(st.get("failures_by_reason") or {}):
        lines.append(f"  failed: {k:>6} {why}")
    lines.append("shards: " + ", ".join(f"{k} {v}" for k, v in sorted(st["counts"].items())))
    for s in st["shards"]:
        line = f"  {s['shard']:5d} {s['state']:<11} {s['done']}/{s['total']}" + (
            f" ({s['failures']} failed)" if s.get("failures") else "")
        if s["state"] == "running" and s.get("rate"):
            line += f"  {s['rate']:.1f} img/s on {s.get('host')}"
        if s["state"] == "failed":
            line += f"  {s.get('error')}  log: {s.get('log')}"
        if s.get("cause"):
            line += f"  ({s['cause']})"
        if s.get("foreign_file"):
            line += "  (its file is not this run's complete shard: extracted again and replaced on resume)"
        if s.get("job_id"):
            line += f"  job {s['job_id']}"
        lines.append(line)
    if any(s.get("cause") == NO_SPACE for s in st["shards"]):
        lines.append(f"{NO_SPACE} in {st['run_dir']}: free space there (df -h {st['run_dir']}), then rerun the "
                     "same command: the interrupted shards resume from their last flushed batch")
    images = st.get("container_images") or {}
    if len(images) > 1:
        lines.append(f"WARNING: the shards ran in {len(images)} different images (a rebuilt image, or another "
                     "container.image): " + "; ".join(f"{label or 'the host, no container'}: shards "
                                                      f"{','.join(map(str, sh))}" for label, sh in images.items()))
    elif images and next(iter(images)):
        lines.append(f"image: {next(iter(images))}")
    if st.get("slurm"):
        lines.append("slurm (sacct): " + ", ".join(f"{k} {v}" for k, v in sorted(st["slurm"].items())))
    return "\n".join(lines)
