"""Issue 29, items 1-15 ("what a new user trips over"), checked in-process on the functions that
make the decision (the fast layer: no pycaffe, no cluster). The end-to-end halves are in
test_third_contact_e2e.py."""
from __future__ import annotations

import os

import pytest

from conftest import input_conf, placeholder_images
from runner.errors import ConfigError

pytestmark = pytest.mark.unit


# ---- item 1: a run directory inside its own input is left out of it ----------------------

@pytest.mark.parametrize("marker", ["launch.lock", "run.json", "sweep.json"])
def test_a_run_or_sweep_folder_inside_the_input_is_left_out_and_counted(tmp_path, marker):
    from runner.inputs.listing import KIND_RUN_FOLDER, describe, walk_images

    placeholder_images(tmp_path / "in", ["a.jpg", "sub/b.jpg"])
    run = tmp_path / "in" / "run"
    placeholder_images(run / "shards", ["x.jpg"])  # an image-looking file inside: still not input
    (run / marker).write_text("")
    listing = walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert listing.names == [b"a.jpg", b"sub/b.jpg"]
    assert listing.by_kind == {KIND_RUN_FOLDER: 1}
    assert "1 caffe-runner run or sweep folder (output.dir is never part of the input)" in describe(listing.record())


def test_the_input_stamp_ignores_what_a_run_inside_it_writes(tmp_path):
    import time

    from runner.inputs import input_stamp

    placeholder_images(tmp_path / "in", ["a.jpg", "b.jpg"])
    run = tmp_path / "in" / "run"
    run.mkdir()
    (run / "launch.lock").write_text("")
    ic = input_conf(dir=str(tmp_path / "in"))
    before = input_stamp(ic)
    time.sleep(0.01)  # mtimes must be able to differ (ns clocks): a write below must not count
    (run / "shards").mkdir()
    (run / "shards" / "shard-00000-of-00001.h5").write_bytes(b"x")
    (run / "status").mkdir()
    assert input_stamp(ic) == before


def test_a_run_made_inside_the_input_later_does_not_change_another_runs_stamp(tmp_path):
    """docs/run-directory.md: `output.dir` inside `input.dir` works. Creating that run folder changes the input
    folder's own mtime; a run listed before (its output elsewhere) must not take that for a
    changed input (its rerun was refused and `verify` failed), while a renamed image still counts."""
    import time

    from runner.run.changes import stamp_changed
    from runner.inputs import input_stamp

    placeholder_images(tmp_path / "in", ["a.jpg", "sub/b.jpg"])
    ic = input_conf(dir=str(tmp_path / "in"))
    before = input_stamp(ic)
    time.sleep(0.01)  # mtimes must be able to differ (ns clocks)
    for run in (tmp_path / "in" / "out", tmp_path / "in" / "sub" / "out"):
        run.mkdir()
        (run / "launch.lock").write_text("")
    assert not stamp_changed(before, input_stamp(ic))
    os.rename(tmp_path / "in" / "sub" / "b.jpg", tmp_path / "in" / "sub" / "c.jpg")  # same count, same mtimes
    assert stamp_changed(before, input_stamp(ic))


def test_a_stamp_recorded_before_names_were_stamped_still_compares(tmp_path):
    """Runs listed by an earlier version recorded {count, mtime_ns} with folders' mtimes in it."""
    from runner.run.changes import stamp_changed
    from runner.inputs import input_stamp

    placeholder_images(tmp_path / "in", ["a.jpg", "b.jpg"])
    now = input_stamp(input_conf(dir=str(tmp_path / "in")))
    old = {"count": 2, "mtime_ns": now["mtime_ns"] + 5}  # a folder was the newest
    assert not stamp_changed(old, now)
    assert stamp_changed({"count": 3, "mtime_ns": old["mtime_ns"]}, now)
    assert stamp_changed({"count": 2, "mtime_ns": now["mtime_ns"] - 5}, now)  # an image rewritten since


def test_a_symlinked_run_folder_is_left_out_too(tmp_path):
    from runner.inputs.listing import KIND_RUN_FOLDER, walk_images

    placeholder_images(tmp_path / "in", ["a.jpg"])
    placeholder_images(tmp_path / "elsewhere", ["r.jpg"])
    (tmp_path / "elsewhere" / "run.json").write_text("{}")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere")
    listing = walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert listing.names == [b"a.jpg"] and listing.by_kind == {KIND_RUN_FOLDER: 1}


