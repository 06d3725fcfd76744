"""Right on any shared file system (issue 37), on the 3-node dev cluster with node-local flock:
CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS=1 makes each node's locks private (Lustre localflock, NFS
local_lock=flock), so tasks on two nodes both take one shard. Every shard must still be written
once, and every run equal a local run (simulated engine, real Slurm, real HDF5).

The moment two nodes hold one shard is made by the test's gates (runner/faults.py), not by
timing: each task reaching the gate names its node, and the test opens it once both are there."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, run_cli, wait_until
from test_stragglers import COMMON, _events, _inputs, _status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODE_LOCAL_VAR = "CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS"
NODE_LOCAL = {NODE_LOCAL_VAR: "1"}
# 4 CPUs a task: one task per node (each dev-cluster node has 4), so two tasks never share a node
SLURM = ["launcher=slurm", "launcher.mem_gb=0.5", "launcher.timeout_min=10", "launcher.gpus_per_task=0"]


def _same_as_local(run: Path, common, ref: Path, num_shards: int) -> None:
    run_cli(*common, f"output.dir={ref}", "launcher=local", "launcher.workers=2", f"num_shards={num_shards}",
            "launcher.threads_per_worker=1", "simulated_batch_s=0.0")
    with h5py.File(run / "features.h5", "r") as a, h5py.File(ref / "features.h5", "r") as b:
        assert list(a["names"].asstr()[:]) == list(b["names"].asstr()[:])
        assert np.array_equal(a["feats"][:], b["feats"][:])
        assert np.array_equal(a["failures/index"][:], b["failures/index"][:])


def _one_file_per_shard(run: Path, n: int) -> None:
    names = sorted(p.name for p in (run / "shards").iterdir() if not p.name.startswith("."))
    assert [x for x in names if x.endswith(".h5")] == [f"shard-{i:05d}-of-{n:05d}.h5" for i in range(n)], names
    assert not [x for x in names if ".partial" in x], names  # every attempt's leftover was discarded


def test_two_nodes_take_one_shard_at_once_and_one_correct_file_stands(cluster, tmp_path):
    """2 tasks, 2 shards. Task 0 is held before its first batch of shard 0; task 1 (another node)
    ends shard 1, finds shard 0 free (its node sees no lock) and takes it, and is held at the same
    gate. Both go on: one file stands, the other attempt is named as lost in the events."""
    run, ref, gates = tmp_path / "run", tmp_path / "ref", tmp_path / "gates"
    gates.mkdir()
    (gates / "first-batch-0.hold").touch()
    common = _inputs(tmp_path, 24) + COMMON
    env = dict(os.environ, **NODE_LOCAL, CAFFE_RUNNER_TEST_GATES=str(gates))
    waiter = subprocess.Popen(CLI + [*common, *SLURM, "launcher.cpus_per_task=4", f"output.dir={run}", "num_shards=2",
                                     "launcher.shards_per_task=1", "simulated_batch_s=0.01", "launcher.wait=true"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def hosts_at_gate():
            return sorted(p.name.rsplit(".", 1)[1] for p in gates.glob("first-batch-0.reached.*"))

        wait_until(lambda: len(hosts_at_gate()) == 2 or waiter.poll() is not None, timeout=300,
                   what="tasks on two nodes both at shard 0's first batch")
        assert waiter.poll() is None, waiter.communicate()
        at_gate = hosts_at_gate()
        assert at_gate[0] != at_gate[1], at_gate
        starts = [e for e in _events(run)["shard-00000-of-00002"] if e["event"] in ("started", "resumed")]
        assert len(starts) == 2 and starts[0]["host"] != starts[1]["host"], starts
        (gates / "first-batch-0.hold").unlink()
        out, err = waiter.communicate(timeout=600)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, (out[-3000:], err[-3000:])
    _one_file_per_shard(run, 2)
    with h5py.File(run / "shards" / "shard-00000-of-00002.h5", "r") as f:
        winner = str(f.attrs["attempt"])
    evs = _events(run)["shard-00000-of-00002"]
    lost = [e for e in evs if e["event"] == "lost"]
    assert len(lost) == 1, evs
    # the loser names the attempt that wrote the file, and is not it
    assert f"attempt {winner}" in lost[0]["other"] and lost[0]["attempt"] != winner, (lost, winner)
    assert lost[0]["host"] != winner.split(".")[0] and lost[0]["host"] in at_gate, (lost, winner)
    assert sum(1 for e in evs if e["event"] == "finished") == 1, evs
    assert run_cli("verify", "--content", run).returncode == 0
    _same_as_local(run, common, ref, 2)


def test_a_six_task_run_with_node_local_locks_equals_a_local_run(cluster, tmp_path):
    """The issue's run (6 tasks, 48 shards, 144 images, launcher.wait=true) with every lock private
    to its node: it completes, every shard written once, features bit-equal to a local run."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = _inputs(tmp_path, 144) + COMMON
    t0 = time.time()
    p = subprocess.run(CLI + [*common, *SLURM, "launcher.cpus_per_task=1", f"output.dir={run}", "num_shards=6",
                              "launcher.shards_per_task=8", "simulated_batch_s=0.02", "launcher.wait=true"],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **NODE_LOCAL), timeout=900)
    print(f"6 tasks, 48 shards with node-local locks: {time.time() - t0:.1f} s")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert _status(run)["counts"] == {"done": 48}
    _one_file_per_shard(run, 48)
    evs = _events(run)
    lost = sum(1 for es in evs.values() for e in es if e["event"] == "lost")
    print(f"attempts that lost their shard to another: {lost}")
    for name, es in evs.items():
        assert sum(1 for e in es if e["event"] == "finished") == 1, (name, es)
        assert not [e for e in es if e["event"] == "failed"], (name, [(e.get("host"), e.get("error")) for e in es if e["event"] == "failed"])
    assert run_cli("verify", "--content", run).returncode == 0
    _same_as_local(run, common, ref, 48)
    print(json.dumps({"lost": lost}))


