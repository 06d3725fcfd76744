"""Crashes and resume: kill -9 of a worker or of the whole run, a requeue race for one shard,
a full disk; and verify's own negative tests. Real processes, real HDF5 files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, assert_same_run, mount_tmpfs, read_features, run_cli, tiny_model_args, wait_until
from test_first_contact import _held

pytestmark = pytest.mark.slow


def _alive(pid) -> bool:
    try:
        return bool(pid) and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:1]
    except FileNotFoundError:
        return False


def _beat(run: Path, shard: int, n: int):
    try:
        return json.loads((run / "status" / f"shard-{shard:05d}-of-{n:05d}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _start(args):
    return subprocess.Popen(CLI + [str(a) for a in args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def reference(tiny_net, photos, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "run"
    gate = ref.parent / "gate"
    gate.write_text("open")
    run_cli(f"input.dir={photos}", f"output.dir={ref}", "num_shards=2", "launcher.workers=2", *_held(tiny_net, gate))
    return read_features(ref / "features.h5")


def test_kill9_one_worker_then_rerun_resumes(tiny_net, photos, tmp_path, reference):
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text("2")  # both shards hold after two batches (4 of 10 images)
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=2", *_held(tiny_net, gate)]
    proc = _start(args)
    wait_until(lambda: _beat(run, 0, 2).get("done", 0) == 4 or proc.poll() is not None, what="shard 0 held")
    assert proc.poll() is None, proc.communicate()
    victim = int(_beat(run, 0, 2)["pid"])
    os.kill(victim, signal.SIGKILL)
    gate.write_text("open")  # shard 1 goes on
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"shard 0 of 2: its worker (pid {victim}) was killed by SIGKILL" in err and "rerun the same command" in err
    # the run stopped at the death: the other shard keeps what it flushed (tests/test_deaths.py)
    assert not (run / "shards" / "shard-00000-of-00002.h5").exists()
    run_cli(*args)
    with h5py.File(run / "shards" / "shard-00000-of-00002.h5", "r") as f:
        assert int(f.attrs["resumed"]) == 1
    assert_same_run(run, reference)


@pytest.mark.parametrize("batches", [0, 2, 4])
def test_kill9_whole_run_at_several_points(tiny_net, photos, tmp_path, reference, batches):
    """Killed before any batch, mid-shard and one batch before the end (the gate holds it there)."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text(str(batches))
    args = [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=2", *_held(tiny_net, gate)]
    proc = _start(args)
    wait_until(lambda: [_beat(run, i, 2).get("done", -1) for i in range(2)] == [2 * batches] * 2
               or proc.poll() is not None, what=f"both shards held after {batches} batch(es)")
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # the workers die with their launcher (they watch it): nothing is left writing
    pids = [_beat(run, i, 2).get("pid") for i in range(2)]
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=30, what="the workers to die with the launcher")
    assert not (run / "features.h5").exists()
    gate.write_text("open")
    run_cli(*args)
    assert_same_run(run, reference)


# A writer that appends batches of rows, failures and variable-length names in a tight loop and
# prints how far it got: a kill lands between two flushes, or inside one, as a real one does.
_WRITER = r"""
import sys
import numpy as np
from runner.results.write import ShardWriter
path, total = sys.argv[1], int(sys.argv[2])
w = ShardWriter(path, {"emb": (64,)}, "float32", {"blobs": '["emb"]'}, "fp", 4)
i = w.next
while i < total:
    n = min(4, total - i)
    good = [k for k in range(i, i + n) if k % 7 != 3]
    fails = [(k, b"bad/%d.jpg" % k, "corrupt image %d" % k) for k in range(i, i + n) if k % 7 == 3]
    feats = np.stack([np.full(64, k, np.float32) for k in good]) if good else np.zeros((0, 64), np.float32)
    w.write_batch(n, good, [b"dir/img_%06d.jpg" % k for k in good], {"emb": feats}, fails)
    i += n
    print(i, flush=True)
w.finish()
"""


