"""Pyxis (NVIDIA's enroot plugin for Slurm): the container comes from srun's own options."""
from __future__ import annotations

from typing import List, Optional

from ..errors import ConfigError
from .base import ContainerSpec, Placement, Runtime, Wrapped, abs_path, is_uri, pairs


class Pyxis(Runtime):
    name = "pyxis"
    executable = "srun"
    # --container-mounts=SRC:DST[,SRC:DST...]; srun's --export list is comma-separated too
    bind_separators = ":,"

    def image_path(self, image: str) -> Optional[str]:
        if is_uri(image) or not image.startswith(("/", ".", "~")):
            return None  # "ubuntu:22.04", "nvcr.io#nvidia/pytorch:24.01" are registry names
        return abs_path(image)

    def wrap(self, s: ContainerSpec, inner: List[str]) -> Wrapped:
        # the task's srun environment is the container's (pyxis/enroot), so fixed values go
        # through srun's own --export
        args = [f"--container-image={s.image}", f"--container-mounts={','.join(pairs(s.binds))}",
                f"--container-workdir={s.workdir}"]
        if s.set_env:
            args.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in s.set_env))
        return Wrapped(list(inner), args + list(s.extra_args))

    def check(self, spec: ContainerSpec, placement: Placement) -> None:
        if not placement.srun:
            raise ConfigError("container.runtime=pyxis runs through srun: use it with launcher=slurm (locally, use "
                              "charliecloud, apptainer or podman)")
