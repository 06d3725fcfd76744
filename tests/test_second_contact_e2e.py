"""Issue 20, items 13-24, end to end with the real command line: SIGTERM, output.overwrite over
a file that cannot be removed, and names as text in the failure lines."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import CLI, REPO, run_cli, tiny_model_args, wait_until
from test_first_contact import _beats, _held

pytestmark = pytest.mark.slow


def _workers_of(pid: int):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_sigterm_stops_a_local_run_with_one_line_and_the_rerun_resumes(tiny_net, photos, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text("2")  # the shards hold after two batches: the run is mid-way when the signal comes
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=2", *_held(tiny_net, gate)]
    proc = subprocess.Popen(CLI + [str(a) for a in args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: [b.get("done", 0) for b in _beats(run, 2)] == [4, 4] or proc.poll() is not None,
               what="both shards held after two batches")
    assert proc.poll() is None, proc.communicate()
    workers = _workers_of(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)  # kill PID: the launcher alone, as a service manager or a script would
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err[-3000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("caffe-runner:")]
    assert len(lines) == 1 and lines[0].startswith("caffe-runner: terminated (SIGTERM): ") and "resume" in lines[0]
    assert "Traceback" not in err
    wait_until(lambda: not any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"
                               for w in workers), timeout=30, what="the workers to stop")
    gate.write_text("open")
    run_cli(*args)
    assert run_cli("verify", run).returncode == 0


def test_overwrite_stops_when_a_file_of_the_old_run_cannot_be_removed(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    t = tiny_model_args(tiny_net)
    run_cli(f"input.dir={photos}", f"output.dir={run}", *t, "launcher.workers=1", "num_shards=2")
    victim = run / "shards" / "shard-00001-of-00002.h5"
    if os.geteuid() == 0:
        lock, undo = ["chattr", "+i", str(victim)], ["chattr", "-i", str(victim)]
    else:
        lock, undo = ["chmod", "555", str(victim.parent)], ["chmod", "755", str(victim.parent)]
    if subprocess.run(lock, capture_output=True).returncode != 0:
        pytest.skip(f"{lock[0]} does not work here")
    try:
        p = run_cli(f"input.dir={photos}", f"output.dir={run}", *t, "output.blobs=[prob]", "output.overwrite=true",
                    "launcher.workers=1", "num_shards=2", check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        errors = [ln for ln in p.stderr.splitlines() if "caffe-runner: error:" in ln]
        assert len(errors) == 1 and "output.overwrite=true could not remove" in errors[0] and str(victim) in errors[0]
        assert (run / "run.json").exists() and victim.exists()
        with h5py.File(victim, "r") as f:
            assert "emb" in f.attrs["blobs"]  # the old run's file, never taken into the new run
    finally:
        subprocess.run(undo, check=True)
    # removable again: the overwrite goes through, and no shard of the old run is in the new one
    run_cli(f"input.dir={photos}", f"output.dir={run}", *t, "output.blobs=[prob]", "output.overwrite=true",
            "launcher.workers=1", "num_shards=2")
    with h5py.File(run / "features.h5", "r") as f:
        assert f["feats"].shape[1:] == (5,)
    assert run_cli("verify", run).returncode == 0


def test_a_damaged_run_json_stops_the_extraction_in_one_line_and_overwrite_replaces_it(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1"]
    run_cli(*args)
    plan = run / "run.json"
    plan.write_text(plan.read_text()[:100])  # truncated (a full disk, a killed copy)
    for argv in (args, ["status", run]):
        p = run_cli(*argv, check=False)
        errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert [ln for ln in errors if "error" in ln] == errors[-1:] and f"{plan} is damaged" in errors[-1]
    run_cli(*args, "output.overwrite=true")
    assert run_cli("verify", run).returncode == 0


@pytest.mark.slurm
def test_wait_without_a_merge_job_says_so_on_a_real_cluster(cluster, tiny_net, photos, tmp_path):
    from test_slurm_errors import SLURM

    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, "launcher.wait=true",
                "launcher.merge_job=false", *tiny_model_args(tiny_net))
    assert "done:" not in p.stdout and not (run / "features.h5").exists()
    assert "all 2 shards are complete" in p.stdout and "launcher.merge_job=false" in p.stdout, p.stdout
    assert f"caffe-runner merge {run}" in p.stdout
    run_cli("merge", run)
    assert run_cli("verify", run).returncode == 0
