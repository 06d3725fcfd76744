"""`caffe-runner status RUN_DIR`: per-shard state from the run directory's files, then, for a
Slurm run, Slurm's word (slurmjobs.py) on every shard whose files fell silent: a task killed
without a word (OOM, a lost node, scancel -s KILL, a time limit) reads as what killed it, with
the next step, instead of "running" for ever; a requeued task reads "requeued", not "failed"."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from ..jobs.inflight import latest_tasks, read_submissions
from ..inputs.listing import describe as describe_listing
from .plan import load_run_dir
from ..store.rundir import launch_holder, pid_alive, shard_file_counts
from ..store.lastwords import caffe_last_words
from ..store.liveness import WATCH, beat_age_s, clock_ahead_s, judge_beat, lost, pid_namespace
from ..jobs.slurm import JobWord, query_jobs
from ..errors import ConfigError, FailureShareError, shell_quote, shown
from ..store.stats import check_failure_share, top_reasons

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


def shard_state(run, i: int, now: float, here: Optional[Tuple[str, str]] = None) -> Dict:
    """Shard i's state from the run directory's files alone: done, failed, requeued, running,
    interrupted or pending; `beat` says what its heartbeat proves (liveness.judge_beat). `here`:
    (host, pid namespace) of this process, where pids can be checked."""
    host, pidns = here or (socket.gethostname(), pid_namespace())
    start, stop = run.shard_range(i)
    hb = run.read_heartbeat(i) or {}
    st = {"shard": i, "total": stop - start, "done": int(hb.get("done") or 0), "rate": hb.get("rate"),
          "rows": int(hb.get("rows") or 0), "failures": int(hb.get("failures") or 0),
          "host": hb.get("host"), "pid": hb.get("pid"), "started": float(hb.get("started", 0)),
          "job_id": hb.get("job_id"), "log": hb.get("log"), "image": hb.get("image")}
    final = shard_file_counts(run.shard_path(i), run.plan["fingerprint"])
    if final and final["complete"]:
        st.update(state="done", done=stop - start, rows=final["rows"], failures=final["failures"])
        return st
    if hb.get("state") == "failed":
        st.update(state="failed", error=hb.get("error"))
    elif hb.get("state") == "requeued":
        st.update(state="requeued")  # submitit requeued it (timeout, preemption): it resumes when restarted
    elif hb.get("state") == "running":
        try:
            mtime: Optional[float] = os.stat(run.rundir.heartbeat_path(i, run.name_total(i))).st_mtime
        except OSError:
            mtime = None
        # a beat dated ahead (a writer clock ahead) ages from when this process first saw it
        age = WATCH.age((str(run.rundir.path), i), hb, mtime, now)
        beat = judge_beat(hb, age, host, pidns, pid_alive)
        # a stale beat is not a death certificate: Slurm is asked (run_status); where no one can
        # be asked it is dead only past the clock-skew allowance (liveness.py)
        alive = beat in ("alive", "fresh") or (beat == "stale" and not lost(hb, age, host))
        st.update(state="running" if alive else "interrupted", age_s=round(age, 1), beat=beat,
                  phase=hb.get("phase"))
        ahead = clock_ahead_s(hb, mtime, now) if beat != "alive" else 0.0
        if ahead and not age:
            st["clock_ahead_s"] = round(ahead)
    elif run.partial_paths(i):
        st.update(state="interrupted")
    else:
        st.update(state="pending")
    if hb.get("own_shard") is not None:
        st["own_shard"] = hb["own_shard"]  # taken by the task started for that shard (steal.py)
    if st["state"] == "running" and hb.get("phase") != "loading":
        stalled = stalled_for(hb, now, int(run.cfg.get("stall_batches", 20)),
                              float(hb.get("interval_s") or run.cfg.get("heartbeat_s", 2)), st.get("age_s"))
        if stalled is not None:
            st["stalled_s"] = round(stalled, 1)
        return st  # its heartbeat is the news; its partial file is being written
    # no process writes this shard: its files hold the truth, not a heartbeat written up to
    # heartbeat_s before a Ctrl-C, or one left by a shard file since deleted
    # the most advanced attempt's file (the one a rerun resumes from)
    partial = max((c for c in (shard_file_counts(p, run.plan["fingerprint"]) for p in run.partial_paths(i)) if c),
                  key=lambda c: c["next"], default=None)
    if partial:
        st.update(done=min(partial["next"], stop - start), rows=partial["rows"], failures=partial["failures"])
    else:
        st.update(done=0, rows=0, failures=0)
    if run.shard_path(i).exists():
        st["foreign_file"] = str(run.shard_path(i))  # another run's (or a damaged) file: replaced when run
    return st


def stalled_for(hb: Dict, now: float, stall_batches: int, heartbeat_s: float,
                age_s: Optional[float] = None) -> Optional[float]:
    """Seconds a beating task's count has not moved, when that is more than `stall_batches` of
    its own batch times and 3 heartbeats (pure); None while it moves. Measured on one clock: the
    writer's own (`quiet_s`, how long its count had not moved when it beat, a difference of two
    of its own times) plus the beat's age as this reader judges it (`age_s`; a beat dated
    ahead counts as written now at most). Never before this attempt's first batch is done (no
    rate yet): its batch time is not known, and a first batch (a model's first forward, a
    cold cache) is not a stall. Beats written before quiet_s: the writer's moved_t against `now`."""
    if hb.get("state") != "running" or int(hb.get("done") or 0) >= int(hb.get("total") or 1):
        return None
    rate = float(hb.get("rate") or 0)
    if rate <= 0:
        return None
    if hb.get("quiet_s") is not None:
        age = age_s if age_s is not None else beat_age_s(hb, None, now)
        quiet = float(hb["quiet_s"]) + max(0.0, float(age))
    elif hb.get("moved_t") is not None:
        quiet = now - float(hb["moved_t"])
    else:
        return None
    batch_s = int(hb.get("batch_size") or 1) / rate
    return quiet if quiet > max(stall_batches * batch_s, 3 * heartbeat_s) else None


