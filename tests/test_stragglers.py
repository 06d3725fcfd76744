"""No straggler holds the run (issue 28): array tasks take the shards nobody holds, more shards
than tasks under Slurm, a stalled task is named.

Units: the order a task looks at shards in, which are free, when a beating task is stalled, the
simulated engine's per-host factor. On the 3-node dev cluster (simulated engine, real Slurm,
real HDF5): tasks requeued at random moments while they take shards still give every shard
exactly once and features bit-equal to a local run's; a task whose engine hangs on one node
(held by a gate file the test creates at the end) reads "stalled" with its host and job."""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, run_cli, wait_until
from test_launchers import world  # noqa: F401  (the fixture: images, a net, a small scontrol)

SIM_NET = """
name: "sim"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: AVE global_pooling: true } }
"""


# ---- units ------------------------------------------------------------------------------

@pytest.mark.unit
def test_a_task_looks_at_its_own_shard_first_then_the_others_from_just_above_it():
    from runner.task.steal import free_shards, take_order

    # up from just above its own shard, cyclically (issue 37: not all on the lowest free one;
    # with the task count, tests/test_scale.py)
    assert take_order(2, 5) == [2, 3, 4, 0, 1]
    assert take_order(0, 1) == [0]
    done = {0, 3}
    held = {2: "caffe-runner shard task pid 7 on node1"}
    assert free_shards(take_order(2, 5), done.__contains__, held.get) == [4, 1]


@pytest.mark.unit
def test_a_slow_task_leaves_the_last_shards_to_faster_ones_that_free_up_sooner():
    from runner.task.steal import worth_taking

    fast = [(1.0, 10.0), (1.0, 10.0)]  # two others, free in 1 s, 10 images/s
    # one shard of 30 left: they would finish it at 4 s, this task (1/3 as fast) at 9 s
    assert not worth_taking(10 / 3, [30], fast)
    # many left: the others cannot take them all first
    assert worth_taking(10 / 3, [30] * 6, fast)
    assert worth_taking(10.0, [30], fast)  # as fast: it is free now
    assert worth_taking(0.0, [30], fast)  # no rate of its own yet: it takes
    assert worth_taking(10 / 3, [30], [])  # nobody else
    assert not worth_taking(10.0, [], fast)


@pytest.mark.unit
def test_a_beating_task_whose_count_does_not_move_is_stalled():
    from runner.run.status import stalled_for

    hb = dict(state="running", done=40, total=100, rate=20.0, batch_size=4, moved_t=1000.0)
    # a batch takes 0.2 s: 20 batch-times are 4 s, 3 heartbeats of 0.5 s are 1.5 s
    assert stalled_for(hb, 1003.9, 20, 0.5) is None
    assert stalled_for(hb, 1004.5, 20, 0.5) == pytest.approx(4.5)
    # a short batch time never makes a task stalled between two of its beats
    assert stalled_for(dict(hb, rate=4000.0), 1001.0, 20, 0.5) is None
    # no batch done yet in this attempt: its batch time is unknown, never stalled (issue 37)
    assert stalled_for(dict(hb, rate=0.0), 1001.6, 20, 0.5) is None
    assert stalled_for(dict(hb, state="done"), 2000.0, 20, 0.5) is None
    assert stalled_for(dict(hb, done=100), 2000.0, 20, 0.5) is None
    assert stalled_for({k: v for k, v in hb.items() if k != "moved_t"}, 2000.0, 20, 0.5) is None


@pytest.mark.unit
def test_the_simulated_engine_reads_its_hosts_factor():
    from runner.engine.simulated import host_value

    assert host_value("node2:3", "node2") == "3"
    assert host_value("node1:1.5, node2:3", "node2") == "3"
    assert host_value("node2:3", "node1") is None
    assert host_value("", "node1") is None
    assert host_value("node3:/tmp/gate", "node3") == "/tmp/gate"


