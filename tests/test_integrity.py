"""The plan's files are the files that run, and the attributes tell the truth (issue 35).

Each task compares the prototxt, weights and mean file it is about to load with the sha256s the
plan recorded, before every shard (a worker keeping its net too), stat-cached; a changed file is
refused by name. The mean file's content is part of the run's identity. Shards, features.h5 and
the report say the backend as configured and the engine as run; `blobs` is an array of strings,
and files written before (a JSON string) still read."""
from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, SWAP_AFTER_PLAN, copy_tiny_net, run_cli, tiny_model_args, wait_until

CHANGED = "changed since this run was planned"


# ---- units: no pycaffe, no cluster --------------------------------------------------------

@pytest.fixture
def files(tmp_path, monkeypatch):
    """Three model files, a fresh cache folder and a fresh process memory of hashes."""
    import runner.engine.modelcheck as mc

    monkeypatch.setenv("CAFFE_RUNNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mc, "_SEEN", {})
    d = tmp_path / "m"
    d.mkdir()
    out = {}
    for name, data in (("prototxt", b"name: 'x'\n"), ("weights", os.urandom(1 << 16)), ("mean_file", b"\x93NUMPY..")):
        (d / name).write_bytes(data)
        out[name] = str(d / name)
    return out


def _planned(files):
    from runner.engine.modelcheck import files_sha256

    shas = files_sha256(files)
    return {k: (p, shas[k]) for k, p in files.items()}


@pytest.mark.unit
def test_a_file_changed_since_the_plan_is_refused_by_name(files):
    from runner.engine.modelcheck import ModelFileChangedError, check_planned_files

    planned = _planned(files)
    check_planned_files(planned)  # unchanged: nothing to say
    data = bytearray(open(files["weights"], "rb").read())
    data[100] ^= 1  # same path, same size, one bit
    with open(files["weights"], "wb") as f:
        f.write(data)
    with pytest.raises(ModelFileChangedError) as e:
        check_planned_files(planned)
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"model.weights {files['weights']} {CHANGED} (sha256 ")
    assert "output.overwrite=true" in line and "new output.dir" in line and "put the planned file back" in line
    os.unlink(files["mean_file"])
    with pytest.raises(ModelFileChangedError, match=f"model.preprocess.mean_file {files['mean_file']} is gone"):
        check_planned_files({k: v for k, v in planned.items() if k != "weights"})
    # a file the plan did not hash (no mean file, a run planned before it was recorded) is not checked
    check_planned_files({"prototxt": planned["prototxt"], "mean_file": (files["mean_file"], None)})


@pytest.mark.unit
def test_each_file_is_hashed_once_per_change_not_per_shard(files, monkeypatch):
    """A task checks before every shard: a stat per file while unchanged, a hash when the stat
    changed; the node's cache file serves a new process (a fresh memory) without a hash."""
    import runner.engine.modelcheck as mc

    hashed = []
    real = mc.file_hash
    monkeypatch.setattr(mc, "file_hash", lambda p, *a, **k: hashed.append(os.path.basename(p)) or real(p, *a, **k))
    planned = _planned(files)
    assert sorted(hashed) == ["mean_file", "prototxt", "weights"]
    for _ in range(5):  # five shards
        mc.check_planned_files(planned)
    assert len(hashed) == 3
    os.utime(files["weights"], ns=(1, 1))  # the stat changed, the bytes did not: hashed again, still the same
    mc.check_planned_files(planned)
    assert hashed[3:] == ["weights"]
    monkeypatch.setattr(mc, "_SEEN", {})  # another process on this node
    mc.check_planned_files(planned)
    assert len(hashed) == 4


@pytest.mark.unit
def test_blobs_attr_reads_the_array_and_the_old_json_string(tmp_path):
    from runner.results.write import blobs_attr

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.attrs["new"], f.attrs["old"], f.attrs["one"] = ["pool5/7x7_s1", "fc7"], '["pool5/7x7_s1", "fc7"]', ["emb"]
        assert blobs_attr({"blobs": f.attrs["new"]}) == ["pool5/7x7_s1", "fc7"]
        assert blobs_attr({"blobs": f.attrs["old"]}) == ["pool5/7x7_s1", "fc7"]
        assert blobs_attr({"blobs": f.attrs["one"]}) == ["emb"] and list(f.attrs["one"]) == ["emb"]


