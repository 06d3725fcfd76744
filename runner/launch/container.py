"""Run the task's Python inside a container: submitit lets the interpreter command be
replaced, so `python -m submitit.core._submit ...` becomes `<runtime> ... IMAGE python ...`.
The input, output (which holds submitit's pickles and logs) and model folders are bound at
the same paths, and the GPU is passed through."""
from __future__ import annotations

import os
import shlex
from typing import List

from ..errors import ConfigError

RUNTIMES = ("none", "apptainer", "podman", "docker", "pyxis")


def bind_dirs(cfg) -> List[str]:
    """Folders the task must see, deduplicated, parents before children dropped."""
    dirs = []
    for p in (cfg.input.dir, cfg.input.root, cfg.input.list and os.path.dirname(os.path.abspath(cfg.input.list)),
              cfg.output.dir, os.path.dirname(os.path.abspath(cfg.model.prototxt)),
              cfg.model.weights and os.path.dirname(os.path.abspath(cfg.model.weights)),
              cfg.model.preprocess.mean_file and os.path.dirname(os.path.abspath(cfg.model.preprocess.mean_file)),
              cfg.input.get("lmdb"), cfg.input.get("tar") and os.path.dirname(os.path.abspath(cfg.input.tar))):
        if p:
            dirs.append(os.path.abspath(os.path.expanduser(str(p))))
    out: List[str] = []
    for d in sorted(set(dirs)):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def container_command(cfg, inner: List[str]) -> List[str]:
    c = cfg.container
    if c.runtime not in RUNTIMES:
        raise ConfigError(f"container.runtime={c.runtime!r}: use one of {', '.join(RUNTIMES)}")
    if c.runtime == "none":
        return inner
    if not c.image:
        raise ConfigError(f"container.runtime={c.runtime} needs container.image=... (an image name or .sif file)")
    binds = bind_dirs(cfg) + list(c.binds)
    gpu = cfg.device == "gpu"
    if c.runtime == "apptainer":
        cmd = ["apptainer", "exec"] + (["--nv"] if gpu else [])
        for b in binds:
            cmd += ["-B", b if ":" in b else f"{b}:{b}"]
        return cmd + list(c.extra_args) + [c.image] + inner
    if c.runtime in ("podman", "docker"):
        cmd = [c.runtime, "run", "--rm", "--network", "host", "--entrypoint", inner[0]]
        if c.runtime == "podman":
            cmd += ["--pull", "never"]
        if gpu:
            cmd += ["--device", "nvidia.com/gpu=all"] if c.runtime == "podman" else ["--gpus", "all"]
        # submitit and caffe-runner read these inside the task
        for var in ("SLURM_*", "SUBMITIT_*", "CUDA_VISIBLE_DEVICES", "CAFFE_RUNNER_*", "GLOG_minloglevel"):
            cmd += ["--env", var]
        for b in binds:
            cmd += ["-v", b if ":" in b else f"{b}:{b}"]
        return cmd + list(c.extra_args) + [c.image] + inner[1:]
    # pyxis: the container comes from srun options; the command stays as it is
    return inner


def wrap_python(cfg, python: str) -> str:
    """The interpreter command submitit puts in the sbatch script."""
    if cfg.container.runtime in ("none", "pyxis"):
        return python
    inner_python = "python"  # the image's own environment
    return " ".join(shlex.quote(x) for x in container_command(cfg, [inner_python]))


def pyxis_srun_args(cfg) -> List[str]:
    c = cfg.container
    if c.runtime != "pyxis":
        return []
    mounts = ",".join(b if ":" in b else f"{b}:{b}" for b in bind_dirs(cfg) + list(c.binds))
    return [f"--container-image={c.image}", f"--container-mounts={mounts}"]
