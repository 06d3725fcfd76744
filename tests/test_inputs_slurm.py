"""An LMDB and tar shards read by a real Slurm array: each task reads its own key range or
samples, and the result equals a local run."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import run_cli, tiny_model_args
from test_inputs import _make_lmdb, _make_tars

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BASE = ["launcher=slurm", "launcher.shards_per_task=1", "launcher.take_free_shards=false",
        "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10",
        "launcher.gpus_per_task=0", "launcher.wait=true", "num_shards=3", "batch_size=1",
        # the inputs hold a broken JPEG and a sample without an image among ~20: over the 5% default
        "run.max_failure_fraction=null"]


def _rows(run):
    with h5py.File(run / "features.h5", "r") as f:
        return [bytes(n) for n in f["names_raw"][:]], f["labels"][:].tolist(), f["feats"][:]


def test_slurm_array_reads_lmdb_key_ranges_and_tars(cluster, photos, tiny_net, tmp_path):
    db = tmp_path / "db"
    keys = _make_lmdb(db, photos, "encoded")
    _make_tars(tmp_path / "tars", photos)
    for name, inp in (("lmdb", f"input.lmdb={db}"), ("tar", f"input.tar={tmp_path / 'tars'}/*.tar")):
        slurm_run, local_run = tmp_path / f"{name}-slurm", tmp_path / f"{name}-local"
        p = run_cli(inp, f"output.dir={slurm_run}", *tiny_model_args(tiny_net), *BASE)
        assert "submitted array job" in p.stdout
        run_cli(inp, f"output.dir={local_run}", *tiny_model_args(tiny_net), "launcher.workers=2", "batch_size=1",
                "num_shards=3", "run.max_failure_fraction=null")
        s_names, s_labels, s_feats = _rows(slurm_run)
        l_names, l_labels, l_feats = _rows(local_run)
        assert s_names == l_names and s_labels == l_labels and len(s_names) >= 19
        np.testing.assert_allclose(s_feats, l_feats, rtol=1e-5, atol=1e-6)
        assert run_cli("verify", slurm_run).returncode == 0
    ordered = sorted(keys)
    for i in range(3):
        with h5py.File(tmp_path / "lmdb-slurm" / "shards" / f"shard-{i:05d}-of-00003.h5", "r") as f:
            read = json.loads(f.attrs["input_read"])
            start, stop = int(f.attrs["start"]), int(f.attrs["stop"])
            assert f.attrs["job_id"]  # ran as a Slurm task
            assert read == {"first_key": ordered[start].decode(), "last_key": ordered[stop - 1].decode(),
                            "records": stop - start, "seeks": 1}
    assert not (db / "lock.mdb").exists()