@pytest.mark.unit
def test_agreed_says_one_value_or_which_shards_differ():
    from runner.results.merge import agreed

    assert agreed({"onnxruntime 1.32.0": [0, 1, 2]}) == "onnxruntime 1.32.0"
    assert agreed({"": [0, 1]}) == ""  # nothing recorded (an old run): no attribute rather than a guess
    assert agreed({"onnxruntime 1.32.0": [0, 1, 2, 4], "caffe": [3]}) == \
        "mixed: onnxruntime 1.32.0 (shards 0-2,4); caffe (shard 3)"
    assert agreed({"caffe": [1], "": [0]}) == "mixed: not recorded (shard 0); caffe (shard 1)"


@pytest.mark.unit
def test_old_format_shards_merge_verify_and_export(tmp_path):
    """Shards that record blobs as a JSON string (every run before issue 35) still merge,
    verify and export; features.h5 records an array."""
    from runner.results.merge import merge_run
    from runner.run.plan import load_run_dir
    from synthetic import BLOB, make_run, shard_file

    run = make_run(tmp_path / "run", 30, 3, dim=4, legacy_blobs=True)
    with h5py.File(shard_file(run, 0, 3), "r") as f:
        assert isinstance(f.attrs["blobs"], str)  # the old form, as written then
    merge_run(load_run_dir(run))
    with h5py.File(run / "features.h5", "r") as f:
        assert list(f.attrs["blobs"]) == [BLOB]
    v = run_cli("verify", run, check=False)
    assert v.returncode == 0 and v.stdout.startswith("OK:"), v.stdout + v.stderr
    run_cli("export", run, tmp_path / "out.h5")
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert list(f.attrs["blobs"]) == [BLOB] and f[f"features/{BLOB}"].shape == (30, 4)


@pytest.mark.unit
def test_features_h5_says_when_shards_ran_on_different_engines(tmp_path):
    from runner.results.merge import merge_run
    from runner.run.plan import load_run_dir
    from synthetic import make_run, shard_file

    run = make_run(tmp_path / "run", 40, 4, dim=2)
    for i in range(4):
        with h5py.File(shard_file(run, i, 4), "a") as f:
            f.attrs["backend"] = "auto"
            f.attrs["engine"] = "caffe (onnxruntime differed by 0.002)" if i == 2 else "onnxruntime 1.32.0"
    merge_run(load_run_dir(run))
    with h5py.File(run / "features.h5", "r") as f:
        assert f.attrs["backend"] == "auto"
        assert f.attrs["engine"] == ("mixed: onnxruntime 1.32.0 (shards 0-1,3); caffe (onnxruntime differed by "
                                     "0.002) (shard 2)")


# ---- end to end: real Caffe, real HDF5, the sample photos ----------------------------------



def _resaved(proto, out, seed: int):
    """The same net saved again with other random weights: a valid caffemodel Caffe loads
    without a word (only its bytes tell it from the planned one)."""
    import caffe

    caffe.set_mode_cpu()
    caffe.set_random_seed(seed)
    caffe.Net(str(proto), caffe.TEST).save(str(out))
    return out


@pytest.fixture
def model(tiny_net, tmp_path):
    d = tmp_path / "model"
    proto, weights, _ = copy_tiny_net(tiny_net, d, conv_outputs=8)
    mean = d / "mean.npy"
    np.save(mean, np.full((3, 32, 40), 110, np.float32))
    other_mean = d / "other-mean.npy"
    np.save(other_mean, np.full((3, 32, 40), 90, np.float32))
    return {"proto": proto, "weights": weights, "mean": mean, "other_mean": other_mean,
            "resaved": _resaved(proto, d / "resaved.caffemodel", seed=2),
            "args": [a for a in tiny_model_args((proto, weights)) if not a.startswith("model.preprocess.mean=")]
            + [f"model.preprocess.mean_file={mean}"],
            "env": {"CAFFE_RUNNER_CACHE": str(tmp_path / "cache")}}


def _replaced_run(model, src, dst, *args, timeout=300):
    return subprocess.run([CLI[0], "-c", SWAP_AFTER_PLAN, str(src), str(dst), *map(str, args), *model["args"]],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, env={**os.environ, **model["env"]})


