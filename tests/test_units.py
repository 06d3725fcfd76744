"""The fast layer (make test-unit): no pycaffe, no cluster, no subprocess per test. Real HDF5
files written by the real ShardWriter, real files on disk, real config objects."""
from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from runner.schema import InputConf, LocalLauncherConf, ModelConf, RunConf, SlurmLauncherConf
from runner.errors import ConfigError
from runner.engine.features import FeaturePost, pooled_shape, postprocess
from runner.engine.device import resolve_local_device, resolve_slurm_device
from runner.inputs import build_manifest, input_stamp
from runner.store.manifest import extend_manifest, load_manifest
from runner.run.plan import Run, _check_preprocess, load_run_dir
from runner.store.rundir import RunDir, partial_of, partials_of
from runner.run.status import shard_state
from synthetic import make_run, shard_file
from runner.results.write import ShardWriter

pytestmark = pytest.mark.unit


# ---- device=auto and the GPU request ----------------------------------------------------

def _cfg(launcher, **top):
    cfg = OmegaConf.structured(RunConf(model=ModelConf(name="m", prototxt="p", weights="w"), launcher=launcher))
    for k, v in top.items():
        OmegaConf.update(cfg, k, v)
    return cfg


# backend=simulated stands in for a CUDA build (a GPU-capable engine), opencv for a CPU-only one;
# the caffe cases need pycaffe and are in test_device.py
@pytest.mark.parametrize("backend,device,gpus,allow,want", [
    ("simulated", "auto", "auto", False, ("gpu", 1)),
    ("simulated", "cpu", "auto", False, ("cpu", 0)),
    ("simulated", "auto", 0, False, ("cpu", 0)),
    ("simulated", "auto", 2, False, ("gpu", 2)),
    ("simulated", "gpu", "auto", False, ("gpu", 1)),
    ("opencv", "auto", "auto", False, ("cpu", 0)),
    ("opencv", "cpu", 0, False, ("cpu", 0)),
    ("opencv", "auto", 1, True, ("cpu", 1)),
    ("simulated", "cpu", 1, True, ("cpu", 1)),
])
def test_slurm_device_resolution(backend, device, gpus, allow, want):
    cfg = _cfg(SlurmLauncherConf(gpus_per_task=gpus, allow_cpu_on_gpu=allow), backend=backend, device=device)
    assert resolve_slurm_device(cfg) == want


@pytest.mark.parametrize("backend,device,gpus,msg", [
    ("opencv", "auto", 1, "backend=opencv computes on the CPU"),
    ("simulated", "cpu", 1, "device=cpu"),
    ("simulated", "gpu", 0, "device=gpu but launcher.gpus_per_task=0"),
    ("simulated", "auto", "two", "launcher.gpus_per_task='two'"),
    ("simulated", "auto", -1, "use auto, 0 or a positive integer"),
])
def test_slurm_gpus_held_for_cpu_work_are_refused(backend, device, gpus, msg):
    cfg = _cfg(SlurmLauncherConf(gpus_per_task=gpus), backend=backend, device=device)
    with pytest.raises(ConfigError) as e:
        resolve_slurm_device(cfg)
    assert msg in str(e.value)
    if "computes on the CPU" in str(e.value) or "device=cpu" in msg:
        assert "device=gpu" in str(e.value) and "launcher.gpus_per_task=0" in str(e.value)
        assert "allow_cpu_on_gpu" in str(e.value)


def test_allow_cpu_on_gpu_warns_once(caplog):
    cfg = _cfg(SlurmLauncherConf(gpus_per_task=1, allow_cpu_on_gpu=True), backend="opencv")
    with caplog.at_level("WARNING", logger="caffe_runner"):
        resolve_slurm_device(cfg)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "allow_cpu_on_gpu=true" in caplog.records[0].message


