"""The report's arithmetic, the event log's bounds, the embedding layout's parts, retry's choice
of reasons, and a 1,000-shard report's weight: no pycaffe, no cluster."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from runner.store import events as ev
from runner.results.embeddings import plan_parts
from runner.ui.report import binned_rate, rate_segments, shard_rates
from runner.ui.retry import is_transient

pytestmark = pytest.mark.unit


def _e(t, event, **kw):
    return dict(t=t, event=event, **kw)


def test_attempts_started_killed_resumed_finished_and_failed():
    log = [_e(10, "started", host="a", job_id="7_0", done=0), _e(15, "progress", done=40),
           _e(20, "progress", done=80),  # then killed: no end line
           _e(30, "resumed", host="b", job_id="7_0", restart=1, done=80), _e(40, "progress", done=150),
           _e(45, "finished", done=200, rows=190, failures=10)]
    a = ev.attempts(log)
    assert [(x["kind"], x["outcome"], x["start"], x["end"]) for x in a] == [
        ("started", "ended", 10, 20), ("resumed", "finished", 30, 45)]
    assert a[1]["host"] == "b" and a[1]["restart"] == 1 and a[1]["rows"] == 190
    assert rate_segments(a[0]) == [(10, 15, 40), (15, 20, 40)]
    a = ev.attempts([_e(1, "started", done=0), _e(2, "failed", error="boom", done=3)])
    assert a[0]["outcome"] == "failed" and a[0]["error"] == "boom"
    # lines before any start line (a log begun mid-attempt) still make an attempt
    assert len(ev.attempts([_e(5, "progress", done=1), _e(6, "finished", done=2)])) == 1


def test_binned_rate_keeps_every_image():
    segs = [(0.0, 10.0, 100), (5.0, 7.0, 50), (12.0, 20.0, 8)]
    edges = np.linspace(0, 20, 41)
    r = binned_rate(segs, edges)
    assert r.sum() * 0.5 == pytest.approx(158)
    assert r[0] == pytest.approx(10) and r[12] == pytest.approx(35)  # 10/s + 25/s where both run
    rates = shard_rates([{"shard": 0, "start": 0, "end": 10, "samples": [(0, 0), (10, 100)], "done0": 0,
                          "host": "h"},
                         {"shard": 0, "start": 20, "end": 30, "samples": [(20, 100), (30, 150)], "done0": 100,
                          "host": "g"}])
    assert rates[0]["images"] == 150 and rates[0]["seconds"] == 20 and rates[0]["rate"] == 7.5


def test_event_log_is_bounded(tmp_path, monkeypatch):
    assert ev.progress_interval_s(0) == ev.PROGRESS_S
    assert ev.progress_interval_s(ev.PROGRESS_STEP) == 2 * ev.PROGRESS_S
    monkeypatch.setattr(ev, "PROGRESS_S", 0.0)
    log = ev.EventLog(tmp_path / "x.jsonl", {"host": "h", "pid": 1, "job_id": None})
    log.write("started", done=0)
    for i in range(ev.MAX_LINES + 500):
        log.progress(done=i)
    log.write("finished", done=1)
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert len(lines) == ev.MAX_LINES + 1, len(lines)  # progress stops at the cap, the end line is kept
    assert json.loads(lines[-1])["event"] == "finished" and "job_id" not in json.loads(lines[0])
    # a new attempt (process) counts what is there: still bounded
    log2 = ev.EventLog(tmp_path / "x.jsonl", {})
    for i in range(ev.HARD_MAX_LINES):
        log2.write("started")
    assert len((tmp_path / "x.jsonl").read_text().splitlines()) == ev.HARD_MAX_LINES
    # a torn last line (a writer killed mid-write) is skipped
    with open(tmp_path / "x.jsonl", "a") as f:
        f.write('{"t": 1, "ev')
    assert len(ev.read_events(tmp_path / "x.jsonl")) == ev.HARD_MAX_LINES


def test_embedding_parts_and_retry_reasons():
    assert plan_parts(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_parts(8, 4) == [(0, 4), (4, 8)]
    assert plan_parts(0, 4) == [(0, 0)]
    for r in ("file not found (deleted after listing?)", "listed but not found", "permission denied",
              "read error: Input/output error", "read error in /x/a.tar: Input/output error",
              "cannot open /x/a.tar: No such file or directory", "broken symlink (its target does not exist)"):
        assert is_transient(r), r
    for r in ("not an image: looks like a text file", "truncated JPEG (no end-of-image marker after the last scan)",
              "too large: 2x2", "is a directory", "empty file (0 bytes)"):
        assert not is_transient(r), r


def synthetic_events(run_dir, num_shards: int, progress_lines: int = 30, requeue_every: int = 20,
                     fail_every: int = 50):
    """Event logs as 1,000 Slurm tasks would leave them: a progress line every ~10 s, some
    attempts killed and resumed, some failed and rerun."""
    rng = np.random.default_rng(0)
    t0 = time.time() - 7200
    for i in range(num_shards):
        log = ev.EventLog(ev.events_path(run_dir, f"shard-{i:05d}-of-{num_shards:05d}"),
                          {"host": f"node{i % 40:03d}", "pid": 1000 + i, "job_id": f"4242_{i}", "gpu": str(i % 4)})
        start = t0 + (i // 64) * 300 + rng.uniform(0, 30)
        rate = rng.uniform(20, 40) * (0.3 if i % 97 == 5 else 1.0)
        done, t = 0, start
        kinds = ["started"]
        if i % requeue_every == 3:
            kinds.append("resumed")
        if i % fail_every == 7:
            kinds.insert(0, "failed-attempt")
        for k in kinds:
            if k == "failed-attempt":
                log.write("started", t=t, done=0, device="gpu:0")
                log.write("failed", t=t + 40, error="RuntimeError: CUDA error: an illegal memory access")
                t += 120
                continue
            log.write(k, t=t, done=done, device="gpu:0", restart=int(k == "resumed"))
            for _ in range(progress_lines // len(kinds)):
                t += 10
                done += int(rate * 10)
                log.write("progress", t=t, done=done, rows=done, failures=0)
            if k == "started" and len(kinds) > 1 and kinds[-1] == "resumed":
                t += 150  # killed, requeued, waited
        log.write("finished", t=t + 2, done=done, rows=done, failures=0)


def test_report_of_1000_shards_is_small(tmp_path, capsys):
    """The weight of a report for a 1,000-shard run (synthetic shards and event logs)."""
    from runner.ui.report import write_report
    from synthetic import make_run

    run = make_run(tmp_path / "big", 100_000, 1000, dim=8, fail_every=997)
    synthetic_events(run, 1000)
    t = time.perf_counter()
    out = write_report(run)
    took = time.perf_counter() - t
    size = out.stat().st_size
    text = out.read_text()
    assert 'id="timeline"' in text and 'id="rate-map"' in text and 'id="shard-rate"' in text
    import re

    assert "synthetic failure" in text and "<script" not in text
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text), "the report must need no network"
    with capsys.disabled():
        print(f"\n1,000-shard report: {size / 1e6:.2f} MB, made in {took:.1f} s")
    assert size < 2_000_000, size
