"""Issue 36, `caffe-runner compare SWEEP`: linear CKA between a sweep's points, streamed over rows.
The arithmetic against an independent direct computation (centred Gram matrices, HSIC form)
and CKA's known properties; then a real sweep of the tiny net on the sample photos."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import run_cli, tiny_model_args
from runner.ui.compare import Moments, cka_from_moments


def direct_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s linear CKA by its definition over examples: HSIC(K, L) with the
    centred Gram matrices of the rows (n x n), independent of the feature-space moments."""
    x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.sum(k * l_) / (np.linalg.norm(k) * np.linalg.norm(l_)))


def streamed(xs, chunk):
    m = Moments([x.shape[1] for x in xs])
    for s in range(0, len(xs[0]), chunk):
        m.add([x[s:s + chunk] for x in xs])
    return m.matrix()


@pytest.mark.unit
def test_streamed_cka_equals_the_direct_computation_whatever_the_chunking():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(57, 6))
    y = np.tanh(x @ rng.normal(size=(6, 9))) + 0.3 * rng.normal(size=(57, 9))
    z = rng.normal(size=(57, 4))
    want = direct_cka(x, y)
    assert 0.2 < want < 0.99  # a case where the answer is neither end of the scale
    for chunk in (1, 5, 57, 1000):
        m = streamed([x, y, z], chunk)
        assert m[0, 1] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert m[1, 0] == m[0, 1]
        assert m[0, 2] == pytest.approx(direct_cka(x, z), rel=1e-9, abs=1e-12)
        assert m[1, 2] == pytest.approx(direct_cka(y, z), rel=1e-9, abs=1e-12)
        assert np.all(np.diag(m) == 1.0)


@pytest.mark.unit
def test_cka_properties_identity_orthogonal_and_isotropic_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8))
    y = x @ rng.normal(size=(8, 5)) + rng.normal(size=(40, 5))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # an orthogonal transform
    base = streamed([x, y], 7)[0, 1]
    # identical features: 1 (computed, not the diagonal's convention)
    assert streamed([x, x.copy()], 7)[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert streamed([x @ q, y], 7)[0, 1] == pytest.approx(base, rel=1e-9)
    assert streamed([x * 37.5, y], 7)[0, 1] == pytest.approx(base, rel=1e-9)
    assert streamed([x + 5.0, y], 7)[0, 1] == pytest.approx(base, rel=1e-9)  # centring: offsets do not count
    # not invariant to an arbitrary invertible transform, nor blind to which row is which
    a = np.diag(np.linspace(0.1, 10, 8))
    assert abs(streamed([x @ a, y], 7)[0, 1] - base) > 1e-3
    assert streamed([x[::-1].copy(), y], 7)[0, 1] < base - 0.1


@pytest.mark.unit
def test_moments_formula_matches_numpy_on_a_small_case():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 2))
    got = cka_from_moments(10, x.sum(0), y.sum(0), x.T @ x, y.T @ y, x.T @ y)
    assert got == pytest.approx(direct_cka(x, y), rel=1e-12)


def _read(run, blob):
    with h5py.File(run / "features.h5", "r") as f:
        return f["index"][:], f[f"features/{blob}"][:]