def test_local_device_auto(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi
    assert resolve_local_device(_cfg(LocalLauncherConf(), backend="simulated")) == "cpu"
    assert resolve_local_device(_cfg(LocalLauncherConf(gpus=[0, 1]), backend="simulated")) == "gpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert resolve_local_device(_cfg(LocalLauncherConf(), backend="simulated")) == "gpu"
    assert resolve_local_device(_cfg(LocalLauncherConf(), backend="opencv")) == "cpu"
    assert resolve_local_device(_cfg(LocalLauncherConf(), backend="simulated", device="cpu")) == "cpu"


# ---- cross-field checks ---------------------------------------------------------------

@pytest.mark.parametrize("pp,hw,channels,msg", [
    ({"mean": [1, 2]}, (32, 32), 3, "mean has 2 values but the net takes 3 channels"),
    ({"mean": [1, 2, 3]}, (32, 32), 1, "takes 1 input channels"),
    ({"resize_size": 16}, (32, 40), 3, "resize_size=16 is smaller than the net input 32x40"),
    ({"resize": "shorter_side", "resize_size": 30}, (32, 32), 3, "centre crop would not fit"),
    ({"oversample": True}, (32, 32), 3, "oversample=true"),
    ({"mean_file": "/nonexistent/mean.binaryproto"}, (32, 32), 3, "mean_file"),
])
def test_preprocess_cross_checks(pp, hw, channels, msg):
    cfg = _cfg(LocalLauncherConf())
    for k, v in pp.items():
        OmegaConf.update(cfg, f"model.preprocess.{k}", v)
    with pytest.raises(ConfigError, match=msg):
        _check_preprocess(cfg, hw, channels)


def test_preprocess_cross_checks_pass_good_values():
    cfg = _cfg(LocalLauncherConf())
    OmegaConf.update(cfg, "model.preprocess.mean", [1, 2, 3])
    OmegaConf.update(cfg, "model.preprocess.resize_size", 40)
    _check_preprocess(cfg, (32, 40), 3)


def test_yaml_holds_no_second_copy_of_the_defaults():
    import yaml

    from runner.run.config import conf_dir

    for name in ("config.yaml", "launcher/local.yaml", "launcher/slurm.yaml"):
        data = yaml.safe_load(open(os.path.join(conf_dir(), name)))
        assert set(data) <= {"defaults", "hydra"}, (name, set(data) - {"defaults", "hydra"})


# ---- post-processing -------------------------------------------------------------------

def test_postprocess_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.random((3, 4, 5, 6), dtype=np.float32)
    np.testing.assert_allclose(postprocess(x, "avg"), x.reshape(3, 4, -1).mean(-1), rtol=1e-6)
    np.testing.assert_array_equal(postprocess(x, "max"), x.reshape(3, 4, -1).max(-1))
    gem = (x.reshape(3, 4, -1) ** 3).mean(-1) ** (1 / 3)
    np.testing.assert_allclose(postprocess(x, "gem", 3.0), gem, rtol=1e-5)
    l2 = FeaturePost("avg", l2=True)(x)
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-6)
    v = rng.random((2, 7), dtype=np.float32)
    np.testing.assert_array_equal(postprocess(v, "max"), v)  # vectors are not pooled
    assert pooled_shape((4, 5, 6), "avg") == (4,) and pooled_shape((4, 5, 6), "none") == (4, 5, 6)


# ---- ShardWriter resume ------------------------------------------------------------------

def _writer(path, fp="fp1"):
    return ShardWriter(path, {"emb": (3,)}, "float32", {"blobs": '["emb"]'}, fp, 4)


def _batch(w, start, n, fail=()):
    idx = [i for i in range(start, start + n) if i not in fail]
    w.write_batch(n, idx, [b"n%d" % i for i in idx], {"emb": np.full((len(idx), 3), start, np.float32)},
                  [(i, b"n%d" % i, "bad") for i in fail])


def test_writer_resumes_after_the_last_flushed_batch(tmp_path):
    final = tmp_path / "s.h5"
    w = _writer(final)
    _batch(w, 0, 4, fail=(2,))
    _batch(w, 4, 4)
    w.close()  # killed: never finished
    assert partials_of(final) == [w.partial] and not final.exists()
    w = _writer(final)
    assert (w.next, w.rows, w.n_failures) == (8, 7, 1)
    _batch(w, 8, 2)
    w.finish()
    with h5py.File(final, "r") as f:
        assert f["index"][:].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
        assert f["failures/index"][:].tolist() == [2] and f.attrs["resumed"] == 1 and f.attrs["complete"]


def test_writer_resume_copies_the_committed_rows_slice_by_slice(tmp_path, monkeypatch):
    import runner.results.write as write

    monkeypatch.setattr(write, "COPY_SLICE_ROWS", 3)  # 23 rows, 2 failures: several slices each
    final = tmp_path / "s.h5"
    w = _writer(final)
    for start in range(0, 24, 4):
        _batch(w, start, 4, fail=tuple(i for i in (5, 17) if start <= i < start + 4))
    w.close()
    w = _writer(final)
    assert (w.next, w.rows, w.n_failures) == (24, 22, 2)
    w.finish()
    with h5py.File(final, "r") as f:
        want = [i for i in range(24) if i not in (5, 17)]
        assert f["index"][:].tolist() == want and [bytes(n) for n in f["names_raw"][:]] == [b"n%d" % i for i in want]
        assert f["features/emb"][:, 0].tolist() == [float(i - i % 4) for i in want]
        assert f["failures/index"][:].tolist() == [5, 17] and f["failures/reason"][:].tolist() == [b"bad", b"bad"]


