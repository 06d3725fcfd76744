"""Every death seen and named, the fast layer (Caffe's last words: test_modelcheck_units.py): exit
codes in words, the launcher's one line, a dead shard's writer joined before its file closes, and
a file whose counters disagree is not resumed. (The local pool's own deaths, an idle worker's
included: test_workers.py.)"""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from runner.store.lastwords import describe_exit
from runner.results.write import ShardWriter

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("code, words", [
    (-signal.SIGKILL, "killed by SIGKILL"), (-signal.SIGABRT, "killed by SIGABRT"),
    (-signal.SIGSEGV, "killed by SIGSEGV"), (134, "exit code 134 (SIGABRT)"), (137, "exit code 137 (SIGKILL)"),
    (1, "exit code 1"), (0, "exit code 0"), (255, "exit code 255"), (-99, "killed by signal 99"),
])
def test_describe_exit(code, words):
    assert describe_exit(code) == words


def test_the_death_line_names_shards_signal_and_caffe():
    from runner.launch.local import death_message
    from runner.launch.workers import Death

    kill = death_message([(3, Death(41, -9, 3), None, "/r/logs/local-worker-41.err")], 8)
    assert kill.startswith("shard 3 of 8: its worker (pid 41) was killed by SIGKILL (kill -9, or the kernel's "
                           "out-of-memory killer"), kill
    words = "net.cpp:822] Cannot copy param 0 weights from layer 'conv1'; shape mismatch"
    both = death_message([(1, Death(7, -6, 1), words, "/r/logs/local-worker-7.err"),
                          (0, Death(8, -6, 0), words, "/r/logs/local-worker-8.err")], 2)
    assert both == (f"shards 0, 1 of 2: Caffe aborted: {words} (worker pid 7, 8, killed by SIGABRT; their output: "
                    "/r/logs)"), both
    idle = death_message([(None, Death(9, 3, None), None, "/r/logs/local-worker-9.err")], 2)
    assert idle == "an idle worker (pid 9) ended with exit code 3", idle


def _batch(first: int, n: int = 2):
    idx = list(range(first, first + n))
    return (first, n, idx, [b"img%d.jpg" % i for i in idx], {"emb": np.full((n, 4), first, np.float32)}, [], {})


def test_an_abandoned_writer_is_joined_before_the_file_closes(tmp_path, monkeypatch):
    """The forward thread fails while the writer thread is inside a batch (held there by a
    gate): abandon() returns only once the writer has ended, after the batches already queued,
    so the file the caller closes next holds whole batches and resumes exactly."""
    from runner.store.events import EventLog
    from runner.task.extract import _Progress, _Sink, _Writer
    from runner.engine.features import FeaturePost
    from runner.store.liveness import Heart
    from runner.run.plan import load_run_dir
    from synthetic import make_run
    from runner.task.identity import task_identity
    from runner.faults import ENV

    run = load_run_dir(make_run(tmp_path / "run", 8, 1))
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv(ENV, str(gates))
    (gates / "written-0-1.hold").touch()
    path = tmp_path / "s.h5"
    w = ShardWriter(path, {"emb": (4,)}, "float32", {}, "fp", 2)
    heart = Heart(lambda beat: run.write_heartbeat(0, beat), 2.0, {})  # not started: beats only when told
    progress = _Progress(run, 0, 8, 0, task_identity(), 0.0, 0.0, None, EventLog(tmp_path / "ev.jsonl", {}), heart)
    writer = _Writer([_Sink(w, FeaturePost(), ["emb"], 0, progress)], shard=0)
    writer.start()
    writer.put(_batch(0))
    writer.put(_batch(2))  # queued while the writer is held after the first
    while not (gates / "written-0-1.reached").exists():
        time.sleep(0.02)
    abandon = threading.Thread(target=writer.abandon)
    abandon.start()
    abandon.join(0.5)
    assert abandon.is_alive(), "abandon() returned while the writer thread was still writing"
    (gates / "written-0-1.hold").unlink()
    abandon.join(60)
    assert not abandon.is_alive() and not writer.is_alive()
    w.close()
    again = ShardWriter(path, {"emb": (4,)}, "float32", {}, "fp", 2)
    assert (again.next, again.rows) == (4, 4)  # the queued batch was written, whole
    again.close()


def test_a_file_whose_counters_disagree_starts_over_instead_of_doubling_a_batch(tmp_path):
    """A file closed (or a process killed) inside a batch's counter update: rows already count
    the batch, next does not. Resuming at next would write the batch's rows twice."""
    from runner.results.write import torn_counters

    path = tmp_path / "s.h5"
    w = ShardWriter(path, {"emb": (4,)}, "float32", {}, "fp", 2)
    w.write_batch(*_batch(0)[1:])
    w.write_batch(*_batch(2)[1:])
    w.write_batch(*_batch(4)[1:])
    w.f.attrs["next"] = 4  # the third batch's rows recorded, its `next` not
    w.close()
    assert torn_counters({"rows": 6, "n_failures": 0, "next": 4})
    assert torn_counters({"rows": 3, "n_failures": 1, "next": 4}) is None
    again = ShardWriter(path, {"emb": (4,)}, "float32", {}, "fp", 2)
    assert (again.next, again.rows) == (0, 0)
    assert w.partial.with_name(w.partial.name + ".corrupt").exists()
    again.close()
