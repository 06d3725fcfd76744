"""Run a task inside a container image, the way HPC sites do: one image file on the shared
file system (SIF, SquashFS) or an image name, one runtime per site.

One shape for every runtime: `container_spec(cfg)` resolves the config once into a
ContainerSpec (image, binds, environment, GPU); a runtime is one function that turns a spec
and the task's command into the wrapped command (and, for Pyxis, srun options). Adding a
runtime is one function in RUNTIMES plus its golden test (tests/golden/).

Submitit lets the interpreter command be replaced, so under Slurm
`python -u -m submitit.core._submit FOLDER` becomes `<wrapper> python -u -m ...`; the local
launcher runs `<wrapper> python -m runner.launch.container_task ...` per shard.

Environment: the task needs variables whose values exist only on the node, when the task
starts (Slurm's array ids, the GPU Slurm bound, submitit's), so they are passed BY NAME
(TASK_ENV), never baked into the script; everything else from the host stays out (a host
PYTHONPATH or LD_LIBRARY_PATH would break the image's Python). Values known at submission
(which runtime and image, the image's identity) are set explicitly, and every shard file
records them (shard attrs container_*).
"""
from __future__ import annotations

import datetime
import os
import pwd
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from ..errors import ConfigError

# Variables the task reads (submitit's JobEnvironment, shard.task_identity, run_shard's
# threads and logs, Caffe's log level), passed by name from the task's environment.
TASK_ENV = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_RESTART_COUNT",
    "SLURM_CPUS_PER_TASK", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER", "CAFFE_RUNNER_LOG", "CAFFE_RUNNER_THREADS", "CAFFE_RUNNER_SINGLE_NODE",
    "GLOG_minloglevel", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "HOME", "LANG", "TZ",
)
# Set at submission (and recorded by each shard): which runtime, which image, its identity.
ENV_RUNTIME, ENV_IMAGE, ENV_IMAGE_ID = "CAFFE_RUNNER_CONTAINER_RUNTIME", "CAFFE_RUNNER_IMAGE", "CAFFE_RUNNER_IMAGE_ID"
# Folders only the node running the command has: an image there is invisible to other nodes.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")
# Image names with a scheme are pulled by the runtime, not read from a path here.
_URI_SCHEMES = ("docker://", "docker-daemon://", "library://", "oras://", "shub://", "http://", "https://")


@dataclass(frozen=True)
class ContainerSpec:
    # none | apptainer | charliecloud | podman | docker | pyxis
    runtime: str
    # an absolute path (SIF, SquashFS, image directory) or an image name (podman/docker/pyxis)
    image: str
    # host folders bound at the same path inside, or "src:dst" pairs from container.binds
    binds: Tuple[str, ...]
    # variables passed by name from the task's environment
    env: Tuple[str, ...]
    # variables set to fixed values (known at submission)
    set_env: Tuple[Tuple[str, str], ...]
    # pass the GPUs through (device=gpu)
    gpu: bool
    # the user's own runtime options, placed before the image
    extra_args: Tuple[str, ...]
    # USER for runtimes that refuse to start without it (ch-run)
    user: str
    # working directory inside (the run directory)
    workdir: str


class Wrapped(NamedTuple):
    command: List[str]  # the task's command, wrapped
    srun_args: List[str]  # srun options (Pyxis: the container comes from srun)


def _pairs(binds) -> List[str]:
    return [b if ":" in b else f"{b}:{b}" for b in binds]


def _apptainer(s: ContainerSpec, inner: List[str]) -> Wrapped:
    # `apptainer exec --cleanenv` passes no host variable except APPTAINERENV_<NAME> ones, so a
    # small sh copies each task variable that is set (on the node, at start) to that prefix.
    names = " ".join(s.env)
    copy = (f'for v in {names}; do eval "[ -z \\"\\${{$v+x}}\\" ] || export APPTAINERENV_$v=\\"\\${{$v}}\\""; done; ')
    cmd = ["apptainer", "exec", "--cleanenv"] + (["--nv"] if s.gpu else [])
    for b in _pairs(s.binds):
        cmd += ["--bind", b]
    for k, v in s.set_env:
        cmd += ["--env", f"{k}={v}"]
    cmd += ["--pwd", s.workdir] + list(s.extra_args) + [s.image] + inner
    return Wrapped(["sh", "-c", copy + "exec " + shlex.join(cmd) + ' "$@"', "sh"], [])


