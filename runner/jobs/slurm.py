"""Slurm's word on a run's jobs: what the queue and the accounting say about each array task,
for `status`, `report`, `wait` and Run.wait() when a shard's own files cannot tell (its
heartbeat is stale or absent: a task killed by the OOM killer, a lost node or `scancel -s KILL`
writes nothing).

Three sources, each asked once per question for all of a run's jobs (never once per shard):
  squeue -r            jobs still in the queue: PENDING (and why), RUNNING (on which node)
  sacct -D -X          how a job that left the queue ended (TIMEOUT, OUT_OF_MEMORY, NODE_FAIL,
                       CANCELLED, PREEMPTED, FAILED and its exit code), and the end of each
                       earlier run of a requeued job (-D: a NODE_FAIL or PREEMPTED before the
                       requeue)
  scontrol show job    where sacct has nothing to say (no slurmdbd): the controller remembers
                       ended jobs for MinJobAge seconds (default 300)
The parsers are pure (tests/test_slurmjobs.py feeds them output captured on the dev cluster);
_run() is the one function that runs the commands: query_jobs() for the whole word, ask_squeue()
for the queue alone (inflight.py: what is still to come before a submission).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

SQUEUE_FORMAT = "%i|%T|%r|%N|%M"
SACCT_FIELDS = "JobID,State,ExitCode,NodeList,ElapsedRaw,Reason"
# The one list of Slurm's job states, for every reader (a resubmission's in-flight check, wait,
# status, report). Ended: the job runs nothing more, ever. Anything else (pending, running, held,
# stopped, requeued, or a state this list does not know) may still start or write its shard: a
# twin must not be submitted beside it, and `wait` must not call it dead.
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                          "BOOT_FAIL", "DEADLINE", "REVOKED"})


def state_alive(state: str) -> bool:
    """Whether a job in this base state may still run (pure): every state but the ends (PENDING,
    RUNNING, COMPLETING: its processes are being ended; STOPPED: SIGSTOPped, it keeps its nodes;
    SPECIAL_EXIT, RESV_DEL_HOLD: requeued and held; ...), an unknown one included (a newer
    Slurm's: assuming it ended could start a twin)."""
    return bool(state) and state not in ENDED_STATES


# how a run ended that Slurm restarts by itself when the job may be requeued
REQUEUE_CAUSES = ("NODE_FAIL", "PREEMPTED", "REQUEUED", "BOOT_FAIL")
TIMEOUT_S = 30  # one query; a controller that does not answer in this long is "not known"


@dataclass(frozen=True)
class JobWord:
    """What Slurm says about one job (an array task "123_4" or a plain job "125")."""
    job_id: str
    state: str                     # Slurm's base state: "RUNNING", "OUT_OF_MEMORY", "CANCELLED" ...
    source: str                    # "squeue" | "sacct" | "scontrol"
    reason: str = ""               # why it is PENDING ("Priority", "BeginTime", "JobArrayTaskLimit")
    node: str = ""                 # where it runs / ran
    elapsed_s: Optional[int] = None
    exit_code: str = ""            # "3:0" = exit 3, "0:9" = killed by signal 9
    restarts: int = 0              # requeues Slurm counted (scontrol), or earlier runs (sacct -D)
    earlier: Tuple[str, ...] = ()  # how each earlier run of a requeued job ended (sacct -D)
    runs: Tuple[str, ...] = ()     # every record sacct -D has of it, oldest first

    @property
    def alive(self) -> bool:
        return state_alive(self.state)

    @property
    def requeued(self) -> bool:
        return self.restarts > 0 or bool(self.earlier) or self.state.startswith("REQUEUE")


def job_id_from_env(environ: Mapping[str, str]) -> Optional[str]:
    """This process's Slurm job as Slurm names it (pure): "A_I" for array task I of array A,
    else the plain job id; None outside Slurm. The one place a job id is built from the
    environment (task identity, lock holder lines)."""
    job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"{job}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def base_state(text: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'RUNNING+' -> 'RUNNING' (pure)."""
    return (text.strip().split() or [""])[0].rstrip("+").upper()


def expand_job_ids(text: str) -> List[str]:
    """A job id as the tools print it -> the array tasks it names (pure):
    '7_3' -> ['7_3']; '7_[2-4%1]' -> ['7_2', '7_3', '7_4']; '7_[1,3-4]' -> [...]; '125' -> ['125']."""
    text = text.strip()
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", text)
    if not m:
        return [text] if text else []
    return [f"{m.group(1)}_{k}" for k in expand_ranges(m.group(2))]


def expand_ranges(spec: str) -> List[int]:
    """'2-4%1' / '1,3-5' / '7' -> [2, 3, 4] / [1, 3, 4, 5] / [7] (pure; a throttle '%N' is dropped)."""
    out: List[int] = []
    for part in spec.split("%", 1)[0].split(","):
        part = part.strip()
        if not part:
            continue
        step = 1
        if ":" in part:
            part, s = part.split(":", 1)
            step = int(s)
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1, step))
    return out


