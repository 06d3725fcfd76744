"""No straggler holds a local run either (issue 28): with num_shards unset the local launcher
plans launcher.shards_per_worker (4) shards per worker and the pool hands the next one to
whichever worker frees up, so a worker held on its first shard (a gate the test opens: a core
shared with another job, a slower GPU) keeps back one small shard while the others do the
rest. A run planned before (one shard per worker) resumes as it was planned.

Real pycaffe (the tiny net), real photos, real HDF5, the real local launcher."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLI, REPO, assert_same_run, read_features, run_cli, tiny_model_args, wait_until

pytestmark = pytest.mark.slow

# two workers, one BLAS thread each: every run below computes the same batches the same way
SHAPE = ["launcher.workers=2", "launcher.threads_per_worker=1", "batch_size=2"]


def _args(tiny_net, photos, run, extra=()):
    return [f"input.dir={photos}", f"output.dir={run}", *SHAPE, *tiny_model_args(tiny_net), *extra]


def _run(path: Path):
    from runner.run.plan import load_run_dir

    return load_run_dir(path)


def test_a_held_worker_keeps_back_one_small_shard_while_the_other_does_the_rest(tiny_net, photos, tmp_path):
    ref = tmp_path / "ref"
    run_cli(*_args(tiny_net, photos, ref))
    reference = read_features(ref / "features.h5")
    count = _run(ref).plan["count"]

    run, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    (gates / "load-0.hold").touch()  # the first worker stops on its first shard, as a slow one would
    env = dict(os.environ, CAFFE_RUNNER_TEST_GATES=str(gates))
    proc = subprocess.Popen(CLI + _args(tiny_net, photos, run), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        wait_until(lambda: (gates / "load-0.reached").exists() or proc.poll() is not None, what="shard 0 held")
        assert proc.poll() is None, proc.communicate()[1][-3000:]

        def others_done():
            return (run / "run.json").exists() and set(_run(run).done_shards()) == set(range(1, _run(run).num_shards))

        # while shard 0's worker is held, the other worker takes every other shard in turn
        wait_until(lambda: others_done() or proc.poll() is not None, what="every shard but the held one done")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        r = _run(run)
        a, b = r.shard_range(0)
        held_back = (b - a) / count
        print(f"the held worker keeps back {b - a} of {count} images ({held_back:.0%})")
        assert held_back <= 1 / 8 + 1 / count, f"a held worker keeps back {held_back:.0%} of the run"
        (gates / "load-0.hold").unlink()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert_same_run(run, reference)
    # the net was loaded once per worker, not once per shard
    import h5py

    r = _run(run)
    loads = []
    for i in range(r.num_shards):
        with h5py.File(r.shard_path(i), "r") as f:
            loads.append(int(f.attrs["net_loaded"]))
    assert sum(loads) == 2, loads


def test_a_local_run_planned_with_one_shard_per_worker_resumes_as_planned(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_net, photos, run)
    run_cli(*args, "launcher.shards_per_worker=1")  # the design before shards_per_worker
    reference = read_features(run / "features.h5")
    old = _run(run)
    assert old.num_shards == 2
    # a shard lost (a deleted file: as if its worker had not finished), then the default command
    os.unlink(old.shard_path(1))
    (run / "features.h5").unlink()
    p = run_cli(*args)
    assert "different config" not in p.stderr, p.stderr[-2000:]
    r = _run(run)
    assert r.num_shards == 2 and r.done_shards() == [0, 1]
    assert_same_run(run, reference)