@pytest.mark.slow
def test_compare_a_real_sweep_against_numpy(tiny_net, photos, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("-m", f"input.dir={photos}", f"output.dir={sweep}", *tiny_model_args(tiny_net),
            "output.blobs=[emb],[p1,emb_t]", "launcher.workers=1", "num_shards=2")
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert len(points) == 2
    p = run_cli("compare", sweep)
    result = json.loads((sweep / "compare.json").read_text())
    assert result["labels"] == [points[0]["name"], f"{points[1]['name']}:p1", f"{points[1]['name']}:emb_t"]
    i0, emb = _read(sweep / points[0]["name"], "emb")
    i1, p1 = _read(sweep / points[1]["name"], "p1")
    _, emb_t = _read(sweep / points[1]["name"], "emb_t")
    assert result["dims"] == [16, int(np.prod(p1.shape[1:])), 16] and p1.ndim == 4
    assert np.array_equal(i0, i1) and len(i0) == result["images"] > 10
    m = np.array(result["matrix"])
    assert m[0, 1] == pytest.approx(direct_cka(emb, p1), abs=2e-6)
    assert m[0, 2] == pytest.approx(direct_cka(emb, emb_t), abs=2e-6)
    assert m[1, 2] == pytest.approx(direct_cka(p1, emb_t), abs=2e-6)
    assert m[0, 2] > 0.8  # tanh of the same embedding: close, not equal
    # streamed in windows of 3 manifest positions: the same matrix
    from runner.ui.compare import compare

    assert np.allclose(compare(sweep, chunk=3)["matrix"], m, atol=2e-6)
    assert "linear CKA on" in p.stdout and points[0]["name"] in p.stdout
    svg = (sweep / "compare.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<rect") == 9

    # one table: what differs (the blobs and their dimensions), not every constant override
    st = run_cli("status", sweep)
    assert f"emb_t {emb_t.shape[1]}" in st.stdout and f"p1 {'x'.join(map(str, p1.shape[1:]))}" in st.stdout, st.stdout
    assert "output.blobs=[p1,emb_t]" in st.stdout and "model.preprocess.mean" not in st.stdout, st.stdout
    assert "img/s" in st.stdout.splitlines()[1] and "blobs" in st.stdout.splitlines()[1], st.stdout
    # verify on the whole sweep
    v = run_cli("verify", sweep)
    assert v.stdout.count("OK: ") == 3 and "every point of the sweep" in v.stdout, v.stdout
    # a run directory, not a sweep: one line, exit 2
    bad = run_cli("compare", sweep / points[0]["name"], check=False)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "not a sweep folder" in lines[0], bad.stderr
    # too wide for the memory given: refused naming the fix
    wide = run_cli("compare", sweep, "--max-gb", "0.0001", check=False)
    assert wide.returncode == 2 and "output.pooling=avg" in wide.stderr, wide.stderr


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_rows_shared_by_every_point_are_found_window_by_window(chunk):
    """Points on the same input whose failures differ: only the images every point has as a row
    count, and each point's row positions are where those images are in its own file."""
    from runner.ui.compare import _chunks

    count = 23
    failed = {"a": {3, 4, 17}, "b": {0, 4, 22}, "c": set()}
    files = {k: {"index": np.array([i for i in range(count) if i not in f])} for k, f in failed.items()}
    got = {k: [] for k in files}
    for rows in _chunks(files, count, chunk):
        for k, pos in rows.items():
            got[k].extend(files[k]["index"][pos].tolist())
    shared = [i for i in range(count) if not any(i in f for f in failed.values())]
    assert got == {k: shared for k in files}


# ---- issue 36: a sweep's output.dir is checked before the first point -----------------------------

def _sweep_refusal(capsys, root, photos):
    from runner.ui import cli

    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code = cli.run(["-m", f"input.dir={photos}", f"output.dir={root}", "batch_size=4,8"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, (out, err)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "nothing written"
    return lines[0]


@pytest.mark.unit
def test_a_sweep_refuses_a_folder_holding_other_things(capsys, photos, tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "todo.txt").write_text("mine\n")
    line = _sweep_refusal(capsys, root, photos)
    assert "is not empty and holds no sweep (todo.txt)" in line and "new or empty output.dir" in line


@pytest.mark.unit
def test_a_sweep_refuses_a_run_directory(capsys, photos, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "run.json").write_text("{}")
    assert "is a run directory, not a sweep folder" in _sweep_refusal(capsys, root, photos)


@pytest.mark.unit
def test_a_sweep_refuses_another_sweeps_folder_and_takes_its_own(capsys, photos, tmp_path):
    from runner.run.config import override_dirname
    from runner.run.sweep import check_sweep_root, record_sweep

    root = tmp_path / "s"
    other = [["batch_size=2"], ["batch_size=3"], ["batch_size=5"]]
    record_sweep(root, ["0", "1", "2"], [override_dirname(p) for p in other], other)
    line = _sweep_refusal(capsys, root, photos)
    assert "holds another sweep (3 point(s), not these 2" in line, line
    # the same definition resumes (checked here; a real resume is in test_local_e2e)
    mine = [["batch_size=4"], ["batch_size=8"]]
    keys = [override_dirname(p) for p in mine]
    record_sweep(tmp_path / "t", ["0", "1"], keys, mine)
    check_sweep_root(tmp_path / "t", keys, [])
    check_sweep_root(tmp_path / "new", keys, [])  # not there yet


@pytest.mark.unit
def test_a_suggested_command_pastes_as_is_for_a_path_with_a_space(tmp_path):
    """Issue 36: suggested commands were not quoted (`unrecognized arguments: space/slurm run`)."""
    import re
    import subprocess
    import sys

    from runner.ui.compare import compare
    from runner.errors import ConfigError
    from runner.run.sweep import record_sweep

    root = tmp_path / "my space" / "sweep"
    record_sweep(root, ["0"], ["k"], [["batch_size=4"]])
    with pytest.raises(ConfigError) as e:
        compare(root)
    cmd = re.search(r"\((caffe-runner status .*?)\)", str(e.value)).group(1)
    assert f"'{root}'" in cmd, cmd
    p = subprocess.run(["bash", "-c", cmd.replace("caffe-runner", f"{sys.executable} -m runner", 1)],
                       capture_output=True, text=True, timeout=120)
    assert "unrecognized arguments" not in p.stderr and "sweep of 1 point(s)" in p.stdout, (p.stdout, p.stderr)
