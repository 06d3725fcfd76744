"""Container runtimes without the image: golden sbatch scripts (as submitit tests its own), the
environment each runtime passes, and the plan-time refusals. Fast; Charliecloud's part runs the
real ch-run on a tiny image made here from host binaries (skipped when ch-run is absent).

Each flag was checked against the runtime's documentation:
- apptainer exec (Apptainer 1.x cmd/internal/cli/action_flags.go, "Environment and Metadata"):
  -e/--cleanenv (no host variable passes, except APPTAINERENV_<NAME> ones, injected as NAME),
  --nv, --bind src[:dest[:opts]], --env NAME=VALUE (Singularity >= 3.6), --pwd (synonym of --cwd).
- ch-run 0.31 (man ch-run, tested here): --unset-env=GLOB (fnmatch with FNM_EXTMATCH, so
  '!(A|B)' drops all but A and B), --set-env (no argument: the image's /ch/environment),
  --set-env=NAME=VALUE, --bind=SRC[:DST] (DST must exist in a read-only image), --cd=DIR;
  ch-run exits "$USER not set" without USER.
- podman run 4.x: --env NAME (the host's value, only when set), --pull never, --device
  nvidia.com/gpu=all (CDI), --volume SRC:DST, --workdir, --entrypoint, --network host, --rm,
  --userns=keep-id (rootless only: the user's uid/gid inside are the same as outside), --user UID:GID.
- docker run: --env NAME (the host's value when set; no prefix globs), --gpus all, --user UID:GID,
  --group-add GID (--user alone drops supplementary groups), the rest as podman.
- pyxis (srun --help, NVIDIA/pyxis wiki "Usage"): --container-image=IMAGE|PATH (a squashfs file
  on the node's file system), --container-mounts=SRC:DST[,SRC:DST...], --container-workdir=PATH;
  srun's own --export=ALL,NAME=VALUE.
Regenerate the golden files after a deliberate change: CAFFE_RUNNER_UPDATE_GOLDEN=1 pytest ...
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner.schema import ContainerConf, InputConf, LocalLauncherConf, ModelConf, OutputConf, RunConf, SlurmLauncherConf
from runner import runtimes as ct
from runner.errors import ConfigError
from runner.launch.registry import launcher_for
from runner.runtimes import identity

GOLDEN = Path(__file__).parent / "golden"
IMAGES = {"apptainer": "/images/caffe-runner.sif", "charliecloud": "/images/caffe-runner.sqfs",
          "podman": "localhost/caffe-runner:cpu", "docker": "caffe-runner:cpu", "pyxis": "/images/caffe-runner.sqsh"}


def _cfg(runtime="none", image=None, device="cpu", launcher=None, **kw):
    return OmegaConf.structured(RunConf(
        model=ModelConf(name="m", prototxt="/models/m/deploy.prototxt", weights="/models/m/w.caffemodel"),
        launcher=launcher or SlurmLauncherConf(partition="gpu", timeout_min=120, gpus_per_task=1),
        input=InputConf(dir="/data/imgs"), output=OutputConf(dir="/scratch/u/run"), device=device,
        container=ContainerConf(runtime=runtime, image=image, **kw)))


@pytest.fixture
def fixed_identity(monkeypatch):
    """The image's identity and the user are facts of this machine: fixed for golden files."""
    monkeypatch.setattr(ct, "image_identity", lambda runtime, image: "size=1234;mtime=2026-11-25T17:00:00Z")
    monkeypatch.setattr(ct, "user_name", lambda: "alice")
    monkeypatch.setattr(ct, "user_ids", lambda: (1000, 1000, (27,)))  # alice, a member of group 27


def _check(cfg) -> None:
    """The plan's container check, with the placement of the launcher cfg names."""
    ct.check_container(cfg, launcher_for(cfg).placement)


def _sbatch(cfg) -> str:
    from runner.launch.slurm import array_executor

    ex = array_executor(cfg, "/scratch/u/run/logs/%j")
    ex.parameters["map_count"] = 3  # as map_array does for a 3-task array
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


