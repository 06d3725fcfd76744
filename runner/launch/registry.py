"""The one registry of launchers, and the one place their modules are imported.

Each launcher config names its implementation (launcher._target_, as Hydra's launchers do),
so choosing one is data, not `if name == ...`. The import is lazy on purpose: a launcher module
imports the plan and the task code (plan, extract, merge), which must never import a launcher
back; importing it only when a launch starts keeps the layers one-way, and keeps submitit
out of processes that never submit.
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Launcher

# launcher.name -> implementation, for configs written before launchers named theirs
# (run.json and queued jobs of earlier versions)
LAUNCHERS = {"local": "runner.launch.local.LocalLauncher", "slurm": "runner.launch.slurm.SlurmLauncher"}


def launcher_for(cfg) -> Launcher:
    """The launcher cfg.launcher names (its _target_), refusing an unknown one with the list."""
    lc = cfg.launcher
    target = lc.get("_target_") or LAUNCHERS.get(str(lc.get("name")))
    if target not in LAUNCHERS.values():
        raise ConfigError(f"launcher={lc.get('name')!r}: use " + " or ".join(f"launcher={n}" for n in LAUNCHERS))
    module, _, cls = target.rpartition(".")
    return getattr(importlib.import_module(module), cls)()
