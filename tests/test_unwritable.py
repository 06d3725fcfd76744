"""Folders that cannot be written, made for real here: a read-only tmpfs (mount -o ro) and an
immutable folder (chattr +i), both undone after the test; and /proc. An extraction whose
output.dir cannot be written, and an export whose target cannot be, end with one line and
exit 2, before any work (they used to end in a traceback from the lock file or h5py)."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import mount_tmpfs, run_cli
from synthetic import make_run

pytestmark = pytest.mark.unit


@pytest.fixture
def readonly_fs(tmp_path):
    umount = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    try:
        yield tmp_path / "ro"
    finally:
        umount()


@pytest.fixture
def immutable_dir(tmp_path):
    d = tmp_path / "imm"
    d.mkdir()
    p = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot make an immutable folder here (chattr needs root and ext4/xfs): {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def _one_line(p, code=2):
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("caffe-runner: error:"), p.stderr
    return lines[0]


def test_output_dir_on_a_read_only_file_system(readonly_fs, photos):
    for out in (readonly_fs, readonly_fs / "run"):  # the mount point itself, and a new folder in it
        line = _one_line(run_cli(f"input.dir={photos}", f"output.dir={out}", check=False))
        assert f"output.dir {out} cannot be written (it is on a read-only file system)" in line, line


def test_output_dir_in_an_immutable_folder(immutable_dir, photos):
    line = _one_line(run_cli(f"input.dir={photos}", f"output.dir={immutable_dir / 'run'}", check=False))
    assert "cannot be written (operation not permitted: an immutable folder" in line, line
    line = _one_line(run_cli(f"input.dir={photos}", f"output.dir={immutable_dir}", check=False))
    assert "an immutable folder" in line, line
    assert os.listdir(immutable_dir) == []


def test_output_dir_under_proc(photos):
    line = _one_line(run_cli(f"input.dir={photos}", "output.dir=/proc/caffe-run", check=False))
    assert "output.dir /proc/caffe-run cannot be written" in line, line


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_export_to_a_folder_that_cannot_be_written(readonly_fs, immutable_dir, tmp_path, fmt):
    run = make_run(tmp_path / "run", 20, 2, dim=3)
    for target, why in ((readonly_fs / "x" / "out.h5", "read-only file system"),
                        (immutable_dir / "out.h5", "an immutable folder")):
        line = _one_line(run_cli("export", run, target if fmt == "h5" else target.parent / "npy", "--format", fmt,
                                 check=False))
        assert "the export target" in line and "cannot be written" in line and why in line, line
    assert os.listdir(immutable_dir) == []
