"""Slurm launcher: one array job (one task per shard / GPU) through submitit.

Each array task unpickles its own (cfg, shard index) and calls run_shard; Slurm's GPU binding
(CUDA_VISIBLE_DEVICES) is read once at the task's edge. Tasks are Checkpointable: on
timeout or preemption submitit requeues them and run_shard resumes from the last flushed
batch. A small dependent job (afterany) merges the shards when the array ends.
Non-blocking by default: the submitting process may exit at once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import submitit
from submitit.core.utils import JobPaths

from .. import log
from ..store.atomic import atomic_write_text
from ..inputs import configured, node_read_paths
from ..engine.device import resolve_slurm_device
from ..errors import ConfigError, RunnerError, ShardFailedError, did_you_mean, shell_quote
from ..task.extract import run_shard
from ..task.steal import take_shards
from ..engine.gpu import require_gpu_caffe
from ..results.merge import merge_run
from ..run.sharedpass import companions, pass_missing
from ..jobs.inflight import InFlight, describe, in_flight, merge_dependency, read_submissions, recorded_jobs
from ..run.plan import Run, load_run, load_run_dir, plan_summary, prepare_run
from ..store.rundir import RunDir
from ..runtimes import Placement, srun_args, wrap_python
from ..store.shard import array_chunks
from ..store.stats import collect_stats, write_stats
from ..run.status import run_status
from ..task.identity import setup_task_logging
from .base import Launcher

DEFAULT_MAX_ARRAY_SIZE = 1001


def parse_scontrol_config(text: str) -> Dict[str, str]:
    """`scontrol show config` lines 'Key = value' -> dict."""
    out = {}
    for line in text.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def max_array_size() -> int:
    """The cluster's MaxArraySize (arrays hold at most this many tasks, indices 0..N-1)."""
    if not shutil.which("scontrol"):
        raise ConfigError("launcher=slurm but `scontrol` is not on PATH: run on a Slurm login node "
                          "(or `eval $(slurm/dev-cluster env)` for the dev cluster), or use launcher=local")
    p = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ConfigError(no_controller_message(p.stderr))
    value = parse_scontrol_config(p.stdout).get("MaxArraySize", str(DEFAULT_MAX_ARRAY_SIZE))
    return int(value) if value.isdigit() else DEFAULT_MAX_ARRAY_SIZE


