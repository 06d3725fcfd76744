"""What every container runtime shares: the resolved spec, the wrapped command, and the
Runtime interface (bind mounts, command wrapping, plan-time checks, the image's identity).

A runtime module holds everything specific to its family; nothing outside runner/runtimes/
asks which runtime it is. What a runtime needs to know of the launcher comes as a Placement
(plain values), so this layer never imports a launcher.
"""
from __future__ import annotations

import datetime
import os
import shlex
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

from ..errors import ConfigError


# Variables the task reads (submitit's JobEnvironment, task.task_identity, run_shard's
# threads and logs, Caffe's log level), passed by name from the task's environment.
TASK_ENV = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES",
    "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_RESTART_COUNT",
    "SLURM_CPUS_PER_TASK", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER", "CAFFE_RUNNER_LOG", "CAFFE_RUNNER_THREADS",
    "GLOG_minloglevel", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "HOME", "LANG", "TZ",
)
# Folders only the node running the command has: an image there is invisible to other nodes.
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")
# Image names with a scheme are pulled by the runtime, not read from a path here.
_URI_SCHEMES = ("docker://", "docker-daemon://", "library://", "oras://", "shub://", "http://", "https://")


@dataclass(frozen=True)
class Placement:
    """Where the launcher starts its tasks, as the runtimes' checks need it."""
    # tasks start through srun (a runtime that comes from srun's options can be used)
    srun: bool
    # tasks may run on other nodes (an image on a node-local folder would not be found)
    other_nodes: bool


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
    # the calling user's ids: podman/docker run the task as them (the files it writes are the user's)
    uid: int = 0
    gid: int = 0
    # the user's supplementary groups (input readable through a group stays readable inside)
    groups: Tuple[int, ...] = ()


class Wrapped(NamedTuple):
    command: List[str]  # the task's command, wrapped
    srun_args: List[str]  # srun options (Pyxis: the container comes from srun)


def separator_error(runtime: str, key: str, path: str, sep: str) -> ConfigError:
    what = "a list of mounts" if sep == "," else "SRC:DST"
    return ConfigError(f"{key} {path} holds {sep!r}, which container.runtime={runtime} reads as a separator "
                       f"({what}; it has no escape), so the folder would become another mount: use a path "
                       f"without ',' or ':' (rename the folder, or point {key} at a symlink to it)")


def abs_path(p) -> str:
    return os.path.abspath(os.path.expanduser(str(p)))


def pairs(binds) -> List[str]:
    return [b if ":" in b else f"{b}:{b}" for b in binds]


def outermost(dirs: List[str]) -> List[str]:
    """Deduplicated, children of another folder dropped."""
    out: List[str] = []
    for d in sorted(set(dirs)):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def is_uri(image: str) -> bool:
    return image.startswith(_URI_SCHEMES) or "#" in image


def file_identity(path: str) -> str:
    """A file's size and mtime (the content of a multi-GB image is not hashed at submission)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    mtime = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"size={st.st_size};mtime={mtime}"


class Runtime:
    """One container runtime family. The defaults suit a runtime whose image is a file or
    folder on the shared file system; a module overrides what differs."""
    # the config's container.runtime value(s) this object serves (set per instance)
    name: str = ""
    # what must be on PATH (login and compute nodes alike)
    executable: str = ""
    # characters the runtime's bind syntax reads as separators (SRC:DST, a comma-separated
    # list), with no documented escape: a folder whose path holds one is refused at plan time
    bind_separators: str = ":"

    def image_path(self, image: str) -> Optional[str]:
        """The image's path when it is a file or folder here, else None (a name to pull)."""
        return None if is_uri(image) else abs_path(image)

    def identity(self, image: str) -> str:
        """What distinguishes one build of the image from another ("" when unknown)."""
        path = self.image_path(image)
        return file_identity(path) if path else ""

    def binds(self, dirs: List[str]) -> List[str]:
        """The host folders to bind, given the folders the task must see."""
        return dirs

    def wrap(self, spec: ContainerSpec, inner: List[str]) -> Wrapped:
        raise NotImplementedError

    def interpreter(self, spec: ContainerSpec, python: str) -> str:
        """The interpreter command in the sbatch script: the image's own `python`, wrapped."""
        return shlex.join(self.wrap(spec, ["python"]).command)

    def check(self, spec: ContainerSpec, placement: Placement) -> None:
        """Refusals that need no image file (e.g. a runtime the launcher cannot start)."""

    def check_paths(self, folders: List[Tuple[str, str]], image: str, user_binds: List[str]) -> None:
        """Refuse a folder to bind (config key, path), an image path or one of the user's own
        container.binds that the runtime's own syntax would split into other mounts or values."""
        for key, path in folders:
            bad = [c for c in self.bind_separators if c in path]
            if bad:
                raise separator_error(self.name, key, path, bad[0])
        if "," not in self.bind_separators:
            return
        if "," in image:  # the --env / --export lists that carry it are comma-separated too
            raise separator_error(self.name, "container.image", image, ",")
        for b in user_binds:  # SRC[:DST] by design: only the list separator is refused there
            if "," in b:
                raise separator_error(self.name, "container.binds", b, ",")

    def check_image(self, spec: ContainerSpec, path: str, device: str) -> None:
        """Refusals that read the image file or folder (after it is known to exist)."""

