"""The report of a Slurm run on the real dev cluster whose task was requeued mid-shard: the
timeline shows the killed attempt and the resumed one, under their job ids, drawn in Chromium."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli, tiny_model_args, wait_until
from report_check import check_report

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ["launcher=slurm", "launcher.shards_per_task=1", "launcher.take_free_shards=false", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10", "device=cpu",
         "launcher.gpus_per_task=1", "launcher.allow_cpu_on_gpu=true"]


def _done(run: Path, shard: int, n: int) -> int:
    try:
        return int(json.loads((run / "status" / f"shard-{shard:05d}-of-{n:05d}.json").read_text()).get("done", 0))
    except (FileNotFoundError, ValueError):
        return 0


def test_report_of_a_requeued_slurm_run(cluster, tiny_net, photos, tmp_path):
    run, gate = tmp_path / "run", tmp_path / "gate"
    # simulated net held by a gate file (runner.engine.simulated.gate_allows): each task holds after 2 images
    # until the test opens it, so the requeue lands mid-shard on a fast or a loaded machine alike
    # (1 s per image only gives the report's rate chart a slope; the gate does the holding)
    gate.write_text("2")
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, *tiny_model_args(tiny_net),
            "backend=simulated", "simulated_batch_s=1.0", "batch_size=1", "heartbeat_s=0.000001",
            f"simulated_gate={gate}")
    wait_until(lambda: _done(run, 0, 2) >= 2, timeout=180, interval=0.5, what="progress")
    subs = json.loads((run / "submissions.json").read_text())
    job = subs[0]["tasks"][0]["job_id"]
    # the report of the run in progress, before the requeue
    run_cli("report", run, "-o", tmp_path / "during.html")
    during = check_report(tmp_path / "during.html")
    assert during["state"] == "running"
    subprocess.run(["scontrol", "requeue", job], check=True)
    # status --watch follows the run through the requeue (the task pending again) to its merge
    from conftest import CLI, REPO

    watch = subprocess.Popen(CLI + ["status", "--watch", "--interval", "1", str(run)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def state():
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%t"], capture_output=True, text=True).stdout.strip()

    def released_and_resumed():
        if state() == "PD":  # a requeued job waits ~2 min to be eligible: release it now
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        ev = run / "events" / "shard-00000-of-00002.jsonl"
        return ev.exists() and '"resumed"' in ev.read_text()

    try:
        # the killed attempt is gone and the next one has resumed (and holds again at the gate)
        wait_until(released_and_resumed, timeout=300, interval=0.5, what="the requeued task resumed")
        seen = []  # five views of the held run, then the gate opens
        while sum("(refreshed " in ln for ln in seen) < 5 and (line := watch.stdout.readline()):
            seen.append(line)
    finally:
        gate.write_text("open")
    wait_until(lambda: (run / "features.h5").exists(), timeout=300, interval=0.5, what="merged output after requeue")
    out, err = watch.communicate(timeout=120)
    out = "".join(seen) + out
    assert watch.returncode == 0 and out.count("(refreshed ") >= 5 and ": merged, 20/20 images" in out, (out, err)
    assert run_cli("verify", run).returncode == 0
    run_cli("report", run)
    html = (run / "report.html").read_text()
    seen = check_report(run / "report.html", screenshot=tmp_path / "slurm-report.png")
    assert seen["state"] == "merged"
    assert "task attempts\t3 (0 failed, 1 resumed, 0 taken by a task started for another shard)" in seen["text"], seen["text"][:1500]
    # the attempts table: shard 0 killed by the requeue then resumed by the same array task; how
    # the first attempt ended is Slurm's word on that run of the job (sacct -D), not a guess
    assert html.count("stopped (killed, requeued or preempted)</td>") == 0
    assert html.count("requeued (resumes when Slurm restarts it)</td>") == 1, html
    assert html.count("<td>resumed</td>") == 1 and html.count(f"<td>{job}</td>") == 2
    events = [json.loads(x) for x in (run / "events" / "shard-00000-of-00002.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events if e["event"] != "progress"]
    assert kinds == ["started", "resumed", "finished"], kinds
    assert [e.get("restart", 0) for e in events if e["event"] in ("started", "resumed")] == [0, 1]
    assert "Slurm submissions" in seen["text"] and subs[0]["array_job_id"] in seen["text"]


def test_retry_of_a_slurm_run_runs_as_an_array(cluster, tiny_net, photos, tmp_path):
    """A Slurm run made while two listed images were missing; restored; `retry` stages the two
    shards as a Slurm array like the run's, then folds them in: rows equal a local clean run's."""
    import shutil

    import h5py
    import numpy as np

    names = sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{photos / n}\n" for n in names))
    gone = [names[1], names[-2]]
    away = tmp_path / "away"
    away.mkdir()
    for k, n in enumerate(gone):
        shutil.move(photos / n, away / str(k))
    args = [f"input.list={lst}", "num_shards=2", *tiny_model_args(tiny_net)]
    try:
        run_cli(*args, f"output.dir={tmp_path / 'run'}", *SLURM, "launcher.wait=true",
                "run.max_failure_fraction=null")  # 2 of 20: over the default 5%
    finally:
        for k, n in enumerate(gone):
            shutil.move(away / str(k), photos / n)
    # the reference with the tasks' BLAS threads (cpus_per_task=1): then, and only then, bit for bit
    run_cli(*args, f"output.dir={tmp_path / 'ref'}", "launcher.workers=2", "launcher.threads_per_worker=1")
    p = run_cli("retry", tmp_path / "run")
    assert "submitted retry array job" in p.stdout and "retried 2 image(s): 2 now feature rows" in p.stdout, p.stdout
    threads = {}
    for name in ("run", "ref"):
        for shard in sorted((tmp_path / name / "shards").glob("*.h5")):
            with h5py.File(shard, "r") as f:
                threads.setdefault(name, set()).add(int(f.attrs["blas_threads"]))
                if name == "run":  # the retry ran with the threads the shard was extracted with
                    assert int(f.attrs["retry_blas_threads"]) == int(f.attrs["blas_threads"]), dict(f.attrs)
    assert threads["run"] == {1}, threads
    with h5py.File(tmp_path / "run" / "features.h5", "r") as a, h5py.File(tmp_path / "ref" / "features.h5", "r") as b:
        assert list(a["names"].asstr()[:]) == list(b["names"].asstr()[:]) and len(a["failures/index"]) == 0
        if threads["run"] == threads["ref"]:
            np.testing.assert_array_equal(a["feats"][:], b["feats"][:])
        else:  # BLAS sums in another order with another thread count: the fidelity bound
            np.testing.assert_allclose(a["feats"][:], b["feats"][:], rtol=1e-5, atol=1e-6)
    assert run_cli("verify", tmp_path / "run").returncode == 0
    history = json.loads((tmp_path / "run" / "retries.json").read_text())
    assert history[0]["recovered"] == 2 and sorted(history[0]["shards"]) == ["0", "1"]


def test_report_names_a_scancelled_attempt_with_slurms_cause(cluster, tiny_net, photos, tmp_path):
    """A task scancelled mid-shard, then the same command finishing the run: the report's attempts
    table says CANCELLED for the stopped attempt, as `status` did while it was the last one."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text("2")
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, *tiny_model_args(tiny_net),
            "backend=simulated", "simulated_batch_s=0.01", "batch_size=1", f"simulated_gate={gate}"]
    run_cli(*args)
    wait_until(lambda: _done(run, 0, 2) >= 2, timeout=180, interval=0.5, what="progress")
    job = json.loads((run / "submissions.json").read_text())[0]["tasks"][0]["job_id"]
    subprocess.run(["scancel", job], check=True)
    wait_until(lambda: "CANCELLED" in run_cli("status", run, check=False).stdout, timeout=180, interval=1,
               what="status naming the scancel")
    gate.write_text("open")
    run_cli(*args, "launcher.wait=true")
    wait_until(lambda: (run / "features.h5").exists(), timeout=300, interval=0.5, what="merged output")
    run_cli("report", run)
    html = (run / "report.html").read_text()
    assert html.count("killed by Slurm: CANCELLED (scancel)") == 1, html
    assert "stopped (killed, requeued or preempted)</td>" not in html
