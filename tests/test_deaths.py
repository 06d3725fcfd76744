"""Every worker death seen and named (issue 26): a local run whose worker is killed at any moment
of its life, or whose Caffe aborts, ends at once with one line naming the shard, the signal and
Caffe's own fatal line; a rerun completes, bit-identical to an uninterrupted run.

Real pycaffe, the tiny net, the sample photos. The moments are held by gates the test opens
(runner/faults.py), so nothing here depends on the machine's speed: the other shard's worker
stays held at its gate, and the command must end while it is still held."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import (CLI, REPO, assert_same_run, copy_tiny_net, read_features, run_cli, tiny_model_args,
                      wait_until)

pytestmark = pytest.mark.slow

# 20 photos, 2 shards of 10, batches of 2: 5 batches a shard; one BLAS thread per worker in
# every run, so reruns are bit-identical to the reference
SHAPE = ["num_shards=2", "launcher.workers=2", "batch_size=2", "heartbeat_s=0.1"]
MOMENTS = {"loading the net": "load-{}", "before its first batch": "first-batch-{}",
           "mid-shard": "written-{}-2", "finishing its file": "finish-{}"}


def _args(tiny_net, photos, run, extra=()):
    return [f"input.dir={photos}", f"output.dir={run}", *SHAPE, *tiny_model_args(tiny_net), *extra]


def _start(args, gates: Path):
    env = dict(os.environ, CAFFE_RUNNER_TEST_GATES=str(gates))
    return subprocess.Popen(CLI + [str(a) for a in args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)


def _hold(gates: Path, *names) -> None:
    gates.mkdir(exist_ok=True)
    for n in names:
        (gates / f"{n}.hold").touch()


def _reached(gates: Path, name: str, proc) -> int:
    """The pid of the worker held at gate `name` (fails at once if the run ended instead)."""
    path = gates / f"{name}.reached"
    wait_until(lambda: path.exists() or proc.poll() is not None, what=f"gate {name}")
    assert path.exists(), f"the run ended before gate {name}:\n{proc.communicate()[1][-3000:]}"
    return int(path.read_text())


# generous: the run ends about a second after a death; a launcher that missed it never ends
END_S = 120


def _communicate(proc, why: str):
    try:
        return proc.communicate(timeout=END_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{why}:\n{err[-3000:]}")


def _end(proc, gates: Path, still_held: str):
    """The command's end, which must come while `still_held` is still closed (the other
    shard's worker is held there: a launcher waiting for it would never end)."""
    out, err = _communicate(proc, f"the run did not end while gate {still_held} was held")
    assert (gates / f"{still_held}.hold").exists()
    return out, err


def _last_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def reference(tiny_net, photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*_args(tiny_net, photos, run))
    return read_features(run / "features.h5")


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_worker_killed_at_any_moment_stops_the_run_naming_shard_and_signal(tiny_net, photos, tmp_path,
                                                                              reference, moment):
    run, gates = tmp_path / "run", tmp_path / "gates"
    args = _args(tiny_net, photos, run)
    gate = MOMENTS[moment]
    _hold(gates, gate.format(0), gate.format(1))
    proc = _start(args, gates)
    victim = _reached(gates, gate.format(0), proc)
    _reached(gates, gate.format(1), proc)
    t_kill = time.time()
    os.kill(victim, signal.SIGKILL)
    out, err = _end(proc, gates, gate.format(1))
    took = time.time() - t_kill
    print(f"{moment}: the run ended {took:.2f} s after the kill")
    last = _last_line(err)
    assert proc.returncode == 1, err[-3000:]
    assert last.startswith("caffe-runner: error: shard 0 of 2: its worker (pid %d) was killed by SIGKILL" % victim), \
        err[-3000:]
    assert "rerun the same command" in last and "shard 1" not in last, last
    assert "Traceback" not in err, err[-3000:]
    # the run stopped; the shard that died is in status as failed, with the same words
    st = run_cli("status", run, check=False)
    assert "killed by SIGKILL" in st.stdout, st.stdout
    run_cli(*args)
    assert_same_run(run, reference)


