"""Charliecloud: `ch-run` on a SquashFS file or an image directory, unprivileged. Its image
is read-only, so every bind needs a mount point the image already has: checked at plan time."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional

from ..errors import ConfigError
from .base import ContainerSpec, Runtime, Wrapped, outermost, pairs, under

_NVIDIA_LIBS = ("libcuda.so", "libnvidia-ml.so")


def charliecloud_binds(dirs: List[str]) -> List[str]:
    """ch-run binds onto mount points that already exist in the image (a SquashFS image is
    read-only, so none can be made): each folder is reached through its top-level directory
    (/scratch/u/run -> /scratch), which the image must have. /tmp and /dev are bound by ch-run
    itself."""
    return outermost(["/" + d.strip("/").split("/")[0] for d in dirs if not under(d, ("/tmp", "/dev"))])


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


class Charliecloud(Runtime):
    name = "charliecloud"
    executable = "ch-run"

    def binds(self, dirs: List[str]) -> List[str]:
        return charliecloud_binds(dirs)

    def wrap(self, s: ContainerSpec, inner: List[str]) -> Wrapped:
        # ch-run passes the whole host environment by default: drop all but the task's variables
        # (extglob), then the image's own (/ch/environment, written by ch-convert), then ours.
        # ch-run stops when USER is unset (batch systems, CI): set it for ch-run itself.
        cmd = ["env", f"USER={s.user}", "ch-run", f"--unset-env=!({'|'.join(s.env)})", "--set-env"]
        cmd += [f"--set-env={k}={v}" for k, v in s.set_env]
        for b in pairs(s.binds):
            cmd += ["--bind", b]
        cmd += ["--cd", s.workdir] + list(s.extra_args) + [s.image, "--"] + inner
        return Wrapped(cmd, [])

    def check_image(self, spec: ContainerSpec, path: str, device: str) -> None:
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
