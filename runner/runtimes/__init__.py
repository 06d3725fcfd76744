"""Container runtimes: run a task inside an image, the way HPC sites do (one image file on the
shared file system, or an image name; one runtime per site).

One shape for every runtime: `container_spec(cfg)` resolves the config once into a
ContainerSpec (image, binds, environment, GPU); the runtime's module (one per family, behind
runtimes.base.Runtime) turns a spec and the task's command into the wrapped command (and, for
Pyxis, srun options), and refuses at plan time what would fail in every task. RUNTIMES is the
registry: adding a runtime is one module, one line here, its config enum value and its golden
test (tests/golden/).

Submitit lets the interpreter command be replaced, so under Slurm
`python -u -m submitit.core._submit FOLDER` becomes `<wrapper> python -u -m ...`; the local
launcher runs `<wrapper> python -m runner.launch.container_task ...` per shard.

Environment: the task needs variables whose values exist only on the node, when the task
starts (Slurm's array ids, the GPU Slurm bound, submitit's), so they are passed BY NAME
(TASK_ENV), never baked into the script; everything else from the host stays out (a host
PYTHONPATH or LD_LIBRARY_PATH would break the image's Python). Values known at submission
(which runtime and image, the image's identity: runtimes/identity.py) are set explicitly, and
every shard file records them (shard attrs container_*).

May import: runner (log, errors, schema), runner.store, runner.inputs (the paths a node must read).
"""
from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..inputs import configured, node_read_paths
from ..errors import ConfigError
from .apptainer import Apptainer
from .base import NODE_LOCAL, TASK_ENV, ContainerSpec, Placement, Runtime, Wrapped, abs_path, outermost, under
from .charliecloud import Charliecloud, charliecloud_binds
from .host import Host
from .identity import ENV_IMAGE, ENV_IMAGE_ID, ENV_RUNTIME
from .oci import Oci
from .pyxis import Pyxis

__all__ = ["RUNTIMES", "TASK_ENV", "ENV_RUNTIME", "ENV_IMAGE", "ENV_IMAGE_ID", "ContainerSpec", "Placement", "Wrapped",
           "Runtime", "runtime", "container_spec", "wrap", "container_command", "wrap_python", "srun_args",
           "check_container", "bind_dirs", "charliecloud_binds", "image_path", "image_identity", "user_name",
           "user_ids"]

# container.runtime -> its implementation ("none", the host, is not a container runtime)
RUNTIMES: Dict[str, Runtime] = {"apptainer": Apptainer(), "charliecloud": Charliecloud(), "podman": Oci("podman"),
                                "docker": Oci("docker"), "pyxis": Pyxis()}
_HOST = Host()


