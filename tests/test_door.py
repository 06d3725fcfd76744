"""Issue 29, "what a neighbour could do (or a careless path)": the interpreter path quoted into
the sbatch script, bind lists that a ',' or ':' would split, containers run as the calling
user, a run directory others can write (submitit's pickles), model files pinned by sha256 on
first fetch, sdists checked before pip runs anything of them. The pure parts here; the real
submission from a venv under a hostile path is at the end (dev cluster)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CLI, REPO, run_cli, tiny_model_args
from runner import runtimes as ct
from runner.errors import ConfigError
from runner.launch.registry import launcher_for
from runner.schema import ContainerConf, InputConf, LocalLauncherConf, ModelConf, OutputConf, RunConf, SlurmLauncherConf

HOSTILE = "my env $(touch pwned)"  # a folder name with a space and a command substitution


def _cfg(runtime="none", image=None, input_dir="/data/imgs", output_dir="/scratch/u/run", launcher=None, **kw):
    return OmegaConf.structured(RunConf(
        model=ModelConf(name="m", prototxt="/models/m/deploy.prototxt", weights="/models/m/w.caffemodel"),
        launcher=launcher or SlurmLauncherConf(partition="gpu", timeout_min=120, gpus_per_task=0),
        input=InputConf(dir=input_dir), output=OutputConf(dir=output_dir),
        container=ContainerConf(runtime=runtime, image=image, **kw)))


# ---- 16: the host's interpreter, quoted into the sbatch script --------------------------------

@pytest.mark.unit
def test_the_interpreter_path_is_one_word_in_the_sbatch_script(monkeypatch):
    from runner.launch.slurm import array_executor

    python = f"/home/u/{HOSTILE}/bin/python"
    monkeypatch.setattr(sys, "executable", python)
    ex = array_executor(_cfg(), "/scratch/u/run/logs/%j")
    ex.parameters["map_count"] = 2
    text = ex._make_submission_file_text(ex._submitit_command_str, "uid")
    line = next(ln for ln in text.splitlines() if "submitit.core._submit" in ln)
    words = shlex.split(line)
    assert python in words, line  # one word for the shell: no split at the space, no $(...) run
    assert words[words.index(python) + 1:words.index(python) + 4] == ["-u", "-m", "submitit.core._submit"]


# ---- 17: bind lists split by ',' or ':' --------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("runtime, image, path, bound, sep", [
    ("pyxis", "/images/cr.sqsh", "/data/a,b", "/data/a,b", ","),
    ("pyxis", "/images/cr.sqsh", "/data/a:b", "/data/a:b", ":"),
    ("apptainer", "/images/cr.sif", "/data/a,b", "/data/a,b", ","),
    ("apptainer", "/images/cr.sif", "/data/x:/etc", "/data/x:/etc", ":"),
    ("podman", "localhost/cr:cpu", "/data/x:/etc", "/data/x:/etc", ":"),
    ("docker", "cr:cpu", "/data/a:b", "/data/a:b", ":"),
    ("charliecloud", "/images/cr.sqfs", "/da:ta/imgs", "/da:ta", ":"),  # ch-run binds the top-level folder
])
def test_a_separator_in_a_bound_path_is_refused_in_one_line(runtime, image, path, bound, sep):
    cfg = _cfg(runtime, image, input_dir=path)
    with pytest.raises(ConfigError) as e:
        ct.check_container(cfg, launcher_for(cfg).placement)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"input.dir {bound} holds {sep!r}"), msg
    assert f"container.runtime={runtime}" in msg and "symlink" in msg


@pytest.mark.unit
def test_separators_that_do_not_split_pass():
    # a ',' is no separator for podman's --volume nor ch-run's --bind; a ':' below Charliecloud's
    # top-level mount point is not bound as such; the user's own SRC:DST binds are meant so
    for runtime, image, path, binds in [("podman", "localhost/cr:cpu", "/data/a,b", []),
                                         ("charliecloud", "/images/cr.sqfs", "/data/a:b", []),
                                         ("apptainer", "/images/cr.sif", "/data/imgs", ["/scratch:/mnt"])]:
        cfg = _cfg(runtime, image, input_dir=path, binds=binds)
        with pytest.raises(ConfigError) as e:  # the next check: the image or the runtime is not here
            ct.check_container(cfg, launcher_for(cfg).placement)
        assert "holds" not in str(e.value), str(e.value)


@pytest.mark.unit
def test_comma_in_a_user_bind_or_the_image_is_refused_where_lists_are_comma_separated():
    cfg = _cfg("apptainer", "/images/cr.sif", binds=["/a,b:/mnt"])
    with pytest.raises(ConfigError, match=r"^container.binds /a,b:/mnt holds ','"):
        ct.check_container(cfg, launcher_for(cfg).placement)
    cfg = _cfg("pyxis", "/images/a,b.sqsh")
    with pytest.raises(ConfigError, match=r"^container.image /images/a,b.sqsh holds ','"):
        ct.check_container(cfg, launcher_for(cfg).placement)


@pytest.mark.unit
def test_bind_separator_refused_at_plan_time_with_exit_2(photos, tmp_path):
    """The command line: one line, exit 2, nothing written, before the image is even looked at."""
    inp = tmp_path / "a,b"
    inp.symlink_to(photos)
    run = tmp_path / "run"
    p = run_cli(f"input.dir='{inp}'", f"output.dir={run}", "launcher=local", "container.runtime=apptainer",
                f"container.image={tmp_path / 'no-such.sif'}", check=False)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"input.dir {inp} holds ','" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not run.exists()


# ---- 18: podman/docker run the task as the calling user ---------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("runtime, uid, gid, groups, expected", [
    ("podman", 1000, 1000, (27, 1001), ["--userns=keep-id"]),  # rootless: the same ids inside
    ("podman", 0, 0, (), ["--user", "0:0"]),  # rootful podman: the ids themselves
    ("docker", 1000, 1000, (27, 1001), ["--user", "1000:1000", "--group-add", "27", "--group-add", "1001"]),
    ("docker", 0, 0, (), ["--user", "0:0"]),
])
def test_oci_runs_as_the_calling_user(monkeypatch, runtime, uid, gid, groups, expected):
    monkeypatch.setattr(ct, "user_ids", lambda: (uid, gid, groups))
    image = "localhost/cr:cpu"
    cmd = ct.container_command(_cfg(runtime, image), ["python", "-m", "x"])
    i = cmd.index(image)
    assert cmd[i - len(expected):i] == expected, cmd  # before the image: options, not the task's arguments
    assert cmd[i + 1:] == ["-m", "x"]


@pytest.mark.unit
def test_user_ids_are_the_callers():
    uid, gid, groups = ct.user_ids()
    assert (uid, gid) == (os.getuid(), os.getgid()) and gid not in groups
    assert set(groups) | {gid} == set(os.getgroups()) | {gid}
