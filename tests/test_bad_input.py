"""End to end on the trouble corpus: every file is accounted for exactly once, as a feature
row or as a recorded failure with its reason; odd names map back to the exact bytes."""
import os
import re
import shutil
from pathlib import Path
import subprocess
import sys

import h5py
import pytest

from conftest import REPO, run_cli, tiny_model_args
from corpus import make_corpus

pytestmark = pytest.mark.slow


def _accounted(run):
    with h5py.File(run / "features.h5", "r") as f:
        rows = [bytes(n) for n in f["names_raw"][:]]
        fails = dict(zip((bytes(n) for n in f["failures/names_raw"][:]), f["failures/reason"].asstr()[:]))
        assert len(f["feats"]) == len(rows) == len(f["names"])
    return rows, fails


def test_corpus_every_file_once(tiny_net, tmp_path):
    root = tmp_path / "in"
    expect = make_corpus(root)
    run = tmp_path / "run"
    p = run_cli(f"input.dir={root}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=2",
                "num_shards=3", "batch_size=4", "run.max_failure_fraction=null")  # a corpus of bad files
    n_bad = sum(1 for want in expect.values() if want != "ok")
    m = re.search(r"images:\s+(\d+) \((\d+) extracted, (\d+) failed\)", p.stdout)
    assert m and tuple(map(int, m.groups())) == (len(expect), len(expect) - n_bad, n_bad), p.stdout
    rows, fails = _accounted(run)
    # each failure's log line names the file as text (non-UTF-8 bytes as \xNN), never a bytes literal
    logged = [ln for ln in p.stderr.splitlines() if re.search(r"shard \d+: image \d+ .* failed: ", ln)]
    assert len(logged) == n_bad and not any(re.search(r"image \d+ b['\"]", ln) for ln in logged), logged
    assert sorted(rows + list(fails)) == sorted(expect), "every file exactly once"
    assert len(rows) + len(fails) == len(set(rows) | set(fails))
    for name, want in expect.items():
        if want == "ok":
            assert name in rows, (name, fails.get(name))
        else:
            assert want.lower() in fails[name].lower(), (name, fails[name])
    for name in rows + list(fails):  # the stored name maps back to the exact file
        assert os.path.lexists(os.path.join(os.fsencode(root), name))
    assert run_cli("verify", run).returncode == 0


def test_file_deleted_after_listing(tiny_net, photos, tmp_path):
    """The manifest lists a file that is gone when its shard runs."""
    root = tmp_path / "in"
    shutil.copytree(photos, root)
    lst = tmp_path / "list.txt"
    names = sorted(p.name for p in root.glob("*.jpg"))
    lst.write_text("\n".join(names) + "\n")
    (root / names[3]).unlink()
    run = tmp_path / "run"
    run_cli(f"input.list={lst}", f"input.root={root}", f"output.dir={run}", *tiny_model_args(tiny_net),
            "launcher.workers=1", "run.max_failure_fraction=null")  # 1 of a few: over the default 5%
    rows, fails = _accounted(run)
    assert fails == {names[3].encode(): "listed but not found"}  # a list names it; it was never there
    assert len(rows) == len(names) - 1


def test_unreadable_file(photos, tmp_path):
    """chmod 000 stops everyone but root: as root, the decoder runs without the capabilities
    that let root read anything (a real permission denial, still root: the venv may live where
    only root can reach it, as under a fresh machine's /root); otherwise as this user."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cr-nobody-"))  # pytest's own tmp folders are 0700
    try:
        os.chmod(base, 0o755)
        locked = base / "locked.jpg"
        shutil.copy(photos / "astronaut.jpg", locked)
        os.chmod(locked, 0)
        code = ("import sys; from runner.engine.decode import Decoder, Geometry; "
                "print(Decoder(Geometry((32, 32))).load(sys.argv[1].encode())[1])")
        cmd = [sys.executable, "-c", code, str(locked)]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.strip() == "permission denied"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_list_of_paths_that_do_not_resolve_stops_before_work(tiny_net, photos, tmp_path):
    """The issue's case: relative paths written against the current folder, the list elsewhere:
    it used to extract 0 of 20 ('listed but not found' x 20) and exit 0."""
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    rels = sorted(os.path.relpath(p, data) for p in data.rglob("*.jpg"))
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "val.txt"
    lst.write_text("".join(f"{r}\n" for r in rels))
    run = tmp_path / "run"
    p = run_cli(f"input.list={lst}", f"output.dir={run}", *tiny_model_args(tiny_net), check=False, cwd=data,
                env={"PYTHONPATH": str(REPO)})  # this tree's runner, from another folder
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(line) == 1 and f"do not exist under {lst.parent}" in line[0] and f"input.root={data}" in line[0]
    assert not run.exists()


def test_a_run_that_extracts_nothing_exits_1(tiny_net, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(b"not a jpeg at all" * 10)
    run = tmp_path / "run"
    p = run_cli(f"input.dir={root}", f"output.dir={run}", *tiny_model_args(tiny_net), check=False)
    assert p.returncode == 1 and "none of the 5 images could be extracted" in p.stderr, p.stderr[-2000:]
    assert (run / "features.h5").exists(), "the failures are kept"
