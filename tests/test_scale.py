"""Metadata that grows with the tasks, and liveness that survives skew and restarts (issue 37).

Units (no Slurm): the order each task takes shards in; a decision reads one listing of the
shards folder and opens no other task's shard file, probes no lock; a beat dated in the future
still ages on the reader's clock, so a dead task on a node whose clock runs ahead is named
within the usual bound; a task is not "stalled" before its first batch, and stalls are measured
on one clock; a reused pid is not "alive"; beats slow down for long shards. End to end (real
HDF5, the simulated engine): a restarted task whose own shard's lock is still held by its dead
predecessor (as an NFSv4 lease or a Lustre eviction keeps it) breaks it and writes the shard;
file-system calls per task stay flat from 8 to 32 tasks (strace, bench/fscalls.py)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, run_cli, tiny_model_args


# ---- the order tasks take shards in ------------------------------------------------------

@pytest.mark.unit
def test_tasks_that_finish_together_take_different_shards():
    from runner.task.steal import take_order

    tasks, shards = 16, 128
    orders = [take_order(k, shards, tasks) for k in range(tasks)]
    for k, o in enumerate(orders):
        assert o[0] == k and sorted(o) == list(range(shards))  # its own first, every shard once
    # the first shard each looks at after its own: 16 different ones, none another task's own
    firsts = [o[1] for o in orders]
    assert len(set(firsts)) == tasks and min(firsts) >= tasks
    # a helper walks another's stretch from its top: it meets that stretch's owner once
    assert orders[0][1:8] == list(range(16, 23)) and orders[0][8:15] == list(range(29, 22, -1))
    # without the task count: up from just above its own shard
    assert take_order(2, 5) == [2, 3, 4, 0, 1] and take_order(0, 1) == [0]


def _synthetic(tmp_path, shards=32, tasks=4):
    from omegaconf import OmegaConf

    from runner.run.plan import load_run_dir
    from synthetic import make_run, shard_file

    run_dir = make_run(tmp_path / "run", shards * 2, shards, dim=2)
    keep = tmp_path / "complete"
    keep.mkdir()
    for i in range(shards):
        shutil.copy(shard_file(run_dir, i, shards), keep / f"{i}.h5")
    cfg = load_run_dir(run_dir).cfg
    OmegaConf.set_struct(cfg, False)
    cfg.num_shards = tasks
    return run_dir, keep, cfg


@pytest.mark.unit
def test_a_decision_lists_the_shards_folder_once_and_opens_no_other_shard(tmp_path, monkeypatch):
    """Facts 3 and 4: each decision reads one listing; no stat and no HDF5 open of the other
    shards, no lock probe. The task's own run_one here puts a complete shard in place (what
    run_shard does, checked in full elsewhere); every call the decisions make is counted."""
    import runner.store.locks
    from runner.errors import ShardBusyError
    from runner.task.steal import take_shards
    from synthetic import shard_file

    shards = 32
    run_dir, keep, cfg = _synthetic(tmp_path, shards)
    for i in range(4, shards):  # shards 0-3 done by their tasks; the rest to take
        shard_file(run_dir, i, shards).unlink()
    held = {5, 17}  # two shards other tasks hold
    ran = []
    calls = {"listdir": 0, "h5": 0, "stat_shard": 0, "probe": 0}
    inside = []  # calls made by run_one (the shard's own extraction) are not the decision's

    def run_one(cfg, i, threads, own=None, keep_=None, break_lock=False, **kw):
        if i in held:
            raise ShardBusyError(f"shard {i} is held")
        ran.append(i)
        inside.append(1)
        shutil.copy(keep / f"{i}.h5", shard_file(run_dir, i, shards))
        inside.pop()
        return {"shard": i, "rows": 2, "images_per_s": 100.0}

    real_listdir, real_stat, real_file, real_probe = os.listdir, os.stat, h5py.File, runner.store.locks.lock_holder

    def listdir(p="."):
        calls["listdir"] += 1
        return real_listdir(p)

    def stat(p, *a, **k):
        if str(p).endswith(".h5") and not inside:
            calls["stat_shard"] += 1
        return real_stat(p, *a, **k)

    def h5file(*a, **k):
        calls["h5"] += 1
        return real_file(*a, **k)

    def probe(*a, **k):
        calls["probe"] += 1
        return real_probe(*a, **k)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(h5py, "File", h5file)
    monkeypatch.setattr(runner.store.locks, "lock_holder", probe)
    import runner.task.steal
    if hasattr(runner.task.steal, "lock_holder"):  # the name as the decision path imported it
        monkeypatch.setattr(runner.task.steal, "lock_holder", probe)
    out = take_shards(cfg, 2, run_one)
    # shard 2, its own, was done (one look at that file, in full), then every free shard
    assert sorted(set(ran)) == sorted(set(range(4, shards)) - held), ran
    assert calls["h5"] <= 1 and calls["stat_shard"] <= 1 and calls["probe"] == 0, calls
    # one listing per decision (and one at the end)
    assert calls["listdir"] <= len(ran) + 2, (calls, len(ran))
    assert set(out["taken"]) == set(range(4, shards)) - held


@pytest.mark.unit
def test_a_task_at_the_tail_tries_a_bounded_few_held_shards(tmp_path):
    """When every shard left is held, a task tries at most MAX_BUSY_TRIES of them and ends: it
    does not try the lock of every unfinished shard (T tasks x T locks at every run's tail)."""
    from runner.errors import ShardBusyError
    from runner.task.steal import MAX_BUSY_TRIES, take_shards
    from synthetic import shard_file

    shards = 32
    run_dir, keep, cfg = _synthetic(tmp_path, shards)
    for i in range(1, shards):
        shard_file(run_dir, i, shards).unlink()
    tried = []

    def run_one(cfg, i, threads, own=None, keep=None, **kw):
        if i == 0:
            return {"shard": 0, "skipped": True}
        tried.append(i)
        raise ShardBusyError(f"shard {i} is held")

    out = take_shards(cfg, 0, run_one)
    assert out["taken"] == [] and 0 < len(tried) <= 2 * MAX_BUSY_TRIES, tried


@pytest.mark.unit
def test_a_slow_task_that_left_a_shard_to_a_faster_one_takes_it_when_that_one_dies(tmp_path):
    """Fact 5: a slow task leaves the last free shard to a faster task that frees up sooner; it
    waits (instead of ending) and looks again. The faster task dies meanwhile (its beat goes
    stale): the slow task takes the shard. Had it ended, nobody would have been left to take it."""
    from runner.errors import ShardBusyError
    from runner.run.plan import load_run_dir
    from runner.task.steal import take_shards
    from synthetic import shard_file

    shards = 5
    run_dir, keep, cfg = _synthetic(tmp_path, shards, tasks=5)
    run = load_run_dir(run_dir)
    for i in (0, 1, 2, 3):  # shard 4 is done; shard 1 is held by the fast task
        shard_file(run_dir, i, shards).unlink()
    now = time.time()

    def beat(updated):
        # shard 1's writer: fast (100 img/s), one image left; its beat fresh, then stale
        hb = run.rundir.heartbeat_path(1, shards)
        hb.parent.mkdir(parents=True, exist_ok=True)
        hb.write_text(json.dumps({"state": "running", "shard": 1, "done": 1, "total": 2, "rate": 100.0,
                                  "interval_s": 2.0, "seq": 1, "updated": updated, "host": "elsewhere",
                                  "pid": 1, "pidns": "pid:[0]"}))
    beat(now + 3600)  # fresh whatever the test's speed
    ran, pauses = [], []

    def run_one(cfg, i, threads, own=None, keep=None, **kw):
        if i == 1:
            raise ShardBusyError("shard 1 is held")
        ran.append(i)
        shutil.copy(keep_dir / f"{i}.h5", shard_file(run_dir, i, shards))
        return {"shard": i, "images_per_s": 1.0}  # this task is slow

    def sleep(s):
        pauses.append(s)
        beat(0.0)  # the fast task died while this one waited: its beat is stale from now on

    keep_dir = keep
    out = take_shards(cfg, 0, run_one, sleep=sleep)
    # own shard 0, then shard 2 (1 is held); then shard 3 is left to the fast task, once
    assert len(pauses) == 1 and pauses[0] >= 5.0, pauses
    assert ran == [0, 2, 3] and out["taken"] == [2, 3], (ran, out)


# ---- liveness across skewed clocks ---------------------------------------------------------

class _Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.mark.unit
def test_a_beat_dated_ahead_ages_on_the_readers_clock():
    from runner.store.liveness import MAX_SKEW_S, BeatWatch, judge_beat, lost, stale_after_s

    clock = _Clock()
    w = BeatWatch(clock)
    now = 50_000.0
    beat = {"state": "running", "host": "node9", "pid": 4242, "pidns": "pid:[1]", "interval_s": 2.0, "seq": 7,
            "updated": now + 600.0}  # node9's clock runs 10 min ahead
    assert w.age("s0", beat, now + 600.0, now) == 0.0  # written now at most
    bound = stale_after_s(beat) + MAX_SKEW_S
    clock.t += bound + 1  # the task died: its beat never changes again
    age = w.age("s0", beat, now + 600.0, now + bound + 1)
    assert age >= bound + 1 and judge_beat(beat, age, "login", "pid:[2]", lambda p, s=None: True) == "stale"
    assert lost(beat, age, "login")
    # a beat that goes on changing stays fresh, whatever its clock says
    clock.t += 1
    assert w.age("s0", dict(beat, seq=8), now + 600.0, now + bound + 2) == 0.0


@pytest.mark.unit
def test_status_names_a_dead_task_on_a_node_whose_clock_runs_ahead(tmp_path, monkeypatch):
    """The skewed-clock test: a node's beats (and, as on Lustre, the file's mtime) dated 10 min
    ahead; its task dies. Status names it within the usual bound of first seeing the beat
    (STALE_BEATS intervals + MAX_SKEW_S), not after the skew."""
    import runner.store.liveness
    from runner.store.liveness import MAX_SKEW_S, BeatWatch, stale_after_s
    from runner.run.plan import load_run_dir
    from runner.run.status import run_status

    run_dir, _, _ = _synthetic(tmp_path, 4)
    run = load_run_dir(run_dir)
    run.shard_path(1).unlink()
    clock = _Clock()
    watch = BeatWatch(clock)
    monkeypatch.setattr(runner.store.liveness, "WATCH", watch)
    import runner.run.status
    if hasattr(runner.run.status, "WATCH"):
        monkeypatch.setattr(runner.run.status, "WATCH", watch)
    ahead = time.time() + 600
    beat = {"state": "running", "shard": 1, "done": 1, "total": 2, "rate": 1.0, "host": "node9", "pid": 4242,
            "pidns": "pid:[1]", "interval_s": 2.0, "seq": 3, "batch_size": 1, "started": ahead - 5}
    run.write_heartbeat(1, beat)
    hb_path = run.rundir.heartbeat_path(1, 4)
    data = json.loads(hb_path.read_text())
    data["updated"] = ahead
    hb_path.write_text(json.dumps(data))
    os.utime(hb_path, (ahead, ahead))
    st = run_status(run_dir, use_slurm=False)
    assert st["shards"][1]["state"] == "running", st["shards"][1]
    clock.t += stale_after_s(beat) + MAX_SKEW_S + 1
    st = run_status(run_dir, use_slurm=False)
    assert st["shards"][1]["state"] == "interrupted", st["shards"][1]
    assert st["state"] == "incomplete"


@pytest.mark.unit
def test_one_look_names_a_dead_task_whose_clock_runs_ahead_when_the_server_stamps_the_mtime(tmp_path, monkeypatch):
    """A one-shot `status` (no memory of earlier looks): a beat dated 10 min ahead by its
    writer, in a file whose mtime the file server stamped (NFS) 5 min ago: the task is named
    dead at the first look. Where the mtime is ahead too (Lustre), the line says by how much one
    look cannot age it, instead of a silent "running"."""
    import runner.store.liveness
    import runner.run.status
    from runner.store.liveness import BeatWatch
    from runner.run.plan import load_run_dir
    from runner.run.status import format_status, run_status

    run_dir, _, _ = _synthetic(tmp_path, 4)
    run = load_run_dir(run_dir)
    run.shard_path(1).unlink()
    monkeypatch.setattr(runner.run.status, "WATCH", BeatWatch(_Clock()))  # a reader that never looks again
    now = time.time()
    beat = {"state": "running", "shard": 1, "done": 1, "total": 2, "rate": 1.0, "host": "node9", "pid": 4242,
            "pidns": "pid:[1]", "interval_s": 2.0, "seq": 3, "batch_size": 1, "started": now + 590}
    run.write_heartbeat(1, beat)
    hb_path = run.rundir.heartbeat_path(1, 4)
    hb_path.write_text(json.dumps(dict(json.loads(hb_path.read_text()), updated=now + 600)))
    os.utime(hb_path, (now - 300, now - 300))
    st = run_status(run_dir, use_slurm=False)
    assert st["shards"][1]["state"] == "interrupted", st["shards"][1]
    os.utime(hb_path, (now + 600, now + 600))
    st = run_status(run_dir, use_slurm=False)
    assert st["shards"][1]["state"] == "running" and 590 <= st["shards"][1]["clock_ahead_s"] <= 610, st["shards"][1]
    assert "s ahead of this clock: one look cannot age it; `status --watch` and `wait` do" in format_status(st)


@pytest.mark.unit
def test_no_stall_before_the_first_batch_and_stalls_on_one_clock():
    from runner.run.status import stalled_for

    now = 10_000.0
    # the first batch is running (no rate yet): never stalled, however long
    first = dict(state="running", done=0, total=100, rate=0.0, batch_size=4, moved_t=now - 500, quiet_s=500.0,
                 updated=now)
    assert stalled_for(first, now, 20, 0.5) is None
    # a writer whose clock is 1000 s behind, moving: its moved_t reads 1000 s old on our clock,
    # but its own quiet_s (a difference on its clock) says 0.2 s: not stalled
    behind = dict(state="running", done=40, total=100, rate=20.0, batch_size=4, moved_t=now - 1000,
                  quiet_s=0.2, updated=now - 1000)
    assert stalled_for(behind, now, 20, 0.5, age_s=0.1) is None
    # quiet for 10 s on its own clock, beat 1 s ago: stalled for 11 s (20 batches are 4 s)
    assert stalled_for(dict(behind, quiet_s=10.0), now, 20, 0.5, age_s=1.0) == pytest.approx(11.0)
    # a writer ahead by 1000 s that has not moved for 10 s: stalled all the same
    ahead = dict(behind, moved_t=now + 990, quiet_s=10.0, updated=now + 1000)
    assert stalled_for(ahead, now, 20, 0.5, age_s=0.0) == pytest.approx(10.0)


@pytest.mark.unit
def test_a_reused_pid_is_not_alive():
    from runner.store.liveness import Heart, judge_beat, pid_namespace, pid_start
    from runner.store.rundir import pid_alive

    me = os.getpid()
    start = pid_start(me)
    assert start is not None and pid_alive(me, start) and pid_alive(me)
    assert not pid_alive(me, start + 1)  # the same pid, another process (started at another time)
    beat = {"pid": me, "pid_start": start + 1, "host": socket.gethostname(), "pidns": pid_namespace(),
            "interval_s": 1.0}
    assert judge_beat(beat, 0.1, socket.gethostname(), pid_namespace(), pid_alive) == "dead"
    assert judge_beat(dict(beat, pid_start=start), 0.1, socket.gethostname(), pid_namespace(), pid_alive) == "alive"
    written = []
    Heart(written.append, 1.0, {"state": "running"}).beat({"state": "running"})
    assert written[0]["pid_start"] == start


@pytest.mark.unit
def test_beats_slow_down_for_long_shards_within_bounds():
    from runner.store.liveness import MAX_BEAT_S, Heart, beat_interval_for_shard

    assert beat_interval_for_shard(2.0, None) == 2.0
    assert beat_interval_for_shard(2.0, 30.0) == 2.0  # a short shard: heartbeat_s
    assert beat_interval_for_shard(2.0, 500.0) == pytest.approx(10.0)  # 50 beats over the shard
    assert beat_interval_for_shard(2.0, 36_000.0) == MAX_BEAT_S  # never less often than that
    h = Heart(lambda b: None, 2.0, {})
    h.pace(500.0)
    assert h.interval_s == pytest.approx(10.0)


# ---- a restarted task and its dead predecessor's lock ------------------------------------------

TASK = """
import sys
from runner.task.extract import run_shard
from runner.run.plan import load_run_dir
from runner.task.steal import take_shards
from runner.task.identity import setup_task_logging
setup_task_logging()
cfg = load_run_dir(sys.argv[1]).cfg
out = take_shards(cfg, 0, run_shard, threads=1, wait_s=float(sys.argv[2]), poll_s=0.05)
print("RESULT", [r.get("shard") for r in out["shards"] if not r.get("skipped")])
"""


def _sim_run(photos, tiny_net, run: Path):
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=3", "launcher.workers=1",
            "launcher.threads_per_worker=1", *tiny_model_args(tiny_net), "backend=simulated", "simulated_batch_s=0",
            "batch_size=2")


