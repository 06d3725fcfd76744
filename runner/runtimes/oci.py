"""podman and docker: `run --rm` on an image name from the local image store."""
from __future__ import annotations

import shutil
import subprocess
from typing import List, Optional

from .base import ContainerSpec, Runtime, Wrapped, pairs


class Oci(Runtime):
    def __init__(self, name: str):
        self.name = self.executable = name

    def image_path(self, image: str) -> Optional[str]:
        return None  # always a name in the runtime's image store

    def identity(self, image: str) -> str:
        """The local image's digest ("" when the runtime cannot say here)."""
        if not shutil.which(self.name):
            return ""
        try:
            p = subprocess.run([self.name, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                               text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        digest = p.stdout.strip()
        if p.returncode == 0 and digest:
            return digest if digest.startswith("sha256:") else "sha256:" + digest
        return ""

    def wrap(self, s: ContainerSpec, inner: List[str]) -> Wrapped:
        # podman and docker: `--env NAME` passes the host's value when it is set (docker has no
        # prefix globs, so names); the entry point is replaced by the task's interpreter.
        cmd = [s.runtime, "run", "--rm", "--network", "host", "--entrypoint", inner[0], "--workdir", s.workdir]
        if self.name == "podman":
            cmd += ["--pull", "never"]
        if s.gpu:  # podman: CDI (nvidia-ctk cdi generate); docker: the NVIDIA container toolkit
            cmd += ["--device", "nvidia.com/gpu=all"] if self.name == "podman" else ["--gpus", "all"]
        for name in s.env:
            cmd += ["--env", name]
        for k, v in s.set_env:
            cmd += ["--env", f"{k}={v}"]
        for b in pairs(s.binds):
            cmd += ["--volume", b]
        return Wrapped(cmd + list(s.extra_args) + [s.image] + inner[1:], [])
