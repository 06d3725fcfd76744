"""Integration tests against a real Slurm cluster (slurm/dev-cluster: munge, slurmctld,
slurmd with 4 fake GPUs, slurmdbd + MariaDB), brought up once for this module and taken
down afterwards, also when tests fail."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MAX_ARRAY, run_cli, tiny_model_args, wait_until
from runner.engine.gpu import caffe_has_gpu

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


BASE = ["launcher=slurm", "launcher.shards_per_task=1", "launcher.take_free_shards=false", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10"]
# the dev cluster's GPUs are fake: tasks hold one (to check the binding) and compute on the CPU,
# with a CPU-only and a CUDA build of Caffe alike
SLURM = BASE + ["device=cpu", "launcher.gpus_per_task=1", "launcher.allow_cpu_on_gpu=true"]


def _h5(path):
    with h5py.File(path, "r") as f:
        return f["feats"][:], [bytes(n) for n in f["names_raw"][:]], f["failures/index"][:]


def _wait(pred, timeout=180, what="condition"):
    wait_until(pred, timeout=timeout, what=what, interval=0.5)


def _heartbeat_done(run: Path, shard: int, n: int) -> int:
    p = run / "status" / f"shard-{shard:05d}-of-{n:05d}.json"
    try:
        return int(json.loads(p.read_text()).get("done", 0))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _submissions(run: Path):
    return json.loads((run / "submissions.json").read_text())


def test_four_tasks_four_gpus_equal_local(cluster, photos, tmp_path):
    slurm_run, local_run = tmp_path / "slurm", tmp_path / "local"
    p = run_cli(f"input.dir={photos}", f"output.dir={slurm_run}", "num_shards=4", *SLURM, "launcher.wait=true")
    assert "submitted array job" in p.stdout and "caffe-runner status" in p.stdout
    run_cli(f"input.dir={photos}", f"output.dir={local_run}", "num_shards=4", "launcher.workers=2")
    gpus = []
    for i in range(4):
        with h5py.File(slurm_run / "shards" / f"shard-{i:05d}-of-00004.h5", "r") as f:
            gpus.append((f.attrs["host"], f.attrs["visible_gpus"]))
            assert f.attrs["job_id"].count("_") == 1
    # the 4 fake GPUs are spread over the 3 nodes (2, 1, 1), each numbered from 0 on its node
    assert sorted(gpus) == [("node1", "0"), ("node1", "1"), ("node2", "0"), ("node3", "0")], gpus
    a, b = _h5(slurm_run / "features.h5"), _h5(local_run / "features.h5")
    assert a[1] == b[1] and len(a[1]) == len(list(photos.rglob("*.*")))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    st = run_cli("status", slurm_run, check=False)
    assert st.returncode == 0 and "merged" in st.stdout
    assert run_cli("verify", slurm_run).returncode == 0


def test_six_tasks_run_on_three_nodes_and_equal_local(cluster, tiny_net, photos, tmp_path):
    slurm_run, local_run = tmp_path / "slurm", tmp_path / "local"
    args = [f"input.dir={photos}", "num_shards=6", *tiny_model_args(tiny_net)]
    run_cli(*args, f"output.dir={slurm_run}", *BASE, "device=cpu", "launcher.gpus_per_task=0", "launcher.wait=true")
    run_cli(*args, f"output.dir={local_run}", "launcher.workers=2")
    hosts, beat_hosts = set(), set()
    for i in range(6):
        with h5py.File(slurm_run / "shards" / f"shard-{i:05d}-of-00006.h5", "r") as f:
            hosts.add(f.attrs["host"])
        beat = json.loads((slurm_run / "status" / f"shard-{i:05d}-of-00006.json").read_text())
        beat_hosts.add(beat["host"])
    # each task saw its own node's hostname (its UTS namespace), and the array spread over all three
    assert hosts == beat_hosts == {"node1", "node2", "node3"}, (hosts, beat_hosts)
    a, b = _h5(slurm_run / "features.h5"), _h5(local_run / "features.h5")
    assert a[1] == b[1] and len(a[1]) == len(list(photos.rglob("*.*")))
    # Slurm tasks run 1 thread (cpus_per_task=1), local workers may run more: the fidelity bound
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert run_cli("verify", slurm_run).returncode == 0


def test_failing_task_is_reported_and_resubmission_runs_only_it(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=3", *SLURM, *tiny_model_args(tiny_net)]
    # shard 1 cannot take its lock: a directory sits where the lock file goes
    blocker = run / "shards" / "shard-00001-of-00003.lock"
    blocker.mkdir(parents=True)
    p = run_cli(*args, "launcher.wait=true", check=False)
    assert p.returncode != 0
    assert "shard 1" in p.stderr and "log " in p.stderr and str(run / "logs") in p.stderr
    assert sorted(x.name for x in (run / "shards").glob("*.h5")) == ["shard-00000-of-00003.h5",
                                                                      "shard-00002-of-00003.h5"]
    st = run_cli("status", run, "--no-sacct", check=False)
    assert "failed" in st.stdout and "log:" in st.stdout
    kept = {x: x.stat().st_mtime_ns for x in (run / "shards").glob("*.h5")}
    blocker.rmdir()
    run_cli(*args, "launcher.wait=true")
    subs = _submissions(run)
    assert [t["shard"] for t in subs[-1]["tasks"]] == [1]
    assert {x: x.stat().st_mtime_ns for x in kept} == kept
    assert run_cli("verify", run).returncode == 0


def _held(tiny_net, gate: Path):
    # simulated backend held by a gate file the test writes (runner.engine.simulated.gate_allows): batch k of
    # each task starts once the file holds a number > k, or "open". A kill (scancel, requeue: after
    # KillWait, as submitit lets a task ignore SIGTERM) lands mid-shard on a fast or a loaded
    # machine alike. Every batch writes its heartbeat.
    return [*tiny_model_args(tiny_net), "backend=simulated", "simulated_batch_s=0.0", "batch_size=1",
            "heartbeat_s=0.000001", f"simulated_gate={gate}"]


def _fast(tiny_net):
    return [*tiny_model_args(tiny_net), "backend=simulated", "simulated_batch_s=0.0", "batch_size=1"]


def _job_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True, text=True).stdout.strip()


def test_scancel_then_resubmit_resumes(cluster, tiny_net, photos, tmp_path):
    run, ref, gate = tmp_path / "run", tmp_path / "ref", tmp_path / "gate"
    gate.write_text("2")  # each task holds after 2 images until the gate opens
    args = [f"input.dir={photos}", "num_shards=2", *_held(tiny_net, gate)]
    run_cli(*args, f"output.dir={run}", *SLURM)
    _wait(lambda: _heartbeat_done(run, 0, 2) >= 2 and _heartbeat_done(run, 1, 2) >= 2, what="progress")
    array = _submissions(run)[0]["array_job_id"]
    subprocess.run(["scancel", array], check=True)
    _wait(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip(),
          what="cancellation")
    assert not list((run / "shards").glob("*.h5")), "cancelled mid-shard: nothing complete yet"
    partial_done = [_heartbeat_done(run, i, 2) for i in range(2)]
    gate.write_text("open")
    run_cli(*args, f"output.dir={run}", *SLURM, "launcher.wait=true")
    for i in range(2):
        with h5py.File(run / "shards" / f"shard-{i:05d}-of-00002.h5", "r") as f:
            assert int(f.attrs.get("resumed", 0)) >= 1, "the shard started over instead of resuming"
    assert partial_done == [2, 2]
    run_cli(f"input.dir={photos}", "num_shards=2", *_fast(tiny_net), f"output.dir={ref}", "launcher.workers=2")
    a, b = _h5(run / "features.h5"), _h5(ref / "features.h5")
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0], b[0])
    assert run_cli("verify", run).returncode == 0


def test_requeue_resumes_from_last_batch(cluster, tiny_net, photos, tmp_path):
    run, ref, gate = tmp_path / "run", tmp_path / "ref", tmp_path / "gate"
    gate.write_text("3")  # the task holds after 3 images until the requeue has ended that attempt
    args = [f"input.dir={photos}", "num_shards=1", *_held(tiny_net, gate)]
    run_cli(*args, f"output.dir={run}", *SLURM)
    _wait(lambda: _heartbeat_done(run, 0, 1) >= 3, what="progress")
    job = _submissions(run)[0]["tasks"][0]["job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True)
    # pending again: the held attempt is gone (it first gets KillWait seconds to stop)
    _wait(lambda: _job_state(job) == "PD", what="the requeued job pending")
    gate.write_text("open")

    def released_and_merged():
        # a requeued job waits ~2 min before it is eligible again: release it once it is pending
        if _job_state(job) == "PD":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        return (run / "features.h5").exists()

    _wait(released_and_merged, timeout=240, what="merged output after requeue")
    with h5py.File(run / "shards" / "shard-00000-of-00001.h5", "r") as f:
        assert int(f.attrs.get("resumed", 0)) >= 1
    run_cli(f"input.dir={photos}", "num_shards=1", *_fast(tiny_net), f"output.dir={ref}", "launcher.workers=1")
    a, b = _h5(run / "features.h5"), _h5(ref / "features.h5")
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0], b[0])


def test_sweep_submits_one_array_per_point(cluster, tiny_net, photos, tmp_path):
    out = tmp_path / "sweep"
    # one whole run per point (sweep.shared_pass=false; one pass per model: test_sweep_file.py)
    p = run_cli("-m", f"input.dir={photos}", f"output.dir={out}", "num_shards=2", *SLURM,
                *tiny_model_args(tiny_net), "output.blobs=[emb],[prob]", "sweep.shared_pass=false")
    assert p.stdout.count("submitted array job") == 2
    # issue 36: submitted, not "done", when the command returns
    assert f"sweep: all 2 point(s) submitted under {out}" in p.stdout and "done under" not in p.stdout, p.stdout
    runs = sorted(d for d in out.iterdir() if (d / "submissions.json").exists())
    assert len(runs) == 2
    ids = {_submissions(r)[0]["array_job_id"] for r in runs}
    assert len(ids) == 2
    _wait(lambda: all((r / "features.h5").exists() for r in runs), timeout=240, what="both sweep points")
    shapes = []
    for r in runs:
        with h5py.File(r / "features.h5", "r") as f:
            shapes.append(f["feats"].shape[1:])
    assert sorted(shapes) == [(5,), (16,)]


def test_more_shards_than_max_array_size(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=7", *SLURM, *tiny_model_args(tiny_net),
                "launcher.gpus_per_task=0", "launcher.wait=true")
    assert f"MaxArraySize {MAX_ARRAY}" in p.stdout
    subs = _submissions(run)
    assert [len(s["tasks"]) for s in subs] == [5, 2]
    assert sorted(t["shard"] for s in subs for t in s["tasks"]) == list(range(7))
    assert len(list((run / "shards").glob("*.h5"))) == 7
    assert run_cli("verify", run).returncode == 0


def _sbatch_scripts(run: Path):
    return [p.read_text() for p in (run / "logs").rglob("*_submission.sh")]


@pytest.mark.skipif(caffe_has_gpu(), reason="with a CUDA build of Caffe, device=auto computes on the GPUs it requests")
def test_cpu_only_caffe_default_requests_no_gpu(cluster, tiny_net, photos, tmp_path):
    """The README's quick start on a CPU partition: no --gres, device cpu, and it completes."""
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *BASE, *tiny_model_args(tiny_net),
                "launcher.wait=true")
    assert "0 GPU" in p.stdout
    scripts = _sbatch_scripts(run)
    assert scripts and not any("--gres" in s for s in scripts), scripts[0]
    for i in range(2):
        with h5py.File(run / "shards" / f"shard-{i:05d}-of-00002.h5", "r") as f:
            assert f.attrs["device"] == "cpu" and f.attrs["visible_gpus"] == ""
    assert run_cli("verify", run).returncode == 0