def finish_advice(run) -> str:
    """What to do about shards that are not complete: wait for the run in progress (a second
    launch would be refused), or rerun the extraction's command."""
    holder = launch_holder(run.rundir.path)
    now = time.time()
    running = [i for i in run.missing_shards() if shard_state(run, i, now)["state"] == "running"]
    if holder or running:
        who = f"held by {holder}" if holder else f"{len(running)} shard(s) running"
        return (f"the run is still in progress ({who}): wait for it to finish "
                f"(`caffe-runner status {shell_quote(run.rundir.path)}`)")
    return "rerun the extraction (same command) to finish them"


# ---- Slurm's word ---------------------------------------------------------------------------

def _duration(seconds: Optional[int]) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f" after {seconds} s"
    if seconds < 7200:
        return f" after {seconds // 60} min"
    return f" after {seconds // 3600} h {seconds % 3600 // 60:02d} min"


OOM_MARKS = ("exceeded memory limit", "out of memory", "oom-kill", "oom_kill", "outofmemory")


def killed_by_oom(log_tail: str) -> bool:
    """Slurm's own line in the task's stderr when it killed a step over its memory
    (jobacct_gather's OverMemoryKill, or the cgroup OOM killer): sacct then may say only FAILED (pure)."""
    low = log_tail.lower()
    return any(m in low for m in OOM_MARKS)


def slurm_cause(word: JobWord, log_tail: str) -> str:
    """The cause of a task's end, in Slurm's words (pure): its state, or OUT_OF_MEMORY when its
    log says Slurm killed it for memory."""
    if word.state != "OUT_OF_MEMORY" and word.state in ("FAILED", "CANCELLED", "COMPLETED") and killed_by_oom(log_tail):
        return "OUT_OF_MEMORY"
    return word.state


