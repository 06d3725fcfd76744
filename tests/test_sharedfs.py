"""Right on any shared file system (issue 37): duplicate work harmless by construction.

Every attempt at a shard writes its own partial file and commits it by link(), the first commit
standing; the shard's lock only saves work (its holder reads its attempt id back before each
batch and before its commit); a lock probe never makes a free lock look held; verify --content
checks a shard against the checksums recorded at its commit; the fault switch
CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS=1 makes each host's flock private, as Lustre localflock or
NFS local_lock=flock do. Real HDF5 files written by the real ShardWriter, real flock."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading

import h5py
import numpy as np
import pytest

from conftest import wait_until
from runner.errors import ShardLostError
from runner.store.locks import FAULT_NODE_LOCAL_LOCKS, FileLock, LockHeld, lock_holder
from runner.store.rundir import partial_of, partials_of
from runner.results.write import ShardLock, ShardWriter

pytestmark = pytest.mark.unit


def _writer(final, attempt, **kw):
    return ShardWriter(final, {"emb": (3,)}, "float32", {"blobs": '["emb"]'}, "fp1", 4, attempt=attempt, **kw)


def _batch(w, start, n, value=None):
    idx = list(range(start, start + n))
    w.write_batch(n, idx, [b"n%d" % i for i in idx],
                  {"emb": np.full((n, 3), start if value is None else value, np.float32)}, [])


def _shard(final, attempt, n=8, **kw):
    w = _writer(final, attempt, **kw)
    for s in range(0, n, 4):
        _batch(w, s, 4)
    return w


# ---- every attempt its own file, the first commit stands --------------------------------

def test_two_attempts_write_their_own_files_and_the_first_commit_stands(tmp_path):
    final = tmp_path / "s.h5"
    a = _shard(final, "node1.11.aaaa0001")
    b = _shard(final, "node2.22.bbbb0002", resume=False)  # both wrote the whole shard, each its own file
    assert sorted(p.name for p in partials_of(final)) == ["s.h5.partial.node1.11.aaaa0001",
                                                           "s.h5.partial.node2.22.bbbb0002"]
    assert a.finish() == final
    with pytest.raises(ShardLostError, match=r"committed first by attempt node1\.11\.aaaa0001.*"
                                             r"s\.h5\.partial\.node2\.22\.bbbb0002\) is discarded") as e:
        b.finish()
    assert e.value.other.startswith("attempt node1.11.aaaa0001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # the loser's file is gone
    with h5py.File(final, "r") as f:
        assert f.attrs["attempt"] == "node1.11.aaaa0001" and f.attrs["complete"]
        assert f["index"][:].tolist() == list(range(8))


def test_a_commit_after_the_shard_file_exists_never_replaces_it(tmp_path):
    """The link fails on the existing name: an attempt whose file is intact (it started after the
    winner's clean-up) still loses, and the winner's file is untouched."""
    final = tmp_path / "s.h5"
    _shard(final, "node1.11.aaaa0001").finish()
    before = final.read_bytes()
    late = _writer(final, "node2.22.bbbb0002", resume=False)
    for s in range(0, 8, 4):
        _batch(late, s, 4, value=99.0)  # different values: a replaced file would show them
    with pytest.raises(ShardLostError, match=r"committed first by attempt node1\.11\.aaaa0001"):
        late.finish()
    assert final.read_bytes() == before and partials_of(final) == []


def test_without_hard_links_the_commit_renames_unless_the_shard_file_exists(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # what some FUSE and SMB mounts answer
    final = tmp_path / "s.h5"
    assert _shard(final, "node1.11.aaaa0001").finish() == final
    late = _shard(final, "node2.22.bbbb0002", resume=False)
    with pytest.raises(ShardLostError, match="committed first by attempt node1.11.aaaa0001"):
        late.finish()
    with h5py.File(final, "r") as f:
        assert f.attrs["attempt"] == "node1.11.aaaa0001"


def test_a_file_of_another_config_at_the_final_name_is_replaced_at_the_commit(tmp_path):
    final = tmp_path / "s.h5"
    with h5py.File(final, "w") as f:
        f.attrs.update(complete=True, fingerprint="another run")
    w = _shard(final, "node1.11.aaaa0001")
    assert w.finish() == final
    with h5py.File(final, "r") as f:
        assert f.attrs["fingerprint"] == "fp1" and f.attrs["attempt"] == "node1.11.aaaa0001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def _dead_here(token: str) -> str:
    """An attempt id of this host whose process is gone (no pid is above pid_max, 2**22)."""
    from runner.store.locks import attempt_host

    return f"{attempt_host()}.{2 ** 22 + 12345}.{token}"


def test_an_attempt_resumes_from_a_dead_attempts_file_into_its_own(tmp_path):
    final = tmp_path / "s.h5"
    a = _writer(final, _dead_here("aaaa0001"))
    _batch(a, 0, 4)
    a.close()  # killed
    b = _writer(final, "node2.22.bbbb0002")
    assert (b.next, b.rows) == (4, 4)
    # the committed rows are in b's own file; a's is gone (its process on this host is gone)
    assert partials_of(final) == [b.partial]
    _batch(b, 4, 4)
    b.finish()
    with h5py.File(final, "r") as f:
        assert f["index"][:].tolist() == list(range(8)) and f.attrs["resumed"] == 1
        assert f.attrs["attempt"] == "node2.22.bbbb0002"


def test_another_hosts_file_is_resumed_from_but_left_until_the_commit(tmp_path):
    """Its attempt may still be writing it (a lock that did not exclude it): removing it could
    make both attempts lose. The file that commits the shard removes every other attempt's."""
    final = tmp_path / "s.h5"
    a = _writer(final, "node1.11.aaaa0001")
    _batch(a, 0, 4)
    b = _writer(final, "node2.22.bbbb0002")
    assert (b.next, b.rows) == (4, 4)
    assert partials_of(final) == [a.partial, b.partial]
    _batch(b, 4, 4)
    b.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]
    with pytest.raises(ShardLostError, match="committed first by attempt node2.22.bbbb0002"):
        _batch(a, 4, 4)
        a.finish()