def _charliecloud(s: ContainerSpec, inner: List[str]) -> Wrapped:
    # ch-run passes the whole host environment by default: drop all but the task's variables
    # (extglob), then the image's own (/ch/environment, written by ch-convert), then ours.
    # ch-run stops when USER is unset (batch systems, CI): set it for ch-run itself.
    cmd = ["env", f"USER={s.user}", "ch-run", f"--unset-env=!({'|'.join(s.env)})", "--set-env"]
    cmd += [f"--set-env={k}={v}" for k, v in s.set_env]
    for b in _pairs(s.binds):
        cmd += ["--bind", b]
    cmd += ["--cd", s.workdir] + list(s.extra_args) + [s.image, "--"] + inner
    return Wrapped(cmd, [])


def _oci(s: ContainerSpec, inner: List[str]) -> Wrapped:
    # podman and docker: `--env NAME` passes the host's value when it is set (docker has no
    # prefix globs, so names); the entry point is replaced by the task's interpreter.
    cmd = [s.runtime, "run", "--rm", "--network", "host", "--entrypoint", inner[0], "--workdir", s.workdir]
    if s.runtime == "podman":
        cmd += ["--pull", "never"]
    if s.gpu:  # podman: CDI (nvidia-ctk cdi generate); docker: the NVIDIA container toolkit
        cmd += ["--device", "nvidia.com/gpu=all"] if s.runtime == "podman" else ["--gpus", "all"]
    for name in s.env:
        cmd += ["--env", name]
    for k, v in s.set_env:
        cmd += ["--env", f"{k}={v}"]
    for b in _pairs(s.binds):
        cmd += ["--volume", b]
    return Wrapped(cmd + list(s.extra_args) + [s.image] + inner[1:], [])


def _pyxis(s: ContainerSpec, inner: List[str]) -> Wrapped:
    # the container comes from srun's options; the task's srun environment is the container's
    # (pyxis/enroot), so fixed values go through srun's own --export
    args = [f"--container-image={s.image}", f"--container-mounts={','.join(_pairs(s.binds))}",
            f"--container-workdir={s.workdir}"]
    if s.set_env:
        args.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in s.set_env))
    return Wrapped(list(inner), args + list(s.extra_args))


RUNTIMES: Dict[str, Callable[[ContainerSpec, List[str]], Wrapped]] = {
    "apptainer": _apptainer, "charliecloud": _charliecloud, "podman": _oci, "docker": _oci, "pyxis": _pyxis,
}
# what must be on PATH (login and compute nodes alike) for each runtime
_EXECUTABLES = {"apptainer": "apptainer", "charliecloud": "ch-run", "podman": "podman", "docker": "docker",
                "pyxis": "srun"}
# The image is a file or folder here (not a name the runtime pulls)
_FILE_RUNTIMES = ("apptainer", "charliecloud", "pyxis")


def _abs(p) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))


def bind_dirs(cfg) -> List[str]:
    """Folders the task must see, deduplicated, children of another dropped."""
    dirs = []
    inp = cfg.input
    lmdb, tar = inp.get("lmdb"), inp.get("tar")
    if lmdb:
        dirs.append(_abs(lmdb) if os.path.isdir(_abs(lmdb)) else os.path.dirname(_abs(lmdb)))
    if tar:  # a glob, a brace range or a list file: the folder before any pattern character
        head = re.split(r"[*?\[{]", str(tar), maxsplit=1)[0]
        dirs.append(os.path.dirname(_abs(head)) if not os.path.isdir(_abs(head)) else _abs(head))
    for p in (cfg.input.dir, cfg.input.root, cfg.input.list and os.path.dirname(_abs(cfg.input.list)),
              cfg.output.dir, os.path.dirname(_abs(cfg.model.prototxt)),
              cfg.model.weights and os.path.dirname(_abs(cfg.model.weights)),
              cfg.model.preprocess.mean_file and os.path.dirname(_abs(cfg.model.preprocess.mean_file)),
              cfg.input.get("lmdb"), cfg.input.get("tar") and os.path.dirname(_abs(cfg.input.tar))):
        if p:
            dirs.append(_abs(p))
    return _outermost(dirs)