def death_message(cause: str, word: JobWord, done: int, total: int, mem_gb=None, timeout_min=None,
                  log_path: Optional[str] = None, last_words: Optional[str] = None) -> str:
    """What killed a task and what to do, in one line (pure), e.g. 'killed by Slurm:
    OUT_OF_MEMORY on node2 after 12 min; raise launcher.mem_gb (now 1) and rerun the command:
    3,120 of 8,000 images are kept'."""
    where = (f" on {word.node}" if word.node else "") + _duration(word.elapsed_s)
    log_hint = f"; its log: {log_path}" if log_path else ""
    if cause == "OUT_OF_MEMORY":
        what = f"killed by Slurm: OUT_OF_MEMORY{where}; raise launcher.mem_gb" + (
            f" (now {mem_gb:g})" if mem_gb is not None else "") + " and rerun the command"
    elif cause == "TIMEOUT":
        what = (f"killed by Slurm: TIMEOUT{where}, not requeued (launcher.max_num_timeout used up); raise "
                "launcher.timeout_min" + (f" (now {timeout_min})" if timeout_min is not None else "")
                + " or num_shards and rerun the command")
    elif cause == "NODE_FAIL":
        what = f"killed by Slurm: NODE_FAIL (its node was lost){where}; rerun the command"
    elif cause == "CANCELLED":
        what = f"killed by Slurm: CANCELLED (scancel){where}; rerun the command to finish it"
    elif cause == "PREEMPTED":
        what = f"killed by Slurm: PREEMPTED{where}, not requeued; rerun the command"
    elif cause == "FAILED":
        what = (f"the task failed in Slurm: FAILED, exit code {word.exit_code or '?'}{where}{log_hint}; fix the "
                "cause and rerun the command")
    elif cause == "COMPLETED":
        what = f"the task ended{where} without completing its shard{log_hint}; rerun the command"
    else:
        what = f"ended in Slurm: {cause}{where}{log_hint}; rerun the command"
    kept = f": {done:,} of {total:,} images are kept" if done else " (the shard starts over)"
    return what + kept + (f"; Caffe said: {last_words}" if last_words else "")


# what a pending task waits for, when the user can do something about it (or should know)
PENDING_HINTS = {
    "JobHeldUser": "held: `scontrol release JOBID` lets it start",
    "JobHeldAdmin": "held by an administrator",
    "PartitionDown": "its partition is down: it starts when the partition is up again",
    "PartitionInactive": "its partition is inactive: it starts when the partition is up again",
    "ReqNodeNotAvail": "the nodes it may use are not available (down or drained)",
    "JobArrayTaskLimit": "launcher.array_parallelism tasks already run",
    "BeginTime": "Slurm holds a requeued task about 2 min before it may start again",
    "DependencyNeverSatisfied": "its dependency can never be met: scancel it and rerun the command",
}


def _pending(reason: str, job_id: str) -> str:
    hint = PENDING_HINTS.get(reason, "")
    return f"pending ({reason or 'queued'}{': ' + hint.replace('JOBID', job_id) if hint else ''})"