def test_an_idle_worker_killed_stops_the_run(tiny_net, photos, tmp_path, reference):
    """Shard 1 done, its worker waits idle for a task that will not come while shard 0 is held
    mid-shard: that worker's death is seen too, and the run still ends. (Killed a moment
    earlier, between the shard's rename and its report, it is as idle; the bare pool's case is
    tests/test_workers.py's.)"""
    run, gates = tmp_path / "run", tmp_path / "gates"
    args = _args(tiny_net, photos, run)
    _hold(gates, "written-0-2")
    proc = _start(args, gates)
    _reached(gates, "written-0-2", proc)
    shard1 = run / "shards" / "shard-00001-of-00002.h5"
    wait_until(lambda: shard1.exists() or proc.poll() is not None, what="shard 1 complete")
    with h5py.File(shard1, "r") as f:
        idle = int(f.attrs["pid"])
    os.kill(idle, signal.SIGKILL)
    out, err = _end(proc, gates, "written-0-2")
    assert proc.returncode == 1, err[-3000:]
    assert _last_line(err).startswith(f"caffe-runner: error: an idle worker (pid {idle}) was killed by SIGKILL"), \
        err[-3000:]
    run_cli(*args)
    assert_same_run(run, reference)


def test_caffe_abort_ends_the_run_with_caffes_line(tiny_net, photos, tmp_path, reference):
    """The weights are replaced by another net's after the plan was made (held at the load gate):
    Caffe aborts in every worker; the run ends in seconds with Caffe's own line."""
    import caffe

    model = tmp_path / "model"
    proto, weights, other = copy_tiny_net(tiny_net, model, conv_outputs=4)
    caffe.set_mode_cpu()
    caffe.Net(str(other), caffe.TEST).save(str(model / "other.caffemodel"))
    run, gates = tmp_path / "run", tmp_path / "gates"
    args = _args((proto, weights), photos, run)
    _hold(gates, "load-0", "load-1")
    proc = _start(args, gates)
    for s in (0, 1):
        _reached(gates, f"load-{s}", proc)
    shutil.copy(model / "other.caffemodel", weights)
    t_open = time.time()
    for s in (0, 1):
        (gates / f"load-{s}.hold").unlink()
    out, err = _communicate(proc, "the run did not end after Caffe aborted")
    print(f"the run ended {time.time() - t_open:.2f} s after Caffe started loading")
    last = _last_line(err)
    assert proc.returncode == 1, err[-3000:]
    assert "Cannot copy param 0 weights from layer 'conv one'; shape mismatch" in last, err[-3000:]
    assert "shard" in last and "Traceback" not in err, err[-3000:]
    st = run_cli("status", run, check=False)
    assert "Cannot copy param 0 weights" in st.stdout, st.stdout
    # the right weights back: the rerun completes
    shutil.copy(tiny_net[1], weights)
    run_cli(*args)
    assert_same_run(run, reference)


def test_a_dead_gpu_worker_is_named_not_its_replacements_empty_queue(tiny_net, photos, tmp_path):
    """device=gpu with two (fake) GPU ids and the simulated engine: the killed worker is named,
    and not replaced by one that would find no GPU left (as multiprocessing.Pool did: the
    error was its replacement's "Empty")."""
    run, gates = tmp_path / "run", tmp_path / "gates"
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "batch_size=2", "heartbeat_s=0.1",
            *tiny_model_args(tiny_net), "backend=simulated", "device=gpu", "launcher.gpus=[0,1]"]
    _hold(gates, "written-0-1", "written-1-1")
    proc = _start(args, gates)
    victim = _reached(gates, "written-0-1", proc)
    _reached(gates, "written-1-1", proc)
    os.kill(victim, signal.SIGKILL)
    out, err = _end(proc, gates, "written-1-1")
    assert proc.returncode == 1, err[-3000:]
    last = _last_line(err)
    assert "shard 0 of 2: its worker (pid %d) was killed by SIGKILL" % victim in last, err[-3000:]
    assert "Empty" not in err and "GPU left" not in err, err[-3000:]