@pytest.mark.slow
@pytest.mark.parametrize("which", ["weights", "mean file"])
def test_a_file_replaced_after_the_plan_is_refused_by_every_task_locally(model, photos, tmp_path, which):
    """Weights re-saved (a valid net, other values) or a rewritten mean file between the plan and
    the tasks: each shard fails naming the file, nothing is extracted with it; with the planned
    file put back, the same command completes."""
    run = tmp_path / "run"
    key, path, other = (("model.weights", model["weights"], model["resaved"]) if which == "weights" else
                        ("model.preprocess.mean_file", model["mean"], model["other_mean"]))
    planned = path.read_bytes()
    args = [f"input.dir={photos}", f"output.dir={run}", "launcher.workers=2", "num_shards=2"]
    p = _replaced_run(model, other, path, *args)
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.stdout, p.stderr[-3000:])
    assert "2 of 2 shards failed" in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(errors) == 1 and errors[0].count(f"{key} {path} {CHANGED}") == 2, p.stderr[-3000:]  # one per shard
    assert "output.overwrite=true" in errors[0] and "put the planned file back" in errors[0]
    assert not list((run / "shards").glob("*.h5")), "a shard was extracted with a file the plan did not hash"
    s = run_cli("status", run, check=False)
    assert s.stdout.count(f"{key} {path} {CHANGED}") == 2, s.stdout
    path.write_bytes(planned)  # the fix the line names
    p = run_cli(*args, *model["args"], env=model["env"])
    assert len(list((run / "shards").glob("*.h5"))) == 2 and (run / "features.h5").exists()