def apply_slurm_word(st: Dict, word: Optional[JobWord], log_tail: str = "", mem_gb=None,
                     timeout_min=None, log_path: Optional[str] = None) -> Dict:
    """Shard state `st` (from shard_state) with Slurm's word on its latest job (pure): the
    queue and the accounting decide whether a task whose files fell silent lives, and how it
    ended. `alive`: whether a task may still write this shard."""
    st = dict(st)
    if st["state"] == "done":
        st["alive"] = False
        return st
    if word is None:
        st["alive"] = st["state"] == "running"
        return st
    st["slurm"] = {"job_id": word.job_id, "state": word.state, "reason": word.reason, "node": word.node,
                   "source": word.source}
    if word.alive:
        st["alive"] = True
        was_here = st["state"] in ("running", "interrupted", "requeued", "failed") and (
            not st.get("job_id") or st.get("job_id") == word.job_id)
        if word.state == "PENDING":
            if word.requeued or (was_here and st["state"] != "failed" and st.get("job_id")):
                after = [e for e in word.earlier if e != "REQUEUED"]
                st.update(state="requeued", note=f"requeued by Slurm{' after ' + after[-1] if after else ''}; "
                                                 + _pending(word.reason, word.job_id))
            else:
                st.update(state="pending", note=f"in Slurm's queue, {_pending(word.reason, word.job_id)}")
        elif word.state.startswith("REQUEUE"):
            st.update(state="requeued", note=f"Slurm: {word.state}")
        else:
            on = f" on {word.node}" if word.node else ""
            if st["state"] == "running" and st.get("beat") in ("alive", "fresh"):
                pass  # the heartbeat is the news
            else:
                silent = ("no heartbeat yet" if not st.get("age_s") else
                          f"its heartbeat is {st['age_s']:.0f} s old")
                st.update(state="running", note=f"Slurm: {word.state}{on}, {silent}")
        return st
    # Slurm says the task is over and its shard is not complete
    st["alive"] = False
    cause = slurm_cause(word, log_tail)
    st["cause"] = cause
    if st["state"] == "failed" and st.get("error") and st.get("job_id") == word.job_id and cause != "OUT_OF_MEMORY":
        return st  # the task said why itself, more precisely than Slurm can
    last = caffe_last_words(log_tail) if log_tail else None
    st.update(state="failed", error=death_message(cause, word, int(st.get("done") or 0), int(st["total"]), mem_gb,
                                                  timeout_min, log_path, last))
    if last:
        st["last_words"] = last
    return st


def _log_tail(path: Optional[str], limit: int = 64 * 1024) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _needs_asking(st: Dict) -> bool:
    """Slurm is asked about every shard not complete whose files fell silent (a stale or absent
    heartbeat, a dead pid) or that says it was requeued or failed (a new job may be queued)."""
    return st["state"] != "done" and not (st["state"] == "running" and st.get("beat") in ("alive", "fresh"))


# A watcher (`status --watch`, `launcher.wait`, Run.wait) polls every few seconds; squeue and
# sacct load the controller and the accounting database every user shares, so one process asks
# about the same jobs of the same run at most once per SLURM_ASK_FLOOR_S. Heartbeats, read from
# the files at every poll, still show a task's progress at once.
SLURM_ASK_FLOOR_S = 10.0
_asked: Dict[Tuple, Tuple[float, object]] = {}


def _ask_slurm(run_dir, job_ids: List[str], accounting: bool):
    key = (str(run_dir), tuple(job_ids), accounting)
    now = time.monotonic()
    hit = _asked.get(key)
    if hit is not None and now - hit[0] < SLURM_ASK_FLOOR_S:
        return hit[1]
    word = query_jobs(job_ids, accounting=accounting)
    for k in [k for k, (t, _) in _asked.items() if now - t >= SLURM_ASK_FLOOR_S]:
        del _asked[k]
    _asked[key] = (now, word)
    return word


