"""End to end on real photos with real pycaffe and the real res10 model, through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, run_cli, tiny_model_args, wait_until

pytestmark = pytest.mark.slow


def _read(path: Path, blob_ds: str = None):
    with h5py.File(path, "r") as f:
        feats = f["feats"][:] if blob_ds is None else f[f"features/{blob_ds}"][:]
        return {"feats": feats, "names": [n.decode() for n in f["names"][:]], "index": f["index"][:],
                "failures": f["failures/names"][:], "attrs": dict(f.attrs)}


def _all_images(root: Path):
    exts = {".jpg", ".jpeg", ".png"}
    return sorted(os.path.relpath(p, root) for p in root.rglob("*") if p.suffix.lower() in exts)


@pytest.fixture(scope="module")
def res10_runs(photos, tmp_path_factory):
    """The same photos: 2 workers x 3 shards, and one process with one shard."""
    base = tmp_path_factory.mktemp("res10")
    par, single = base / "par", base / "single"
    p = run_cli(f"input.dir={photos}", f"output.dir={par}", "launcher.workers=2", "num_shards=3", "batch_size=4")
    run_cli(f"input.dir={photos}", f"output.dir={single}", "launcher.workers=1", "num_shards=1", "batch_size=16")
    return par, single, p


def test_every_image_once_in_order(res10_runs, photos):
    par, _, proc = res10_runs
    out = _read(par / "features.h5")
    names = _all_images(photos)
    assert out["names"] == sorted(out["names"])
    assert [n.encode() for n in out["names"]] == sorted(n.encode() for n in names)  # manifest order: bytes
    assert out["index"].tolist() == list(range(len(names)))
    assert len(out["failures"]) == 0
    assert out["feats"].shape == (len(names), 256, 19, 19)
    assert np.isfinite(out["feats"]).all() and out["feats"].std() > 0
    shards = sorted((par / "shards").glob("*.h5"))
    assert [s.name for s in shards] == [f"shard-0000{i}-of-00003.h5" for i in range(3)]
    assert f"images:        {len(names)} ({len(names)} extracted, 0 failed)" in proc.stdout
    assert f"features:      {par / 'features.h5'}" in proc.stdout


def test_shard_files_keep_the_classic_layout(res10_runs, res10):
    par, _, _ = res10_runs
    total = 0
    for s in sorted((par / "shards").glob("*.h5")):
        with h5py.File(s, "r") as f:
            feats, names = f["feats"][:], f["names"][:]   # as the classic recipe's readers do
            assert len(feats) == len(names) > 0
            total += len(names)
            a = f.attrs
            assert a["complete"] and a["weights_sha256"] and list(a["blobs"]) == ["fc7"]
            assert a["weights"] == str(res10[1]) and "mean" in a["preprocess"] and "model:" in a["config"]
    assert total == _read(par / "features.h5")["feats"].shape[0]


def test_parallel_equals_single_process(res10_runs):
    par, single, _ = res10_runs
    a, b = _read(par / "features.h5"), _read(single / "features.h5")
    assert a["names"] == b["names"]
    np.testing.assert_allclose(a["feats"], b["feats"], rtol=1e-5, atol=1e-6)


def test_matches_opencv_dnn_reference(res10_runs, photos, res10):
    """An independent implementation of the default preprocessing + net: OpenCV DNN."""
    import cv2

    par, _, _ = res10_runs
    out = _read(par / "features.h5")
    net = cv2.dnn.readNetFromCaffe(str(res10[0]), str(res10[1]))
    for name, feat in zip(out["names"], out["feats"]):
        img = cv2.imread(str(photos / name))
        blob = cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104.0, 177.0, 123.0), swapRB=False, crop=False)
        net.setInput(blob)
        ref = net.forward("last_relu")[0]
        rel = np.abs(feat - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{name}: relative difference {rel:.2e}"


def test_merged_view_is_virtual_and_movable(res10_runs, tmp_path):
    import shutil

    par, _, _ = res10_runs
    with h5py.File(par / "features.h5", "r") as f:
        assert f["features/fc7"].is_virtual
        want = f["feats"][-1]
    moved = tmp_path / "moved"
    shutil.copytree(par, moved)
    cwd = os.getcwd()
    try:
        os.chdir("/")
        with h5py.File(moved / "features.h5", "r") as f:
            np.testing.assert_array_equal(f["feats"][-1], want)
    finally:
        os.chdir(cwd)


def test_rerun_same_command_does_nothing_new(res10_runs, photos):
    par, _, _ = res10_runs
    before = {p: p.stat().st_mtime_ns for p in (par / "shards").glob("*.h5")}
    # features.h5 and stats.json too: the same file for readers holding it open (issue 36)
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (par / "features.h5", par / "stats.json")}
    p = run_cli(f"input.dir={photos}", f"output.dir={par}", "launcher.workers=2", "num_shards=3", "batch_size=4")
    assert {p: p.stat().st_mtime_ns for p in (par / "shards").glob("*.h5")} == before
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept
    assert "3 of 3 shards done" in p.stdout + p.stderr
    assert "shards:        3 (0 run now, 3 already complete)" in p.stdout


def test_multi_blob_equals_single_blob_runs(tiny_net, photos, tmp_path):
    blobs = ["stage1/conv", "emb", "prob"]
    multi = tmp_path / "multi"
    run_cli(f"input.dir={photos}", f"output.dir={multi}", "launcher.workers=2", "num_shards=2",
            *tiny_model_args(tiny_net), f"output.blobs=[{','.join(blobs)}]")
    with h5py.File(multi / "features.h5", "r") as f:
        assert sorted(f["features"]) == sorted(["stage1__conv", "emb", "prob"])
        assert f["features/stage1__conv"].attrs["blob"] == "stage1/conv"
        np.testing.assert_array_equal(f["feats"][:], f["features/stage1__conv"][:])
        multi_out = {b: f[f"features/{b.replace('/', '__')}"][:] for b in blobs}
    assert multi_out["stage1/conv"].shape[1:] == (8, 15, 19)
    assert multi_out["emb"].shape[1:] == (16,)
    np.testing.assert_allclose(multi_out["prob"].sum(axis=1), 1.0, rtol=1e-5)
    for b in blobs:
        single = tmp_path / ("single_" + b.replace("/", "_"))
        run_cli(f"input.dir={photos}", f"output.dir={single}", "launcher.workers=1", "num_shards=1",
                *tiny_model_args(tiny_net), f"output.blobs=[{b}]")
        np.testing.assert_allclose(_read(single / "features.h5")["feats"], multi_out[b], rtol=1e-5, atol=1e-6)


def test_unknown_blob_lists_the_blobs(tiny_net, photos, tmp_path):
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'x'}", *tiny_model_args(tiny_net),
                "output.blobs=[fc7]", check=False)
    assert p.returncode == 2
    assert "blob 'fc7' is not in the net" in p.stderr and "stage1/conv" in p.stderr and "emb_t" in p.stderr


def test_local_sweep_makes_one_run_dir_per_point(tiny_net, photos, tmp_path):
    out = tmp_path / "sweep"
    run_cli("-m", f"input.dir={photos}", f"output.dir={out}", "launcher.workers=1",
            *tiny_model_args(tiny_net), "output.blobs=[emb],[prob]")
    dirs = sorted(d for d in out.iterdir() if (d / "features.h5").exists())
    assert [d.name for d in dirs] == ["0_output.blobs-emb", "1_output.blobs-prob"]
    shapes = []
    for d in dirs:
        with h5py.File(d / "features.h5", "r") as f:
            shapes.append(f["feats"].shape[1:])
    assert shapes == [(16,), (5,)]


def _shards_held_at(run: Path, done: int) -> int:
    """How many shards' heartbeats say exactly `done` images are done."""
    n = 0
    for p in (run / "status").glob("*.json"):
        try:
            n += int(json.loads(p.read_text()).get("done", -1)) == done
        except ValueError:
            pass
    return n