def parse_duration_s(text: str) -> Optional[int]:
    """squeue's '%M' ('0:13', '1:02:03', '2-01:00:00') -> seconds; None when it cannot say (pure)."""
    t = text.strip()
    if not t or t in ("INVALID", "NOT_SET", "N/A"):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
    try:
        parts = [int(x) for x in t.split(":")]
    except ValueError:
        return None
    s = 0
    for p in parts:
        s = s * 60 + p
    return days * 86400 + s


def parse_squeue(text: str) -> Dict[str, JobWord]:
    """`squeue -h -r -o '%i|%T|%r|%N|%M'` -> {job id: JobWord} (pure)."""
    out: Dict[str, JobWord] = {}
    for line in text.splitlines():
        f = line.split("|")
        if len(f) < 5:
            continue
        node = f[3].strip()
        for jid in expand_job_ids(f[0]):
            out[jid] = JobWord(jid, base_state(f[1]), "squeue", reason=_none(f[2]), node=node,
                               elapsed_s=parse_duration_s(f[4]))
    return out


def parse_sacct(text: str) -> Dict[str, JobWord]:
    """`sacct -n -P -X -D -o JobID,State,ExitCode,NodeList,ElapsedRaw,Reason` -> {job id: JobWord}
    (pure). With -D a requeued job has one line per run, oldest first: the last is its state
    now, the others say how the earlier runs ended."""
    runs: Dict[str, List[List[str]]] = {}
    for line in text.splitlines():
        f = line.split("|")
        if len(f) < 6 or not f[0].strip():
            continue
        for jid in expand_job_ids(f[0]):
            runs.setdefault(jid, []).append(f)
    out: Dict[str, JobWord] = {}
    for jid, rows in runs.items():
        f = rows[-1]
        earlier = tuple(base_state(r[1]) for r in rows[:-1])
        node = f[3].strip()
        out[jid] = JobWord(jid, base_state(f[1]), "sacct", reason=_none(f[5]),
                           node="" if node == "None assigned" else node,
                           elapsed_s=int(f[4]) if f[4].strip().isdigit() else None, exit_code=f[2].strip(),
                           restarts=len(earlier), earlier=earlier, runs=tuple(base_state(r[1]) for r in rows))
    return out


def parse_scontrol_jobs(text: str) -> Dict[str, JobWord]:
    """`scontrol -o show job ID` (one line per job, 'Key=value' pairs) -> {job id: JobWord} (pure)."""
    out: Dict[str, JobWord] = {}
    for line in text.splitlines():
        kv = _key_values(line)
        if "JobId" not in kv:
            continue
        if kv.get("ArrayJobId") and kv.get("ArrayTaskId"):
            ids = [f"{kv['ArrayJobId']}_{k}" for k in expand_ranges(kv["ArrayTaskId"])]
        else:
            ids = [kv["JobId"]]
        restarts = int(kv["Restarts"]) if kv.get("Restarts", "").isdigit() else 0
        for jid in ids:
            out[jid] = JobWord(jid, base_state(kv.get("JobState", "")), "scontrol", reason=_none(kv.get("Reason", "")),
                               node=_none(kv.get("NodeList", "")), elapsed_s=parse_duration_s(kv.get("RunTime", "")),
                               exit_code=kv.get("ExitCode", ""), restarts=restarts)
    return out


def _key_values(line: str) -> Dict[str, str]:
    # values hold no spaces except a few free-text fields (Comment, Reason text) we do not read
    out = {}
    for tok in line.split():
        k, sep, v = tok.partition("=")
        if sep and k not in out:
            out[k] = v
    return out


def _none(v: str) -> str:
    v = v.strip()
    return "" if v in ("None", "(null)", "N/A") else v


@dataclass
class SlurmWord:
    """The answer for a run's jobs: each job's word, and what could not be asked."""
    jobs: Dict[str, JobWord] = field(default_factory=dict)
    sources: List[str] = field(default_factory=list)  # the commands that answered
    problems: List[str] = field(default_factory=list)  # "sacct: Slurm accounting storage is disabled"

    def get(self, job_id: Optional[str]) -> Optional[JobWord]:
        return self.jobs.get(str(job_id)) if job_id else None