def slurm_view(run, states: List[Dict], accounting: bool = True) -> Tuple[List[Dict], Dict]:
    """The states with Slurm's word applied (one batched query), and the run's Slurm summary:
    {sources, problems, merge: {job_id, state} or None}."""
    try:
        tasks, merges = latest_tasks(read_submissions(run.rundir.path))
    except ConfigError as e:  # a damaged submissions.json: said, and the files speak alone
        return [dict(s, alive=s["state"] == "running") for s in states], {"sources": [], "problems": [str(e)],
                                                                            "merge": None}
    if not tasks:
        return [dict(s, alive=s["state"] == "running") for s in states], {}
    # the job that last wrote a shard is its heartbeat's (a task may take others' shards:
    # steal.py); a shard no task has touched yet is its submitted task's. Both are asked: the
    # shard's latest submission (a rerun's task, queued) may live where its last writer died
    by_job = {str(t["job_id"]): t for t in tasks.values()}
    candidates: Dict[int, List[str]] = {}
    for s in states:
        jids = [str(j) for j in ((tasks.get(s["shard"]) or {}).get("job_id"), s.get("job_id")) if j]
        if jids and _needs_asking(s):
            candidates[s["shard"]] = list(dict.fromkeys(jids))
    ask = {i: js[-1] for i, js in candidates.items()}
    # the merge job matters once the shards are complete and the merged file is not there yet
    merge_ids = merges[-1:] if ask or not run.rundir.merged.exists() else []
    if not ask and not merge_ids:
        return [dict(s, alive=s["state"] == "running") for s in states], {}
    word = _ask_slurm(run.rundir.path, list(dict.fromkeys(j for js in candidates.values() for j in js)) + merge_ids,
                      accounting)
    for i, js in candidates.items():
        # a live job's word wins (the submitted task first); else the last writer's
        alive = [j for j in js if word.get(j) is not None and word.get(j).alive]
        ask[i] = alive[0] if alive else js[-1] if word.get(js[-1]) is not None else js[0]
    lc = getattr(run.cfg, "launcher", None)
    mem_gb = float(lc.mem_gb) if lc is not None and lc.get("mem_gb") is not None else None
    timeout_min = int(lc.timeout_min) if lc is not None and lc.get("timeout_min") is not None else None
    out = []
    for s in states:
        i = s["shard"]
        if i not in ask:
            out.append(dict(s, alive=s["state"] == "running"))
            continue
        w = word.get(ask[i])
        if w is not None and not w.alive and run.shard_done(i):
            # it completed its shard between our look at the files and Slurm's answer
            out.append(shard_state(run, i, time.time()) | {"alive": False})
            continue
        stderr = (by_job.get(ask[i]) or tasks.get(i) or {}).get("stderr")
        tail = _log_tail(stderr) if w is not None and not w.alive else ""
        s = dict(s, job_id=s.get("job_id") or ask[i], log=s.get("log") or stderr)
        out.append(apply_slurm_word(s, w, tail, mem_gb, timeout_min, stderr))
    merge = None
    if merge_ids:
        mw = word.get(merges[-1])
        merge = {"job_id": merges[-1], "state": mw.state if mw else None, "alive": bool(mw and mw.alive)}
    return out, {"sources": word.sources, "problems": word.problems, "merge": merge}


def run_status(run_dir: Path, use_sacct: bool = True, use_slurm: bool = True) -> Dict:
    """The run's state for status/report/wait: files first, then (a Slurm run) Slurm's word
    on every shard whose files fell silent: squeue, sacct (use_sacct) or scontrol."""
    run = load_run_dir(run_dir)
    now = time.time()
    here = (socket.gethostname(), pid_namespace())
    shards = [shard_state(run, i, now, here) for i in range(run.num_shards)]
    slurm: Dict = {}
    if use_slurm:
        shards, slurm = slurm_view(run, shards, accounting=use_sacct)
    else:
        shards = [dict(s, alive=s["state"] == "running") for s in shards]
    for s in shards:
        if s["state"] == "running" and s.get("stalled_s") is not None:
            # alive (its beats go on) but not moving: named, with where it runs
            s["state"] = "stalled"
            s["note"] = (f"no progress for {s['stalled_s']:.0f} s while its heartbeat beats, on "
                         f"{s.get('host') or '?'} (job {s.get('job_id') or '-'})" + (f"; {s['note']}" if s.get("note") else ""))
    counts: Dict[str, int] = {}
    for s in shards:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    if counts.get("interrupted") and out_of_space(run.rundir.path):
        for s in shards:
            if s["state"] == "interrupted":
                s["cause"] = NO_SPACE
    total = run.plan["count"]
    done = sum(s["done"] for s in shards)
    rate = sum(float(s["rate"] or 0) for s in shards if s["state"] in ("running", "stalled"))
    eta = (total - done) / rate if rate > 0 else None
    in_flight = any(s.get("alive") for s in shards)
    state = "done" if counts.get("done", 0) == run.num_shards else (
        "failed" if counts.get("failed") else "running" if in_flight else "incomplete")
    if state == "done" and run.rundir.merged_done(run.plan):
        state = "merged"
    result = {"run_dir": str(run.rundir.path), "state": state, "images": total, "done": done,
              "listing": run.plan.get("listing"),
              "rows": sum(s["rows"] for s in shards), "failures": sum(s["failures"] for s in shards),
              "rate": rate, "eta_s": eta, "counts": counts, "shards": shards,
              "alive": sum(1 for s in shards if s.get("alive"))}
    if slurm:
        result["slurm_word"] = slurm
    # which image each shard ran in ("" on the host); shards of one run from several images are flagged
    images: Dict[str, List[int]] = {}
    for s in shards:
        if s["image"] is not None:
            images.setdefault(s["image"], []).append(s["shard"])
    result["container_images"] = images
    stats_path = run.rundir.path / "stats.json"
    merged_stats = {}
    if stats_path.exists():  # written at merge: the failure reasons, grouped
        try:
            merged_stats = json.loads(stats_path.read_text())
            result["failures_by_reason"] = merged_stats.get("failures_by_reason", {})
        except (OSError, ValueError):
            pass
    if state in ("done", "merged"):  # complete, but a failed run when too many images failed (the launch's exit 1)
        # judged by the limit of the command that merged it (stats.json), else the plan's
        cfg = run.cfg
        if "max_failure_fraction" in merged_stats:
            cfg = OmegaConf.merge(cfg, {"run": {"max_failure_fraction": merged_stats["max_failure_fraction"]}})
        try:
            check_failure_share(cfg, {"rows": result["rows"], "failures": result["failures"],
                                          "failures_by_reason": result.get("failures_by_reason") or {},
                                          "run_dir": result["run_dir"]})
        except FailureShareError as e:
            result["too_many_failures"] = str(e)
    return result