def _outermost(dirs: List[str]) -> List[str]:
    out: List[str] = []
    for d in sorted(set(dirs)):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def charliecloud_binds(dirs: List[str]) -> List[str]:
    """ch-run binds onto mount points that already exist in the image (a SquashFS image is
    read-only, so none can be made): each folder is reached through its top-level directory
    (/scratch/u/run -> /scratch), which the image must have. /tmp and /dev are bound by ch-run
    itself."""
    return _outermost(["/" + d.strip("/").split("/")[0] for d in dirs if not _under(d, ("/tmp", "/dev"))])


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def _is_uri(image: str) -> bool:
    return image.startswith(_URI_SCHEMES) or "#" in image


def image_path(runtime: str, image: str) -> Optional[str]:
    """The image's path when it is a file or folder here, else None (a name to pull)."""
    if runtime not in _FILE_RUNTIMES or _is_uri(image):
        return None
    if runtime == "pyxis" and not image.startswith(("/", ".", "~")):
        return None  # pyxis: "ubuntu:22.04", "nvcr.io#nvidia/pytorch:24.01" are registry names
    return _abs(image)


def image_identity(runtime: str, image: str) -> str:
    """What distinguishes one build of the image from another: a file's size and mtime (the
    content of a multi-GB image is not hashed at submission), a local image's digest, or ""."""
    path = image_path(runtime, image)
    if path:
        try:
            st = os.stat(path)
        except OSError:
            return ""
        mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"size={st.st_size};mtime={mtime}"
    if runtime in ("podman", "docker") and shutil.which(runtime):
        try:
            p = subprocess.run([runtime, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        digest = p.stdout.strip()
        if p.returncode == 0 and digest:
            return digest if digest.startswith("sha256:") else "sha256:" + digest
    return ""


def container_spec(cfg) -> ContainerSpec:
    c = cfg.container
    if str(c.runtime) not in ("none",) + tuple(RUNTIMES):
        raise ConfigError(f"container.runtime={str(c.runtime)!r}: use one of none, {', '.join(RUNTIMES)}")
    if str(c.runtime) != "none" and not c.image:
        raise ConfigError(f"container.runtime={str(c.runtime)} needs container.image=... (an image file such as "
                          f"$HOME/images/caffe-runner.sif or .sqfs, or an image name)")
    runtime = str(c.runtime)  # a ContainerRuntime (str enum) from the schema, or a plain string
    image = str(c.image or "")
    image = image_path(runtime, image) or image
    dirs = bind_dirs(cfg)
    binds = charliecloud_binds(dirs) if runtime == "charliecloud" else dirs
    set_env = ((ENV_RUNTIME, runtime), (ENV_IMAGE, image), (ENV_IMAGE_ID, image_identity(runtime, image)))
    return ContainerSpec(runtime=runtime, image=image, binds=tuple(binds) + tuple(c.binds), env=TASK_ENV,
                         set_env=set_env, gpu=cfg.device == "gpu", extra_args=tuple(c.extra_args), user=_user(),
                         workdir=_abs(cfg.output.dir))


def wrap(spec: ContainerSpec, inner: List[str]) -> Wrapped:
    if spec.runtime == "none":
        return Wrapped(list(inner), [])
    return RUNTIMES[spec.runtime](spec, inner)


def container_command(cfg, inner: List[str]) -> List[str]:
    return wrap(container_spec(cfg), inner).command


def wrap_python(cfg, python: str) -> str:
    """The interpreter command submitit puts in the sbatch script: the host's Python, or the
    image's own `python` (its environment) wrapped by the runtime."""
    spec = container_spec(cfg)
    if spec.runtime == "none":
        return python
    return shlex.join(wrap(spec, ["python"]).command)


def pyxis_srun_args(cfg) -> List[str]:
    spec = container_spec(cfg)
    return wrap(spec, ["python"]).srun_args if spec.runtime == "pyxis" else []


# ---- plan-time checks: a typo must not fail a thousand tasks --------------------------------

def _squashfs_listing(path: str) -> Optional[List[str]]:
    """Paths inside a SquashFS file (unsquashfs -l), or None when squashfs-tools is absent."""
    if not shutil.which("unsquashfs"):
        return None
    p = subprocess.run(["unsquashfs", "-l", "-no-progress", path], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return None
    # lines look like "squashfs-root/usr/lib/..."
    return [line.split("squashfs-root", 1)[1] for line in p.stdout.splitlines() if line.startswith("squashfs-root")]


def _is_squashfs(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"hsqs"


_NVIDIA_LIBS = ("libcuda.so", "libnvidia-ml.so")


def _has_nvidia_libs(path: str, listing: Optional[List[str]]) -> Optional[bool]:
    if listing is not None:
        return any(os.path.basename(p).startswith(_NVIDIA_LIBS) for p in listing)
    if os.path.isdir(path):
        for sub in ("usr/lib", "usr/lib64", "lib", "lib64", "usr/local/lib", "usr/local/cuda/lib64"):
            for root, _dirs, files in os.walk(os.path.join(path, sub)):
                if any(f.startswith(_NVIDIA_LIBS) for f in files):
                    return True
        return False
    return None  # a SquashFS file without squashfs-tools here: cannot tell


def check_container(cfg, device: Optional[str] = None) -> None:
    """Refuse, before anything runs, a container setup that would fail in every task: an
    unknown runtime or one not on PATH, a missing or unreadable image file, an image only this
    node can see (launcher=slurm), a Charliecloud image without the mount points or NVIDIA
    libraries it needs. One line each, naming the fix."""
    c = cfg.container
    if str(c.runtime) == "none":
        return
    spec = container_spec(cfg)  # unknown runtime, missing image name
    if spec.runtime == "pyxis" and cfg.launcher.name != "slurm":
        raise ConfigError("container.runtime=pyxis runs through srun: use it with launcher=slurm (locally, use "
                          "charliecloud, apptainer or podman)")
    path = image_path(spec.runtime, str(c.image))
    if path is not None:
        _check_image_file(cfg, spec, path, str(device or cfg.device))
    exe = _EXECUTABLES[spec.runtime]
    if not shutil.which(exe):
        raise ConfigError(f"container.runtime={spec.runtime} but `{exe}` is not on PATH here: load it "
                          f"(e.g. `module load {exe}`), or choose another container.runtime")
    if spec.runtime == "docker" and cfg.launcher.name == "local":
        # the CLI is a client: without a daemon every shard would fail after the run started
        # (Slurm tasks use their nodes' daemons, which this machine cannot see)
        why = docker_daemon_problem()
        if why:
            raise ConfigError(docker_daemon_message(why))


def docker_daemon_problem(timeout_s: float = 20.0) -> Optional[str]:
    """None when the Docker daemon answers, else what the client said."""
    try:
        p = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:.0f} s"
    if p.returncode == 0 and p.stdout.strip():
        return None
    lines = [ln.strip() for ln in (p.stderr or p.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"docker version exited {p.returncode}"


def docker_daemon_message(why: str) -> str:
    return (f"container.runtime=docker but the Docker daemon does not answer here ({why[:200]}): start it "
            "(e.g. `sudo systemctl start docker`), point DOCKER_HOST at one that runs, or use "
            "container.runtime=podman (no daemon needed)")


def _check_image_file(cfg, spec: ContainerSpec, path: str, device: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"container.image {path} does not exist: give the path of the image file "
                          f"(e.g. made by docker/build-image.sh --squashfs OUT or apptainer build)")
    if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
        raise ConfigError(f"container.image {path} is not readable by you: fix its permissions (chmod a+r) or "
                          "use a copy you can read")
    node_local = NODE_LOCAL + tuple(t for t in [os.environ.get("TMPDIR")] if t)
    if cfg.launcher.name == "slurm" and _under(os.path.realpath(path), node_local):
        raise ConfigError(f"container.image {path} is on a folder only this node has ({path.split('/')[1]!r} is "
                          "local to each node): array tasks on other nodes would not find it; copy the image to "
                          "a shared file system (your home, project or scratch folder) and point container.image there")
    if spec.runtime != "charliecloud":
        return
    if os.path.isfile(path) and not _is_squashfs(path):
        raise ConfigError(f"container.image {path} is neither a SquashFS file nor an image directory: make one "
                          "with `ch-convert IMAGE OUT.sqfs` (docker/build-image.sh --squashfs OUT does)")
    listing = _squashfs_listing(path) if os.path.isfile(path) else None
    has_env = ("/ch/environment" in listing) if listing is not None else (
        os.path.isfile(os.path.join(path, "ch", "environment")) if os.path.isdir(path) else True)
    if not has_env:
        raise ConfigError(f"container.image {path} has no /ch/environment (the image's variables, PATH among "
                          "them): convert it with ch-convert, which writes it (docker/build-image.sh --squashfs OUT)")
    for b in spec.binds:
        dst = b.split(":", 1)[1] if ":" in b else b
        present = (dst in listing) if listing is not None else (
            os.path.isdir(os.path.join(path, dst.lstrip("/"))) if os.path.isdir(path) else True)
        if not present:
            raise ConfigError(f"container.image {path} has no {dst} to bind the host's {dst} onto (ch-run cannot "
                              f"create mount points in a read-only image): add `RUN mkdir -p {dst}` to the "
                              "Dockerfile and rebuild, or keep input/output/model folders under folders the image has")
    if device == "gpu" and _has_nvidia_libs(path, listing) is False:
        raise ConfigError(f"device=gpu but container.image {path} has no NVIDIA driver libraries (libcuda.so): "
                          "for Charliecloud, unpack the image to a directory (ch-convert IMAGE DIR) and add the "
                          "host's with `ch-fromhost --nvidia DIR`, then use container.image=DIR")


def task_container(environ=os.environ) -> Dict[str, str]:
    """Inside a task: where it runs (shard attrs, heartbeats). `container` is the image's own
    label (set by the image's environment, so present only inside it); the others were set by
    the launcher for this submission."""
    return {"container": environ.get("CAFFE_RUNNER_CONTAINER", ""),
            "container_runtime": environ.get(ENV_RUNTIME, ""),
            "container_image": environ.get(ENV_IMAGE, ""),
            "container_image_id": environ.get(ENV_IMAGE_ID, "")}


def image_label(attrs=None) -> str:
    """One string per image a shard ran in ("" on the host): `status` and the merged file
    compare them to flag a run whose shards came from different images."""
    tc = task_container() if attrs is None else {k: str(attrs.get(k, "")) for k in task_container({})}
    if not tc["container_runtime"]:
        return tc["container"]  # an image run by hand (podman run ...) still says so
    return f"{tc['container_runtime']}:{tc['container_image']}" + (
        f" ({tc['container_image_id']})" if tc["container_image_id"] else "")


def run_shard_in_container(cfg, index: int, threads: int) -> Dict:
    """Local launcher, container.runtime set: run one shard as a process inside the image.
    The config travels as a file in the run directory (bound inside at the same path)."""
    import ctypes
    import json
    import signal

    from omegaconf import OmegaConf

    from ..errors import ShardFailedError
    from .container_task import RESULT_PREFIX

    logs = os.path.join(_abs(cfg.output.dir), "logs")
    os.makedirs(logs, exist_ok=True)
    cfg_path = os.path.join(logs, f"container-task-{index:05d}.yaml")
    with open(cfg_path + ".tmp", "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(cfg_path + ".tmp", cfg_path)
    cmd = wrap(container_spec(cfg), ["python", "-m", "runner.launch.container_task", cfg_path, str(index),
                                     str(threads)]).command

    def die_with_worker():  # this worker killed: the runtime goes too (PR_SET_PDEATHSIG)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)

    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_worker,
                       env=dict(os.environ, CAFFE_RUNNER_THREADS=str(threads)))
    lines = [line for line in p.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if p.returncode != 0 or not lines:
        raise ShardFailedError(f"shard {index} in {cfg.container.runtime} image {cfg.container.image} exited "
                               f"{p.returncode} (its stderr is above; the command: {shlex.join(cmd)})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])