# ---- item 2: a UTF-8 byte-order mark is not part of the first path ------------------------

def test_a_list_with_a_utf8_bom_keeps_its_first_image(tmp_path):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path / "imgs", ["img_0000.jpg", "img_0001.jpg"])
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfimgs/img_0000.jpg\r\nimgs/img_0001.jpg\r\n")
    m = build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt")))
    assert m.read_slice(0, 2) == [b"imgs/img_0000.jpg", b"imgs/img_0001.jpg"]


def test_a_labelled_list_with_a_bom_reads_its_first_label(tmp_path):
    from runner.inputs.files import read_list

    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbfa.jpg 3\nb.jpg 4\n")
    _, names, labels = read_list(os.fsencode(tmp_path / "l.txt"), None)
    assert names == [b"a.jpg", b"b.jpg"] and labels == [3, 4]


def test_a_utf16_list_is_refused_with_the_fix(tmp_path):
    from runner.inputs.files import read_list

    (tmp_path / "l.txt").write_bytes("a.jpg\nb.jpg\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="UTF-16.*save it as UTF-8"):
        read_list(os.fsencode(tmp_path / "l.txt"), None)


# ---- item 3: one file spelled two ways is a duplicate --------------------------------------

@pytest.mark.parametrize("first,second", [("imgs/img_0001.jpg", "imgs/./img_0001.jpg"),
                                          ("imgs/sub/../img_0002.jpg", "imgs/img_0002.jpg"),
                                          ("imgs//img_0001.jpg", "imgs/img_0001.jpg"),
                                          ("imgs/img_0001.jpg", "{root}/imgs/./img_0001.jpg")])
def test_two_spellings_of_one_listed_path_are_refused_naming_both(tmp_path, first, second):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path / "imgs", ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg", "sub/x.jpg"])
    second = second.format(root=tmp_path)
    (tmp_path / "l.txt").write_text(f"imgs/img_0000.jpg\n{first}\n{second}\n")
    with pytest.raises(ConfigError) as e:
        build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt")))
    msg = str(e.value)
    assert "names 1 image(s) more than once" in msg and "line 2" in msg and "line 3" in msg, msg
    assert "the same file" in msg and "spelled differently" in msg, msg


def test_a_symlink_to_a_listed_file_is_its_own_image(tmp_path):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "imgs" / "link.jpg").symlink_to(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "l.txt").write_text("imgs/a.jpg\nimgs/b.jpg\nimgs/link.jpg\n")
    assert build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt"))).count == 3


# ---- item 15: a symlinked folder that cannot be read is counted, with the reason ----------

def test_a_symlinked_folder_whose_stat_fails_is_counted_as_skipped(tmp_path, monkeypatch):
    """The folder is there when the walk meets the link and gone when its turn comes (a
    network mount dropping, a target deleted meanwhile); the stat is made to fail on cue:
    the file system cannot be timed to fail between two calls of one walk."""
    from runner.inputs import listing

    placeholder_images(tmp_path / "in", ["a.jpg"])
    placeholder_images(tmp_path / "target", ["t.jpg"])
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "target")
    real_stat = os.stat

    def stat(path, *a, **kw):
        if os.fsdecode(path).endswith("/linked"):
            raise OSError(5, "Input/output error")
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(listing.os, "stat", stat)
    out = listing.walk_images(os.fsencode(tmp_path / "in"), ["jpg"])
    assert out.names == [b"a.jpg"]
    assert out.by_kind == {f"{listing.KIND_UNREADABLE} (Input/output error)": 1}
    assert out.skipped == 1


# ---- runs made without a net (tests/synthetic.py): status, export, watch, features ------------

def _run(tmp_path, n=20, shards=2, name="run"):
    from synthetic import make_run

    return make_run(tmp_path / name, n, shards, dim=3)


def _merged(run_dir):
    from runner.results.merge import merge_run
    from runner.run.plan import load_run_dir

    return merge_run(load_run_dir(run_dir))


def _hold_shard(run_dir, i, n):
    """Shard i is running now (this test process is its worker): its file gone, its heartbeat live."""
    import socket

    from runner.store.rundir import RunDir
    from synthetic import shard_file

    shard_file(run_dir, i, n).unlink()
    RunDir(run_dir).write_heartbeat(i, n, {"state": "running", "shard": i, "done": 3, "total": 10, "rows": 3,
                                           "failures": 0, "rate": 1.0, "host": socket.gethostname(),
                                           "pid": os.getpid(), "started": 0.0})


