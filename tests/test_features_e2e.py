"""Post-processing through a real extraction (tiny net, real pycaffe): pooling avg/max/gem,
L2 and float16 checked against numpy applied to the unpooled blob of the same run."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import run_cli, tiny_model_args

pytestmark = pytest.mark.slow
BLOB = "stage1/conv"  # 8 x 15 x 19 after ReLU


@pytest.fixture(scope="module")
def unpooled(tiny_net, photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("raw") / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), f"output.blobs=[{BLOB}]",
            "launcher.workers=1", "num_shards=1")
    with h5py.File(run / "features.h5", "r") as f:
        return f["feats"][:], f["names"][:]


def _run(tiny_net, photos, tmp_path, *extra):
    run = tmp_path / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), f"output.blobs=[{BLOB}]",
            "launcher.workers=2", "num_shards=2", *extra)
    with h5py.File(run / "features.h5", "r") as f:
        return f["feats"][:], f["names"][:]


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_pooling_matches_numpy_on_the_unpooled_blob(tiny_net, photos, tmp_path, unpooled, pooling):
    raw, names = unpooled
    assert raw.ndim == 4 and raw.shape[1:] == (8, 15, 19)
    got, gnames = _run(tiny_net, photos, tmp_path, f"output.pooling={pooling}", "output.gem_p=2.5")
    flat = raw.reshape(len(raw), 8, -1).astype(np.float64)
    want = {"avg": flat.mean(-1), "max": flat.max(-1),
            "gem": (np.clip(flat, 1e-6, None) ** 2.5).mean(-1) ** (1 / 2.5)}[pooling]
    assert got.shape == (len(raw), 8) and (gnames == names).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_l2_after_pooling(tiny_net, photos, tmp_path, unpooled):
    raw, _ = unpooled
    got, _ = _run(tiny_net, photos, tmp_path, "output.pooling=avg", "output.l2_normalize=true")
    want = raw.reshape(len(raw), 8, -1).mean(-1)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_float16_storage(tiny_net, photos, tmp_path, unpooled):
    raw, _ = unpooled
    got, _ = _run(tiny_net, photos, tmp_path, "output.dtype=float16")
    assert got.dtype == np.float16 and got.shape == raw.shape
    np.testing.assert_array_equal(got, raw.astype(np.float16))
