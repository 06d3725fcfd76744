"""Input changed since listing: a rerun notices it, says what to do, and input.relist=true
extends the run with the new images as new shards without touching complete ones."""
from __future__ import annotations

import shutil

import h5py
import pytest

from conftest import run_cli, tiny_model_args

pytestmark = pytest.mark.slow


def test_added_image_is_noticed_then_relisted(tiny_net, photos, tmp_path):
    root = tmp_path / "in"
    shutil.copytree(photos, root)
    run = tmp_path / "run"
    args = [f"input.dir={root}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=2",
            "num_shards=2"]
    run_cli(*args)
    n0 = len(list(root.rglob("*.jpg"))) + len(list(root.rglob("*.png")))
    shards = sorted((run / "shards").glob("*.h5"))
    before = {p: p.stat().st_mtime_ns for p in shards}

    (root / "new").mkdir()
    shutil.copy(root / "astronaut.jpg", root / "new" / "added.jpg")
    shutil.copy(root / "coffee.jpg", root / "aaa-added.jpg")

    p = run_cli(*args, check=False)
    assert p.returncode == 2 and "the input changed since this run listed it" in p.stderr
    assert f"{n0} images when listed, {n0 + 2} now" in p.stderr and "input.relist=true" in p.stderr
    v = run_cli("verify", run, check=False)
    assert v.returncode == 1 and "input changed since it was listed" in v.stdout

    run_cli(*args, "input.relist=true")
    assert {p: p.stat().st_mtime_ns for p in shards} == before, "complete shards are never touched"
    new = sorted(p.name for p in (run / "shards").glob("*.h5") if p not in before)
    assert new == ["shard-00002-of-00003.h5"]
    with h5py.File(run / "features.h5", "r") as f:
        names = [bytes(n) for n in f["names_raw"][:]]
        assert len(names) == n0 + 2 and names[-2:] == [b"aaa-added.jpg", b"new/added.jpg"]
        assert len(f["feats"]) == n0 + 2
    assert run_cli("verify", run).returncode == 0
    # the same command again: nothing changed, nothing to do
    p = run_cli(*args)
    assert "shards:        3 (0 run now, 3 already complete)" in p.stdout
