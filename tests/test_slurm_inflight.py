"""One submission per shard and one merge job per run, on the real 3-node dev cluster: the
same command again while the run's tasks are queued, output.overwrite=true while they are,
and a task queued for a plan that has since been replaced. The tasks are held PENDING by the
partition set DOWN (a gate the test opens), never by timing."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, tiny_model_args, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10",
         "device=cpu", "launcher.gpus_per_task=0"]


@pytest.fixture
def gate(cluster):
    """The partition DOWN: submitted jobs stay PENDING until the test calls gate() (UP again)."""
    def partition(state):
        subprocess.run(["scontrol", "update", "partitionname=debug", f"state={state}"], check=True)

    partition("DOWN")
    try:
        yield lambda: partition("UP")
    finally:
        partition("UP")


def _subs(run: Path):
    return json.loads((run / "submissions.json").read_text())


def _squeue(first_id: int):
    """{job id: state} of the jobs squeue has from `first_id` on (this test's)."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%j"], capture_output=True, text=True,
                         check=True).stdout
    jobs = {}
    for line in out.splitlines():
        jid, state, name = line.split("|")
        if int(jid.split("_")[0]) >= first_id:
            jobs[jid] = (state, name)
    return jobs


def _sacct(first_id: int):
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,JobName"], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1], r[2]) for r in rows if r[0].split("_")[0].isdigit() and int(r[0].split("_")[0]) >= first_id}


def _alive(first_id: int):
    return {j: s for j, s in _squeue(first_id).items() if s[0] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")}


def test_same_command_while_pending_submits_nothing_twice_and_one_merge(gate, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=3", *SLURM, *tiny_model_args(tiny_net)]
    first = run_cli(*args)
    assert "3 task(s) to submit" in first.stdout
    first_id = int(_subs(run)[0]["array_job_id"])
    merge = _subs(run)[0]["merge_job_id"]
    assert len(_squeue(first_id)) == 4  # 3 tasks + the merge job, all pending behind the gate

    again = run_cli(*args)
    assert "0 task(s) to submit" in again.stdout and "submitted array" not in again.stdout, again.stdout
    assert "submitted merge" not in again.stdout
    assert "already in flight" in again.stdout and f"job {first_id}_0 PENDING" in again.stdout
    assert f"merge job {merge} PENDING" in again.stdout
    assert len(_subs(run)) == 1 and len(_squeue(first_id)) == 4

    # one task cancelled: the next command submits that shard alone, and the one merge job
    # (still pending) now waits for the new array too
    subprocess.run(["scancel", f"{first_id}_1"], check=True)
    wait_until(lambda: f"{first_id}_1" not in _alive(first_id), timeout=60, what="the cancellation")
    third = run_cli(*args)
    assert "1 task(s) to submit" in third.stdout and "now waits for" in third.stdout, third.stdout
    subs = _subs(run)
    assert [t["shard"] for t in subs[-1]["tasks"]] == [1] and subs[-1]["merge_job_id"] == merge
    merges = [j for j, (_, name) in _squeue(first_id).items() if name.endswith("-merge")]
    assert merges == [merge]

    gate()
    wait_until(lambda: (run / "features.h5").exists() and not _alive(first_id), timeout=300, what="the merged run")
    assert run_cli("verify", run).returncode == 0
    wait_until(lambda: merge in _sacct(first_id), timeout=60, what="sacct")
    acct = _sacct(first_id)
    ran_merges = {j: s for j, (s, name) in acct.items() if name.endswith("-merge")}
    assert ran_merges == {merge: "COMPLETED"}, acct
    assert not [j for j, (s, _) in acct.items() if s == "FAILED"], acct


def test_overwrite_refused_while_old_jobs_live_then_removes_all(gate, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, *tiny_model_args(tiny_net)]
    run_cli(*args)
    first_id = int(_subs(run)[0]["array_job_id"])
    # what an old run leaves besides its shards: a retry's records
    (run / "retries.json").write_text("[]")
    (run / "retry").mkdir()
    (run / "retry" / "x").write_text("old")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "launch.lock"}

    p = run_cli(*args, "output.pooling=max", "output.overwrite=true", check=False)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "still has Slurm jobs" in line and f"{first_id}_0" in line and f"scancel {first_id}" in line, p.stderr
    assert "Traceback" not in p.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "launch.lock"}
    assert after.keys() >= before.keys() and all(after[k] == before[k] for k in before if k.suffix != ".log")

    subprocess.run(["scancel", str(first_id), str(_subs(run)[0]["merge_job_id"])], check=True)
    wait_until(lambda: not _alive(first_id), timeout=60, what="the cancellation")
    old_fp = json.loads((run / "run.json").read_text())["fingerprint"]
    run_cli(*args, "output.pooling=max", "output.overwrite=true")
    assert json.loads((run / "run.json").read_text())["fingerprint"] != old_fp
    # nothing of the old run is left: its submissions, retries, the commands that made it
    assert not (run / "retries.json").exists() and not (run / "retry").exists()
    assert [int(s["array_job_id"]) for s in _subs(run)] == [int(_subs(run)[0]["array_job_id"])] and \
        int(_subs(run)[0]["array_job_id"]) > first_id
    commands = (run / "logs" / "commands.jsonl").read_text().splitlines()
    assert len(commands) == 1 and "output.overwrite=true" in commands[0]
    gate()
    wait_until(lambda: (run / "features.h5").exists(), timeout=300, what="the new run merged")
    assert run_cli("verify", run).returncode == 0


def test_task_queued_for_a_replaced_plan_writes_nothing(gate, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, *tiny_model_args(tiny_net)]
    run_cli(*args)
    first_id = int(_subs(run)[0]["array_job_id"])
    # the plan replaced under the queued tasks (as an overwrite that could not see them would)
    plan = json.loads((run / "run.json").read_text())
    plan["fingerprint"] = "f" * 64
    (run / "run.json").write_text(json.dumps(plan))
    gate()
    wait_until(lambda: not _alive(first_id), timeout=300, what="the stale tasks to end")
    written = [p.name for d in ("shards", "status", "events") if (run / d).exists() for p in (run / d).iterdir()]
    assert written == [] and not (run / "features.h5").exists(), written
    # each of them said why: the 2 tasks and the merge job
    jobs = [f"{first_id}_0", f"{first_id}_1", str(_subs(run)[0]["merge_job_id"])]
    for jid in jobs:
        err = "".join(p.read_text(errors="replace") for p in (run / "logs" / jid).glob("*.err"))
        assert "writes nothing" in err, (jid, err[-2000:])
