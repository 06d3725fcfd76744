"""Durable files and locks (issue 27): one atomic-write protocol (unique temporary name, fsync
the file, rename, fsync the folder) behind every file the run trusts, one flock helper that
names its holder, a file system without flock refused in one line, and a single-writer merge
(two real processes). No pycaffe, no cluster: runs are synthetic (tests/synthetic.py)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import CLI, REPO, run_cli, wait_until
from runner.ui import cli
from runner.store.atomic import atomic_path, atomic_write_text, is_temp_of
from runner.errors import ConfigError
from runner.store.locks import FileLock, LockHeld, NoFlockError, lock_holder, probe_flock
from runner.run.plan import load_run_dir
from runner.store.rundir import MERGE_LOCK, RunDir
from synthetic import BLOB, make_run

pytestmark = pytest.mark.unit


def _temps(folder, name):
    return [e for e in os.listdir(folder) if is_temp_of(e, name) or e == name + ".tmp"]


class _FsyncSpy:
    """Records what each os.fsync call flushed, as (device, inode, is a folder). Counting the
    calls is the one property a test can see of an fsync: no crash is simulated here."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = os.fsync

        def spy(fd):
            st = os.fstat(fd)
            self.seen.append((st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)))
            return real(fd)

        monkeypatch.setattr(os, "fsync", spy)

    def synced(self, path) -> bool:
        st = os.stat(path)
        return (st.st_dev, st.st_ino, stat.S_ISDIR(st.st_mode)) in self.seen


# ---- every durable file: its content and its folder are fsync'd ---------------------------

def _plan(tmp_path):
    RunDir(tmp_path / "r").write_plan({"fingerprint": "x"})
    return tmp_path / "r" / "run.json"


def _shard(tmp_path):
    run = make_run(tmp_path / "run", 10, 1, dim=2)  # the shard file is written by the real ShardWriter
    return run / "shards" / "shard-00000-of-00001.h5"


def _merged(tmp_path):
    from runner.results.merge import merge_run

    return merge_run(load_run_dir(make_run(tmp_path / "run", 10, 2, dim=2)))


def _stats(tmp_path):
    from runner.store.stats import write_stats

    run = load_run_dir(make_run(tmp_path / "run", 10, 2, dim=2))
    write_stats(run)
    return run.rundir.path / "stats.json"


def _submissions(tmp_path):
    from runner.launch.slurm import _record_submissions

    _record_submissions(tmp_path, [{"array_job_id": "7", "tasks": []}], "8")
    return tmp_path / "submissions.json"


def _manifest(tmp_path):
    from runner.store.manifest import write_manifest

    write_manifest(tmp_path / "run", b"/in", [b"a.jpg", b"b.jpg"], "synthetic")
    return tmp_path / "run" / "manifest" / "meta.json"


@pytest.mark.parametrize("make", [_plan, _shard, _merged, _stats, _submissions, _manifest],
                         ids=["run.json", "shard", "features.h5", "stats.json", "submissions.json", "manifest"])
def test_each_durable_file_is_fsyncd_and_then_its_folder(make, tmp_path, monkeypatch):
    spy = _FsyncSpy(monkeypatch)
    path = make(tmp_path)
    assert spy.synced(path), f"{path.name}: its content was not fsync'd before the rename"
    assert spy.synced(path.parent), f"{path.name}: its folder was not fsync'd after the rename"
    assert not _temps(path.parent, path.name)


def test_a_heartbeat_is_renamed_into_place_but_not_fsyncd(tmp_path, monkeypatch):
    """Heartbeats come every 2 s from every task: a lost one is harmless (rundir.write_heartbeat)."""
    spy = _FsyncSpy(monkeypatch)
    rd = RunDir(tmp_path)
    rd.write_heartbeat(0, 1, {"state": "running"})
    assert rd.read_heartbeat(0, 1)["state"] == "running" and spy.seen == []
    assert not _temps(rd.status_dir, rd.heartbeat_path(0, 1).name)


