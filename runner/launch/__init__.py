"""Launchers: the same run_shard on this machine (local) or as a Slurm array (slurm)."""
from __future__ import annotations

from typing import Dict

from ..errors import ConfigError


def launch(cfg) -> Dict:
    name = cfg.launcher.name
    if name == "local":
        from .local import launch_local

        return launch_local(cfg)
    if name == "slurm":
        from .slurm import launch_slurm

        return launch_slurm(cfg)
    raise ConfigError(f"launcher={name!r}: use launcher=local or launcher=slurm")