def test_a_poison_image_in_a_six_task_array_is_a_failure_and_the_run_completes(cluster, tmp_path):
    """The issue's 6-task array (48 shards, 144 images) with one image whose decoding kills its task
    (the fault switch CAFFE_RUNNER_FAULT_CRASH_ON: SIGSEGV), in shard 0: its own task dies on it,
    the task that takes it next (at the tail: tasks claim their own stretch first) decodes it
    image by image in child processes; the run completes, that image is a failure naming SIGSEGV
    and every other image a row equal to a local run without the switch."""
    from runner.engine.decode import FAULT_CRASH_ON

    run, ref = tmp_path / "run", tmp_path / "ref"
    common = _inputs(tmp_path, 144) + COMMON
    poison = Path(Path(tmp_path / "list.txt").read_text().splitlines()[0])  # image 0: shard 0
    name = str(poison.relative_to(tmp_path))  # as the run names it: relative to the list's folder
    p = subprocess.run(CLI + [*common, *SLURM, "launcher.cpus_per_task=1", f"output.dir={run}", "num_shards=6",
                              "launcher.shards_per_task=8", "simulated_batch_s=0.02", "launcher.wait=true",
                              "run.max_failure_fraction=null"],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **{FAULT_CRASH_ON: poison.name}),
                       timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert _status(run)["counts"] == {"done": 48}
    _one_file_per_shard(run, 48)
    evs = _events(run)["shard-00000-of-00048"]
    starts = [e for e in evs if e["event"] in ("started", "resumed")]
    if os.environ.get(NODE_LOCAL_VAR) in (None, "", "0"):
        assert [e.get("isolated") for e in starts] == [None, 1], evs  # its task died, the taker isolated
        assert len({e["job_id"] for e in starts}) == 2 and starts[1].get("own_shard") is not None, starts
    else:
        # the whole layer run with node-local locks (--node-local-locks): several tasks may take
        # the dead shard at once, and an attempt with no end line yet counts as died to the next,
        # so later attempts isolate earlier, never later; one of them commits
        assert starts[0].get("isolated") is None and all(e.get("isolated") for e in starts[1:]), evs
        assert sum(1 for e in evs if e["event"] == "finished") == 1, evs
    with h5py.File(run / "features.h5", "r") as f:
        fails = dict(zip(f["failures/names"].asstr()[:], f["failures/reason"].asstr()[:]))
        names, feats = list(f["names"].asstr()[:]), f["feats"][:]
    assert list(fails) == [name], fails
    assert fails[name].startswith("crashed the decoder: its process was killed by SIGSEGV"), fails
    run_cli(*common, f"output.dir={ref}", "launcher=local", "launcher.workers=2", "num_shards=48",
            "launcher.threads_per_worker=1", "simulated_batch_s=0.0")
    with h5py.File(ref / "features.h5", "r") as b:
        ref_names = list(b["names"].asstr()[:])
        keep = [k for k, n in enumerate(ref_names) if n != name]
        assert names == [ref_names[k] for k in keep]
        assert np.array_equal(feats, b["feats"][:][keep])
    assert run_cli("verify", "--content", run).returncode == 0
