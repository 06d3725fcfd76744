"""A folder as a user's phone and camera leave it (issue 20, item 2), end to end with the real
pycaffe: HEIC and AVIF photos (encoded here from the sample photos) are extracted like the JPEG
they came from; raw files the run cannot read are skipped and counted, in the plan summary,
`status` and `verify`; a symlinked folder is entered once."""
from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import run_cli, tiny_model_args
from test_folder_listing import _encoded

pytestmark = pytest.mark.slow


def test_phone_folder_every_file_accounted_for(photos, tiny_net, tmp_path):
    root, elsewhere = tmp_path / "phone", tmp_path / "card"
    root.mkdir()
    elsewhere.mkdir()
    shutil.copy(photos / "rocket.jpg", root / "rocket.jpg")
    for i in range(3):
        (root / f"IMG_{i}.heic").write_bytes(_encoded(photos, "HEIF"))
        (root / f"raw_{i}.jp2").write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 64)
    (root / "IMG_9.avif").write_bytes(_encoded(photos, "AVIF"))
    shutil.copy(photos / "coffee.jpg", elsewhere / "coffee.jpg")
    os.symlink(elsewhere, root / "card")
    os.symlink(root, root / "card_loop")
    run = tmp_path / "run"
    p = run_cli(f"input.dir={root}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1")
    said = "10 files seen, 6 listed, 4 skipped: 3 .jp2 (not in input.extensions); 1 symlinked folder already listed"
    assert said in p.stderr, p.stderr[-3000:]
    with h5py.File(run / "features.h5", "r") as f:
        names = list(f["names"].asstr()[:])
        feats = dict(zip(names, f["feats"][:]))
        assert len(f["failures/index"]) == 0, f["failures/reason"].asstr()[:]
    assert sorted(names) == ["IMG_0.heic", "IMG_1.heic", "IMG_2.heic", "IMG_9.avif", "card/coffee.jpg", "rocket.jpg"]
    for n in ("IMG_0.heic", "IMG_9.avif"):  # the same picture as rocket.jpg, lossy-encoded
        a, b = feats[n].ravel(), feats["rocket.jpg"].ravel()
        assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99, n
    st = run_cli("status", run)
    assert "input: 10 files seen, 6 listed, 4 skipped: 3 .jp2" in st.stdout, st.stdout
    v = run_cli("verify", run)
    assert "note: input: 10 files seen, 6 listed, 4 skipped: 3 .jp2" in v.stdout, v.stdout
    # the rerun resumes: the symlinked folder is not taken for a change of the input
    again = run_cli(f"input.dir={root}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1")
    assert "already complete" in again.stderr, again.stderr[-2000:]