# ---- a failed write leaves the old file and no temporary ----------------------------------

def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    atomic_write_text(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]
    monkeypatch.undo()
    for kind in ("file", "folder"):
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "out") as tmp:
                tmp.mkdir() if kind == "folder" else tmp.write_text("half")
                (tmp / "x").write_text("half") if kind == "folder" else None
                raise RuntimeError("the writer failed")
        assert sorted(os.listdir(tmp_path)) == ["run.json"], kind


def test_a_merge_that_fails_midway_keeps_the_old_features_and_leaves_no_temporary(tmp_path, monkeypatch):
    from runner.results import merge

    run = load_run_dir(make_run(tmp_path / "run", 40, 4, dim=2))
    merge.merge_run(run)
    before = run.rundir.merged.read_bytes()

    def disk_full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge, "_copy", disk_full)
    with pytest.raises(OSError):
        merge.merge_run(run)
    assert run.rundir.merged.read_bytes() == before
    assert not _temps(run.rundir.path, "features.h5")


def test_a_merge_removes_the_temporary_a_killed_merge_left(tmp_path):
    from runner.store.atomic import temp_name
    from runner.results.merge import merge_run

    run = load_run_dir(make_run(tmp_path / "run", 20, 2, dim=2))
    left = temp_name(run.rundir.merged)
    left.write_bytes(b"half a file from a merge killed with -9")
    merge_run(run)
    assert not left.exists() and not _temps(run.rundir.path, "features.h5")


# ---- the lock helper: flock plus the holder's name ----------------------------------------

def test_a_held_lock_names_its_holder_and_a_released_one_nobody(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path, "caffe-runner merge"):
        with pytest.raises(LockHeld) as e:
            FileLock(path, "another").acquire()  # flock: a second open file conflicts, even in one process
        want = f"caffe-runner merge pid {os.getpid()} on {socket.gethostname()} since "
        assert e.value.holder.startswith(want) and lock_holder(path).startswith(want)
    assert lock_holder(path) is None and path.read_text() == ""
    assert lock_holder(tmp_path / "no-such.lock") is None


def test_a_lock_whose_holder_was_killed_is_free(tmp_path):
    """The kernel drops a dead holder's flock: kill -9 never blocks the next taker."""
    path = tmp_path / "x.lock"
    code = ("import sys; from runner.store.locks import FileLock; FileLock(sys.argv[1], 'holder').acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert lock_holder(path).startswith(f"holder pid {p.pid} ")
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
    with FileLock(path, "next"):
        assert lock_holder(path).startswith("next pid ")


# ---- a file system without flock: refused at plan time in one line -------------------------

def _no_flock(monkeypatch, code):
    """No file system here lacks flock, so the failing call is simulated at the edge: fcntl.flock
    raises what Lustre's noflock (ENOSYS), some FUSE (EOPNOTSUPP) or NFS without a lock manager
    (ENOLCK) give."""
    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK])
def test_the_plan_probe_names_the_file_system_without_flock(tmp_path, monkeypatch, code):
    from runner.run.plan import _check_writable

    _no_flock(monkeypatch, code)
    with pytest.raises(NoFlockError) as e:
        probe_flock(tmp_path / "run")
    assert isinstance(e.value, ConfigError) and errno.errorcode[code] in str(e.value)
    with pytest.raises(NoFlockError, match="without working flock"):
        _check_writable(tmp_path / "run")
    assert os.listdir(tmp_path / "run") == []  # the probe file is gone