@pytest.mark.unit
def test_slurm_asks_for_num_shards_tasks_and_shards_per_task_shards_each():
    from runner.run.config import compose
    from runner.launch.slurm import SlurmLauncher

    cfg = compose(["input.dir=/data/x", "output.dir=/scratch/r", "launcher=slurm", "num_shards=16"])
    assert cfg.launcher.shards_per_task == 8 and cfg.launcher.take_free_shards is True
    assert SlurmLauncher().default_shards(cfg) == 128
    cfg.launcher.shards_per_task = 1
    assert SlurmLauncher().default_shards(cfg) == 16


@pytest.mark.unit
def test_num_shards_tasks_are_submitted_and_take_every_shard_of_the_run(world):
    """The Slurm launcher's hand-out with a submitit that runs each array task's body in place:
    3 tasks (num_shards=3) for a run of 7 shards (4 per task, at most one per image)."""
    from test_launchers import N_IMAGES, FakeSlurmExecutor, _cfg

    from runner.launch.slurm import SlurmLauncher
    from runner.launch import launch
    from runner.task.extract import run_shard
    from runner.task.steal import take_shards

    class Tasks(FakeSlurmExecutor):
        def map_array(self, task, cfgs, indices, *more):
            FakeSlurmExecutor.jobs += 1
            out = []
            for k, (cfg, i) in enumerate(zip(cfgs, indices)):
                self.ran.append(take_shards(cfg, i, run_shard, threads=1))
                out.append(self._job(f"{FakeSlurmExecutor.jobs}_{k}"))
            return out

    cfg = _cfg("slurm", world)
    cfg.launcher.shards_per_task, cfg.launcher.take_free_shards = 4, True
    ran = []
    launch(cfg, launcher=SlurmLauncher(executor=lambda **kw: Tasks(ran, **kw)))
    assert [r["shard"] for r in ran] == [0, 1, 2]  # 3 tasks, each started on its own shard
    # run one after another here, the first task took every shard (the others' own shards were
    # free, not held); the later ones found them all done and ran nothing (no model loaded)
    # (in its order, steal.take_order: the shards above the tasks' own first, their own last)
    assert sorted(ran[0]["taken"]) == [1, 2, 3, 4, 5, 6] and ran[0]["taken"][-2:] == [1, 2]
    assert ran[1]["shards"] == [] and ran[2]["shards"] == []
    with h5py.File(world[2] / "features.h5", "r") as f:
        assert len(f["names"]) + len(f["failures/index"]) == N_IMAGES


# ---- on the dev cluster -----------------------------------------------------------------

COMMON = ["device=cpu", "backend=simulated", "batch_size=4", "decode.workers=1", "heartbeat_s=0.5", "model.name=sim",
          "model.default_blobs=[pool]"]
SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.timeout_min=10",
         "launcher.gpus_per_task=0"]


def _inputs(tmp_path: Path, n: int) -> list:
    from runner.ui.samples import write_corpus

    pics = write_corpus(tmp_path / "pics", n, seed=3, min_wh=(40, 40), max_wh=(64, 64))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(sorted(map(str, pics))) + "\n")
    proto = tmp_path / "sim.prototxt"
    proto.write_text(SIM_NET)
    # the preset's preprocessing (a net of your own must name its own: model.preprocess.*)
    return [f"input.list={lst}", "model=res10_ssd", f"model.prototxt={proto}", f"model.weights={proto}"]


def _status(run: Path) -> dict:
    p = run_cli("status", "--json", run, check=False)
    assert p.returncode in (0, 1, 3), p.stderr
    return json.loads(p.stdout)


def _events(run: Path) -> dict:
    out = {}
    for f in sorted((run / "events").glob("shard-*.jsonl")):
        out[f.stem] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return out


