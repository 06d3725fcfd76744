"""podman and docker: `run --rm` on an image name from the local image store."""
from __future__ import annotations

import shutil
import subprocess
from typing import List, Optional

from ..errors import ConfigError
from .base import ContainerSpec, Placement, Runtime, Wrapped, pairs


class Oci(Runtime):
    def __init__(self, name: str):
        self.name = self.executable = name

    def image_path(self, image: str) -> Optional[str]:
        return None  # always a name in the runtime's image store

    def check(self, spec: ContainerSpec, placement: Placement) -> None:
        # docker's CLI is a client: without a daemon every shard would fail after the run
        # started. Only where tasks run on this machine (other nodes use their own daemons).
        if self.name == "docker" and not placement.other_nodes and shutil.which(self.executable):
            why = docker_daemon_problem()
            if why:
                raise ConfigError(docker_daemon_message(why))

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
        cmd += self.user_args(s.uid, s.gid, s.groups)
        return Wrapped(cmd + list(s.extra_args) + [s.image] + inner[1:], [])

    def user_args(self, uid: int, gid: int, groups) -> List[str]:
        """Run the task as the calling user, not as the image's root: the shard files it writes
        into the user's run directory are then the user's. Rootless podman (any user but root)
        maps the user to the same ids inside with --userns=keep-id (its --user would name a
        sub-id); docker and rootful podman take the ids themselves, plus the supplementary
        groups, which --user alone drops (input readable through a group stays readable)."""
        if self.name == "podman" and uid != 0:
            return ["--userns=keep-id"]
        return ["--user", f"{uid}:{gid}"] + [a for g in groups for a in ("--group-add", str(g))]


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
