"""No poison shard, end to end on the local launcher (issue 37): one image whose decoding kills its
process (the fault switch CAFFE_RUNNER_FAULT_CRASH_ON: a real SIGSEGV of the worker) stops the run
twice, each time naming the shard and the signal, the second time saying that the rerun isolates
it; the third run completes: that image is a failure whose reason names SIGSEGV, every other image
a row bit-identical to the run where that file is a good photo. A shard whose worker the launcher
stopped (another worker died) is not taken for a poison shard. A list naming /dev/zero, a named
pipe and a file over decode.max_file_mb completes with each a failure with its reason.

Real pycaffe, the tiny net, the sample photos; one BLAS thread per worker in every run. Gates
(runner/faults.py) hold the other shard's worker at its first batch, and the poison shard's
until then, so that the other is in flight when the poison worker dies, whatever the machine's
speed."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, read_features, run_cli, tiny_model_args, wait_until
from runner.engine.decode import FAULT_CRASH_ON
from runner.store.events import read_events

pytestmark = pytest.mark.slow

# 20 photos, 2 shards of 10, batches of 2; rocket.jpg is image 16, in shard 1
SHAPE = ["num_shards=2", "launcher.workers=2", "batch_size=2", "heartbeat_s=0.1", "run.max_failure_fraction=null"]
POISON = "rocket.jpg"
SAFETY_S = 300  # a safety net against a hang, not an assertion


def _args(tiny_net, src, run, extra=()):
    return [f"input.dir={src}", f"output.dir={run}", *SHAPE, *tiny_model_args(tiny_net), *extra]


def _run(args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(CLI + [str(a) for a in args], cwd=REPO, capture_output=True, text=True, env=e,
                          timeout=SAFETY_S)


def _failures(run: Path):
    with h5py.File(run / "features.h5", "r") as f:
        return dict(zip((bytes(n) for n in f["failures/names_raw"][:]), f["failures/reason"].asstr()[:]))


def test_a_poison_image_stops_the_run_twice_then_is_a_failure_naming_the_signal(tiny_net, photos, tmp_path):
    ref_run, run, gates = tmp_path / "ref", tmp_path / "run", tmp_path / "gates"
    run_cli(*_args(tiny_net, photos, ref_run))
    ref_feats, ref_names, _ = read_features(ref_run / "features.h5")

    gates.mkdir()
    hold = gates / "first-batch-0.hold"  # shard 0's worker stays in flight while shard 1's dies
    env = dict(os.environ, **{FAULT_CRASH_ON: POISON, "CAFFE_RUNNER_TEST_GATES": str(gates)})
    for attempt in (1, 2):
        for old in gates.glob("*.reached*"):
            old.unlink()
        hold.touch()
        (gates / "load-1.hold").touch()  # shard 1 waits until shard 0 has begun (its "started" line)
        proc = subprocess.Popen(CLI + [str(a) for a in _args(tiny_net, photos, run)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: (gates / "first-batch-0.reached").exists() or proc.poll() is not None,
                       timeout=SAFETY_S, what="shard 0 at its first batch")
            (gates / "load-1.hold").unlink()
            _, err = proc.communicate(timeout=SAFETY_S)
        finally:
            if proc.poll() is None:
                proc.kill()
        p = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
        assert p.returncode == 1, p.stderr[-3000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("caffe-runner: error: shard 1 of 2: its worker (pid ") and \
            "was killed by SIGSEGV" in last, p.stderr[-3000:]
        isolates = "shard 1 has died 2 times or more: the rerun decodes its images one by one" in last
        assert isolates == (attempt == 2), last
        assert hold.exists()  # the run ended while shard 0 was held: its worker was stopped
    events0 = read_events(run / "events" / "shard-00000-of-00002.jsonl")
    assert [e["event"] for e in events0].count("stopped") == 2
    hold.unlink()

    p = _run(_args(tiny_net, photos, run), env)
    assert p.returncode == 0, p.stderr[-3000:]
    fails = _failures(run)
    assert list(fails) == [POISON.encode()]
    assert fails[POISON.encode()].startswith("crashed the decoder: its process was killed by SIGSEGV"), fails
    feats, names, index = read_features(run / "features.h5")
    keep = [k for k, n in enumerate(ref_names) if n != POISON.encode()]
    assert names == [ref_names[k] for k in keep]
    np.testing.assert_array_equal(feats, ref_feats[keep])  # bit for bit: same engine, same threads
    started = [e for n in (0, 1) for e in read_events(run / "events" / f"shard-0000{n}-of-00002.jsonl")
               if e["event"] in ("started", "resumed")]
    assert [e["isolated"] for e in started if "isolated" in e] == [2]  # shard 1's third attempt only
    assert run_cli("verify", "--content", run).returncode == 0


def test_dev_zero_a_fifo_and_a_big_file_in_a_list_are_failures_with_their_reasons(tiny_net, photos, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + os.urandom(3 << 20))  # 3 MB: over decode.max_file_mb=2
    good = sorted(str(p) for p in photos.rglob("*.jpg"))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(good[:4] + ["/dev/zero", str(fifo), str(big)] + good[4:8]) + "\n")
    run = tmp_path / "run"
    p = _run([f"input.list={lst}", f"output.dir={run}", "num_shards=1", "launcher.workers=1", "batch_size=2",
              "decode.max_file_mb=2", "run.max_failure_fraction=null", *tiny_model_args(tiny_net)])
    assert p.returncode == 0, p.stderr[-3000:]
    fails = _failures(run)
    assert fails[b"/dev/zero"] == "not a regular file: a character device"
    # names under the list file's folder are kept relative to it
    assert fails[b"pipe.jpg"] == "not a regular file: a named pipe (FIFO)"
    assert fails[b"big.jpg"].startswith(f"too large: {big.stat().st_size} bytes > decode.max_file_mb=2 ")
    assert len(fails) == 3 and len(read_features(run / "features.h5")[1]) == 8
