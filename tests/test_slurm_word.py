"""Slurm's word on the real dev cluster: tasks killed without a word (scancel -s KILL, over their
memory), requeued (scontrol requeue, submitit's own requeue on SIGUSR2), and slurmdbd stopped.
`status`, `launcher.wait=true` and the report name what happened; a requeue never reads
"failed"; the wait ends once nothing is alive; a rerun completes.

Tasks are held mid-shard by gates the test opens: before reading an image of the list the task
waits at a test gate named after it (runner/faults.py: CAFFE_RUNNER_TEST_GATES, which the Slurm
tasks inherit) until the test removes its .hold file; every later reader (a requeued task, a
rerun) then reads it at once. No sleeps. (Named pipes held the tasks before: the decoder now
refuses anything but a regular file.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, DEV, MAX_ARRAY, REPO, run_cli, tiny_model_args, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# the gates' folder, set for every process of this module's tests (the CLI and its Slurm tasks)
GATES = Path(tempfile.mkdtemp(prefix="cr-gates-", dir="/tmp"))


@pytest.fixture(autouse=True)
def _gates_env(monkeypatch):
    monkeypatch.setenv("CAFFE_RUNNER_TEST_GATES", str(GATES))

SLURM = ["launcher=slurm", "launcher.shards_per_task=1", "launcher.take_free_shards=false", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10", "device=cpu",
         "launcher.gpus_per_task=1", "launcher.allow_cpu_on_gpu=true", "heartbeat_s=0.5", "batch_size=2",
         "decode.workers=1"]


class Gate:
    """A list entry that holds the task reading it until open() (see the module's docstring)."""

    def __init__(self, path: Path, photo: Path):
        shutil.copyfile(photo, path)
        GATES.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.hold = GATES / f"read-{path.name}.hold"  # runner/faults.py: the decoder waits before reading it
        self.hold.touch()

    def open(self) -> None:
        self.hold.unlink(missing_ok=True)


def _gated_list(tmp_path: Path, photos: Path, n_shards: int, gated) -> tuple:
    """A list of the photos, 5 per shard, in which the last entry of each gated shard is a Gate."""
    files = sorted(p for p in photos.rglob("*") if p.is_file())[:5 * n_shards]
    assert len(files) == 5 * n_shards
    gates = {}
    lines = []
    for k, f in enumerate(files):
        shard = k // 5
        if shard in gated and k % 5 == 4:
            gates[shard] = Gate(tmp_path / f"gate{shard}{f.suffix}", f)
            lines.append(str(gates[shard].path))
        else:
            lines.append(str(f))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst, gates


def _beat(run: Path, shard: int, n: int) -> dict:
    try:
        return json.loads((run / "status" / f"shard-{shard:05d}-of-{n:05d}.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _jobs(run: Path) -> dict:
    return {t["shard"]: t["job_id"] for s in json.loads((run / "submissions.json").read_text()) for t in s["tasks"]}


def _status(run: Path, *extra) -> dict:
    p = run_cli("status", "--json", run, *extra, check=False)
    assert p.returncode in (0, 1, 3), p.stderr
    return json.loads(p.stdout)


def _by_shard(st: dict) -> dict:
    return {s["shard"]: s for s in st["shards"]}


def _release(job: str) -> None:
    """A requeued task waits ~2 min before it may start again: now."""
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def _h5(path: Path):
    with h5py.File(path, "r") as f:
        return f["feats"][:], list(f["names"].asstr()[:])


def test_kill_requeue_and_submitit_requeue_are_named_and_wait_ends(cluster, tiny_net, photos, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    lst, gates = _gated_list(tmp_path, photos, 4, gated=(0, 1, 2))
    args = [f"input.list={lst}", "num_shards=4", *tiny_model_args(tiny_net)]
    # launcher.wait=true in the background: it must end by itself once nothing is alive
    waiter = subprocess.Popen(CLI + [*args, f"output.dir={run}", *SLURM, "launcher.wait=true"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # each gated task has written its first two batches and waits at its gate
        wait_until(lambda: waiter.poll() is not None or all(_beat(run, i, 4).get("done") == 4 for i in (0, 1, 2)),
                   timeout=240, interval=0.2, what="three tasks held at their gates")
        assert waiter.poll() is None, waiter.communicate()
        jobs = _jobs(run)
        subprocess.run(["scancel", "-s", "KILL", jobs[0]], check=True)      # killed without a word
        subprocess.run(["scontrol", "requeue", jobs[1]], check=True)        # Slurm's requeue (TERM, KILL)
        subprocess.run(["scancel", "-s", "USR2", jobs[2]], check=True)      # submitit's requeue (sys.exit(-1))
        seen = {1: set(), 2: set()}

        def named():
            st = _by_shard(_status(run))
            for i in seen:
                seen[i].add(st[i]["state"])
            return (st[0]["state"] == "failed" and st[0].get("cause") == "CANCELLED"
                    and st[1]["state"] == "requeued" and st[2]["state"] == "requeued")

        wait_until(named, timeout=120, interval=0.3, what="status naming the kill and both requeues")
        assert "failed" not in seen[1] and "failed" not in seen[2], seen
        p = run_cli("status", run, check=False)
        assert p.returncode == 1, p.stdout
        line0 = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("0 "))
        assert "killed by Slurm: CANCELLED (scancel)" in line0 and "4 of 5 images are kept" in line0, p.stdout
        assert "requeued by Slurm" in p.stdout, p.stdout
        # submitit's requeue left the task's own word: a "requeued" beat and event, no failure
        assert _beat(run, 2, 4)["state"] == "requeued"
        events = [json.loads(x)["event"] for x in (run / "events" / "shard-00002-of-00004.jsonl").read_text().splitlines()]
        assert "requeued" in events and "failed" not in events, events
        # the report: the killed attempt is named, the requeues are not failures
        run_cli("report", run, "-o", tmp_path / "during.html")
        html = (tmp_path / "during.html").read_text()
        assert "killed by Slurm: CANCELLED" in html and "task attempts" in html
        for g in gates.values():
            g.open()
        for i in (1, 2):
            _release(jobs[i])
        # the wait ends by itself: shard 0 is dead and named, the others completed
        out, err = waiter.communicate(timeout=300)
        assert waiter.returncode == 1, (out, err)
        assert "shard 0" in err and "CANCELLED" in err and "shard 1" not in err and "shard 2" not in err, err
    finally:
        if waiter.poll() is None:
            waiter.kill()
        for g in gates.values():
            g.open()
    st = _by_shard(_status(run))
    assert [st[i]["state"] for i in range(4)] == ["failed", "done", "done", "done"]
    # the rerun submits only shard 0 and completes; features equal a local run's
    p = run_cli(*args, f"output.dir={run}", *SLURM, "launcher.wait=true")
    assert "1 task(s) to submit" in p.stdout, p.stdout
    run_cli(*args, f"output.dir={ref}", "launcher.workers=2")
    a, b = _h5(run / "features.h5"), _h5(ref / "features.h5")
    assert a[1] == b[1] and len(a[1]) == 20
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert run_cli("verify", run).returncode == 0
    final = run_cli("report", run)
    assert final.returncode == 0


def test_a_task_over_its_memory_reads_out_of_memory(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    lst, gates = _gated_list(tmp_path, photos, 1, gated=(0,))
    args = [f"input.list={lst}", "num_shards=1", f"output.dir={run}", *tiny_model_args(tiny_net)]
    try:
        # 100 MB: the task's Python with Caffe holds more once imported (about 160 MB); the gate
        # keeps it from finishing before Slurm's memory sampling sees it
        small = [a for a in SLURM if not a.startswith("launcher.mem_gb")] + ["launcher.mem_gb=0.1"]
        p = run_cli(*args, *small, "launcher.wait=true", check=False, timeout=300)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert "OUT_OF_MEMORY" in p.stderr and "raise launcher.mem_gb (now 0.1)" in p.stderr, p.stderr
        st = _by_shard(_status(run))[0]
        assert st["state"] == "failed" and st["cause"] == "OUT_OF_MEMORY", st
        assert "killed by Slurm: OUT_OF_MEMORY" in run_cli("status", run, check=False).stdout
        from runner.api import Run
        from runner.errors import ShardFailedError

        with pytest.raises(ShardFailedError, match=r"shard 0: killed by Slurm: OUT_OF_MEMORY"):
            Run(run).wait(timeout_s=120)
    finally:
        for g in gates.values():
            g.open()
    run_cli(*args, *SLURM, "launcher.wait=true")  # 1 GB
    assert (run / "features.h5").exists() and run_cli("verify", run).returncode == 0


def test_without_slurmdbd_status_asks_squeue_and_scontrol(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    lst, gates = _gated_list(tmp_path, photos, 3, gated=(0, 1, 2))
    args = [f"input.list={lst}", "num_shards=3", f"output.dir={run}", *tiny_model_args(tiny_net), *SLURM]
    state = Path(cluster)
    env = dict(os.environ, DEV_CLUSTER_MAX_ARRAY_SIZE=str(MAX_ARRAY))
    dbd = state / "run" / "slurmdbd.pid"
    try:
        run_cli(*args, "launcher.array_parallelism=2")
        wait_until(lambda: all(_beat(run, i, 3).get("done") == 4 for i in (0, 1)), timeout=240, interval=0.2,
                   what="two tasks held at their gates")
        jobs = _jobs(run)
        os.kill(int(dbd.read_text()), 15)  # slurmdbd down: sacct cannot answer
        wait_until(lambda: subprocess.run(["sacct", "-n", "-X", "-j", jobs[0].split("_")[0]], capture_output=True)
                   .returncode != 0, timeout=60, what="sacct failing")
        subprocess.run(["scancel", "-s", "KILL", jobs[1]], check=True)

        def told():
            st = _status(run)
            s = _by_shard(st)
            # shard 0's task waits at its gate while it beats: "stalled" once that lasts (issue 28)
            return (s[0]["state"] in ("running", "stalled") and s[1]["state"] == "failed" and s[1].get("cause") == "CANCELLED"
                    and s[2]["state"] in ("pending", "running") and st.get("slurm_word", {}).get("problems"))

        try:
            wait_until(told, timeout=60, interval=0.3, what="status from squeue/scontrol")
        except AssertionError as e:  # what status said last, to tell which condition did not come
            raise AssertionError(f"{e}: {json.dumps(_status(run), default=str)[-4000:]}") from None
        s = _by_shard(_status(run))
        assert s[1]["slurm"]["source"] == "scontrol", s[1]
        text = run_cli("status", run, check=False).stdout
        assert "sacct:" in text and "scontrol" in text and "killed by Slurm: CANCELLED" in text, text
    finally:
        # slurmdbd back (it daemonizes, reading slurmdbd.conf beside SLURM_CONF; `dev-cluster up`
        # on a running cluster restarts only its nodes), and sacct answering, for the tests after
        subprocess.run(["slurmdbd"], env=env, capture_output=True, timeout=60)
        wait_until(lambda: subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0, timeout=120,
                   interval=0.5, what="sacct answering again")
        for g in gates.values():
            g.open()
    run_cli(*args, "launcher.wait=true")
    assert run_cli("verify", run).returncode == 0


def test_a_node_lost_mid_shard_is_requeued_and_the_run_completes_on_the_others(cluster, tiny_net, photos, tmp_path):
    from conftest import NODES

    run, ref = tmp_path / "run", tmp_path / "ref"
    lst, gates = _gated_list(tmp_path, photos, 3, gated=(0, 1, 2))
    args = [f"input.list={lst}", "num_shards=3", *tiny_model_args(tiny_net)]
    state = Path(cluster)
    env = dict(os.environ, DEV_CLUSTER_MAX_ARRAY_SIZE=str(MAX_ARRAY))
    lost = None
    try:
        run_cli(*args, f"output.dir={run}", *SLURM)
        wait_until(lambda: all(_beat(run, i, 3).get("done") == 4 for i in range(3)), timeout=240, interval=0.2,
                   what="three tasks held at their gates")
        hosts = {i: _beat(run, i, 3)["host"] for i in range(3)}
        lost = hosts[0]
        on_lost = [i for i, h in hosts.items() if h == lost]
        jobs = _jobs(run)
        k = subprocess.run(["bash", str(DEV), "kill-node", lost, "--state-dir", str(state)], env=env,
                           capture_output=True, text=True, timeout=60)
        assert k.returncode == 0, k.stderr
        subprocess.run(["scontrol", "update", f"nodename={lost}", "state=down", "reason=lost-in-test"], check=True)
        seen = {i: set() for i in on_lost}

        def requeued():
            st = _by_shard(_status(run))
            for i in on_lost:
                seen[i].add(st[i]["state"])
            return all(st[i]["state"] == "requeued" and "NODE_FAIL" in st[i].get("note", "") for i in on_lost)

        try:
            wait_until(requeued, timeout=120, interval=0.3, what="status naming the node loss")
        except AssertionError as e:
            raise AssertionError(f"{e}: {run_cli('status', run, check=False).stdout}") from None
        assert all("failed" not in s for s in seen.values()), seen
        text = run_cli("status", run, check=False).stdout
        assert "requeued by Slurm after NODE_FAIL" in text, text
        for g in gates.values():
            g.open()
        for i in on_lost:
            _release(jobs[i])
        try:
            wait_until(lambda: (run / "features.h5").exists(), timeout=300, interval=0.5, what="the run merged")
        except AssertionError as e:
            raise AssertionError(f"{e}: {run_cli('status', run, check=False).stdout}\n"
                                 f"{run_cli('report', run, check=False).stdout[-3000:]}") from None
    finally:
        for g in gates.values():
            g.open()
        if lost:  # the node back, for the tests after this one
            subprocess.run(["bash", str(DEV), "up", "--nodes", str(NODES), "--state-dir", str(state)], env=env,
                           capture_output=True, timeout=180)
    st = _status(run)
    assert st["state"] == "merged", st
    redone = {s["shard"]: s["host"] for s in st["shards"]}
    for i in on_lost:  # its shard finished elsewhere: the lost node is down
        assert redone[i] != lost, (redone, lost)
    run_cli(*args, f"output.dir={ref}", "launcher.workers=2")
    a, b = _h5(run / "features.h5"), _h5(ref / "features.h5")
    assert a[1] == b[1] and len(a[1]) == 15
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert run_cli("verify", run).returncode == 0