def test_writer_killed_at_random_moments_resumes_to_the_exact_file(tmp_path):
    """kill -9 (what Pool.terminate after Ctrl-C, scancel and a time limit amount to) at random
    moments of a shard's writing: every rerun resumes, and the finished file is exactly right.
    Writing on into the killed file itself failed here with "bad heap index" on every trial."""
    import random
    import sys

    path, rng = tmp_path / "s.h5", random.Random(7)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def writer(total):
        return [sys.executable, "-c", _WRITER, str(path), str(total)]

    seen, last = [], 0
    for _ in range(6):
        # an endless shard, so a kill always lands while writing, however fast the machine
        p = subprocess.Popen(writer(10**9), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = int(p.stdout.readline() or 0)  # writing (a resumed writer has copied its rows)
        for _ in range(rng.randint(0, 30)):  # a random number of batches on (counted, not timed: a
            p.stdout.readline()              # slow machine gets as far), then wherever it is now
        p.kill()
        out, err = p.communicate()
        assert p.returncode == -signal.SIGKILL, err
        assert "Traceback" not in err and "starting the shard over" not in err, err
        seen.append(first)
        last = max([last, first, *map(int, out.split())])
    assert seen == sorted(seen) and seen[-1] > 4, f"each rerun resumed where the last stopped: {seen}"
    total = last + 400  # past anything a killed run can have committed (at most a batch after its last line)
    p = subprocess.run(writer(total), capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    with h5py.File(path, "r") as f:
        index, fails = f["index"][:], f["failures/index"][:]
        assert index.tolist() == [k for k in range(total) if k % 7 != 3]
        assert fails.tolist() == [k for k in range(total) if k % 7 == 3]
        np.testing.assert_array_equal(f["features/emb"][:], np.repeat(index[:, None], 64, 1).astype(np.float32))
        assert [bytes(n) for n in f["names_raw"][:]] == [b"dir/img_%06d.jpg" % k for k in index]
        assert [r.decode() for r in f["failures/reason"][:]] == [f"corrupt image {k}" for k in fails]
        assert f.attrs["complete"] and int(f.attrs["resumed"]) == 6


def test_second_process_on_a_held_shard_stops(tiny_net, photos, tmp_path):
    from runner.results.write import ShardLock

    run = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=1",
            *tiny_model_args(tiny_net), "output.merge=false")
    (run / "shards" / "shard-00001-of-00002.h5").unlink()
    with ShardLock(run / "shards" / "shard-00001-of-00002.lock"):
        p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=1",
                    *tiny_model_args(tiny_net), check=False)
    assert p.returncode != 0
    assert "is being written by" in p.stdout + p.stderr and f"pid {os.getpid()}" in p.stdout + p.stderr
    assert not (run / "shards" / "shard-00001-of-00002.h5").exists()
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=1", *tiny_model_args(tiny_net))
    assert run_cli("verify", run).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    umount = mount_tmpfs(tmp_path / "small", "size=3m")
    yield tmp_path / "small"
    umount()


def test_resume_without_room_for_the_copy_keeps_the_partial(small_disk):
    """A resume copies the committed rows into a fresh file beside the partial: when that copy
    does not fit, the partial is kept as it was (it is sound) and the error says to free space."""
    from runner.errors import RunnerError
    from runner.results.write import ShardWriter

    def writer():
        return ShardWriter(small_disk / "s.h5", {"emb": (64,)}, "float32", {"blobs": '["emb"]'}, "fp", 64)

    w = writer()
    for start in range(0, 3000, 64):
        idx = list(range(start, min(start + 64, 3000)))
        w.write_batch(len(idx), idx, [b"img%d" % i for i in idx], {"emb": np.full((len(idx), 64), 1.0, np.float32)}, [])
    w.close()  # killed: never finished
    partial = w.partial
    kept = partial.read_bytes()
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave ~100 KB: less than the copy needs
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        f.write(b"\0" * (free - 100_000))
    with pytest.raises(RunnerError, match=r"cannot resume shard file .*needs up to 1\.\d MB \(only 0\.1 MB free\): free space.*"
                                          r"the partial file is kept"):
        writer()
    assert partial.read_bytes() == kept
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", partial.name]
    filler.unlink()
    w = writer()
    assert (w.next, w.rows) == (3000, 3000)
    w.close()