def test_local_gpu_workers_bind_one_gpu_each(tiny_net, photos, tmp_path):
    """device=gpu: one worker per GPU, each bound (CUDA_VISIBLE_DEVICES) before the engine loads.
    No GPU here: the simulated backend stands in for the device; the binding is real. Each shard
    holds after its first batch (a gate the test opens) until two shards are under way at once:
    both workers have one, however late the second one starts."""
    run, gate = tmp_path / "run", tmp_path / "gate"
    gate.write_text("1")
    proc = subprocess.Popen(CLI + [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net),
                                   "device=gpu", "backend=simulated", "simulated_batch_s=0.0", "batch_size=2",
                                   "launcher.gpus=[2,5]", "num_shards=4", "heartbeat_s=0.000001",
                                   f"simulated_gate={gate}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _shards_held_at(run, 2) == 2 or proc.poll() is not None, timeout=300,
                   what="two shards held after their first batch")
        assert proc.poll() is None and _shards_held_at(run, 2) == 2, proc.communicate()
    finally:
        gate.write_text("open")
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    seen = {}
    for s in sorted((run / "shards").glob("*.h5")):
        with h5py.File(s, "r") as f:
            seen.setdefault(f.attrs["visible_gpus"], set()).add(int(f.attrs["pid"]))
            assert f.attrs["device"] == "simulated-gpu:0"
    assert set(seen) == {"2", "5"}, seen
    # a worker keeps its GPU for every shard it runs: two workers, two GPUs, no sharing
    assert all(len(pids) == 1 for pids in seen.values()) and len(set.union(*seen.values())) == 2


def test_shards_record_their_steady_state_apart_from_one_time_costs(photos, tmp_path):
    """A shard's first batches pay the pipeline fill and Caffe's first allocations once, and its
    last ones drain the decode window; the steady figures (make bench rows 2 and 10) count only
    the batches between (runner.task.extract.steady_marks)."""
    from runner.task.extract import steady_marks

    out = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={out}", "launcher.workers=1", "num_shards=1", "batch_size=1",
            "decode.prefetch_batches=1")
    [s] = (out / "shards").glob("*.h5")
    with h5py.File(s, "r") as f:
        a = dict(f.attrs)
    done = int(a["rows"]) + int(a["n_failures"])
    first, last = steady_marks(done, 1, 1)
    assert a["steady_images"] == last - first
    assert 0 < a["steady_s"] < a["elapsed_s"] and 0 < a["steady_cpu_s"] < a["cpu_s"]