def test_writer_drops_a_flush_interrupted_between_datasets(tmp_path):
    """Rows appended to some datasets but the progress attrs not yet updated (a kill inside
    write_batch): the resumed writer cuts every dataset back to the committed rows."""
    final = tmp_path / "s.h5"
    w = _writer(final)
    _batch(w, 0, 4)
    f = w.f
    for name in ("features/emb", "names"):  # half a batch: features and names, not index
        d = f[name]
        d.resize(len(d) + 2, axis=0)
    f["failures/reason"].resize(1, axis=0)
    f.flush()
    w.close()
    w = _writer(final)
    assert (w.next, w.rows) == (4, 4)
    for name in ("features/emb", "names", "names_raw", "index"):
        assert len(w.f[name]) == 4, name
    assert len(w.f["failures/reason"]) == 0
    _batch(w, 4, 4)
    w.finish()
    with h5py.File(final, "r") as f:
        assert f["index"][:].tolist() == list(range(8)) and f["features/emb"][:, 0].tolist() == [0] * 4 + [4] * 4


def test_writer_moves_a_truncated_partial_aside_and_starts_over(tmp_path):
    final = tmp_path / "s.h5"
    w = _writer(final)
    _batch(w, 0, 4)
    w.close()
    data = w.partial.read_bytes()
    w.partial.write_bytes(data[: len(data) // 3])
    old = w.partial
    w = _writer(final)
    assert (w.next, w.rows) == (0, 0)
    assert old.with_name(old.name + ".corrupt").exists() and partials_of(final) == [w.partial]
    w.close()


def test_writer_starts_over_on_another_config(tmp_path):
    final = tmp_path / "s.h5"
    w = _writer(final, "fp1")
    _batch(w, 0, 4)
    w.close()
    w = _writer(final, "fp2")
    assert w.next == 0 and w.f.attrs["fingerprint"] == "fp2"
    w.close()


# ---- shard_state -------------------------------------------------------------------------

def test_shard_state_reads_files_only(tmp_path):
    run_dir = make_run(tmp_path / "run", 60, 6, dim=2)
    run = load_run_dir(run_dir)
    now = time.time()
    os.unlink(shard_file(run_dir, 1, 6))  # never run: pending
    p2 = shard_file(run_dir, 2, 6)
    os.replace(p2, partial_of(p2))        # interrupted, no heartbeat
    os.unlink(shard_file(run_dir, 3, 6))
    run.write_heartbeat(3, {"state": "failed", "error": "boom", "pid": 1, "host": "x"})
    os.unlink(shard_file(run_dir, 4, 6))
    import socket

    run.write_heartbeat(4, {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "done": 3,
                            "started": now})
    os.unlink(shard_file(run_dir, 5, 6))
    run.write_heartbeat(5, {"state": "running", "pid": 2 ** 22 + 12345, "host": socket.gethostname(), "done": 1})
    states = [shard_state(run, i, now) for i in range(6)]
    assert [s["state"] for s in states] == ["done", "pending", "interrupted", "failed", "running", "interrupted"]
    assert states[0]["done"] == states[0]["total"] == 10 and states[4]["done"] == 3
    assert states[3]["error"] == "boom"
    # another host's running heartbeat: alive while fresh, interrupted once stale
    run.write_heartbeat(5, {"state": "running", "pid": 1, "host": "elsewhere", "done": 1})
    assert shard_state(run, 5, time.time())["state"] == "running"
    assert shard_state(run, 5, time.time() + 3600)["state"] == "interrupted"


# ---- segments (input.relist) ---------------------------------------------------------------

def test_segments_keep_old_shard_names_and_ranges():
    plan = {"num_shards": 5, "count": 25,
            "segments": [{"first": 0, "num_shards": 3, "start": 0, "count": 20},
                         {"first": 3, "num_shards": 2, "start": 20, "count": 5}]}
    run = Run(None, RunDir(__import__("pathlib").Path("/r")), plan)
    assert [run.shard_range(i) for i in range(5)] == [(0, 7), (7, 14), (14, 20), (20, 23), (23, 25)]
    assert run.shard_path(2).name == "shard-00002-of-00003.h5"
    assert run.shard_path(3).name == "shard-00003-of-00005.h5"
    old = Run(None, RunDir(__import__("pathlib").Path("/r")), {"num_shards": 3, "count": 20})
    assert [old.shard_range(i) for i in range(3)] == [(0, 7), (7, 14), (14, 20)]


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_input_stamp_notices_added_removed_and_rewritten_images(tmp_path):
    root = tmp_path / "in"
    for n in ("a.jpg", "sub/b.png", "sub/deep/c.jpg", "notes.txt"):
        _touch(root / n)
    inp = OmegaConf.structured(InputConf(dir=str(root)))
    s0 = input_stamp(inp)
    assert s0["count"] == 3 and input_stamp(inp) == s0
    _touch(root / "notes2.txt")  # not an image: ignored... except for its folder's mtime
    os.utime(root, ns=(s0["mtime_ns"], s0["mtime_ns"]))
    os.utime(root / "notes2.txt", ns=(s0["mtime_ns"], s0["mtime_ns"]))
    assert input_stamp(inp) == s0
    _touch(root / "sub/deep/d.jpg")
    assert input_stamp(inp)["count"] == 4
    s1 = input_stamp(inp)
    later = s1["mtime_ns"] + 10 ** 9
    os.utime(root / "a.jpg", ns=(later, later))  # rewritten in place
    assert input_stamp(inp)["mtime_ns"] == later
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\n")
    li = OmegaConf.structured(InputConf(list=str(lst)))
    l0 = input_stamp(li)
    lst.write_text("a.jpg\nsub/b.png\n")
    assert input_stamp(li) != l0
    assert input_stamp(OmegaConf.structured(InputConf(dir=str(tmp_path / "gone")))) is None


def test_extend_manifest_keeps_listed_entries(tmp_path):
    root = tmp_path / "in"
    for n in ("a.jpg", "c.jpg"):
        _touch(root / n)
    inp = OmegaConf.structured(InputConf(dir=str(root)))
    build_manifest(tmp_path / "run", inp)
    m = extend_manifest(tmp_path / "run", 2, [b"b.jpg", b"d.jpg"])
    assert m.count == 4 and load_manifest(tmp_path / "run").read_slice(0, 4) == [b"a.jpg", b"c.jpg", b"b.jpg",
                                                                                    b"d.jpg"]
    # a tail left by an interrupted earlier extension is replaced, never kept twice
    m = extend_manifest(tmp_path / "run", 2, [b"e.jpg"])
    assert load_manifest(tmp_path / "run").read_slice(0, m.count) == [b"a.jpg", b"c.jpg", b"e.jpg"]
    assert json.loads((tmp_path / "run/manifest/meta.json").read_text())["count"] == 3


# ---- the CUDA build's no-driver noise in CPU mode ------------------------------------------

def test_cpu_mode_noise_is_dropped_and_other_fd2_lines_kept(capfd):
    """glog writes from C++ straight to fd 2: only Caffe's harmless cuBLAS/cuRAND lines go."""
    from runner.engine.model import _drop_cuda_noise_on_fd2

    with _drop_cuda_noise_on_fd2():
        os.write(2, b"WARNING: Logging before InitGoogleLogging() is written to STDERR\n"
                    b"E1125 21:25:07.239905 23437 common.cpp:117] Cannot create Cublas handle. Cublas won't be available.\n"
                    b"E1125 21:25:07.240146 23437 common.cpp:124] Cannot create Curand generator. Curand won't be available.\n"
                    b"F1125 21:25:07.3 net.cpp:1] a real Caffe error\n")
    err = capfd.readouterr().err
    assert err == "F1125 21:25:07.3 net.cpp:1] a real Caffe error\n", err


def test_configs_pickled_before_the_schema_moved_still_unpickle():
    """A Slurm job queued by an earlier version holds its config pickled with the schema's classes
    under runner.config (the schema moved to runner.schema; the name is kept by the shim
    runner/config.py since the composition moved to runner/run/config.py): it must still unpickle, equal."""
    import pickle

    import cloudpickle

    from runner.run.config import compose

    cfg = compose(["input.dir=/data/x", "output.dir=/scratch/r", "launcher=slurm", "output.pooling=avg"])
    new = cloudpickle.dumps(cfg)
    assert b"runner.schema" in new and b"runner.config" not in new
    old = new.replace(b"runner.schema", b"runner.config")  # the same length: a valid pickle
    back = pickle.loads(old)
    assert back == cfg and back.output.pooling == "avg" and type(back.output.pooling).__name__ == "Pooling"
    assert OmegaConf.get_type(back) is RunConf


def test_names_queued_jobs_and_images_use_stay_importable():
    import importlib

    slurm = importlib.import_module("runner.launch.slurm")
    assert callable(slurm._task_entry) and callable(slurm.merge_job)
    assert importlib.util.find_spec("runner.launch.container_task") is not None


@pytest.mark.parametrize("images,batch,prefetch,marks", [
    (16 * 24, 16, 3, (6, 18)),   # bench rows 2 and 10: 24 batches per worker
    (16 * 12, 16, 3, None),      # 12 batches: no batch between a full window and its draining
    (16 * 13 - 5, 16, 3, (6, 7)),
    (20, 1, 1, (4, 16)),
])
def test_steady_marks(images, batch, prefetch, marks):
    from runner.task.extract import steady_marks

    assert steady_marks(images, batch, prefetch) == marks