@pytest.mark.parametrize("runtime", sorted(ct.RUNTIMES))
def test_every_runtime_honours_the_interface(runtime, fixed_identity):
    """One test over the registry (a new runtime module runs it too): its sbatch script is the
    golden one byte for byte, and through the Runtime interface it binds every folder the task
    reads, sets the submission's values and keeps the task's command in order."""
    assert runtime in IMAGES, f"add an image for {runtime} to IMAGES and a golden file (see the docstring)"
    cfg = _cfg(runtime, IMAGES[runtime])
    text = _sbatch(cfg)
    path = GOLDEN / f"sbatch-{runtime}.sh"
    if os.environ.get("CAFFE_RUNNER_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"the {runtime} sbatch script changed; if on purpose, regenerate {path}"
    rt = ct.runtime(runtime)
    spec = ct.container_spec(cfg)
    assert spec.runtime == runtime and spec.binds == tuple(rt.binds(ct.bind_dirs(cfg)))
    w = rt.wrap(spec, ["python", "-m", "x", "a b"])
    whole = " ".join(w.command + w.srun_args)
    for b in spec.binds:
        assert f"{b}:{b}" in whole, (b, whole)
    for k, v in spec.set_env:
        assert f"{k}={v}" in whole
    # the command last, in order (apptainer: inside its `sh -c '... "$@"' sh`)
    assert w.command[-3:] == ["-m", "x", "a b"] or "python -m x 'a b' \"$@\"" in w.command[2], w.command


def test_golden_files_say_what_each_runtime_needs(fixed_identity):
    """Read the golden scripts for the facts that matter, so a regenerated file cannot silently drop one."""
    g = {r: (GOLDEN / f"sbatch-{r}.sh").read_text() for r in IMAGES}
    for r, text in g.items():
        assert "#SBATCH --array=0-2%3" in text and "#SBATCH --partition=gpu" in text
        assert "-u -m submitit.core._submit /scratch/u/run/logs/%j" in text and sys.executable not in text
    assert "apptainer exec --cleanenv --bind /data/imgs:/data/imgs --bind /models/m:/models/m" in g["apptainer"]
    assert "export APPTAINERENV_$v" in g["apptainer"] and "/images/caffe-runner.sif python" in g["apptainer"]
    ch = g["charliecloud"]
    assert "env USER=alice ch-run '--unset-env=!(SLURM_JOB_ID|" in ch and "--set-env --set-env=" in ch
    assert "--bind /data:/data --bind /models:/models --bind /scratch:/scratch" in ch  # top-level mount points
    assert "/images/caffe-runner.sqfs -- python" in ch
    assert "podman run --rm --network host --entrypoint python --workdir /scratch/u/run --pull never" in g["podman"]
    assert "--env SLURM_ARRAY_TASK_ID" in g["docker"] and "caffe-runner:cpu -u -m submitit" in g["docker"]
    # the task runs as the calling user (rootless podman: the same ids inside), not as the image's root
    assert "--volume /scratch/u/run:/scratch/u/run --userns=keep-id localhost/caffe-runner:cpu" in g["podman"]
    assert "--volume /scratch/u/run:/scratch/u/run --user 1000:1000 --group-add 27 caffe-runner:cpu" in g["docker"]
    assert ("srun --unbuffered --output /scratch/u/run/logs/%A_%a/%A_%a_%t_log.out --error "
            "/scratch/u/run/logs/%A_%a/%A_%a_%t_log.err --container-image=/images/caffe-runner.sqsh "
            "--container-mounts=/data/imgs:/data/imgs,/models/m:/models/m,/scratch/u/run:/scratch/u/run "
            "--container-workdir=/scratch/u/run") in g["pyxis"]
    assert "CAFFE_RUNNER_IMAGE_ID=size=1234;mtime=2026-11-25T17:00:00Z" in g["pyxis"]


def test_gpu_flags(fixed_identity):
    def cmd(runtime):
        return " ".join(ct.container_command(_cfg(runtime, IMAGES[runtime], device="gpu"), ["python"]))

    assert "apptainer exec --cleanenv --nv" in cmd("apptainer")
    assert "--gpus all" in cmd("docker") and "--device nvidia.com/gpu=all" in cmd("podman")
    assert "--nv" not in " ".join(ct.container_command(_cfg("apptainer", IMAGES["apptainer"]), ["python"]))
    # charliecloud: no flag; the libraries must be in the image (checked at plan time)
    assert cmd("charliecloud") == " ".join(ct.container_command(_cfg("charliecloud", IMAGES["charliecloud"]),
                                                                ["python"]))


def test_one_shape_for_all_runtimes(fixed_identity):
    for runtime in IMAGES:
        spec = ct.container_spec(_cfg(runtime, IMAGES[runtime]))
        assert spec.image == IMAGES[runtime] and spec.env == ct.TASK_ENV and spec.workdir == "/scratch/u/run"
        assert dict(spec.set_env) == {identity.ENV_RUNTIME: runtime, identity.ENV_IMAGE: IMAGES[runtime],
                                      identity.ENV_IMAGE_ID: "size=1234;mtime=2026-11-25T17:00:00Z"}
        assert set(ct.RUNTIMES) == set(IMAGES)
    assert ct.wrap(ct.container_spec(_cfg()), ["python", "-V"]).command == ["python", "-V"]
    with pytest.raises(ConfigError, match="container.image"):
        ct.container_spec(_cfg("docker"))
    with pytest.raises(Exception, match="Invalid value 'lxc', expected one of"):  # the schema's enum
        _cfg("lxc", "x")


def test_charliecloud_binds_reach_folders_through_top_level_mount_points():
    assert ct.charliecloud_binds(["/scratch/u/run", "/scratch/v/in", "/tmp/x", "/dev/shm/y", "/work/m"]) == [
        "/scratch", "/work"]


def test_apptainer_env_copy_runs_in_sh(tmp_path, fixed_identity):
    """The sh that copies the task's variables to APPTAINERENV_*: run for real, with an
    `apptainer` on PATH that prints what it was given (Apptainer itself cannot run here)."""
    fake = tmp_path / "bin" / "apptainer"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "ARG %s\\n" "$@"\nenv | grep ^APPTAINERENV_ | sort\n')
    fake.chmod(0o755)
    cmd = ct.container_command(_cfg("apptainer", IMAGES["apptainer"]), ["python"])
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "2", "SUBMITIT_EXECUTOR": "slurm",
           "CAFFE_RUNNER_LOG": "/x/it's a log", "PYTHONPATH": "/host/site"}
    out = subprocess.run(cmd + ["-u", "-m", "submitit.core._submit", "/f"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "APPTAINERENV_SLURM_ARRAY_TASK_ID=2" in out and "APPTAINERENV_SUBMITIT_EXECUTOR=slurm" in out
    assert "APPTAINERENV_CAFFE_RUNNER_LOG=/x/it's a log" in out
    assert not any("PYTHONPATH" in line or "SLURM_JOB_ID" in line for line in out)  # unset/foreign stay out
    assert out[out.index("ARG /images/caffe-runner.sif"):][:6] == [
        "ARG /images/caffe-runner.sif", "ARG python", "ARG -u", "ARG -m", "ARG submitit.core._submit", "ARG /f"]


# ---- Charliecloud for real, on a tiny image -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory):
    """A directory image with sh and env from this host and their libraries, /ch/environment and
    the mount points ch-run needs."""
    if not shutil.which("ch-run"):
        pytest.skip("ch-run is absent: apt-get install charliecloud (make test-image does)")
    img = Path("/var/tmp") / f"cr-tiny-image-{os.getpid()}"
    shutil.rmtree(img, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "etc", "tmp", "ch", "scratch", "data", "models"):
        (img / d).mkdir(parents=True)
    for b in ("/usr/bin/env", "/bin/dash", "/bin/cat"):
        shutil.copy2(b, img / "bin")
        libs = subprocess.run(["ldd", b], capture_output=True, text=True).stdout.split()
        for lib in (x for x in libs if x.startswith("/")):
            dst = img / lib.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dst)
    (img / "bin" / "sh").symlink_to("dash")
    (img / "etc" / "passwd").touch()
    (img / "etc" / "group").touch()
    (img / "ch" / "environment").write_text("PATH=/bin\nCAFFE_RUNNER_CONTAINER=tiny test image\n")
    yield img
    shutil.rmtree(img, ignore_errors=True)


def _tiny_cfg(img, tmp_path, **kw):
    from runner.schema import LocalLauncherConf

    cfg = _cfg("charliecloud", str(img), launcher=LocalLauncherConf(), **kw)
    cfg.input.dir = cfg.output.dir = str(tmp_path)
    cfg.model.prototxt, cfg.model.weights = str(tmp_path / "d.prototxt"), str(tmp_path / "w.caffemodel")
    return cfg


def test_charliecloud_passes_only_the_task_environment_and_runs_without_user(tiny_image, tmp_path):
    cmd = ct.container_command(_tiny_cfg(tiny_image, tmp_path), ["env"])
    env = {k: v for k, v in os.environ.items() if k != "USER"}  # as under some batch systems and CI
    env.update(SLURM_ARRAY_TASK_ID="1", SUBMITIT_EXECUTOR="slurm", PYTHONPATH="/host/site", FOO="bar")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert got["SLURM_ARRAY_TASK_ID"] == "1" and got["SUBMITIT_EXECUTOR"] == "slurm"
    assert got["PATH"] == "/bin" and got["CAFFE_RUNNER_CONTAINER"] == "tiny test image"  # the image's own
    assert got[identity.ENV_RUNTIME] == "charliecloud" and got[identity.ENV_IMAGE] == str(tiny_image)
    assert got[identity.ENV_IMAGE_ID].startswith("size=")
    assert "PYTHONPATH" not in got and "FOO" not in got
    # without our USER, ch-run itself refuses: the wrapper is what makes it run
    bare = [a for a in cmd if not a.startswith("USER=")][1:]
    q = subprocess.run(bare, env=env, capture_output=True, text=True)
    assert q.returncode != 0 and "USER not set" in q.stderr


def test_charliecloud_image_checks(tiny_image, tmp_path):
    _check(_tiny_cfg(tiny_image, tmp_path))  # fine as it is (tmp_path: /tmp is bound by ch-run)
    cfg = _tiny_cfg(tiny_image, tmp_path)
    cfg.output.dir = "/srv/out"  # /srv is not in the tiny image
    with pytest.raises(ConfigError, match=r"has no /srv to bind .* add `RUN mkdir -p /srv`"):
        _check(cfg)
    with pytest.raises(ConfigError, match="device=gpu but container.image .* no NVIDIA driver libraries"):
        _check(_tiny_cfg(tiny_image, tmp_path, device="gpu"))
    lib = tiny_image / "usr" / "lib" / "x86_64-linux-gnu" / "libcuda.so.1"
    lib.parent.mkdir(parents=True, exist_ok=True)
    lib.touch()  # as ch-fromhost --nvidia leaves it
    try:
        _check(_tiny_cfg(tiny_image, tmp_path, device="gpu"))
    finally:
        lib.unlink()
    not_sqfs = tmp_path / "image.sqfs"
    not_sqfs.write_bytes(b"PK\x03\x04 a zip, not squashfs")
    with pytest.raises(ConfigError, match="neither a SquashFS file nor an image directory"):
        _check(_tiny_cfg(not_sqfs, tmp_path))
    (tiny_image / "ch" / "environment").rename(tiny_image / "ch" / "env.bak")
    try:
        with pytest.raises(ConfigError, match="has no /ch/environment"):
            _check(_tiny_cfg(tiny_image, tmp_path))
    finally:
        (tiny_image / "ch" / "env.bak").rename(tiny_image / "ch" / "environment")


def test_image_file_checks(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="container.runtime=apptainer but `apptainer` is not on PATH here"):
        _check(_cfg("apptainer", "docker://caffe-runner:cpu"))
    # apptainer and srun (pyxis) are not installed here: only their presence on PATH is checked
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("apptainer", "srun"):
        (bin_dir / exe).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    missing = _cfg("apptainer", str(tmp_path / "nope.sif"))
    with pytest.raises(ConfigError, match=r"container.image .*nope.sif does not exist"):
        _check(missing)
    sif = tmp_path / "cr.sif"
    sif.write_bytes(b"SIF")
    with pytest.raises(ConfigError, match="only this node has .*copy the image to a shared file system"):
        _check(_cfg("apptainer", str(sif)))  # launcher=slurm, image under /tmp
    local = _cfg("apptainer", str(sif), launcher=LocalLauncherConf())
    _check(local)  # one machine: /tmp is fine
    shared = Path(os.environ.get("HOME", "/root")) / f".cr-test-{os.getpid()}.sif"
    shared.write_bytes(b"SIF")
    try:
        _check(_cfg("apptainer", str(shared)))
    finally:
        shared.unlink()
    for name in ("docker://caffe-runner:cpu", "library://u/c/cr:1"):
        _check(_cfg("apptainer", name))  # pulled by apptainer, not a path here
    _check(_cfg("pyxis", "nvcr.io#nvidia/caffe:20.03-py3"))
    with pytest.raises(ConfigError, match="pyxis runs through srun: use it with launcher=slurm"):
        cfg = _cfg("pyxis", "ubuntu", launcher=LocalLauncherConf())
        _check(cfg)


def test_image_label_and_identity(tmp_path):
    f = tmp_path / "i.sqfs"
    f.write_bytes(b"hsqs" + b"\0" * 96)
    os.utime(f, (1764090000, 1764090000))
    assert ct.image_identity("charliecloud", str(f)) == "size=100;mtime=2025-11-25T17:00:00Z"
    assert ct.image_identity("apptainer", "docker://x") == ""
    assert identity.image_label({}) == ""
    assert identity.image_label({"container": "caffe-runner:cpu (Debian 12, CPU)"}) == "caffe-runner:cpu (Debian 12, CPU)"
    assert identity.image_label({"container_runtime": "charliecloud", "container_image": "/i.sqfs",
                           "container_image_id": "size=1"}) == "charliecloud:/i.sqfs (size=1)"


# ---- the command line: refused before anything is submitted, with one line ----------------

def _refused(tmp_path, photos, tiny_net, image, user=None, launcher="slurm"):
    from conftest import CLI, REPO, tiny_model_args

    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), f"launcher={launcher}",
            "num_shards=2", "container.runtime=charliecloud", f"container.image={image}"]
    # root without the capabilities that let it read anything (a real denial; still root, so the
    # venv is reachable wherever it lives, e.g. under a fresh machine's 0700 /root)
    pre = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if user else []
    p = subprocess.run(pre + CLI + args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("caffe-runner: error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert not (run / "submissions.json").exists() and not (run / "shards").exists()
    return errors[0]


@pytest.mark.slurm
def test_bad_images_refused_before_anything_is_submitted(cluster, tmp_path, photos, tiny_net):
    """launcher=slurm asks the controller first (MaxArraySize): the dev cluster answers."""
    home = Path(os.environ.get("HOME", "/root"))
    assert "container.image" in _refused(tmp_path, photos, tiny_net, home / "no-such-image.sqfs")
    assert "does not exist" in _refused(tmp_path, photos, tiny_net, home / "no-such-image.sqfs")
    local = tmp_path / "image.sqfs"
    local.write_bytes(b"hsqs" + b"\0" * 96)
    assert "only this node has" in _refused(tmp_path, photos, tiny_net, local)


def test_unreadable_image_refused(tmp_path, photos, tiny_net):
    """As root every file is readable: the check runs without root's capability to read anything."""
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the check as another user")
    d = Path("/var/tmp") / f"cr-unreadable-{os.getpid()}"  # a folder nobody can enter
    d.mkdir(mode=0o755)
    img = d / "image.sqfs"
    img.write_bytes(b"hsqs" + b"\0" * 96)
    img.chmod(0o000)
    try:
        for p in (tmp_path, photos, tiny_net[0].parent):  # pytest's folders are root's: let nobody reach them
            for q in [p, *p.parents]:
                if str(q).startswith("/tmp/"):
                    q.chmod(q.stat().st_mode | 0o755)
        # the output folder is nobody's to write; sticky, as /tmp is: a folder above a run that
        # others may write without it is refused first (private.unsafe_parent, OpenSSH StrictModes)
        tmp_path.chmod(0o1777)
        line = _refused(tmp_path, photos, tiny_net, img, user="nocaps", launcher="local")
        assert "is not readable by you" in line
    finally:
        shutil.rmtree(d)


def test_status_and_merged_file_flag_shards_from_different_images(tiny_net, photos, tmp_path):
    """The image is rebuilt between a run and the rerun of one shard: both the merged file and
    `status` say which shards came from which image. (The launcher's variables are set by hand
    here; the real runtimes set them in test_container.py.)"""
    import h5py

    from conftest import run_cli, tiny_model_args

    run = tmp_path / "run"
    args = [f"input.dir={photos}", f"output.dir={run}", *tiny_model_args(tiny_net), "num_shards=2",
            "launcher.workers=1"]
    a = {identity.ENV_RUNTIME: "charliecloud", identity.ENV_IMAGE: "/img/cr.sqfs", identity.ENV_IMAGE_ID: "size=1;mtime=A"}
    run_cli(*args, env=a)
    label_a = "charliecloud:/img/cr.sqfs (size=1;mtime=A)"
    assert f"image: {label_a}" in run_cli("status", run).stdout
    with h5py.File(run / "features.h5") as f:
        assert json.loads(f.attrs["container_images"]) == {label_a: [0, 1]}
    (run / "shards" / "shard-00001-of-00002.h5").unlink()
    run_cli(*args, env=dict(a, **{identity.ENV_IMAGE_ID: "size=2;mtime=B"}))
    label_b = "charliecloud:/img/cr.sqfs (size=2;mtime=B)"
    out = run_cli("status", run).stdout
    assert "WARNING: the shards ran in 2 different images" in out, out
    assert f"{label_a}: shards 0" in out and f"{label_b}: shards 1" in out
    with h5py.File(run / "features.h5") as f:
        assert json.loads(f.attrs["container_images"]) == {label_a: [0], label_b: [1]}
        assert f.attrs["container_runtime"] == "charliecloud"


def test_bind_dirs_cover_every_input_kind(tmp_path):
    cfg = _cfg()
    cfg.input.dir = None
    cfg.input.lmdb = str(tmp_path / "train_lmdb")
    (tmp_path / "train_lmdb").mkdir()
    cfg.input.tar = "/shards/web/part-{000000..000099}.tar"
    assert ct.bind_dirs(cfg) == ["/models/m", "/scratch/u/run", "/shards/web", str(tmp_path / "train_lmdb")]
    cfg.input.tar = "/data2/tars.txt"
    assert "/data2" in ct.bind_dirs(cfg)


def test_docker_without_a_daemon_is_refused_at_plan_time(monkeypatch):
    """The real docker client, its daemon unreachable (DOCKER_HOST at a socket that does not
    exist): one line before anything runs, not a failed `docker run` per shard."""
    if not shutil.which("docker"):
        pytest.skip("no docker client on PATH")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(ConfigError) as e:
        local = _cfg("docker", "caffe-runner:cpu", launcher=LocalLauncherConf())
        ct.check_container(local, launcher_for(local).placement)
    msg = str(e.value)
    assert msg.startswith("container.runtime=docker but the Docker daemon does not answer here (Cannot connect "
                          "to the Docker daemon at unix:///nonexistent/docker.sock"), msg
    assert "\n" not in msg and len(msg) < 400
    # with launcher=slurm the nodes' daemons run the tasks: this machine's is not asked
    slurm = _cfg("docker", "caffe-runner:cpu")
    ct.check_container(slurm, launcher_for(slurm).placement)


def test_docker_daemon_message_is_one_line():
    from runner.runtimes.oci import docker_daemon_message

    msg = docker_daemon_message("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                                   "Is the docker daemon running?")
    assert "sudo systemctl start docker" in msg and "DOCKER_HOST" in msg and "container.runtime=podman" in msg