def format_status(st: Dict) -> str:
    lines = [f"{st['run_dir']}: {st['state']}, {st['done']}/{st['images']} images"
             + (f" ({st['rows']} extracted, {st['failures']} failed)" if st["done"] else "")
             + (f", {st['rate']:.1f} img/s, ETA {st['eta_s']:.0f} s" if st.get("eta_s") else "")]
    if (st.get("listing") or {}).get("skipped"):  # what the folder's listing left out, and why
        lines.append(f"  input: {describe_listing(st['listing'])}")
    for k, why in top_reasons(st.get("failures_by_reason") or {}):
        lines.append(f"  failed: {k:>6} {why}")
    if st.get("too_many_failures"):
        lines.append(f"  a failed run: {st['too_many_failures']}")
    lines.append("shards: " + ", ".join(f"{k} {v}" for k, v in sorted(st["counts"].items())))
    for s in st["shards"]:
        line = f"  {s['shard']:5d} {s['state']:<11} {s['done']}/{s['total']}" + (
            f" ({s['failures']} failed)" if s.get("failures") else "")
        if s["state"] == "running" and s.get("rate"):
            line += f"  {s['rate']:.1f} img/s on {s.get('host')}"
        if s.get("own_shard") is not None:
            line += f"  (taken by the task of shard {s['own_shard']})"
        if s.get("clock_ahead_s"):
            line += (f"  (its beat is dated {s['clock_ahead_s']} s ahead of this clock: one look cannot age it; "
                     "`status --watch` and `wait` do)")
        if s.get("note"):  # Slurm's word: pending and why, requeued, running on which node
            line += f"  {s['note']}"
        if s["state"] == "failed":
            line += f"  {s.get('error')}" + ("" if str(s.get("log")) in str(s.get("error")) else f"  log: {s.get('log')}")
        if s.get("cause") == NO_SPACE:
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
    word = st.get("slurm_word") or {}
    if word.get("merge"):
        m = word["merge"]
        lines.append(f"merge job {m['job_id']}: {m['state'] or 'not known to Slurm'}")
    if word.get("problems"):
        lines.append(f"Slurm: {'; '.join(word['problems'])} (states from {', '.join(word['sources']) or 'the files'})")
    return "\n".join(shown(ln) for ln in lines)  # names, reasons and errors come from outside
