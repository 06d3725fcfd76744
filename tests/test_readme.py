"""The README's examples run as written: every fenced block that uses the sample photos
(`samples/`, what `make demo` writes) is extracted and run, line by line, from a folder laid
out like the repository after `make demo`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def readme_blocks(lang: str):
    text = (REPO / "README.md").read_text()
    return [b for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S) if "samples" in b]


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
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return tmp_path, env


def test_the_readme_has_sample_blocks():
    assert len(readme_blocks("bash")) >= 1 and len(readme_blocks("python")) >= 1
    cmds = [c for b in readme_blocks("bash") for c in commands(b)]
    assert any(c.startswith("caffe-runner -m ") for c in cmds), "the sweep example is among them"
    assert any(c.startswith("caffe-runner status ") for c in cmds)


def test_readme_shell_blocks_run_as_written(repo_like):
    cwd, env = repo_like
    ran = 0
    for block in readme_blocks("bash"):
        for cmd in commands(block):
            p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, f"README command failed: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
            assert "Traceback" not in p.stderr, cmd
            if cmd.startswith("caffe-runner status "):
                assert "merged" in p.stdout
            if cmd.startswith("caffe-runner -m "):
                runs = [d for d in (cwd / "runs" / "sweep").iterdir() if (d / "features.h5").exists()]
                assert len(runs) == 4, "every combination of the sweep"
            ran += 1
    assert ran >= 5


def test_readme_python_blocks_run_as_written(repo_like):
    cwd, env = repo_like
    for block in readme_blocks("python"):
        p = subprocess.run([sys.executable, "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, f"README block failed:\n{block}\n{p.stderr[-3000:]}"