def test_full_disk_stops_the_shard_with_a_clear_error(tiny_net, photos, small_disk, tmp_path):
    run = small_disk / "run"
    # stage1/conv is 8x15x19 floats = 9 KB a row: 3 MB fills up within a few hundred rows
    big = tmp_path / "many"
    big.mkdir()
    src = sorted(photos.glob("*.jpg"))
    for i in range(400):
        os.link(src[i % len(src)], big / f"{i:04d}.jpg")
    p = run_cli(f"input.dir={big}", f"output.dir={run}", "num_shards=2", "launcher.workers=1",
                *tiny_model_args(tiny_net), "output.blobs=[stage1/conv]", check=False)
    assert p.returncode == 1  # a runtime failure (2 is for usage and config errors)
    assert "no space left on device" in p.stderr and "rerun the same command" in p.stderr
    assert "Traceback" not in p.stderr, p.stderr  # h5py's failed flushes when objects are freed
    partials = {x: x.read_bytes() for x in (run / "shards").glob("*.partial*")}
    # a rerun on the still-full disk is refused before any work, naming the fix; nothing is lost
    p = run_cli(f"input.dir={big}", f"output.dir={run}", "num_shards=2", "launcher.workers=1",
                *tiny_model_args(tiny_net), "output.blobs=[stage1/conv]", check=False)
    assert p.returncode == 2 and "no space left on device: free space there, then rerun" in p.stderr, p.stderr
    assert {x: x.read_bytes() for x in (run / "shards").glob("*.partial*")} == partials
    done = list((run / "shards").glob("*.h5"))
    for d in done:  # whatever completed is valid
        with h5py.File(d, "r") as f:
            assert f.attrs["complete"]
    assert not (run / "features.h5").exists()


@pytest.fixture
def finished_run(tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=3", "launcher.workers=2", *tiny_model_args(tiny_net))
    assert run_cli("verify", run).returncode == 0
    return run


def test_verify_finds_a_deleted_shard(finished_run):
    (finished_run / "shards" / "shard-00001-of-00003.h5").unlink()
    p = run_cli("verify", finished_run, check=False)
    assert p.returncode == 1 and "shard 1" in p.stdout and "missing" in p.stdout


def test_verify_finds_a_truncated_shard(finished_run):
    path = finished_run / "shards" / "shard-00002-of-00003.h5"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    p = run_cli("verify", finished_run, check=False)
    assert p.returncode == 1 and "shard 2" in p.stdout


def test_verify_finds_a_doubled_row(finished_run):
    path = finished_run / "shards" / "shard-00000-of-00003.h5"
    with h5py.File(path, "r+") as f:
        for name in ("index", "names", "names_raw", "features/emb"):
            d = f[name]
            d.resize(len(d) + 1, axis=0)
            d[-1] = d[0]
    p = run_cli("verify", finished_run, check=False)
    assert p.returncode == 1 and "more than once" in p.stdout


def test_verify_finds_a_stale_merge(finished_run):
    path = finished_run / "shards" / "shard-00001-of-00003.h5"
    with h5py.File(path, "r+") as f:
        f["features/emb"][0] = f["features/emb"][0] + 1.0  # the merge still shows it: virtual
    with h5py.File(finished_run / "features.h5", "r+") as f:
        del f["index"]
        f["index"] = np.arange(3)
    p = run_cli("verify", finished_run, check=False)
    assert p.returncode == 1 and "features.h5" in p.stdout


def test_merge_by_hand(finished_run):
    merged = finished_run / "features.h5"
    want = h5py.File(merged, "r")["feats"][:]
    merged.unlink()
    p = run_cli("merge", finished_run)
    assert p.stdout.strip() == str(merged)
    with h5py.File(merged, "r") as f:
        np.testing.assert_array_equal(f["feats"][:], want)
    (finished_run / "shards" / "shard-00001-of-00003.h5").unlink()
    p = run_cli("merge", finished_run, check=False)
    assert p.returncode == 1 and "1 of 3 shards are not complete" in p.stderr