def _run(cmd: List[str], timeout_s: float = TIMEOUT_S) -> Tuple[Optional[str], str]:
    """(stdout, "") or (None, why it did not answer)."""
    if not shutil.which(cmd[0]):
        return None, f"{cmd[0]} is not on PATH"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cmd[0]}: {type(e).__name__}"
    if p.returncode != 0:
        said = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()] or [f"exit {p.returncode}"]
        return None, f"{cmd[0]}: {said[-1][:200]}"
    return p.stdout, ""


def _arrays(job_ids: Iterable[str]) -> List[str]:
    """The arrays (or plain jobs) of these ids, in numeric order: '12_3' -> '12' (pure)."""
    return sorted({str(j).split("_")[0] for j in job_ids}, key=lambda s: (len(s), s))


def squeue_command(job_ids: Iterable[str], all_states: bool = False) -> List[str]:
    """The squeue command for these jobs (pure): one query by array, whose pending tasks are one
    record until they start and each task's own with -r; `all_states` adds the jobs that ended
    and that the controller still remembers (-t all)."""
    return (["squeue", "-h", "-r"] + (["-t", "all"] if all_states else [])
            + ["-o", SQUEUE_FORMAT, "-j", ",".join(_arrays(job_ids))])


def ask_squeue(job_ids: Iterable[str], all_states: bool = False,
               timeout_s: float = TIMEOUT_S) -> Tuple[Optional[Dict[str, JobWord]], str]:
    """({job id: JobWord} of every job squeue lists for these ids' arrays, "") or (None, why
    squeue did not answer). Jobs Slurm has forgotten (ended long ago) are absent; the caller
    keeps the ids it asked about."""
    out, why = _run(squeue_command(job_ids, all_states), timeout_s)
    if out is None:
        # squeue refuses an id that has left the queue with "Invalid job id" when it is the only one
        return ({}, "") if "Invalid job id" in why else (None, why)
    return parse_squeue(out), ""


def query_jobs(job_ids: Iterable[str], accounting: bool = True) -> SlurmWord:
    """Slurm's word on these jobs ("123_4", "125"): squeue for the queue, then sacct (or, where
    it does not answer, scontrol) for the rest. One command of each kind for all of them."""
    ids = sorted({str(j) for j in job_ids if j})
    word = SlurmWord()
    if not ids:
        return word
    if not shutil.which("squeue"):  # not on the cluster (a copied run directory): one line, not three
        word.problems.append("squeue is not on PATH (not a Slurm login node?)")
        return word
    queued, why = ask_squeue(ids)
    if queued is None:
        word.problems.append(why)
    else:
        word.sources.append("squeue")
        word.jobs.update({k: v for k, v in queued.items() if k in ids})
    rest = [j for j in ids if j not in word.jobs]
    # a pending job may be a requeued one: accounting tells how its earlier runs ended
    pending = [j for j in ids if j in word.jobs and word.jobs[j].state == "PENDING"]
    if not rest and not pending:
        return word
    if accounting:
        asked = sorted({j.split("_")[0] for j in rest + pending}, key=lambda s: (len(s), s))
        out, why = _run(["sacct", "-n", "-P", "-X", "-D", "-o", SACCT_FIELDS, "-j", ",".join(asked)])
        if out is None:
            word.problems.append(why)
        else:
            word.sources.append("sacct")
            found = parse_sacct(out)
            word.jobs.update({k: v for k, v in found.items() if k in rest})
            for j in pending:
                if j in found:
                    ended = tuple(st for st in found[j].runs if not state_alive(st))
                    word.jobs[j] = replace(word.jobs[j], earlier=ended, restarts=len(ended))
            rest = [j for j in rest if j not in word.jobs]
    if rest and ("sacct" not in word.sources or not accounting):
        # no accounting: the controller still knows jobs ended within MinJobAge
        seen = False
        for array in sorted({j.split("_")[0] for j in rest}, key=lambda s: (len(s), s)):
            out, why = _run(["scontrol", "-o", "show", "job", array])
            if out is None:
                if "Invalid job id" not in why and why not in word.problems:
                    word.problems.append(why)
                continue
            seen = True
            word.jobs.update({k: v for k, v in parse_scontrol_jobs(out).items() if k in rest})
        if seen:
            word.sources.append("scontrol")
    return word