@pytest.mark.skipif(caffe_has_gpu(), reason="with a CUDA build of Caffe, device=auto computes on the GPUs it requests")
def test_gpus_for_cpu_work_refused_before_submitting(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *BASE, *tiny_model_args(tiny_net),
                "launcher.gpus_per_task=1", check=False)
    assert p.returncode == 2 and "this pycaffe is CPU-only" in p.stderr
    assert "device=gpu" in p.stderr and "launcher.gpus_per_task=0" in p.stderr
    assert not (run / "manifest").exists() and not (run / "submissions.json").exists()
    # allowed: one warning, and the GPUs are bound as requested
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, *tiny_model_args(tiny_net),
                "launcher.wait=true")
    assert (p.stdout + p.stderr).count("allow_cpu_on_gpu=true") == 1
    assert any("--gres=gpu:1" in s for s in _sbatch_scripts(run))


def test_unknown_partition_and_account_are_refused(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *BASE, *tiny_model_args(tiny_net)]
    p = run_cli(*args, "launcher.partition=nosuch", check=False)
    assert p.returncode == 2 and "launcher.partition=nosuch: the cluster has no such partition" in p.stderr
    p = run_cli(*args, "launcher.account=nosuch", check=False)
    assert p.returncode == 2 and "launcher.account=nosuch" in p.stderr
    assert not (run / "manifest").exists()
    p = run_cli(*args, "launcher.partition=debug", "launcher.merge_job=false")
    assert "submitted array job" in p.stdout