@pytest.mark.slow
def test_a_worker_keeping_its_net_checks_the_files_before_each_shard(model, photos, tmp_path):
    """One worker, two shards: it loads the net once. The weights re-saved while it finishes its
    first shard: the second shard is refused by name (the net in memory is the planned one, but a
    resume elsewhere would load the new file: the plan's files are the ones that run)."""
    run, gates = tmp_path / "run", tmp_path / "gates"
    gates.mkdir()
    for i in range(2):
        (gates / f"finish-{i}.hold").touch()
    env = {**os.environ, **model["env"], "CAFFE_RUNNER_TEST_GATES": str(gates)}
    proc = subprocess.Popen(CLI + [f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", "num_shards=2",
                                   *model["args"]], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_until(lambda: any(gates.glob("*.reached")) or proc.poll() is not None, timeout=300,
                   what="the worker at the end of its first shard")
        reached = sorted(gates.glob("*.reached"))
        assert reached, proc.communicate()[1][-3000:]
        first = int(reached[0].name.split("-")[1].split(".")[0])
        model["weights"].write_bytes(model["resaved"].read_bytes())
        for h in gates.glob("*.hold"):
            h.unlink()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and "1 of 2 shards failed" in err, err[-3000:]
    said = [ln for ln in err.splitlines() if f"model.weights {model['weights']} {CHANGED}" in ln]
    assert said, err[-3000:]
    assert (run / "shards" / f"shard-{first:05d}-of-00002.h5").exists()
    assert not (run / "shards" / f"shard-{1 - first:05d}-of-00002.h5").exists()
    with h5py.File(run / "shards" / f"shard-{first:05d}-of-00002.h5", "r") as f:
        assert f.attrs["net_loaded"] == 1


@pytest.mark.slow
def test_the_mean_files_content_is_part_of_the_runs_identity(model, photos, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", "num_shards=1", *model["args"]]
    run_cli(*args, env=model["env"])
    with h5py.File(run / "shards" / "shard-00000-of-00001.h5", "r") as f:
        assert f.attrs["mean_file"] == str(model["mean"]) and len(f.attrs["mean_file_sha256"]) == 64
    model["mean"].write_bytes(model["other_mean"].read_bytes())  # same path, other values
    p = run_cli(*args, env=model["env"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(errors) == 1 and "holds a run with a different config (model.preprocess.mean_file (sha256): " \
        in errors[0] and "output.overwrite=true" in errors[0], p.stderr[-3000:]


def _ran(run):
    with h5py.File(run / "shards" / "shard-00000-of-00001.h5", "r") as f:
        shard = (str(f.attrs["backend"]), str(f.attrs["engine"]), list(f.attrs["blobs"]))
    with h5py.File(run / "features.h5", "r") as f:
        merged = (str(f.attrs["backend"]), str(f.attrs["engine"]), list(f.attrs["blobs"]))
    run_cli("report", run)
    html = (run / "report.html").read_text()
    return shard, merged, html


@pytest.mark.slow
def test_backend_as_configured_and_engine_as_run_the_default_cpu_run(photos, tmp_path):
    """The default model and backend (auto) on the CPU: ONNX Runtime computes the rows, and every
    record says backend auto beside engine onnxruntime (it said backend caffe)."""
    import onnxruntime

    run = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", "num_shards=1", "device=cpu")
    shard, merged, html = _ran(run)
    want = ("auto", f"onnxruntime {onnxruntime.__version__}", ["fc7"])
    assert shard == want and merged == want, (shard, merged)
    assert "<tr><td>backend</td><td><code>auto</code></td></tr>" in html
    assert f"<tr><td>engine</td><td><code>onnxruntime {onnxruntime.__version__}</code></td></tr>" in html


@pytest.mark.slow
def test_backend_and_engine_under_backend_caffe(model, photos, tmp_path):
    run = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", "num_shards=1", "backend=caffe",
            "output.blobs=[emb,stage1/conv]", *model["args"], env=model["env"])
    shard, merged, html = _ran(run)
    assert shard == merged == ("caffe", "caffe", ["emb", "stage1/conv"]), (shard, merged)
    assert "<tr><td>backend</td><td><code>caffe</code></td></tr>" in html
    assert "<tr><td>engine</td><td><code>caffe</code></td></tr>" in html
    assert f"<tr><td>mean file</td><td><code>{model['mean']} (sha256 " in html


@pytest.mark.slurm
def test_weights_replaced_after_the_plan_are_refused_by_every_array_task(cluster, model, photos, tmp_path):
    from test_report_slurm import SLURM

    run = tmp_path / "run"
    p = _replaced_run(model, model["resaved"], model["weights"], f"input.dir={photos}", f"output.dir={run}",
                      "num_shards=2", *SLURM, "launcher.wait=true", timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.stdout, p.stderr[-3000:])
    s = run_cli("status", run, check=False)
    assert s.stdout.count(f"model.weights {model['weights']} {CHANGED}") == 2, s.stdout
    for i in range(2):
        beat = json.loads((run / "status" / f"shard-{i:05d}-of-00002.json").read_text())
        assert beat["state"] == "failed" and CHANGED in beat["error"], beat
    assert not list((run / "shards").glob("*.h5"))


@pytest.mark.unit
def test_a_run_planned_before_the_mean_files_content_was_recorded_still_resumes():
    """Its identity has the mean file's path but not its sha256: the same config resumes it
    (with a warning); any other difference, or another recorded content, is refused as before."""
    from runner.run.plan import _same_identity

    new = {"model": {"prototxt_sha256": "p", "mean_file_sha256": "m", "preprocess": {"mean_file": "/m.npy"}},
           "blobs": ["emb"]}
    old = {"model": {"prototxt_sha256": "p", "preprocess": {"mean_file": "/m.npy"}}, "blobs": ["emb"]}
    assert _same_identity(new, new) and _same_identity(old, new)
    assert not _same_identity(dict(old, blobs=["fc7"]), new)
    assert not _same_identity({"model": dict(new["model"], mean_file_sha256="other"), "blobs": ["emb"]}, new)
    assert not _same_identity(None, new)


@pytest.mark.slow
def test_retry_refuses_weights_changed_since_the_plan(model, photos, tmp_path):
    """`retry` adds rows to the run's shards: it loads the plan's files or nothing (one line,
    exit 2, the run untouched)."""
    import shutil

    d = tmp_path / "in"
    shutil.copytree(photos, d)
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{d / n} 0\n" for n in names) + f"{d / 'late.jpg'} 0\n")  # not there yet
    run = tmp_path / "run"
    run_cli(f"input.list={listing}", f"output.dir={run}", "launcher.workers=1", "num_shards=1",
            "run.max_failure_fraction=null", *model["args"], env=model["env"])
    shutil.copyfile(d / names[0], d / "late.jpg")  # the missing image is there now: retry would recover it
    model["weights"].write_bytes(model["resaved"].read_bytes())
    before = {p: p.read_bytes() for p in (run / "shards").glob("*.h5")}
    p = run_cli("retry", run, env=model["env"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stdout + p.stderr[-3000:]
    assert f"model.weights {model['weights']} {CHANGED}" in p.stderr, p.stderr[-3000:]
    assert {p: p.read_bytes() for p in (run / "shards").glob("*.h5")} == before