def _running_jobs(run: Path) -> list:
    """The array tasks Slurm has running for this run now."""
    ids = {t["job_id"].split("_")[0] for s in json.loads((run / "submissions.json").read_text()) for t in s["tasks"]}
    p = subprocess.run(["squeue", "-h", "-r", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True)
    return [j for j in p.stdout.split() if j.split("_")[0] in ids]


@pytest.mark.slurm
@pytest.mark.slow
def test_tasks_requeued_while_taking_shards_give_every_shard_exactly_once(cluster, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = _inputs(tmp_path, 240) + COMMON
    # 3 tasks x 4 shards of 20 images; node2 3x slower, so the others take its shards
    env = {"CAFFE_RUNNER_SIM_SLOW_HOSTS": "node2:3"}
    waiter = subprocess.Popen(CLI + [*common, *SLURM, f"output.dir={run}", "num_shards=3", "simulated_batch_s=0.3",
                                     "launcher.shards_per_task=4", "launcher.wait=true"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, **env})
    rng = random.Random(28)
    requeued = []
    try:
        wait_until(lambda: waiter.poll() is not None or any((run / "events").glob("shard-*.jsonl")), timeout=180,
                   what="the first shard started")
        # requeue a running task at random moments while shards are being extracted and taken
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.5))  # a random moment (what is killed is chosen, not waited for)
            jobs = _running_jobs(run)
            if not jobs or waiter.poll() is not None:
                break
            job = rng.choice(jobs)
            subprocess.run(["scontrol", "requeue", job], capture_output=True)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            requeued.append(job)
        out, err = waiter.communicate(timeout=600)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, (out[-3000:], err[-3000:])
    assert requeued, "no task was running to requeue"
    st = _status(run)
    assert st["counts"] == {"done": 12}, st["counts"]
    # no shard written by two tasks at once: its attempts follow one another, one finish each
    evs = _events(run)
    assert len(evs) == 12
    taken = 0
    for name, es in evs.items():
        starts = [e for e in es if e["event"] in ("started", "resumed")]
        assert sum(1 for e in es if e["event"] == "finished") == 1, (name, es)
        taken += sum(1 for e in starts if "own_shard" in e)
        for a, b in zip(starts, starts[1:]):
            # nothing from the process of an attempt after the next attempt began; where locks are
            # private to each node (--node-local-locks) two attempts can overlap, and then the one
            # that did not commit ends "lost" (its own file discarded: tests/test_sharedfs_slurm.py)
            late = [e for e in es if (e.get("host"), e.get("pid")) == (a.get("host"), a.get("pid")) and e["t"] > b["t"]]
            if os.environ.get("CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS") == "1" and late:
                assert late[-1]["event"] == "lost", (name, es)
            else:
                assert not late, (name, es)
    assert taken >= 1, "no task took a shard it was not started for"
    # the shard files name their writer (host, pid, job id)
    for f in sorted((run / "shards").glob("*.h5")):
        with h5py.File(f, "r") as h:
            assert h.attrs["host"] and int(h.attrs["pid"]) > 0 and str(h.attrs["job_id"]), f
    assert run_cli("verify", run).returncode == 0
    # features equal a local run's: the same engine and one thread each, so bit-equal
    run_cli(*common, f"output.dir={ref}", "launcher=local", "launcher.workers=2", "num_shards=12",
            "launcher.threads_per_worker=1", "simulated_batch_s=0.01")
    with h5py.File(run / "features.h5", "r") as a, h5py.File(ref / "features.h5", "r") as b:
        assert list(a["names"].asstr()[:]) == list(b["names"].asstr()[:])
        assert np.array_equal(a["feats"][:], b["feats"][:])
    # the report shows the shards taken
    run_cli("report", run)
    assert "taken by the task of shard" in (run / "report.html").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_hung_on_one_node_reads_stalled_with_its_host_and_job(cluster, tmp_path):
    import os

    run = tmp_path / "run"
    gate = tmp_path / "gate"  # node2's engine: batch k starts once this holds a number > k, or "open"
    gate.write_text("1")  # its first batch, then it hangs
    args = _inputs(tmp_path, 96) + COMMON + SLURM
    env = dict(os.environ, CAFFE_RUNNER_SIM_HANG_HOSTS=f"node2:{gate}")
    p = subprocess.run(CLI + [*args, f"output.dir={run}", "num_shards=3", "launcher.shards_per_task=2",
                              "simulated_batch_s=0.05", "stall_batches=10"], cwd=REPO, capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    if os.environ.get("CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS") == "1":
        # locks private to each node (--node-local-locks): nothing keeps the other nodes' tasks off
        # the hung task's shard, so one of them takes it over and commits it (a backup task, as
        # in MapReduce); its beats are the shard's, so it never reads stalled. Every shard is done
        # while node2 still hangs, none by node2, and the hung attempt ends "lost" once it goes on
        try:
            wait_until(lambda: _status(run)["counts"].get("done") == 6, timeout=240, interval=0.5,
                       what="every shard done while node2 hangs")
            for f in sorted((run / "shards").glob("*.h5")):
                with h5py.File(f, "r") as h:
                    assert not str(h.attrs["attempt"]).startswith("node2."), (f, dict(h.attrs))
        finally:
            gate.write_text("open")
        wait_until(lambda: (run / "features.h5").exists(), timeout=240, interval=0.5, what="the merge after the gate")
        assert any(e["event"] == "lost" and e["host"] == "node2" for es in _events(run).values() for e in es)
        assert run_cli("verify", "--content", run).returncode == 0
        return
    try:
        t0 = time.time()

        def stalled():
            st = _status(run)
            return [s for s in st["shards"] if s["state"] == "stalled"]

        wait_until(lambda: stalled(), timeout=120, interval=0.5, what="a shard read as stalled")
        named = time.time() - t0
        s = stalled()[0]
        assert s["host"] == "node2" and s["job_id"], s
        text = run_cli("status", run, check=False).stdout
        assert "stalled" in text and "node2" in text and f"job {s['job_id']}" in text, text
        # the others are not stalled: they finish and take the shards the hung task does not hold
        wait_until(lambda: sum(1 for x in _status(run)["shards"] if x["state"] == "done") >= 5, timeout=180,
                   interval=0.5, what="every other shard done")
        run_cli("report", run)
        assert "stalled" in (run / "report.html").read_text()
    finally:
        gate.write_text("open")
    wait_until(lambda: (run / "features.h5").exists(), timeout=240, interval=0.5, what="the merge after the gate")
    assert named < 120
    assert run_cli("verify", run).returncode == 0


@pytest.mark.slurm
@pytest.mark.slow
def test_a_run_planned_before_shards_per_task_resumes_with_its_own_shards(cluster, tmp_path):
    """A run planned with one shard per task (the design before launcher.shards_per_task), one of
    its shards lost, then the same command with today's defaults: it resumes as planned (no
    "different config"), one task for the one missing shard, features as before."""
    from runner.run.plan import load_run_dir

    run = tmp_path / "run"
    args = _inputs(tmp_path, 24) + COMMON + SLURM + [f"output.dir={run}", "num_shards=2", "launcher.wait=true",
                                                     "simulated_batch_s=0.01"]
    run_cli(*args, "launcher.shards_per_task=1", "launcher.take_free_shards=false")
    before = load_run_dir(run)
    assert before.num_shards == 2
    with h5py.File(run / "features.h5", "r") as f:
        names, feats = list(f["names"].asstr()[:]), f["feats"][:]
    import os

    os.unlink(before.shard_path(1))
    (run / "features.h5").unlink()
    p = run_cli(*args)
    assert "1 task(s) to submit" in p.stdout, p.stdout
    after = load_run_dir(run)
    assert after.num_shards == 2 and after.done_shards() == [0, 1]
    with h5py.File(run / "features.h5", "r") as f:
        assert list(f["names"].asstr()[:]) == names
        assert np.array_equal(f["feats"][:], feats)
    assert run_cli("verify", run).returncode == 0