def no_controller_message(stderr: str) -> str:
    """scontrol's several error lines -> one: the telling one (its fatal line, else its last),
    and what to do."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    fatal = [ln for ln in lines if "fatal:" in ln]
    said = (fatal or lines or ["no output"])[-1]
    said = said.split("fatal:", 1)[-1].split("error:", 1)[-1].strip()
    return (f"launcher=slurm but no Slurm cluster answers from this machine (scontrol: {said[:160]}): run on the "
            "cluster's login node (or set SLURM_CONF to its slurm.conf), or use launcher=local")


def parse_slurm_minutes(text: str):
    """Slurm time ("UNLIMITED", "MM", "HH:MM:SS", "D-HH:MM:SS", "D-HH") -> minutes; None: no limit."""
    t = text.strip()
    if not t or t.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(x) for x in t.split(":")] + [0, 0]
        h, m, sec = parts[:3]
    else:
        parts = [int(x) for x in t.split(":")]
        if len(parts) == 1:
            h, m, sec = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, sec = 0, parts[0], parts[1]
        else:
            h, m, sec = parts[:3]
    return days * 1440 + h * 60 + m + (1 if sec else 0)


def check_partition(lc) -> None:
    """What Slurm can tell before submitting: the partition exists and allows the time limit
    (a refusal by sbatch would come after the plan was written)."""
    if not lc.partition or not shutil.which("scontrol"):
        return
    p = subprocess.run(["scontrol", "-o", "show", "partition", str(lc.partition)], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0 or not p.stdout.strip():
        names = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60).stdout.split()
        raise ConfigError(f"launcher.partition={lc.partition}: the cluster has no such partition"
                          f"{did_you_mean(lc.partition, names, cutoff=0.6)}; its partitions: "
                          f"{', '.join(sorted(set(names))) or 'none'} (sinfo), or leave launcher.partition unset "
                          "for the default")
    info = parse_scontrol_config(p.stdout.replace(" ", "\n"))
    limit = parse_slurm_minutes(info.get("MaxTime", ""))
    for key in ("timeout_min", "merge_timeout_min"):
        if limit is not None and int(lc.get(key, 0)) > limit:
            raise ConfigError(f"launcher.{key}={lc[key]} is above partition {lc.partition}'s MaxTime "
                              f"({info.get('MaxTime')} = {limit} min): use launcher.{key}<={limit}"
                              + (" (a requeued task resumes where it stopped)" if key == "timeout_min" else ""))


def most_cpus(sinfo_out: str) -> Optional[int]:
    """The largest CPU count in `sinfo -h -N -o %c` output (one node per line; pure)."""
    counts = [int(n) for n in re.findall(r"\d+", sinfo_out)]
    return max(counts) if counts else None


def check_cpus_per_task(lc) -> None:
    """A task asking more CPUs than any node of the partition has never starts: sbatch refuses
    it after the plan was written ("Requested node configuration is not available", naming no
    key). Said before, with the number that fits."""
    cmd = ["sinfo", "-h", "-N", "-o", "%c"] + (["-p", str(lc.partition)] if lc.partition else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return
    most = most_cpus(p.stdout) if p.returncode == 0 else None
    if most is not None and int(lc.cpus_per_task) > most:
        where = f"partition {lc.partition}" if lc.partition else "the cluster"
        raise ConfigError(f"launcher.cpus_per_task={lc.cpus_per_task}: the largest node of {where} has {most} CPUs "
                          f"(sinfo), so no task could start: use launcher.cpus_per_task<={most}")


def sbatch_errors() -> tuple:
    """What submitit raises when sbatch refuses a job (non-zero exit: FailedJobError with
    sbatch's stderr) or answers without a job id (FailedSubmissionError). Anything else
    raised while submitting (pickling the task, a bug) is not a refusal."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    return (FailedJobError, FailedSubmissionError)


def _sbatch_refused(e: Exception, what: str) -> ConfigError:
    """submitit's error when sbatch refuses: one line with sbatch's own words."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    msg = lines[-1] if lines else (text.strip().splitlines() or [type(e).__name__])[-1]
    return ConfigError(f"sbatch refused the {what}: {msg[:300]}; check launcher.partition, launcher.account, "
                       "launcher.qos, launcher.timeout_min, launcher.cpus_per_task, launcher.mem_gb and "
                       "launcher.additional_parameters")


def executor_parameters(lc, gres: bool = True) -> Dict:
    """submitit SlurmExecutor parameters from launcher config (pure)."""
    params = dict(job_name=lc.job_name, time=int(lc.timeout_min), cpus_per_task=int(lc.cpus_per_task),
                  mem=f"{int(round(float(lc.mem_gb) * 1024))}M", array_parallelism=int(lc.array_parallelism),
                  setup=list(lc.setup), additional_parameters=dict(lc.additional_parameters),
                  stderr_to_stdout=False)
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[key] = lc[key]
    if gres and int(lc.gpus_per_task) > 0:
        params["gres"] = f"gpu:{int(lc.gpus_per_task)}"
    return params


def _task_entry(cfg, index: int, fingerprint: Optional[str] = None):
    """What runs on the node, inside the array task. (Queued and requeued tasks unpickle it by
    this name: runner.launch.slurm._task_entry.) `fingerprint`: the run it was submitted for; a
    task queued before its run was replaced stops here, before it writes anything."""
    setup_task_logging()
    env = submitit.JobEnvironment()
    os.environ["CAFFE_RUNNER_LOG"] = str(env.paths.stderr).replace("%t", str(env.global_rank))
    load_run(cfg, fingerprint)
    if cfg.decode.workers == 2 and int(cfg.launcher.cpus_per_task) > 2:
        cfg.decode.workers = int(cfg.launcher.cpus_per_task) - 1  # the default follows the allocation
    # its own shard, then the ones no task holds (steal.py): a slow node holds no run
    if not cfg.launcher.get("take_free_shards", True):
        return run_shard(cfg, index)
    return take_shards(cfg, index, run_shard)


def _make_task():
    class ShardTask(submitit.helpers.Checkpointable):
        """Requeued on timeout/preemption; the rerun resumes from the shard's partial file."""

        def __call__(self, cfg, index, fingerprint=None):
            return _task_entry(cfg, index, fingerprint)

    return ShardTask()


def merge_job(run_dir: str, fingerprint: Optional[str] = None) -> str:
    """The dependent job: merge if every shard is complete, else say which are missing.
    (Submitted merge jobs unpickle it by this name: runner.launch.slurm.merge_job.)"""
    setup_task_logging()
    run = load_run_dir(run_dir, fingerprint)
    comps = companions(run)
    out = merge_run(run)
    st = write_stats(run)
    log.info("%d images: %d extracted, %d failed", st["rows"] + st["failures"], st["rows"], st["failures"])
    for c in comps:  # a sweep's shared pass: its other points' files came from the same tasks
        if c.missing_shards():
            log.warning("%s: %d shard(s) missing, not merged: its own launch (the sweep's command) extracts them",
                        c.rundir.path, len(c.missing_shards()))
            continue
        merge_run(c)
        write_stats(c)
        log.info("merged %s", c.rundir.merged)
    return str(out)


# Folders each node has its own of, unless the site declares them shared.
NODE_LOCAL_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm")


def node_local_folder(path: str, shared: str = "") -> Optional[str]:
    """The node-local folder `path` lies under, or None; `shared` (CAFFE_RUNNER_SHARED_PATHS,
    colon-separated) lists folders the site declares every node sees (pure)."""
    declared = [s.rstrip("/") for s in shared.split(":") if s.strip()]
    p = os.path.abspath(path)
    if any(p == d or p.startswith(d + "/") for d in declared):
        return None
    return next((f for f in NODE_LOCAL_FOLDERS if p.startswith(f + "/")), None)


def _check_paths_for_nodes(cfg) -> None:
    """Tasks run elsewhere: node-local paths would not exist there."""
    which = "/".join(f"input.{f}" for f in configured(cfg.input)) or "input"  # as the user set it
    paths = [("model.prototxt", cfg.model.prototxt), ("model.weights", cfg.model.weights),
             ("output.dir", cfg.output.dir)] + [(which, str(p)) for p in node_read_paths(cfg.input)]
    # a site whose /tmp is one file system for all nodes (the dev cluster) declares it
    shared = os.environ.get("CAFFE_RUNNER_SHARED_PATHS", "")
    for label, p in paths:
        # output.dir may not exist yet: prepare_run checks that it can be written
        if p and label != "output.dir" and not os.access(p, os.R_OK):
            raise ConfigError(f"{label} {p} is not readable from here; tasks will not read it either")
        folder = node_local_folder(str(p), shared) if p else None
        if folder:
            log.warning("%s %s is under %s, which each node has its own of: tasks on other nodes will not see it "
                        "(use a shared folder, or declare it with CAFFE_RUNNER_SHARED_PATHS=%s if all nodes share "
                        "it)", label, p, folder, folder)


def submitit_executor(**kw):
    """submitit.SlurmExecutor(**kw): the executor the Slurm launcher submits through."""
    return submitit.SlurmExecutor(**kw)


def drop_submission_links(folder) -> None:
    """submitit leaves a symlink `.submission_file_<uuid>.sh` beside the job folders after each
    sbatch (the script itself moves to `<job>/<job>_submission.sh`). A link's mode is always
    rwxrwxrwx, so every audit of the run directory (`find -perm /022`) flags it as writable by
    others: remove them once the script has moved (only links; a file there is still being
    submitted)."""
    for p in JobPaths.get_first_id_independent_folder(folder).glob(".submission_file_*.sh"):
        if p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def array_executor(cfg, folder, make: Callable = submitit_executor):
    """The array's submitit executor: sbatch options from launcher.*, the task's interpreter
    wrapped by the container runtime (tests/golden/ pins the sbatch scripts it writes)."""
    ex = make(folder=folder, max_num_timeout=int(cfg.launcher.max_num_timeout),
              python=wrap_python(cfg, sys.executable))
    params = executor_parameters(cfg.launcher)
    extra = srun_args(cfg)
    if extra:
        params["srun_args"] = extra
    ex.update_parameters(**params)
    return ex


def _sinfo_has_partition(name: str) -> Optional[bool]:
    """Whether the cluster has partition `name`; None when sinfo cannot say."""
    if not shutil.which("sinfo"):
        return None
    try:
        p = subprocess.run(["sinfo", "-h", "-a", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return name in {line.strip() for line in p.stdout.splitlines()}


def _sacctmgr_has_account(name: str) -> Optional[bool]:
    """Whether accounting knows account `name`; None when sacctmgr cannot say (no accounting)."""
    if not shutil.which("sacctmgr"):
        return None
    try:
        p = subprocess.run(["sacctmgr", "-n", "-P", "show", "account", name, "format=Account"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return name.lower() in {line.strip().lower() for line in p.stdout.splitlines()}


def check_slurm(cfg) -> None:
    """Slurm-side checks of validate(): before anything is listed or submitted."""
    lc = cfg.launcher
    if cfg.num_shards is None:
        raise ConfigError("launcher=slurm needs num_shards=N: the number of array tasks (one per GPU is "
                          "typical; more, smaller shards checkpoint and rebalance better)")
    if not shutil.which("scontrol"):
        raise ConfigError("launcher=slurm but `scontrol` is not on PATH: run on a Slurm login node "
                          "(or `eval $(slurm/dev-cluster env)` for the dev cluster), or use launcher=local")
    for key in ("timeout_min", "cpus_per_task", "array_parallelism", "shards_per_task", "merge_cpus_per_task",
                "merge_timeout_min"):
        if int(lc[key]) < 1:
            raise ConfigError(f"launcher.{key}={lc[key]}: use 1 or more")
    for key in ("mem_gb", "merge_mem_gb"):
        if float(lc[key]) <= 0:
            raise ConfigError(f"launcher.{key}={lc[key]}: use a positive number of GB")
    max_array_size()  # is a controller there? (before the partition is asked of it)
    if lc.partition and _sinfo_has_partition(str(lc.partition)) is False:
        check_partition(lc)  # raises, naming the closest partition and listing them
        raise ConfigError(f"launcher.partition={lc.partition}: the cluster has no such partition (`sinfo -s` "
                          "lists them); set launcher.partition to one of them, or leave it unset for the default")
    check_partition(lc)  # its MaxTime against launcher.timeout_min
    check_cpus_per_task(lc)
    if lc.account and _sacctmgr_has_account(str(lc.account)) is False:
        raise ConfigError(f"launcher.account={lc.account}: Slurm accounting has no such account "
                          "(`sacctmgr show associations user=$USER` lists yours)")
    _check_paths_for_nodes(cfg)


class SlurmLauncher(Launcher):
    """One Slurm array job (one task per shard) through submitit, and a dependent merge job."""
    name = "slurm"
    placement = Placement(srun=True, other_nodes=True)

    def __init__(self, executor: Callable = submitit_executor):
        # executor(folder=, python=, ...) -> a submitit.SlurmExecutor (tests: a fake)
        self.executor = executor

    def resolve_device(self, cfg) -> Tuple[str, int]:
        return resolve_slurm_device(cfg)

    def require_gpu_here(self) -> None:
        require_gpu_caffe()  # a login node need not have a GPU: each task probes its own

    def check(self, cfg) -> None:
        check_slurm(cfg)

    def settle(self, cfg, checked) -> None:
        cfg.launcher.gpus_per_task = checked.gpus_per_task

    def default_shards(self, cfg) -> int:
        # num_shards (required: check_slurm) is the number of array tasks; each takes more
        # shards as it frees up, so the tail is a fraction of one task's work
        return int(cfg.num_shards) * int(cfg.launcher.get("shards_per_task", 1) or 1)

    def explicit_shards(self, cfg) -> Optional[int]:
        # num_shards tasks x launcher.shards_per_task shards (default_shards), else one per task
        return None if int(cfg.launcher.get("shards_per_task", 1) or 1) > 1 else cfg.num_shards

    def returns_before_done(self, cfg) -> bool:
        return not cfg.launcher.get("wait", False)

    def execute(self, cfg, accepted: Callable) -> Dict:
        return launch_slurm(cfg, accepted, self)

    def run_tasks(self, run, fn: Callable, calls: List[Sequence], what: str) -> bool:
        """One array task per call, with the run's sbatch options (its partition, GPUs, image);
        waits for them (`retry` of a Slurm run)."""
        ex = array_executor(run.cfg, run.rundir.logs_dir / "%j", self.executor)
        ex.update_parameters(job_name=f"{run.cfg.launcher.job_name}-{what}")
        jobs = []
        for chunk in array_chunks(list(range(len(calls))), max_array_size()):
            js = ex.map_array(fn, *zip(*[calls[k] for k in chunk]))
            drop_submission_links(ex.folder)
            jobs += [(calls[k], j) for k, j in zip(chunk, js)]
            print(f"submitted {what} array job {js[0].job_id.split('_')[0]} ({len(chunk)} task(s))", flush=True)
        failed = []
        for args, j in jobs:
            try:
                j.result()
            except Exception as e:
                failed.append(f"job {j.job_id} {type(e).__name__} (log {j.paths.stderr})")
        if failed:
            raise ShardFailedError(f"{len(failed)} {what} task(s) failed: {'; '.join(failed)}; what the others did "
                                   "is kept: rerun the same command")
        return True


def launch_slurm(cfg, accepted: Callable, launcher: SlurmLauncher) -> Dict:
    max_size = max_array_size()  # also: is the controller there?
    # the run's shards: num_shards tasks x launcher.shards_per_task (at most one per image)
    run = prepare_run(cfg, launcher, explicit_shards=launcher.explicit_shards(cfg))
    accepted(run)
    with _ctrl_c_once():  # a second Ctrl-C must not lose the answer to the first
        try:
            return _submit(cfg, run, launcher, max_size)
        except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM) while submitting or waiting
            msg = interrupted_message(run.rundir.path)
            raise type(e)(msg) from None


@contextmanager
def _ctrl_c_once():
    """The first Ctrl-C raises KeyboardInterrupt and, in the same breath, makes later ones
    ignored until the block ends: an impatient second one cannot land between the raise and the
    handler that answers the first (it did, at random, when the handler turned them off itself)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signals go to the main thread only: nothing to hold back here
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _submit(cfg, run: Run, launcher: "SlurmLauncher", max_size: int) -> Dict:
    lc = cfg.launcher
    rd = run.rundir
    fingerprint = run.plan["fingerprint"]
    # a shard whose job Slurm still has queued or running is not submitted again: the twins
    # would collide on its file (the same command run twice, a resubmit while tasks wait)
    flight = in_flight(rd.path)
    # this run's shards, and a sweep companion's (sharedpass.py: the same tasks write both)
    missing = [s for s in pass_missing(run) if s not in flight.shards]
    # one task per GPU asked for (num_shards), each started on a missing shard; the tasks still
    # in flight take missing shards too
    todo = missing[:max(0, int(cfg.num_shards) - len(flight.shards))]
    if missing and not todo:
        print(f"  {len(missing)} shard(s) not done are taken by the {len(flight.shards)} task(s) in flight",
              flush=True)
    chunks = array_chunks(todo, max_size)
    print(f"plan: {plan_summary(run)}\n"
          f"  {len(todo)} task(s) to submit in {len(chunks)} array(s) for {len(missing)} shard(s) "
          f"(MaxArraySize {max_size}), "
          f"{lc.gpus_per_task} GPU, {lc.cpus_per_task} CPUs, {lc.mem_gb} GB, {lc.timeout_min} min each, "
          f"at most {lc.array_parallelism} at once", flush=True)
    if flight:
        print(f"  already in flight, not submitted again: {describe(flight)}", flush=True)
    if not missing and not flight.shards:
        if flight.merges:
            print(f"all {run.num_shards} shards are complete; merge job {', '.join(flight.merges)} writes "
                  f"{rd.merged}", flush=True)
        else:
            if not rd.merged_done(run.plan) or any(not c.rundir.merged_done(c.plan) for c in companions(run)):
                merge_job(str(rd.path))
            print(f"all {run.num_shards} shards are complete: {rd.merged}")
        return {"submitted": True, "run_dir": str(rd.path), "jobs": [], "in_flight": flight.job_ids()}

    logs = rd.logs_dir / "%j"
    ex = array_executor(cfg, logs, launcher.executor)
    python = ex.python
    submissions, all_jobs = submit_arrays(ex, _make_task(), cfg, chunks, rd.path, fingerprint) if todo else ([], [])
    merge_id = mjob = None
    if lc.merge_job:
        arrays = flight.arrays + [s["array_job_id"] for s in submissions]
        try:
            merge_id, mjob = _one_merge_job(cfg, launcher, logs, python, rd.path, fingerprint, arrays, flight,
                                            new=bool(submissions))
        except BaseException as e:
            _record_submissions(rd.path, submissions, None)
            if isinstance(e, sbatch_errors()):
                raise _sbatch_refused(e, "merge job (the array was submitted; `caffe-runner merge` merges by "
                                         "hand)") from e
            raise
    if not submissions and merge_id and merge_id not in flight.merges:
        # a merge job for arrays already in flight: recorded too, so the next command sees it
        submissions = [{"array_job_id": "", "submitted": time.time(), "tasks": []}]
    if submissions:
        _record_submissions(rd.path, submissions, merge_id)
        for c in companions(run):  # the same tasks write their shards: status follows them there too
            _record_submissions(c.rundir.path, [dict(s) for s in submissions], merge_id)
    print(f"follow it:  caffe-runner status {shell_quote(rd.path)}   (or squeue -u $USER; logs in {rd.logs_dir})\n"
          f"output:     {rd.merged} when the merge job ends", flush=True)
    result = {"submitted": True, "run_dir": str(rd.path), "jobs": [j.job_id for _, j in all_jobs],
              "merge_job": merge_id, "in_flight": flight.job_ids()}
    if lc.wait:
        # the tasks already in flight are waited for as the ones just submitted
        waited = all_jobs + [(shard, submitit.SlurmJob(folder=logs, job_id=jid))
                             for shard, (jid, _, _) in sorted(flight.shards.items())]
        if merge_id and mjob is None:
            mjob = submitit.SlurmJob(folder=logs, job_id=merge_id)
        wait_for(run, waited, mjob)
        result.update(waited=True, stats=collect_stats(run))
    return result


def _one_merge_job(cfg, launcher: SlurmLauncher, logs: Path, python: str, run_dir: Path, fingerprint: str,
                   arrays: List[str], flight: InFlight, new: bool):
    """The run's one merge job, after all of its arrays: a merge job still pending is made to
    wait for the new arrays too (scontrol update); else one is submitted (after a merge still
    running, if any: two merges never write at once). Returns (its id, the submitit job when
    submitted here, else None)."""
    lc = cfg.launcher
    pending = [m for m, (state, _) in flight.merges.items() if state == "PENDING"]
    if pending:
        m = pending[-1]
        if new:
            dep = merge_dependency(arrays)
            p = subprocess.run(["scontrol", "update", f"JobId={m}", f"Dependency={dep}"], capture_output=True,
                               text=True, timeout=60)
            if p.returncode != 0:
                raise RunnerError(f"merge job {m} could not be made to wait for the new array(s) ({p.stderr.strip()}"
                                  f"): scancel {m} and run the command again (it submits one merge job)")
            print(f"merge job {m} (already queued) now waits for array(s) {', '.join(arrays)}", flush=True)
        return m, None
    running = [m for m in flight.merges if m not in pending]
    mex = launcher.executor(folder=logs, python=python)
    params = executor_parameters(lc, gres=False)
    params.update(job_name=f"{lc.job_name}-merge", cpus_per_task=int(lc.merge_cpus_per_task),
                  mem=f"{int(round(float(lc.merge_mem_gb) * 1024))}M", time=int(lc.merge_timeout_min),
                  dependency=merge_dependency(arrays, running[-1] if running else None))
    if srun_args(cfg):  # the merge runs in the same image as the tasks
        params["srun_args"] = srun_args(cfg)
    mex.update_parameters(**params)
    mjob = mex.submit(merge_job, str(run_dir), fingerprint)
    drop_submission_links(mex.folder)
    print(f"submitted merge job {mjob.job_id} (afterany on the array{'s' if len(arrays) > 1 else ''})", flush=True)
    return mjob.job_id, mjob


def submit_arrays(ex, task, cfg, chunks: List[List[int]], run_dir: Path, fingerprint: Optional[str] = None):
    """One map_array per chunk of shards -> (submission records, [(shard, job)]). An sbatch
    refusal is one ConfigError with sbatch's words (its cause kept); anything else raised while
    submitting (a pickling error, a bug) surfaces as itself. Either way the arrays already
    submitted are recorded in submissions.json."""
    submissions: List[Dict] = []
    all_jobs = []
    for chunk in chunks:
        try:
            jobs = ex.map_array(task, [cfg] * len(chunk), chunk, [fingerprint] * len(chunk))
            drop_submission_links(RunDir(run_dir).logs_dir)
        except BaseException as e:
            if submissions:
                _record_submissions(run_dir, submissions, None)
            if isinstance(e, sbatch_errors()):
                raise _sbatch_refused(e, "array job") from e
            raise
        all_jobs.extend(zip(chunk, jobs))
        array_id = jobs[0].job_id.split("_")[0]
        submissions.append({"array_job_id": array_id, "submitted": time.time(),
                            "tasks": [{"shard": s, "job_id": j.job_id, "stderr": str(j.paths.stderr)}
                                      for s, j in zip(chunk, jobs)]})
        print(f"submitted array job {array_id}: shards {chunk[0]}..{chunk[-1]} ({len(chunk)} tasks)", flush=True)
    return submissions, all_jobs


def _record_submissions(run_dir: Path, subs: List[Dict], merge_id: Optional[str]) -> None:
    path = Path(run_dir) / "submissions.json"
    old = json.loads(path.read_text()) if path.exists() else []
    for s in subs:
        s["merge_job_id"] = merge_id
    atomic_write_text(path, json.dumps(old + subs, indent=1))


def interrupted_message(run_dir: Path) -> str:
    """What a Ctrl-C of a Slurm launch leaves behind: the run's jobs Slurm still has queued or
    running (inflight.in_flight, asked once) go on without this command; how to cancel them."""
    if not read_submissions(run_dir):
        return "interrupted before any job was submitted: nothing is queued; the same command submits the run"
    try:
        fl = in_flight(run_dir)
    except (ConfigError, OSError, subprocess.TimeoutExpired) as e:  # squeue cannot say
        jobs = recorded_jobs(read_submissions(run_dir))
        ids = " ".join(dict.fromkeys([j.split("_")[0] for j in jobs[0].values()] + jobs[1]))
        return (f"interrupted; the run's Slurm jobs ({ids}) may still be queued or running ({e}): they go on "
                f"without this command; `scancel {ids}` cancels them, `caffe-runner status {shell_quote(run_dir)}` follows them")
    if not fl:
        return (f"interrupted; no job of this run is left in Slurm's queue: rerun the same command to submit the "
                f"shards that are not complete (`caffe-runner status {shell_quote(run_dir)}` says which)")
    ids = " ".join(fl.arrays + list(fl.merges))
    return (f"interrupted; Slurm jobs of this run are still queued or running and go on without this command "
            f"({describe(fl)}): `scancel {ids}` cancels them; `caffe-runner status {shell_quote(run_dir)}` follows them")


def waiting_line(st: Dict) -> str:
    """One line of progress for logs (no terminal for a bar)."""
    pct = 100.0 * st["done"] / st["images"] if st["images"] else 100.0
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items()))
    eta = f", ETA {st['eta_s'] / 60:.0f} min" if st.get("eta_s") else ""
    return f"slurm: {st['done']}/{st['images']} images ({pct:.0f}%), shards: {counts}{eta}"


def wait_for(run: Run, jobs, merge_job=None, poll_s: float = 2.0, merge_wait_s: float = 600.0) -> None:
    """Block until no task of the array is alive (Slurm's word and the heartbeats, as `status`
    sees them: a task killed without a word ends the wait within a few heartbeat intervals,
    with or without sacct), with progress; report unfinished shards with what ended them;
    then wait for the merge job's features.h5 (at most merge_wait_s once the array has ended)
    and say what happened: merged, no merge job, or a merge job that ended or is still waiting
    without the file."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=run.plan["count"], unit="img", desc="slurm", file=sys.stderr)
    last = 0
    last_log = 0.0
    try:
        while True:
            st = run_status(run.rundir.path)
            if bar is not None:
                bar.update(st["done"] - last)
                last = st["done"]
            elif time.time() - last_log > 30:
                last_log = time.time()
                log.info("%s", waiting_line(st))
            if not st["alive"]:
                break
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()
    by_shard = {s["shard"]: s for s in st["shards"]}
    started = {shard: j for shard, j in jobs}
    failed = []
    # every shard not done, whichever task was started on it or took it last (steal.py)
    for shard in run.missing_shards():
        s = by_shard.get(shard, {})
        j = started.get(shard)
        jid = s.get("job_id") or (j.job_id if j is not None else "none")
        path = s.get("log") or (str(j.paths.stderr) if j is not None else "-")
        failed.append((shard, jid, path, s.get("error") or s.get("note") or s.get("state")))
    if failed:
        lines = "\n".join(f"  shard {s}: job {jid}: {why}; log {path}" for s, jid, path, why in failed)
        raise ShardFailedError(f"{len(failed)} task(s) failed; completed shards are kept. Resubmit the same "
                               f"command to run only the missing shards.\n{lines}")
    rd = run.rundir
    if merge_job is None:
        print(f"all {run.num_shards} shards are complete in {rd.shards_dir}; no merge job was submitted "
              f"(launcher.merge_job=false): `caffe-runner merge {shell_quote(rd.path)}` writes {rd.merged}", flush=True)
        return
    # the merge job follows the array; wait for its file so `wait` returns a finished run
    deadline = time.time() + merge_wait_s

    def merge_word() -> Tuple[bool, str]:
        """(alive, state): Slurm's word as `status` has it, else what submitit says."""
        word = (run_status(rd.path).get("slurm_word") or {}).get("merge") or {}
        if word.get("state"):
            return bool(word["alive"]), word["state"]
        return not merge_job.done(), merge_job.state

    alive, state = merge_word()
    while not rd.merged_done(run.plan) and alive and time.time() < deadline:
        time.sleep(poll_s)
        alive, state = merge_word()
    if rd.merged_done(run.plan):
        print(f"done: {rd.merged}", flush=True)
        return
    what = (f"has not written it after {merge_wait_s:.0f} s (state {state}; it may still run)" if alive
            else f"ended ({state}) without writing it")
    raise RunnerError(f"all {run.num_shards} shards are complete, but merge job {merge_job.job_id} {what}: "
                      f"{rd.merged} is missing or does not hold every planned image; its log: {merge_job.paths.stderr}; `caffe-runner merge "
                      f"{rd.path}` merges by hand")
