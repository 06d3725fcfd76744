"""An image that hangs the decoder (decode.max_image_s, runner/engine/decodepool.py, issue 37): it is
recorded as a failure naming the bound, its thread left behind, and the shard goes on at full width.

The unit tests drive the pool with a clock of their own (a job is "late" only when the test says
so) and hold the hanging job on an event the test opens: nothing races the machine's speed. The
end-to-end run makes one real file hang the real decoder (the fault switch
CAFFE_RUNNER_FAULT_HANG_ON: it blocks for ever) with a real bound of 10 s, far above what a sample
photo takes to decode on any machine."""
from __future__ import annotations

import os
import threading

import h5py
import numpy as np
import pytest

from conftest import read_features, run_cli, tiny_model_args
from runner.engine.decode import FAULT_HANG_ON
from runner.errors import RunnerError


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fast(v):
    return lambda: (v, None)


def _hanging(started: threading.Event, release: threading.Event):
    def job():
        started.set()
        release.wait()
        return "late", None
    return job


@pytest.mark.unit
def test_a_job_past_the_bound_is_a_failure_and_a_fresh_thread_takes_its_place():
    import runner.engine.decodepool as dp

    clock, started, release = _Clock(), threading.Event(), threading.Event()
    pool = dp.DecodePool(2, max_image_s=5, clock=clock)
    try:
        j0, j1, j2 = pool.submit(_fast(0)), pool.submit(_hanging(started, release)), pool.submit(_fast(2))
        assert pool.result(j0) == (0, None)
        j2.done.wait()
        started.wait()
        # not yet late on the pool's clock: the waiting thread waits on
        clock.t = 4.0
        assert not j1.done.wait(0.05)
        clock.t = 10.0
        assert pool.result(j1) == (None, dp.hang_reason(5))
        assert pool.result(j2) == (2, None)
        assert pool.threads == 3 and pool.abandoned == 1
        # the pool is still two threads wide: two jobs run at once while the first hangs
        both = threading.Barrier(3, timeout=120)  # a safety net: a pool one thread wide never meets

        def meet():
            both.wait()
            return "met", None
        a, b = pool.submit(meet), pool.submit(meet)
        both.wait()  # would block for ever if only one thread were left
        assert pool.result(a) == ("met", None) and pool.result(b) == ("met", None)
    finally:
        release.set()
        pool.close()
    # the thread left behind ends when its image comes back; its result is not used
    for t in threading.enumerate():
        if t.name == "decode-2":
            t.join(30)
            assert not t.is_alive()


@pytest.mark.unit
def test_errors_reach_the_caller_and_no_bound_waits_for_ever():
    import runner.engine.decodepool as dp

    pool = dp.DecodePool(1, max_image_s=0)
    try:
        def boom():
            raise ValueError("bad reader")
        j = pool.submit(boom)
        with pytest.raises(ValueError, match="bad reader"):
            pool.result(j)
        assert pool.result(pool.submit(_fast(1))) == (1, None)
    finally:
        pool.close()


@pytest.mark.unit
def test_too_many_hangs_stop_the_shard_with_one_error(monkeypatch):
    import runner.engine.decodepool as dp

    monkeypatch.setattr(dp, "MAX_ABANDONED", 1)
    clock, release = _Clock(), threading.Event()
    pool = dp.DecodePool(1, max_image_s=5, clock=clock)
    try:
        s1, s2 = threading.Event(), threading.Event()
        j1, j2 = pool.submit(_hanging(s1, release)), pool.submit(_hanging(s2, release))
        s1.wait()
        clock.t = 10.0
        assert pool.result(j1)[0] is None
        s2.wait()
        clock.t = 20.0
        with pytest.raises(RunnerError, match=r"2 images each took more than decode.max_image_s=5 s .*stuck file "
                                              r"server.*resumes"):
            pool.result(j2)
    finally:
        release.set()
        pool.close()


@pytest.mark.unit
def test_a_negative_bound_is_refused_in_one_line(tmp_path, photos):
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'run'}", "decode.max_image_s=-1", check=False)
    assert p.returncode == 2 and "decode.max_image_s=-1" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_hanging_image_is_a_failure_and_every_other_image_a_row(tiny_net, photos, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    shape = ["num_shards=2", "launcher.workers=2", "batch_size=2", "run.max_failure_fraction=null",
             *tiny_model_args(tiny_net)]
    run_cli(f"input.dir={photos}", f"output.dir={ref}", *shape)
    env = dict(os.environ, **{FAULT_HANG_ON: "rocket.jpg"})
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", *shape, "decode.max_image_s=10", env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(run / "features.h5", "r") as f:
        fails = dict(zip((bytes(n) for n in f["failures/names_raw"][:]), f["failures/reason"].asstr()[:]))
    assert list(fails) == [b"rocket.jpg"], fails
    assert fails[b"rocket.jpg"].startswith("decoding took more than decode.max_image_s=10 s: given up"), fails
    feats, names, _ = read_features(run / "features.h5")
    ref_feats, ref_names, _ = read_features(ref / "features.h5")
    keep = [i for i, n in enumerate(ref_names) if n != b"rocket.jpg"]
    assert list(names) == [ref_names[i] for i in keep]
    np.testing.assert_array_equal(feats, ref_feats[keep])