def test_a_run_on_a_file_system_without_flock_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    """Simulated (see _no_flock): Lustre mounted with noflock."""
    _no_flock(monkeypatch, errno.ENOSYS)
    run = tmp_path / "run"
    code = cli.run([f"input.dir={tmp_path}", f"output.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "without working flock (ENOSYS" in err and "choose an output.dir" in err.lower()
    assert not (run / "run.json").exists()


def test_merge_and_status_on_a_file_system_without_flock(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run", 20, 2, dim=2)
    _no_flock(monkeypatch, errno.ENOSYS)
    assert cli.run(["merge", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "without working flock" in err and not (run / "features.h5").exists()
    assert cli.run(["status", str(run)]) == 0  # a reader needs no lock: status still answers


# ---- merging is single-writer ---------------------------------------------------------------

def test_a_second_merge_is_refused_naming_the_first_which_then_completes(tmp_path):
    """Two real `caffe-runner merge` processes: the first is held, after it took the merge lock,
    at the point merge-locked (runner/faults.py), after it took the merge lock; the second is refused with
    the first's host and pid, exit 2, and changes nothing; then the first completes and verify
    is OK."""
    run = make_run(tmp_path / "run", 60, 3, dim=4, fail_every=7)
    gates = tmp_path / "gates"
    gates.mkdir()
    hold = gates / "merge-locked.hold"
    hold.touch()
    env = dict(os.environ, CAFFE_RUNNER_TEST_GATES=str(gates))
    first = subprocess.Popen(CLI + ["merge", str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: lock_holder(run / MERGE_LOCK) is not None or first.poll() is not None,
                   what="the first merge to take the merge lock")
        assert first.poll() is None, first.communicate()
        second = run_cli("merge", run, check=False)
        assert second.returncode == 2, second.stdout + second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"is being merged by caffe-runner merge pid {first.pid} on {socket.gethostname()}" in err, err
        assert not (run / "features.h5").exists() and not _temps(run, "features.h5")
        hold.unlink()
        out, errs = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, errs
    assert out.strip() == str(run / "features.h5")
    assert lock_holder(run / MERGE_LOCK) is None and not _temps(run, "features.h5")
    v = run_cli("verify", run, check=False)
    assert v.returncode == 0 and v.stdout.startswith("OK:"), v.stdout + v.stderr
    import h5py

    with h5py.File(run / "features.h5", "r") as f:
        idx = f["index"][:]
        np.testing.assert_array_equal(f[f"features/{BLOB}"][:, 0], idx.astype(np.float32))
        assert list(f.attrs["blobs"]) == [BLOB]


def test_a_listing_killed_mid_write_is_not_taken_for_someones_data(tmp_path):
    """kill -9 while the manifest is written leaves its temporary folder in a new output.dir:
    the rerun must not refuse the folder as foreign, and the listing removes the leftover."""
    from runner.store.atomic import temp_name
    from runner.launch import check_run_dir
    from runner.store.manifest import write_manifest

    run = tmp_path / "run"
    left = temp_name(run / "manifest")
    left.mkdir(parents=True)
    (left / "paths.bin").write_bytes(b"half")
    check_run_dir(run)  # no ConfigError: nothing in it is someone's data
    (run / "photos.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds no run \(photos.txt\)"):
        check_run_dir(run)
    (run / "photos.txt").unlink()
    write_manifest(run, b"/in", [b"a.jpg"], "synthetic")
    assert sorted(os.listdir(run)) == ["manifest"]


@pytest.mark.unit
def test_verify_names_a_shard_or_merged_file_that_is_not_hdf5_and_the_fix(tmp_path):
    """A shard file or features.h5 that HDF5 cannot open (overwritten, truncated to garbage) is one
    problem each, naming the file and what to do, not a traceback."""
    from runner.results.verify import verify
    from synthetic import shard_file

    run = make_run(tmp_path / "run", 12, 2, dim=4)
    shard_file(run, 1, 2).write_bytes(b"not an HDF5 file")
    problems = verify(run)
    assert any(p.startswith("shard 1: shard-00001-of-00002.h5 cannot be opened (") and
               p.endswith("): delete it and rerun the extraction") for p in problems), problems
    run = make_run(tmp_path / "run2", 12, 2, dim=4)
    merged = run / "features.h5"
    if merged.exists():
        merged.unlink()
    merged.write_bytes(b"not an HDF5 file either")
    problems = verify(run)
    assert any(p.startswith("features.h5 cannot be opened (") and "run `caffe-runner merge " in p
               for p in problems), problems