def runtime(name) -> Runtime:
    """The implementation of container.runtime=name, refusing an unknown name with the list."""
    name = str(name)  # a ContainerRuntime (str enum) from the schema, or a plain string
    if name == _HOST.name:
        return _HOST
    if name not in RUNTIMES:
        raise ConfigError(f"container.runtime={name!r}: use one of none, {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def image_path(runtime_name: str, image: str) -> Optional[str]:
    """The image's path when it is a file or folder here, else None (a name to pull)."""
    return runtime(runtime_name).image_path(image)


def image_identity(runtime_name: str, image: str) -> str:
    """What distinguishes one build of the image from another: a file's size and mtime (the
    content of a multi-GB image is not hashed at submission), a local image's digest, or ""."""
    return runtime(runtime_name).identity(image)


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def user_ids() -> Tuple[int, int, Tuple[int, ...]]:
    """(uid, gid, supplementary groups) of the calling user, as a container must run the task."""
    gid = os.getgid()
    return os.getuid(), gid, tuple(sorted(set(os.getgroups()) - {gid}))


def _folder(p: Path) -> str:
    """The folder to bind for a path the task reads: a folder itself, a file's parent. A path
    that is not there yet (an input that fails at listing anyway) counts as a folder unless its
    name has an extension."""
    if p.is_dir() or (not p.exists() and not p.suffix):
        return str(p)
    return str(p.parent)


def bind_sources(cfg) -> List[Tuple[str, str]]:
    """(config key, folder) for every folder the task must see."""
    which = "/".join(f"input.{f}" for f in configured(cfg.input)) or "input"  # as the user set it
    out = [(which, _folder(p)) for p in node_read_paths(cfg.input)]
    for key, p in (("output.dir", cfg.output.dir), ("model.prototxt", os.path.dirname(abs_path(cfg.model.prototxt))),
                   ("model.weights", cfg.model.weights and os.path.dirname(abs_path(cfg.model.weights))),
                   ("model.preprocess.mean_file", cfg.model.preprocess.mean_file
                    and os.path.dirname(abs_path(cfg.model.preprocess.mean_file)))):
        if p:
            out.append((key, abs_path(p)))
    return out


def bind_dirs(cfg) -> List[str]:
    """Folders the task must see, deduplicated, children of another dropped."""
    return outermost([folder for _key, folder in bind_sources(cfg)])


def container_spec(cfg) -> ContainerSpec:
    c = cfg.container
    rt = runtime(c.runtime)
    if rt is not _HOST and not c.image:
        raise ConfigError(f"container.runtime={rt.name} needs container.image=... (an image file such as "
                          f"$HOME/images/caffe-runner.sif or .sqfs, or an image name)")
    image = str(c.image or "")
    image = rt.image_path(image) or image
    set_env = ((ENV_RUNTIME, rt.name), (ENV_IMAGE, image), (ENV_IMAGE_ID, image_identity(rt.name, image)))
    uid, gid, groups = user_ids()
    return ContainerSpec(runtime=rt.name, image=image, binds=tuple(rt.binds(bind_dirs(cfg))) + tuple(c.binds),
                         env=TASK_ENV, set_env=set_env, gpu=cfg.device == "gpu", extra_args=tuple(c.extra_args),
                         user=user_name(), workdir=abs_path(cfg.output.dir), uid=uid, gid=gid, groups=groups)


def wrap(spec: ContainerSpec, inner: List[str]) -> Wrapped:
    return runtime(spec.runtime).wrap(spec, inner)


def container_command(cfg, inner: List[str]) -> List[str]:
    return wrap(container_spec(cfg), inner).command


def wrap_python(cfg, python: str) -> str:
    """The interpreter command submitit puts in the sbatch script: the host's Python, or the
    image's own `python` (its environment) wrapped by the runtime."""
    spec = container_spec(cfg)
    return runtime(spec.runtime).interpreter(spec, python)


def srun_args(cfg) -> List[str]:
    """srun options the runtime needs (Pyxis: the container itself), else []."""
    return wrap(container_spec(cfg), ["python"]).srun_args


# ---- plan-time checks: a typo must not fail a thousand tasks --------------------------------

def check_container(cfg, placement: Placement, device: Optional[str] = None) -> None:
    """Refuse, before anything runs, a container setup that would fail in every task: an
    unknown runtime or one not on PATH, a missing or unreadable image file, an image only this
    node can see (tasks on other nodes), what the runtime itself refuses (runtimes/*.py).
    One line each, naming the fix."""
    if str(cfg.container.runtime) == _HOST.name:
        return
    spec = container_spec(cfg)  # unknown runtime, missing image name
    rt = runtime(spec.runtime)
    rt.check(spec, placement)
    bound = rt.binds(bind_dirs(cfg))
    # each folder as it is bound (an outer folder, Charliecloud's top-level one), named by its key
    rt.check_paths([(key, b) for key, folder in bind_sources(cfg) for b in bound if under(folder, [b])], spec.image,
                   list(cfg.container.binds))
    path = rt.image_path(str(cfg.container.image))
    if path is not None:
        _check_image_file(path, placement)
        rt.check_image(spec, path, str(device or cfg.device))
    if not shutil.which(rt.executable):
        raise ConfigError(f"container.runtime={spec.runtime} but `{rt.executable}` is not on PATH here: load it "
                          f"(e.g. `module load {rt.executable}`), or choose another container.runtime")


def _check_image_file(path: str, placement: Placement) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"container.image {path} does not exist: give the path of the image file "
                          f"(e.g. made by docker/build-image.sh --squashfs OUT or apptainer build)")
    if not os.access(path, os.R_OK) or (os.path.isdir(path) and not os.access(path, os.X_OK)):
        raise ConfigError(f"container.image {path} is not readable by you: fix its permissions (chmod a+r) or "
                          "use a copy you can read")
    node_local = NODE_LOCAL + tuple(t for t in [os.environ.get("TMPDIR")] if t)
    if placement.other_nodes and under(os.path.realpath(path), node_local):
        raise ConfigError(f"container.image {path} is on a folder only this node has ({path.split('/')[1]!r} is "
                          "local to each node): array tasks on other nodes would not find it; copy the image to "
                          "a shared file system (your home, project or scratch folder) and point container.image there")
