"""Issue 29, items 1-15, end to end with the real command line on the sample photos and the
tiny net: a run directory inside its input, progress in a log, a kill -9 of the launcher, a
sweep with one bad point, a run where many reads failed. A run that must still be running is
held by a test gate at the last image of its list (runner/faults.py): its decode thread
waits before reading it until the test releases it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import CLI, REPO, run_cli, tiny_model_args, wait_until

pytestmark = pytest.mark.slow


def _photo_names(photos: Path):
    return sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())


class _Gated:
    """`caffe-runner` on a list of the photos whose last entry is held by a test gate (runner/
    faults.py: the decoder waits before reading it until release() removes the .hold file).
    stderr is read by a thread (lines so far: .err)."""

    def __init__(self, photos: Path, tmp: Path, *args):
        self.photo = next(p for p in sorted(photos.rglob("*.jpg")))
        self.gate = tmp / "gate.jpg"
        shutil.copyfile(self.photo, self.gate)
        self.gates = tmp / "gates"
        self.gates.mkdir()
        self.hold = self.gates / "read-gate.jpg.hold"
        self.hold.touch()
        lst = tmp / "list.txt"
        lst.write_text("".join(f"{photos / n}\n" for n in _photo_names(photos)) + f"{self.gate}\n")
        self.proc = subprocess.Popen(CLI + [f"input.list={lst}", *map(str, args)], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(os.environ, CAFFE_RUNNER_TEST_GATES=str(self.gates)))
        self.err = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def gate_opened(self) -> bool:
        """A task waits at the gate (before reading the last image)."""
        return (self.gates / "read-gate.jpg.reached").exists()

    def release(self):
        self.hold.unlink(missing_ok=True)

    def stop(self):
        self.release()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.reader.join(timeout=60)


# ---- item 1: output.dir inside input.dir ---------------------------------------------------

def test_a_run_inside_its_input_dir_is_left_out_and_every_later_command_works(tiny_net, photos, tmp_path):
    inp = tmp_path / "inout"
    shutil.copytree(photos, inp)
    n = len(_photo_names(photos))
    args = [f"input.dir={inp}", f"output.dir={inp / 'run'}", *tiny_model_args(tiny_net), "launcher.workers=1"]
    first = run_cli(*args)
    assert "1 caffe-runner run or sweep folder (output.dir is never part of the input)" in first.stderr, first.stderr
    assert json.loads((inp / "run" / "stats.json").read_text())["images"] == n
    again = run_cli(*args)  # no "the input changed since this run listed it"
    assert "already complete, nothing to extract" in again.stderr, again.stderr
    v = run_cli("verify", inp / "run", check=False)
    assert v.returncode == 0, v.stdout + v.stderr
    assert run_cli(*args, "input.relist=true").returncode == 0
    # a sweep folder inside the input: every point lists the same images, and a rerun resumes
    sweep = [f"input.dir={inp}", f"output.dir={inp / 'sweep'}", *tiny_model_args(tiny_net), "launcher.workers=1",
             "batch_size=2,4"]
    run_cli("-m", *sweep)
    rerun = run_cli("-m", *sweep)
    assert rerun.stderr.count("already complete, nothing to extract") == 2, rerun.stderr
    for point in (p for p in (inp / "sweep").iterdir() if p.is_dir()):
        assert json.loads((point / "stats.json").read_text())["images"] == n
        assert run_cli("verify", point).returncode == 0


# ---- item 4: progress lines when stderr is not a terminal ---------------------------------

def test_progress_lines_in_a_log_while_the_run_goes_on(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    g = _Gated(photos, tmp_path, f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1",
               "batch_size=2", "heartbeat_s=0.1", "launcher.log_interval_s=0.2")
    try:
        n = len(_photo_names(photos)) + 1
        wait_until(lambda: any(f"progress: " in ln and f"/{n} images" in ln for ln in g.err) and g.gate_opened(),
                   timeout=180, what="a progress line while the run is held")
        assert g.proc.poll() is None  # still running: the line came during the run, not at its end
        g.release()
        assert g.proc.wait(timeout=180) == 0
    finally:
        g.stop()
    lines = [ln for ln in g.err if "progress: " in ln]
    assert lines and all("img/s" in ln and "shards done" in ln for ln in lines), g.err
    assert "\r" not in "".join(g.err)  # no progress bar redraws in a log


# ---- item 10: kill -9 of the launcher leaves no noise ---------------------------------------

def test_kill_9_of_the_launcher_prints_no_leaked_semaphore_warning(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    g = _Gated(photos, tmp_path, f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=2",
               "num_shards=2", "batch_size=2")
    try:
        wait_until(g.gate_opened, timeout=180, what="the worker to reach the gate")
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait(timeout=60)
        # stderr ends when every holder has gone: the workers (they die with the launcher) and
        # multiprocessing's resource tracker, which warns as it cleans up
        g.reader.join(timeout=120)
        assert not g.reader.is_alive()
    finally:
        g.stop()
    text = "".join(g.err)
    assert "leaked semaphore" not in text and "resource_tracker" not in text, text[-3000:]


# ---- item 11: a sweep checks every point before the first runs ----------------------------

def test_a_sweep_with_one_bad_blob_is_refused_before_any_point_runs(tiny_net, photos, tmp_path):
    sweep = tmp_path / "sweep"
    p = run_cli("-m", f"input.dir={photos}", f"output.dir={sweep}", *tiny_model_args(tiny_net),
                "output.blobs=[emb],[nope]", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(errors) == 1 and "sweep point 1_output.blobs-nope" in errors[0] and "'nope'" in errors[0], p.stderr
    assert "no point was started" in errors[0]
    assert not sweep.exists() or not any(sweep.iterdir()), list(sweep.iterdir())


# ---- item 14: many failed reads fail the run by default, and the summary says why ----------

def test_a_run_where_many_reads_failed_exits_1_by_default_naming_the_reason(tiny_net, photos, tmp_path):
    names = _photo_names(photos)
    gone = [f"gone/missing_{i}.jpg" for i in range(len(names) * 2 // 3)]  # 40%: under the wrong-root check
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{photos / n}\n" for n in names) + "".join(f"{tmp_path / g}\n" for g in gone))
    run = tmp_path / "run"
    p = run_cli(f"input.list={lst}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1",
                check=False)
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    k, total = len(gone), len(names) + len(gone)
    assert (f"WARNING: {k} of {total} images ({k / total:.0%}) failed for one reason, 'listed but not found': "
            f"the storage, not the images: fix it, then `caffe-runner retry {run}` reads them again") in p.stdout
    assert "> run.max_failure_fraction=0.05" in p.stderr and (run / "features.h5").exists()
    assert run_cli(f"input.list={lst}", f"output.dir={run}", *tiny_model_args(tiny_net),
                   "run.max_failure_fraction=null").returncode == 0


# ---- item 12: Ctrl-C (twice) of launcher.wait on Slurm: which jobs go on, and how to cancel ----

@pytest.mark.slurm
def test_ctrl_c_twice_while_waiting_on_slurm_names_the_queued_jobs_and_scancel(cluster, tiny_net, photos, tmp_path):
    import re

    run = tmp_path / "run"
    g = _Gated(photos, tmp_path, f"output.dir={run}", *tiny_model_args(tiny_net), "launcher=slurm",
               "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10", "device=cpu",
               "launcher.gpus_per_task=0", "num_shards=1", "launcher.wait=true")
    try:
        wait_until(g.gate_opened, timeout=300, interval=0.5, what="the Slurm task to reach the gate")
        g.proc.send_signal(signal.SIGINT)
        g.proc.send_signal(signal.SIGINT)  # the impatient second one
        assert g.proc.wait(timeout=120) == 130
        g.reader.join(timeout=60)
        err = "".join(g.err)
        assert "Traceback" not in err, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("caffe-runner:")]
        assert len(lines) == 1, err[-3000:]
        subs = json.loads((run / "submissions.json").read_text())
        ids = sorted({str(s["array_job_id"]) for s in subs} | {str(s["merge_job_id"]) for s in subs
                                                               if s.get("merge_job_id")})
        assert len(ids) == 2 and "Slurm jobs of this run are still queued or running" in lines[0], lines[0]
        assert "shard 0: job " in lines[0] and "merge job " in lines[0], lines[0]  # which job is which
        m = re.search(r"`(scancel [0-9 ]+)`", lines[0])
        assert m and sorted(m.group(1).split()[1:]) == ids, lines[0]
        assert f"caffe-runner status {run}" in lines[0]
        # the command it gives cancels them
        subprocess.run(m.group(1).split(), check=True)
        wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True,
                                              text=True).stdout.strip(), timeout=120, interval=0.5,
                   what="the cancelled jobs to leave the queue")
        # and a Ctrl-C once they are gone says that nothing is left
        from runner.launch.slurm import interrupted_message

        assert "no job of this run is left in Slurm's queue" in interrupted_message(run)
    finally:
        g.stop()
