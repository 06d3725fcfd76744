"""A run's Slurm jobs that are still alive, asked of Slurm (squeue) by the job ids the run
recorded in submissions.json.

Why: the same command run again while the run's array is queued must not submit a shard that
already has a job (the twins would collide on the shard's file, and a second merge job on the
merged one), and output.overwrite=true must not delete a run whose queued tasks would then write
into its successor. The run directory says what is done; only Slurm knows what is still to come.

submissions.json: a list of {"array_job_id", "submitted", "merge_job_id",
"tasks": [{"shard", "job_id" ("A_I"), "stderr"}]}, one record per array, oldest first.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from ..errors import ConfigError, shell_quote
from .slurm import JobWord, ask_squeue, state_alive

SUBMISSIONS = "submissions.json"
SQUEUE_TIMEOUT_S = 60  # a submission waits this long for the controller before it is refused


def read_submissions(run_dir: Path) -> List[Dict]:
    path = Path(run_dir) / SUBMISSIONS
    try:
        subs = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}): it names the run's Slurm jobs; check `squeue -u $USER` for "
                          f"jobs still running in this run, scancel them, then remove {path}") from None
    return subs if isinstance(subs, list) else []


def latest_tasks(subs: List[Dict]) -> Tuple[Dict[int, Dict], List[str]]:
    """(shard -> the task record of its latest submission, merge job ids in submission order)
    (pure)."""
    tasks: Dict[int, Dict] = {}
    merges: List[str] = []
    for s in subs:
        for t in s.get("tasks", []):
            tasks[int(t["shard"])] = t
        m = s.get("merge_job_id")
        if m and str(m) not in merges:
            merges.append(str(m))
    return tasks, merges


def recorded_jobs(subs: List[Dict]) -> Tuple[Dict[int, str], List[str]]:
    """(shard -> the job id of its latest submission, merge job ids in submission order) (pure)."""
    tasks, merges = latest_tasks(subs)
    return {i: str(t["job_id"]) for i, t in tasks.items()}, merges


def state_where(words: Dict[str, JobWord]) -> Dict[str, Tuple[str, str]]:
    """squeue's word -> {job id: (state, its nodes, or why it is pending)} (pure)."""
    return {jid: (w.state, w.node or w.reason) for jid, w in words.items()}


def squeue_jobs(job_ids: Iterable[str]) -> Dict[str, Tuple[str, str]]:
    """What squeue says of these jobs (array task ids "A_I" included): {id: (state, where)}.
    Jobs Slurm has forgotten (ended long ago) are absent. Raises ConfigError when Slurm cannot
    be asked: whether a job is alive must not be guessed."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    if not shutil.which("squeue"):
        raise ConfigError(f"this run has Slurm jobs ({', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}) and "
                          "`squeue` is not on PATH to tell whether they still run: run the command on the "
                          "cluster's login node")
    # every state: a job that ended reads as ended (slurmjobs.state_alive), not as absent
    words, why = ask_squeue(ids, all_states=True, timeout_s=SQUEUE_TIMEOUT_S)
    if words is None:
        raise ConfigError(f"squeue could not say whether this run's jobs still run ({why}): retry when "
                          "the Slurm controller answers")
    return {k: v for k, v in state_where(words).items() if k in ids or k.split("_")[0] in ids}


@dataclass
class InFlight:
    """The run's jobs Slurm still has queued or running."""
    shards: Dict[int, Tuple[str, str, str]] = field(default_factory=dict)  # shard -> (job id, state, where)
    merges: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # merge job id -> (state, where)

    @property
    def arrays(self) -> List[str]:
        return sorted({j.split("_")[0] for j, _, _ in self.shards.values()}, key=_job_key)

    def job_ids(self) -> List[str]:
        return [j for j, _, _ in self.shards.values()] + list(self.merges)

    def __bool__(self) -> bool:
        return bool(self.shards or self.merges)


def _job_key(job_id: str):
    return tuple(int(x) if x.isdigit() else 0 for x in job_id.split("_"))


def live_of(tasks: Dict[int, str], merges: List[str], known: Dict[str, Tuple[str, str]]) -> InFlight:
    """The recorded jobs squeue knows in a state that is not an end (pure)."""
    fl = InFlight()
    for shard, jid in tasks.items():
        state, where = known.get(jid, ("", ""))
        if state_alive(state):
            fl.shards[shard] = (jid, state, where)
    for m in merges:
        state, where = known.get(m, ("", ""))
        if state_alive(state):
            fl.merges[m] = (state, where)
    return fl


def in_flight(run_dir: Path) -> InFlight:
    """The jobs recorded in run_dir's submissions.json that Slurm still has queued or running."""
    tasks, merges = recorded_jobs(read_submissions(run_dir))
    if not tasks and not merges:
        return InFlight()
    return live_of(tasks, merges, squeue_jobs(list(tasks.values()) + merges))


def _where(state: str, where: str) -> str:
    if not where or where == "None":
        return state
    return f"{state} on {where}" if state == "RUNNING" else f"{state} ({where})"


def describe(fl: InFlight, limit: int = 6) -> str:
    """'shard 0: job 12_0 RUNNING on node1; shard 1: job 12_1 PENDING (Priority); merge job 13
    PENDING (Dependency)' (pure)."""
    parts = [f"shard {s}: job {j} {_where(st, w)}" for s, (j, st, w) in sorted(fl.shards.items())]
    if len(parts) > limit:
        parts = parts[:limit] + [f"{len(parts) - limit} more"]
    parts += [f"merge job {m} {_where(st, w)}" for m, (st, w) in fl.merges.items()]
    return "; ".join(parts)


def refuse_if_live(run_dir: Path, what: str) -> None:
    """Raise (before anything is touched) when the run in run_dir still has Slurm jobs that
    may write into it."""
    fl = in_flight(run_dir)
    if fl:
        ids = " ".join(sorted({j.split("_")[0] for j in fl.job_ids()}, key=_job_key))
        raise ConfigError(f"{what}: the run in {run_dir} still has Slurm jobs that would write into it "
                          f"({describe(fl)}): wait for them (caffe-runner status {shell_quote(run_dir)}) or cancel them "
                          f"(scancel {ids}), then run the command again")


def merge_dependency(arrays: List[str], after: Optional[str] = None) -> str:
    """sbatch's --dependency for the run's merge job: after every array (and a merge already
    running) ended, whatever their outcome (pure)."""
    return "afterany:" + ":".join(list(arrays) + ([after] if after else []))