def _rows(path: Path):
    with h5py.File(path, "r") as f:
        return f["feats"][:], f["index"][:]


@pytest.mark.parametrize("beat_job", ["77_0", None])
def test_a_restarted_task_breaks_its_dead_predecessors_lock(photos, tiny_net, tmp_path, beat_job):
    """Fact 5: a node failed; Slurm restarted its task, but the file server still holds the dead
    node's lock on the task's own shard (here the test holds it, as the server would). The task
    must not skip its own shard: it recognises its predecessor (the beat names its own Slurm
    job) and breaks the lock at once, or, with no beat to tell (beat_job None), waits its
    bounded time and breaks it then. The shard is written, bit-equal to the reference."""
    from runner.run.plan import load_run_dir

    run = tmp_path / "run"
    _sim_run(photos, tiny_net, run)
    r = load_run_dir(run)
    ref = _rows(r.shard_path(0))
    r.shard_path(0).unlink()
    (run / "features.h5").unlink()
    if beat_job:
        r.write_heartbeat(0, {"state": "running", "shard": 0, "done": 2, "total": 4, "host": "node-lost",
                              "pid": 99999, "job_id": beat_job, "interval_s": 2.0, "seq": 9})
    else:
        r.rundir.heartbeat_path(0, 3).unlink(missing_ok=True)
    lock = os.open(r.lock_path(0), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the dead node's lock, kept by the file server
    os.pwrite(lock, b"shard task pid 99999 on node-lost Slurm job 77_0 attempt node-lost.99999.deadbeef\n", 0)
    try:
        env = dict(os.environ, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0", SLURM_RESTART_COUNT="1")
        p = subprocess.run([sys.executable, "-c", TASK, str(run), "0.5" if beat_job is None else "600"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.close(lock)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RESULT [0]" in p.stdout, (p.stdout, p.stderr[-3000:])
    assert "breaks it" in p.stderr
    got = _rows(r.shard_path(0))
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[1].tolist() == ref[1].tolist()


def test_a_task_leaves_its_own_shard_to_a_live_task_that_took_it(photos, tiny_net, tmp_path):
    """Its own shard held by another task that is alive (fresh beats, another job): the task
    does not wait or break it, and goes on to the other shards."""
    from runner.run.plan import load_run_dir

    run = tmp_path / "run"
    _sim_run(photos, tiny_net, run)
    r = load_run_dir(run)
    r.shard_path(0).unlink()
    r.write_heartbeat(0, {"state": "running", "shard": 0, "done": 2, "total": 4, "host": "node2", "pid": 1,
                          "job_id": "77_2", "interval_s": 600.0, "seq": 9})
    lock = os.open(r.lock_path(0), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        env = dict(os.environ, SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="0")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", TASK, str(run), "600"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
        took = time.monotonic() - t0
    finally:
        os.close(lock)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RESULT []" in p.stdout and not r.shard_path(0).exists(), (p.stdout, p.stderr[-2000:])
    assert took < 300  # not the 600 s wait for a dead holder


# ---- file-system calls per task ------------------------------------------------------------

@pytest.mark.slow
def test_file_system_calls_per_task_stay_flat_as_tasks_grow(tmp_path):
    """What `make bench` row 14 measures at 16, 64 and 256 tasks, at 8 and 32 here: every call on
    the run directory counted with strace, per task, within 1.5x."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (apt-get install strace)")
    p = subprocess.run([sys.executable, "bench/fscalls.py", "--tasks", "8", "32", "--work", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    r = json.loads("\n".join(lines[lines.index("{"):len(lines) - lines[::-1].index("}")]))
    assert r["T8"]["done"] == 64 and r["T32"]["done"] == 256 and not r["T32"]["failed_tasks"], r
    assert r["T32"]["calls_per_task"] <= 1.5 * r["T8"]["calls_per_task"], r