def test_the_most_advanced_partial_is_resumed_and_the_legacy_name_still_counts(tmp_path):
    final = tmp_path / "s.h5"
    old = _writer(final, None)
    old.close()
    os.replace(old.partial, partial_of(final))  # a run interrupted before attempts had their own files
    w = _writer(final, _dead_here("aaaa0001"))
    _batch(w, 0, 4)
    _batch(w, 4, 4)
    w.close()
    w = _writer(final, "node3.33.cccc0003")
    assert w.next == 8
    assert partials_of(final) == [w.partial]  # both were over: removed
    w.close()


def test_a_file_that_changes_while_it_is_copied_is_left_and_the_shard_starts_over(tmp_path, monkeypatch):
    """Another host's attempt still writing its file: the copy is tried twice, then given up;
    the fresh file's checksums hold none of the copied rows (seen on the dev cluster: a shard
    whose recorded checksums counted a given-up copy's rows)."""
    import itertools

    import runner.results.write as write
    from runner.results.write import content_digests

    final = tmp_path / "s.h5"
    a = _writer(final, "node1.11.aaaa0001")
    _batch(a, 0, 4)
    a.close()
    ticks = itertools.count()
    monkeypatch.setattr(write, "_stat_key", lambda path: next(ticks))  # a new size/mtime at every look
    b = _writer(final, "node2.22.bbbb0002")
    assert (b.next, b.rows) == (0, 0)
    assert partials_of(final) == [a.partial, b.partial]  # a's left alone
    for s in range(0, 8, 4):
        _batch(b, s, 4, value=1.0)
    b.finish()
    with h5py.File(final, "r") as f:
        want = json.loads(f.attrs["content_sha256"])
        assert content_digests(f, sorted(want)) == want


# ---- the lock saves work; the holder line decides who goes on ----------------------------

def test_an_attempt_whose_lock_file_names_another_stops_before_its_next_batch(tmp_path):
    final, lock = tmp_path / "s.h5", tmp_path / "s.lock"
    with ShardLock(lock, "node1.11.aaaa0001") as mine:
        w = _writer(final, mine.attempt, guard=mine.check)
        _batch(w, 0, 4)
        # another node took the shard: its flock excluded nothing, its holder line replaced ours
        lock.write_text("shard task pid 22 on node2 since 2026-12-07 20:00:00 attempt node2.22.bbbb0002\n")
        with pytest.raises(ShardLostError, match=r"taken by another attempt.*on node2.*attempt node2\.22\.bbbb0002"):
            _batch(w, 4, 4)
        w.discard()
    assert not final.exists() and partials_of(final) == []


def test_an_attempt_checks_its_holder_line_before_the_commit(tmp_path):
    final, lock = tmp_path / "s.h5", tmp_path / "s.lock"
    with ShardLock(lock, "node1.11.aaaa0001") as mine:
        w = _shard(final, mine.attempt, guard=mine.check)
        lock.write_text("shard task pid 22 on node2 since 2026-12-07 20:00:00 attempt node2.22.bbbb0002\n")
        with pytest.raises(ShardLostError, match="node2"):
            w.finish()
    assert not final.exists()


