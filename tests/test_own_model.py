"""Your own model, trusted (issue 35, items 1-4): a net given as model.prototxt= model.weights=
without a preset takes its own input size and the preprocessing the user gives (or the plan
refuses, naming the keys); every shape is proven at plan time at the run's batch geometry (AlexNet
at 300x300 is refused with Caffe's line and the fix, nothing created); inspect prints the input it
really uses and lists every blob of any prototxt; presets of your own live in a folder outside
the repository ($CAFFE_RUNNER_CONFIG/model/NAME.yaml).

The real runs use the BVLC zoo's deploy nets shipped in the pycaffe sdist, with seeded random
weights (conftest.zoo), as a user's own files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ZOO_NETS, ZOO_PREPROCESS, run_cli

PRESET = """\
defaults: [base_model, _self_]
name: lab_net
prototxt: {proto}
weights: {weights}
input_size: [227, 227]
preprocess:
  channel_order: BGR
  raw_scale: 255
  mean: [104, 117, 123]
  scale: 1
default_blobs: [fc7]
"""


def _compose(*overrides, **kw):
    from runner.run.config import compose

    return compose(list(overrides) + ["output.dir=/tmp/never-made"], **kw)


def _one_error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("caffe-runner: error: ")
    return lines[0]


# ---- unit: composition ------------------------------------------------------------------------

@pytest.mark.unit
def test_own_files_without_a_preset_take_no_presets_values(tmp_path):
    """model.prototxt= without model=: no preset's input size, mean, blobs (res10's 300x300 and
    face-detector mean were taken silently before)."""
    cfg = _compose(f"model.prototxt={tmp_path}/deploy.prototxt", f"model.weights={tmp_path}/w.caffemodel",
                   *ZOO_PREPROCESS)
    assert cfg.model.name == "own" and cfg.model.input_size is None  # null: read from the prototxt
    assert list(cfg.model.preprocess.mean) == [104, 117, 123] and list(cfg.model.default_blobs) == []
    assert cfg.model.source == "" and not cfg.model.files


@pytest.mark.unit
def test_an_explicit_preset_keeps_its_values_for_a_fine_tuned_prototxt(tmp_path):
    cfg = _compose("model=googlenet", f"model.prototxt={tmp_path}/ft.prototxt", f"model.weights={tmp_path}/ft.w")
    assert cfg.model.name == "googlenet" and list(cfg.model.input_size) == [224, 224]
    assert list(cfg.model.preprocess.mean) == [104, 117, 123] and list(cfg.model.default_blobs) == ["pool5/7x7_s1"]
    # and the default preset, untouched
    cfg = _compose()
    assert cfg.model.name == "res10_ssd" and list(cfg.model.input_size) == [300, 300]


@pytest.mark.unit
@pytest.mark.parametrize("given, missing", [
    ([], ["mean (or mean_file)", "channel_order", "raw_scale", "scale"]),
    (["model.preprocess.mean=[1,2,3]", "model.preprocess.scale=1"], ["channel_order", "raw_scale"]),
    (["model.preprocess.mean_file=/m.npy", "model.preprocess.channel_order=RGB", "model.preprocess.raw_scale=1"],
     ["scale"]),
])
def test_preprocessing_a_prototxt_cannot_tell_is_required(given, missing, tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _compose(f"model.prototxt={tmp_path}/d.prototxt", f"model.weights={tmp_path}/w", *given)
    msg = str(e.value)
    named = msg.split("give ", 1)[1].split(" (e.g.", 1)[0]
    assert named == ", ".join(f"model.preprocess.{k}" for k in missing), msg
    assert "model.preprocess.mean=[104,117,123] model.preprocess.channel_order=BGR" in msg  # to copy
    assert "$CAFFE_RUNNER_CONFIG/model/NAME.yaml" in msg and "\n" not in msg
    # all given (mean=null: no mean, said on purpose): composed
    _compose(f"model.prototxt={tmp_path}/d.prototxt", f"model.weights={tmp_path}/w", "model.preprocess.mean=null",
             "model.preprocess.channel_order=RGB", "model.preprocess.raw_scale=1", "model.preprocess.scale=1")


@pytest.mark.unit
def test_weights_alone_are_not_a_net(tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"give model.prototxt=\.\.\. too, or choose a preset"):
        _compose(f"model.weights={tmp_path}/w", *ZOO_PREPROCESS)


@pytest.mark.unit
def test_the_missing_preprocessing_refusal_is_one_line_and_creates_nothing(tmp_path, photos):
    proto, weights = tmp_path / "deploy.prototxt", tmp_path / "w.caffemodel"
    proto.write_text("name: 'x'")
    weights.write_bytes(b"x")
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", f"model.prototxt={proto}", f"model.weights={weights}",
                check=False)
    line = _one_error_line(p)
    assert "model.preprocess.mean (or mean_file), model.preprocess.channel_order" in line, line
    assert not run.exists()


# ---- unit: presets of your own -----------------------------------------------------------------

@pytest.fixture
def user_presets(tmp_path, monkeypatch):
    d = tmp_path / "presets"
    (d / "model").mkdir(parents=True)
    (d / "model" / "lab_net.yaml").write_text(PRESET.format(proto=tmp_path / "p.prototxt", weights=tmp_path / "w"))
    monkeypatch.setenv("CAFFE_RUNNER_CONFIG", str(d))
    return d


@pytest.mark.unit
def test_a_preset_of_your_own_is_found_by_name(user_presets):
    cfg = _compose("model=lab_net")
    assert cfg.model.name == "lab_net" and list(cfg.model.input_size) == [227, 227]
    assert list(cfg.model.preprocess.mean) == [104, 117, 123] and list(cfg.model.default_blobs) == ["fc7"]
    # a preset without name: (or without the defaults line) is named by its file
    (user_presets / "model" / "short.yaml").write_text("prototxt: /p\nweights: /w\npreprocess:\n  scale: 0.5\n")
    cfg = _compose("model=short")
    assert cfg.model.name == "short" and cfg.model.preprocess.scale == 0.5


@pytest.mark.unit
def test_help_lists_your_presets(user_presets):
    p = run_cli("--help", env={"CAFFE_RUNNER_CONFIG": str(user_presets)})
    assert "yours, in $CAFFE_RUNNER_CONFIG/model: lab_net" in p.stdout, p.stdout
    from runner.run.config import config_groups

    assert "lab_net" in config_groups()["model"] and "res10_ssd" in config_groups()["model"]


@pytest.mark.unit
@pytest.mark.parametrize("text, said", [
    ("defaults: [base_model, _self_]\nname: bad\nprototxt: /p\nweights: /w\nmean: [1,2,3]\n",
     "it sets 'mean', which is no key of a model preset"),
    ("defaults: [base_model, _self_]\nprototxt: /p\nweights: /w\ninput_size: big\n", "model.input_size: "),
    ("name: [unclosed\n", "while parsing a flow sequence"),
])
def test_a_bad_preset_of_your_own_is_named_with_the_fix(user_presets, text, said):
    from runner.errors import ConfigError

    f = user_presets / "model" / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        _compose("model=bad")
    msg = str(e.value)
    assert msg.startswith(f"model=bad: your preset {f} is not valid: ") and said in msg and "(fix: " in msg, msg


@pytest.mark.unit
def test_a_preset_of_your_own_may_not_shadow_a_shipped_one(user_presets):
    from runner.errors import ConfigError

    (user_presets / "model" / "googlenet.yaml").write_text("prototxt: /p\nweights: /w\n")
    with pytest.raises(ConfigError, match="rename yours"):
        _compose("model=googlenet")


@pytest.mark.unit
def test_a_preset_folder_that_is_not_there_is_refused(tmp_path, monkeypatch):
    from runner.errors import ConfigError

    monkeypatch.setenv("CAFFE_RUNNER_CONFIG", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is not a folder: make it"):
        _compose("model=lab_net")


# ---- unit: the shape proof's pieces --------------------------------------------------------------

@pytest.mark.unit
def test_the_run_geometry_is_the_batch_a_task_feeds(tiny_net):
    from conftest import tiny_model_args
    from runner.engine.modelcheck import _pair_key, run_geometry

    cfg = _compose(*tiny_model_args(tiny_net), "batch_size=5")
    g = run_geometry(cfg)
    assert g["shape"] == [5, 3, 32, 40] and g["blobs"] == ["emb"] and g["net_hw"] == [32, 40]
    cfg = _compose(*tiny_model_args(tiny_net), "batch_size=5", "model.input_size=[64,64]",
                   "model.preprocess.oversample=true", "model.preprocess.resize_size=80")
    g2 = run_geometry(cfg)
    assert g2["shape"] == [50, 3, 64, 64] and g2["input_size"] == [64, 64]  # 10 crops per image
    shas = {"prototxt": "a", "weights": "b"}
    keys = {_pair_key(shas, "build"), _pair_key(shas, "build", g), _pair_key(shas, "build", g2)}
    assert len(keys) == 3  # another geometry is checked again


@pytest.mark.unit
@pytest.mark.parametrize("declared", [
    'input: "data" input_dim: 1 input_dim: 3 input_dim: 20 input_dim: 24',
    'input: "data" input_shape { dim: 1 dim: 3 dim: 20 dim: 24 }',
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 20 dim: 24 } } }',
])
def test_your_own_nets_input_size_is_read_from_each_way_a_prototxt_declares_it(declared, tmp_path):
    from runner.engine.modelcheck import run_geometry

    proto = tmp_path / "deploy.prototxt"
    proto.write_text(f'name: "n"\n{declared}\nlayer {{ name: "c" type: "Convolution" bottom: "data" top: "c" '
                     "convolution_param { num_output: 2 kernel_size: 3 } }\n")
    cfg = _compose(f"model.prototxt={proto}", f"model.weights={tmp_path}/w", *ZOO_PREPROCESS, "output.blobs=[c]",
                   "batch_size=3")
    assert run_geometry(cfg)["shape"] == [3, 3, 20, 24]


@pytest.mark.unit
def test_a_shape_failure_names_caffes_line_and_the_nets_own_size():
    from runner.engine.modelcheck import describe_shape_failure

    said = "Check failed: K_ == new_K (9216 vs. 20736) Input size incompatible with inner product parameters."
    msg = describe_shape_failure("/m/deploy.prototxt", {"shape": [16, 3, 300, 300], "blobs": ["fc7"],
                                                        "net_hw": [227, 227]}, said, -6)
    assert said in msg and "batch 16x3x300x300" in msg and "(fix: model.input_size=[227,227]" in msg


# ---- slow: real runs of the zoo nets as your own files -------------------------------------------

def _photos(photos: Path, tmp_path: Path, n: int = 3) -> Path:
    """A few of the sample photos (the machine is shared: keep runs small)."""
    import shutil

    d = tmp_path / "few"
    d.mkdir()
    for f in sorted(p for p in photos.rglob("*") if p.suffix in (".jpg", ".png"))[:n]:
        shutil.copyfile(f, d / f.name)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO_NETS))
def test_a_zoo_net_as_your_own_files_runs_at_its_own_size(name, zoo, photos, tmp_path):
    proto, weights = zoo(name)
    blob, want = ZOO_NETS[name][1], ZOO_NETS[name][2]
    few = _photos(photos, tmp_path)
    common = [f"input.dir={few}", f"model.prototxt={proto}", f"model.weights={weights}", *ZOO_PREPROCESS,
              f"output.blobs=[{blob}]", "batch_size=2", "launcher.workers=1", "num_shards=1"]
    feats = {}
    for backend in ("auto", "caffe"):
        run = tmp_path / backend
        p = run_cli(*common, f"output.dir={run}", f"backend={backend}")
        plan = json.loads((run / "run.json").read_text())
        own = 224 if name == "googlenet" else 227
        assert plan["input_hw"] == [own, own] and plan["model"]["name"] == "own"
        assert f"input 3x{own}x{own} (the prototxt's own size)" in plan["model"]["input"]
        assert "mean [104.0, 117.0, 123.0]" in plan["model"]["input"]
        assert f"input 3x{own}x{own}" in p.stderr  # the log says it too
        import h5py

        with h5py.File(run / "features.h5", "r") as f:
            key = blob.replace("/", "__")
            feats[backend] = f[f"features/{key}"][:]
        assert feats[backend].shape == (3, *want), feats[backend].shape
    a, b = feats["auto"], feats["caffe"]
    assert np.abs(b).max() > 0  # random weights that compute something
    assert np.abs(a - b).max() / np.abs(b).max() <= 1e-5


@pytest.mark.slow
def test_alexnet_at_a_size_its_layers_do_not_take_is_refused_at_plan_time(zoo, photos, tmp_path):
    """Before: the run directory was made, then every shard aborted in Caffe (K_ == new_K)."""
    proto, weights = zoo("alexnet")
    run, few = tmp_path / "run", _photos(photos, tmp_path)
    p = run_cli(f"input.dir={few}", f"output.dir={run}", f"model.prototxt={proto}",
                f"model.weights={weights}", *ZOO_PREPROCESS, "output.blobs=[fc7]", "model.input_size=[300,300]",
                "batch_size=2", "launcher.workers=1", env={"CAFFE_RUNNER_CACHE": str(tmp_path / "cache")}, check=False,
                timeout=300)
    line = _one_error_line(p)
    assert "Check failed: K_ == new_K" in line and "Input size incompatible with inner product parameters" in line
    assert "(fix: model.input_size=[227,227]" in line and "batch 2x3x300x300" in line, line
    assert not run.exists()
    # a blob before fc6 does take 300x300: the run's own cut, proven at its own geometry
    p = run_cli(f"input.dir={few}", f"output.dir={run}", f"model.prototxt={proto}", f"model.weights={weights}", *ZOO_PREPROCESS,
                "output.blobs=[pool5]", "model.input_size=[300,300]", "batch_size=2", "launcher.workers=1",
                "num_shards=1", env={"CAFFE_RUNNER_CACHE": str(tmp_path / "cache")})
    import h5py

    with h5py.File(run / "features.h5", "r") as f:
        assert f["features/pool5"].shape == (3, 256, 9, 9)


@pytest.mark.slow
def test_inspect_lists_every_blob_of_any_prototxt_at_the_input_it_uses(zoo):
    proto, weights = zoo("googlenet")
    own = [f"model.prototxt={proto}", f"model.weights={weights}"]
    p = run_cli("inspect", *own)  # no blob, no preprocessing: it lists, and says what a run needs
    assert "data: input 3x224x224 (the prototxt's own size); preprocessing: not given" in p.stdout, p.stdout
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith("    ") and "<-" in ln}
    from runner.engine.model import parse_prototxt

    assert rows.pop("blob").split()[:4] == ["blob", "<-", "layer", "writing"]  # the header
    assert sorted(rows) == sorted(parse_prototxt(str(proto)).blobs[1:]), p.stdout  # every blob of the net
    row = rows["pool5/7x7_s1"]
    assert "<- pool5/drop_7x7_s1" in row and "1024 x 1 x 1" in row and "4,096" in row and "onnxruntime" in row, row
    assert "no blob chosen (model own has no default_blobs): name the ones to extract with output.blobs=" in p.stdout
    # an unknown blob: the listing, then the one error line (exit 2)
    p = run_cli("inspect", *own, "output.blobs=[fc7]", check=False)
    assert p.returncode == 2 and "pool5/7x7_s1" in p.stdout and "Traceback" not in p.stderr
    assert "blob 'fc7' is not in the net" in p.stderr
    # AlexNet at 300x300: the shapes the run would use (pool5 6x6 -> 9x9: 256 x 81 = 20736 inputs to fc6), and where Caffe stops
    proto, weights = zoo("alexnet")
    p = run_cli("inspect", f"model.prototxt={proto}", f"model.weights={weights}", "model.input_size=[300,300]",
                *ZOO_PREPROCESS)
    assert "data: input 3x300x300 (model.input_size); preprocessing: resize 300x300" in p.stdout, p.stdout
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith("    ") and "<-" in ln}
    assert "256 x 9 x 9" in rows["pool5"] and "fc6" not in rows, p.stdout
    assert "from fc6 on Caffe does not build the net at 3x300x300: Check failed: K_ == new_K" in p.stdout
    # the chosen blob does not take it: the run's own refusal
    p = run_cli("inspect", f"model.prototxt={proto}", f"model.weights={weights}", "model.input_size=[300,300]",
                "output.blobs=[fc7]", check=False)
    assert p.returncode == 2 and "(fix: model.input_size=[227,227]" in p.stderr, p.stderr


@pytest.mark.slow
def test_inspect_judges_the_engine_by_the_layers_that_run(tiny_net, tmp_path):
    """A TRAIN-phase twin with the same name as a TEST layer (a layer the converter does not
    take) does not run in the deployed net: inspect says ONNX Runtime, as the task would."""
    from conftest import TINY_PROTOTXT

    proto = tmp_path / "twin.prototxt"
    twin = ('layer { name: "act" type: "Power" bottom: "emb" top: "emb_t" include { phase: TRAIN } }\n'
            'layer { name: "act" type: "TanH" bottom: "emb" top: "emb_t" include { phase: TEST } }')
    proto.write_text(TINY_PROTOTXT.replace('layer { name: "act" type: "TanH" bottom: "emb" top: "emb_t" }', twin))
    assert "Power" in proto.read_text()
    p = run_cli("inspect", f"model.prototxt={proto}", f"model.weights={tiny_net[1]}", "output.blobs=[emb_t]",
                *ZOO_PREPROCESS)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("engine on the CPU"))
    assert "ONNX Runtime" in line and "Power" not in line, line
