"""Issue 37 on the 3-node dev cluster: the merge job asks for launcher.merge_* (Slurm's own
accounting says what it got), writes a view of the run's own shards, and refuses a run directory
whose parent others can write, in one line in its log, writing nothing."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import pytest

from conftest import CLI, REPO, run_cli, wait_until
from test_stragglers import COMMON, _inputs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.timeout_min=10",
         "launcher.gpus_per_task=0", "launcher.shards_per_task=1", "simulated_batch_s=0.0"]


def _merge_id(run: Path) -> str:
    return json.loads((run / "submissions.json").read_text())[-1]["merge_job_id"]


def _sacct(job: str, fields: str) -> list:
    p = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", fields], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()[0].split("|") if p.stdout.strip() else []


def test_the_merge_job_asks_for_the_merge_keys_and_views_its_own_shards(cluster, tmp_path):
    run = tmp_path / "run"
    run_cli(*_inputs(tmp_path, 16), *COMMON, *SLURM, f"output.dir={run}", "num_shards=2",
            "launcher.merge_cpus_per_task=2", "launcher.merge_mem_gb=0.75", "launcher.merge_timeout_min=7",
            "launcher.wait=true")
    merge = _merge_id(run)
    # slurmdbd records a job's end and its request in separate updates: a COMPLETED record can
    # still read ReqCPUS 0, ReqMem "16?" and no time limit for a moment (seen in a fresh run)
    wait_until(lambda: (lambda r: r[:1] == ["COMPLETED"] and r[1:2] != ["0"] and r[3:4] not in ([""], []))(
        _sacct(merge, "State,ReqCPUS,ReqMem,Timelimit")), timeout=120, what="sacct to record the merge job")
    assert _sacct(merge, "ReqCPUS,ReqMem,Timelimit") == ["2", "768M", "00:07:00"]
    with h5py.File(run / "features.h5", "r") as f:
        sources = {m.file_name for m in f["features"][next(iter(f["features"]))].virtual_sources()}
    views = [p.name for p in run.iterdir() if p.is_dir() and p.name.startswith("view.")]
    assert len(views) == 1 and list((run / views[0]).iterdir()) == []
    assert sources == {f"{views[0]}/../shards/shard-{i:05d}-of-00002.h5" for i in range(2)}, sources
    st = run_cli("status", run)
    assert st.stdout.splitlines()[0].split(": ")[1].startswith("merged,"), st.stdout


def test_the_merge_job_refuses_a_run_whose_parent_others_can_write(cluster, tmp_path):
    """The parent turns group-writable while the task runs (held at a gate): the merge job that
    follows refuses in one line in its log and writes nothing."""
    project, gates = tmp_path / "project", tmp_path / "gates"
    gates.mkdir()
    run = project / "run"
    (gates / "first-batch-0.hold").touch()
    env = dict(os.environ, CAFFE_RUNNER_TEST_GATES=str(gates))
    p = subprocess.run(CLI + [*_inputs(tmp_path, 8), *COMMON, *SLURM, f"output.dir={run}", "num_shards=1"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    wait_until(lambda: (gates / "first-batch-0.reached").exists(), timeout=180, what="the task at its first batch")
    project.chmod(0o2775)
    (gates / "first-batch-0.hold").unlink()
    merge = _merge_id(run)
    wait_until(lambda: _sacct(merge, "State")[:1] in (["FAILED"], ["COMPLETED"]), timeout=240,
               what="the merge job to end")
    assert _sacct(merge, "State") == ["FAILED"]
    assert not (run / "features.h5").exists() and not (run / "merge.lock").exists()
    err = "\n".join(p.read_text() for p in (run / "logs").rglob(f"{merge}*.err"))
    assert f"the folder {project} above it can be written by others (mode drwxrwsr-x, no sticky bit)" in err, err[-3000:]
    project.chmod(0o755)
    run_cli("merge", run)
    assert (run / "features.h5").exists()