def test_an_attempt_that_opens_its_file_late_never_removes_the_newer_attempts_file(tmp_path, monkeypatch):
    """Seen on the dev cluster: node1 takes the lock, loads the net slowly; node2 takes the shard
    (its line now in the lock file) and opens its file; node1 then opens its own, resuming from
    node2's. Had node1 removed node2's file, node1 would stop at its first batch (node2's line)
    and node2 would find its file gone at the commit: a shard left to nobody."""
    monkeypatch.setenv(FAULT_NODE_LOCAL_LOCKS, "1")
    final, lock = tmp_path / "s.h5", tmp_path / "s.lock"
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    first = ShardLock(lock, "node1.11.aaaa0001").__enter__()
    monkeypatch.setattr(socket, "gethostname", lambda: "node2")
    second = ShardLock(lock, "node2.22.bbbb0002").__enter__()
    try:
        b = _writer(final, second.attempt, guard=second.check)
        monkeypatch.setattr(socket, "gethostname", lambda: "node1")  # node1 opens its file now
        a = _writer(final, first.attempt, guard=first.check)
        with pytest.raises(ShardLostError, match="node2.22.bbbb0002"):
            _batch(a, 0, 4)
        a.discard()
        for s in range(0, 8, 4):
            _batch(b, s, 4)
        assert b.finish() == final
    finally:
        second.lock.release()
        first.lock.release()
    with h5py.File(final, "r") as f:
        assert f.attrs["attempt"] == "node2.22.bbbb0002" and f["index"][:].tolist() == list(range(8))


# ---- the node-local fault switch ----------------------------------------------------------

@pytest.mark.parametrize("node_local", [False, True])
def test_the_fault_switch_makes_each_hosts_flock_private(tmp_path, monkeypatch, node_local):
    if node_local:
        monkeypatch.setenv(FAULT_NODE_LOCAL_LOCKS, "1")
    else:
        monkeypatch.delenv(FAULT_NODE_LOCAL_LOCKS, raising=False)
    path = tmp_path / "s.lock"
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    first = FileLock(path, "shard task", attempt="node1.1.aaaa0001").acquire()
    try:
        assert "attempt node1.1.aaaa0001" in lock_holder(path)  # on its own node it is held
        monkeypatch.setattr(socket, "gethostname", lambda: "node2")
        if not node_local:
            assert lock_holder(path)
            with pytest.raises(LockHeld):
                FileLock(path, "shard task").acquire()
            return
        assert lock_holder(path) is None  # node2 sees no lock ...
        second = FileLock(path, "shard task", attempt="node2.2.bbbb0002").acquire()  # ... and takes it
        try:
            # the holder line is shared, as a lock file on Lustre is: node1's attempt learns it lost
            assert "node2.2.bbbb0002" in first.still_held()
            assert second.still_held() is None
        finally:
            second.release()
    finally:
        first.release()


# ---- a probe never makes a free lock look held ---------------------------------------------

def test_a_lock_probe_in_progress_does_not_make_a_free_lock_look_held(tmp_path, monkeypatch):
    """A probe (lock_holder) holds a shared flock for an instant; a taker arriving in that instant
    must not read the lock as held. The probe is frozen mid-probe here (the test holds its shared
    lock) until the taker has seen it (gate lock-probed)."""
    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv("CAFFE_RUNNER_TEST_GATES", str(gates))
    (gates / "lock-probed.hold").touch()
    path = tmp_path / "s.lock"
    path.touch()
    probe = os.open(path, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what lock_holder does, caught in the act
    out = {}

    def take():
        try:
            out["lock"] = FileLock(path, "shard task").acquire()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=take)
    t.start()
    try:
        wait_until(lambda: (gates / "lock-probed.reached").exists() or not t.is_alive(), what="the taker meets the probe")
        assert "error" not in out, f"a probe made a free lock look held: {out.get('error')}"
    finally:
        fcntl.flock(probe, fcntl.LOCK_UN)  # the probe ends
        os.close(probe)
        (gates / "lock-probed.hold").unlink()
        t.join(30)
    assert "lock" in out, out
    assert lock_holder(path) is not None
    out["lock"].release()


def test_a_taker_still_reads_a_real_holder_as_held(tmp_path):
    path = tmp_path / "s.lock"
    with FileLock(path, "shard task", attempt="node1.1.aaaa0001"):
        with pytest.raises(LockHeld, match="attempt node1.1.aaaa0001"):
            FileLock(path, "shard task").acquire()


# ---- verify --content ----------------------------------------------------------------------

def test_verify_content_finds_a_changed_value_that_the_plain_verify_passes(tmp_path):
    from synthetic import make_run, shard_file
    from runner.results.verify import verify

    run = make_run(tmp_path / "run", 40, 4, dim=3, fail_every=7)
    notes = []
    assert verify(run, notes, content=True) == [] and not notes
    with h5py.File(shard_file(run, 2, 4), "r+") as f:
        f["features/emb"][3, 1] += 1.0  # one value, the names and counts as they were
    assert verify(run) == []
    problems = verify(run, content=True)
    assert len(problems) == 1 and problems[0].startswith("shard 2: shard-00002-of-00004.h5 differs from the "
                                                         "checksums recorded when it was committed (features/emb)")
    with h5py.File(shard_file(run, 1, 4), "r+") as f:
        del f.attrs["content_sha256"]  # a shard written before checksums were recorded
    notes = []
    verify(run, notes, content=True)
    assert any("1 shard(s) (e.g. 1) hold no checksums" in n for n in notes), notes
