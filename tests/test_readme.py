"""The documentation's examples run as written: every fenced block of README.md and docs/*.md
that uses the sample photos (`samples/`, what `make demo` writes) is extracted and run, line by
line, from a folder laid out like the repository after `make demo` (the README's blocks first,
then each page's, in conftest.doc_pages() order)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, doc_blocks

pytestmark = pytest.mark.slow


def readme_blocks(lang: str):
    return [b for _, b in sample_blocks(lang)]


def sample_blocks(lang: str):
    """(page, block) of the documentation's blocks that use the sample photos."""
    return [(page, b) for page, b in doc_blocks(lang) if "samples" in b]


def commands(block: str):
    """Shell lines of a block: continuations joined, comments dropped; `make` and
    `source .venv/bin/activate` are what the fixture already did."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith(("#", "make ", "source ")):
            out.append(line)
    return out


@pytest.fixture
def repo_like(photos, tmp_path):
    shutil.copytree(photos, tmp_path / "samples")
    # PYTHONPATH: this tree's runner, whatever the venv's editable install points at
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    return tmp_path, env


def test_the_readme_has_sample_blocks():
    assert len(readme_blocks("bash")) >= 1 and len(readme_blocks("python")) >= 1
    # the README's first run, then the pages that took the rest of it: all run, none dropped
    pages = {page for lang in ("bash", "python") for page, _ in sample_blocks(lang)}
    assert {"README.md", "docs/configuration.md", "docs/run-directory.md", "docs/python.md"} <= pages, pages
    assert len(readme_blocks("bash")) >= 3 and len(readme_blocks("python")) >= 1
    cmds = [c for b in readme_blocks("bash") for c in commands(b)]
    assert any(c.startswith("caffe-runner -m ") for c in cmds), "the sweep example is among them"
    assert any(c.startswith("caffe-runner status ") for c in cmds)


def test_readme_shell_blocks_run_as_written(repo_like):
    cwd, env = repo_like
    ran = 0
    for block in readme_blocks("bash"):
        for cmd in commands(block):
            p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, f"documented command failed: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
            assert "Traceback" not in p.stderr, cmd
            if cmd.startswith("caffe-runner status "):
                assert "merged" in p.stdout
            if cmd.startswith("caffe-runner -m ") and "runs/sweep" in cmd:
                runs = [d for d in (cwd / "runs" / "sweep").iterdir() if (d / "features.h5").exists()]
                assert len(runs) == 4, "every combination of the sweep"
            if cmd.startswith("caffe-runner --sweep "):
                runs = [d for d in (cwd / "runs" / "by-file").iterdir() if (d / "features.h5").exists()]
                assert len(runs) == 4 and "4 of them in 1 shared pass" in p.stdout, p.stdout
            if cmd.startswith("caffe-runner report ") and "by-file" in cmd:
                assert (cwd / "runs" / "by-file" / "report.html").exists()
            if cmd.startswith("caffe-runner compare "):
                assert "linear CKA on" in p.stdout and (cwd / cmd.split()[-1] / "compare.svg").exists()
            ran += 1
    assert ran >= 5


def test_readme_python_blocks_run_as_written(repo_like):
    cwd, env = repo_like
    for block in readme_blocks("python"):
        p = subprocess.run([sys.executable, "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"documented block failed:\n{block}\n{p.stderr[-3000:]}"


def _python_block():
    blocks = [b for b in readme_blocks("python") if "extract(" in b]
    assert len(blocks) == 1, "the Python API example (docs/python.md)"
    return blocks[0]


def _check_api_run(p, cwd):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "RunBusyError" not in p.stderr and "<stdin>" not in p.stderr and "Traceback" not in p.stderr, \
        p.stderr[-3000:]
    assert (cwd / "runs" / "api" / "features.h5").is_file()


def test_readme_api_example_as_a_script_file(repo_like):
    """Saved as a file and run with `python script.py`: no __main__ guard, as a user writes it
    (the workers used to import the script again, and call extract() again, forever)."""
    cwd, env = repo_like
    (cwd / "example.py").write_text(_python_block())
    p = subprocess.run([sys.executable, "example.py"], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=300)
    _check_api_run(p, cwd)


def test_readme_api_example_from_stdin(repo_like):
    cwd, env = repo_like
    p = subprocess.run([sys.executable, "-"], input=_python_block(), cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    _check_api_run(p, cwd)


def test_readme_api_example_in_a_notebook(repo_like):
    """In a real Jupyter kernel (ipykernel), executed by nbclient as a notebook is."""
    import nbformat
    from nbclient import NotebookClient

    cwd, env = repo_like
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_python_block()),
                                         nbformat.v4.new_code_cell('print(run.status()["state"])')])
    old = dict(os.environ)
    os.environ.update(PATH=env["PATH"], PYTHONPATH=env["PYTHONPATH"])
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    out = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert out.strip() == "merged", nb.cells
    assert (cwd / "runs" / "api" / "features.h5").is_file()


def test_a_worker_that_cannot_start_fails_the_run_at_once(repo_like, tmp_path):
    """A real command line run whose workers' initializer fails (here replaced by one that
    raises: the parent pickles it by reference) ends within seconds, exit 1, one line naming the
    cause, instead of Pool replacing the worker forever."""
    cwd, env = repo_like
    wrapper = ("import sys, runner.launch.local as L, posix\n"
               "L._init_worker = posix.chdir  # children get posix.chdir(4 arguments): TypeError\n"
               "from runner.ui.cli import main\nmain()\n")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", wrapper, "input.dir=samples", "output.dir=runs/nostart",
                        "backend=simulated", "launcher.workers=2"], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    took = time.time() - t0
    assert p.returncode == 1, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(err) == 1 and "failed while starting: TypeError" in err[0], p.stderr[-3000:]
    assert took < 60 and "Traceback" not in p.stderr, (took, p.stderr[-3000:])


def test_readme_preset_of_your_own_runs_as_written(zoo, photos, tmp_path):
    """The documented preset for a fine-tuned net (the zoo's Flickr style, random weights here) is
    written where its first line says, its files put where it names them, and the block after it
    runs as one script (its `export` holds for the lines after it), with HOME a fresh folder."""
    preset = [b for _, b in doc_blocks("yaml") if "name: flickr_style" in b]
    script = [b for _, b in doc_blocks("bash") if "model=flickr_style" in b]
    assert len(preset) == 1 and len(script) == 1
    home = tmp_path / "home"
    where = Path(preset[0].splitlines()[0].lstrip("# ").strip().replace("~", str(home)))
    where.parent.mkdir(parents=True)
    where.write_text(preset[0])
    proto, weights = zoo("flickr_style")
    models = home / "lab" / "models" / "finetune_flickr_style"
    models.mkdir(parents=True)
    shutil.copyfile(proto, models / "deploy.prototxt")
    shutil.copyfile(weights, models / "finetune_flickr_style.caffemodel")
    (home / "lab" / "photos").mkdir()
    for f in sorted(photos.rglob("*.jpg"))[:3]:  # a few (the machine is shared)
        shutil.copyfile(f, home / "lab" / "photos" / f.name)
    env = dict(os.environ, HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO))
    env.pop("CAFFE_RUNNER_CACHE", None)
    env.pop("XDG_CACHE_HOME", None)
    p = subprocess.run(["bash", "-e", "-c", script[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr
    assert "yours, in $CAFFE_RUNNER_CONFIG/model: flickr_style" in p.stdout  # --help lists it
    assert "data: input 3x227x227 (model.input_size of preset flickr_style)" in p.stdout  # inspect
    import h5py

    with h5py.File(home / "lab" / "runs" / "flickr" / "features.h5", "r") as f:
        assert f["features/fc7"].shape == (3, 4096) and f.attrs["model_name"] == "flickr_style"