# ---- item 13: Run.features() checks a view's sources as the command line does -------------

def test_run_features_refuses_a_view_with_a_missing_shard_file(tmp_path):
    from runner.api import Run
    from runner.errors import RunnerError
    from synthetic import shard_file

    run = _run(tmp_path)
    _merged(run)
    with Run(run).features() as f:  # all there: opens
        assert f["feats"].shape == (20, 3)
    shard_file(run, 1, 2).unlink()
    with pytest.raises(RunnerError, match="cannot be read.*would read as NaN"):
        Run(run).features()
    with pytest.raises(RunnerError, match="would read as NaN"):
        Run(run).features(arrays=True)


# ---- item 9: export of a run in progress is refused with exit 2, whatever the format -------

@pytest.mark.parametrize("fmt", ["h5", "npy", "embeddings"])
def test_export_of_a_run_in_progress_exits_2_in_every_format(tmp_path, fmt):
    from conftest import run_cli

    run = _run(tmp_path)
    _hold_shard(run, 1, 2)
    out = tmp_path / ("out.h5" if fmt == "h5" else "out")
    p = run_cli("export", run, out, "--format", fmt, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "is still running (1 shard(s) running" in lines[0], p.stderr
    assert not out.exists()


def test_export_while_a_launch_holds_the_run_exits_2(tmp_path):
    from conftest import run_cli
    from runner.launch import launch_lock

    run = _run(tmp_path)
    _merged(run)
    with launch_lock(run):  # a launch that has not started a shard yet (listing, planning)
        p = run_cli("export", run, tmp_path / "out.h5", check=False)
    assert p.returncode == 2 and "is still running (held by caffe-runner pid" in p.stderr, p.stderr
    assert not (tmp_path / "out.h5").exists()
    assert run_cli("export", run, tmp_path / "out.h5").returncode == 0


def test_export_of_an_incomplete_run_not_running_exits_1(tmp_path):
    from conftest import run_cli
    from synthetic import shard_file

    run = _run(tmp_path)
    shard_file(run, 1, 2).unlink()
    p = run_cli("export", run, tmp_path / "out.h5", check=False)
    assert p.returncode == 1 and "shards are missing" in p.stderr, p.stderr


# ---- item 7: status --watch on a finished run says so -----------------------------------

def test_watch_on_a_finished_run_says_it_has_ended(tmp_path):
    from conftest import run_cli

    run = _run(tmp_path)
    _merged(run)
    p = run_cli("status", "--watch", "--interval", "0.2", run)
    assert p.returncode == 0
    assert "(refreshed" not in p.stdout and "Ctrl-C" not in p.stdout, p.stdout
    assert p.stdout.rstrip().splitlines()[-1] == "(the run is merged: nothing is running, nothing more to watch)"


# ---- item 6: a sweep's status keeps its columns with long point names --------------------

def test_sweep_status_columns_line_up_for_long_names():
    from pathlib import Path

    from runner.run.sweep import format_sweep_status

    rows = [{"name": "0_output.blobs-fc7", "state": "merged", "done": 20, "images": 20, "overrides": ["a=1"]},
            {"name": "1_output.blobs-conv6_2_h__output.pooling-avg__model.preprocess.resize_size-320__x-" + "y" * 20,
             "state": "not started", "done": 0, "images": None, "overrides": ["a=2"]},
            {"name": "2_b", "state": "running", "done": 3, "images": 1000, "overrides": ["a=3"]}]
    lines = format_sweep_status(Path("/s"), rows).splitlines()[2:]  # the title, the header
    starts = [[ln.index(r["state"]), ln.index(r["overrides"][0])] for ln, r in zip(lines, rows)]
    assert len({s[0] for s in starts}) == 1 and len({s[1] for s in starts}) == 1, "\n".join(lines)
    assert all(ln.split()[0] == r["name"] for ln, r in zip(lines, rows))


# ---- item 8: the report shows commands as the user could type them again -----------------

@pytest.mark.parametrize("typed,shown", [
    (["input.dir=samples", "output.dir=runs/first"], "caffe-runner input.dir=samples output.dir=runs/first"),
    (["input.dir=my photos", "output.blobs=[fc7]"], "caffe-runner 'input.dir=my photos' 'output.blobs=[fc7]'"),
    (["input.dir=it's,#1", "output.dir=/tmp/a\\b"], "caffe-runner 'input.dir=it'\"'\"'s,#1' 'output.dir=/tmp/a\\b'"),
])
def test_report_command_lines_are_what_the_user_typed(typed, shown):
    import shlex

    from runner.run.overrides import normalize_overrides
    from runner.ui.report import _command_line

    line = _command_line({"what": "extract", "args": normalize_overrides(typed)})
    assert line == shown
    assert normalize_overrides(shlex.split(line)[1:]) == normalize_overrides(typed)  # it runs the same again


# ---- item 14: a default failure limit, and the summary names a mass failure ---------------

def test_the_default_failure_limit_fails_a_run_where_half_the_reads_failed():
    from runner.run.config import compose
    from runner.errors import FailureShareError
    from runner.store.stats import check_failure_share

    cfg = compose(["input.dir=/x", "output.dir=/y"])
    assert cfg.run.max_failure_fraction == 0.05
    stats = {"rows": 50, "failures": 50, "failures_by_reason": {"read error": 50}, "run_dir": "/y"}
    with pytest.raises(FailureShareError, match=r"50 of 100 images failed \(50.0% > run.max_failure_fraction=0.05"):
        check_failure_share(cfg, stats)
    check_failure_share(cfg, dict(stats, rows=96, failures=4, failures_by_reason={"read error": 4}))  # 4%: passes


def test_the_summary_warns_when_many_images_failed_for_one_reason():
    from runner.store.stats import format_summary

    st = {"rows": 60, "failures": 40, "failures_by_reason": {"read error": 38, "empty file (0 bytes)": 2},
          "shards": []}
    text = format_summary({"run_dir": "/r", "stats": st, "shards": {}})
    assert ("WARNING: 38 of 100 images (38%) failed for one reason, 'read error': the storage, not the images: "
            "fix it, then `caffe-runner retry /r` reads them again") in text, text
    few = {"rows": 998, "failures": 2, "failures_by_reason": {"not an image": 1, "empty file (0 bytes)": 1},
           "shards": []}
    assert "WARNING" not in format_summary({"run_dir": "/r", "stats": few, "shards": {}})
    odd = {"rows": 90, "failures": 10, "failures_by_reason": {"not an image": 10}, "shards": []}
    assert "'not an image': check a few of them" in format_summary({"run_dir": "/r", "stats": odd, "shards": {}})


# ---- item 5: a shard stopped by a full disk is named so by status -------------------------

def test_status_names_a_full_disk_for_an_interrupted_shard(tmp_path):
    import subprocess
    import sys

    from conftest import mount_tmpfs, run_cli

    umount = mount_tmpfs(tmp_path / "small", "size=4m")
    try:
        run = _run(tmp_path / "small", n=20, shards=2)
        _hold_shard(run, 1, 2)
        # the worker that held it died (a pid that is no process now)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        hb = run / "status" / "shard-00001-of-00002.json"
        hb.write_text(hb.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead.pid}'))
        p = run_cli("status", run, check=False)
        assert "interrupted" in p.stdout and "no space" not in p.stdout, p.stdout  # space left: just interrupted
        with open(tmp_path / "small" / "filler", "wb") as f:  # the disk fills up
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        p = run_cli("status", run, check=False)
        assert p.returncode == 3, p.stdout + p.stderr
        assert "interrupted 0/10  (no space left on device)" in p.stdout, p.stdout
        assert f"no space left on device in {run}: free space there" in p.stdout, p.stdout
    finally:
        umount()


def test_verify_offers_input_extensions_only_for_files_skipped_by_extension():
    """A run folder inside the input is left out by design: input.extensions cannot include it."""
    from runner.inputs.listing import KIND_RUN_FOLDER
    from runner.results.verify import skipped_note

    run_folder = {"seen": 21, "listed": 20, "skipped": 1, "skipped_by_extension": {},
                  "skipped_by_kind": {KIND_RUN_FOLDER: 1}}
    assert "input.extensions" not in skipped_note(run_folder)
    heic = dict(run_folder, skipped=2, skipped_by_extension={".heic": 1})
    assert "add extensions with input.extensions=[...]" in skipped_note(heic)
