"""The launcher interface: what plan.py asks of a launcher, and how it runs a run.

plan.prepare_run calls the hooks at fixed points (device resolution, the launcher's own
checks, the resolved values written back, the default shard count), so every check happens
where it did and says what it said; the plan never asks which launcher it serves. A launcher
module (local.py, slurm.py) subclasses Launcher; launch/registry.py picks one from the config.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..runtimes import Placement


class Launcher(ABC):
    # launcher.name in the config (launcher=local | launcher=slurm)
    name: str = ""
    # where tasks run, as the container runtimes' checks need it
    placement: Placement = Placement(srun=False, other_nodes=False)

    @abstractmethod
    def resolve_device(self, cfg) -> Tuple[str, int]:
        """(device, GPUs per task) of the tasks, refusing a request they could not honour."""

    @abstractmethod
    def require_gpu_here(self) -> None:
        """device=gpu with the host's Caffe: what this machine must have (plan time)."""

    def check(self, cfg) -> None:
        """The launcher's own plan-time checks (the last ones, before anything is listed)."""

    def settle(self, cfg, checked) -> None:
        """Write what the plan resolved for this launcher into cfg (tasks get plain values)."""

    @abstractmethod
    def default_shards(self, cfg) -> int:
        """num_shards when the config leaves it unset (asked after the device is resolved)."""

    def run_tasks(self, run, fn: Callable, calls: List[Sequence], what: str) -> bool:
        """Run fn(*args) for each args as this launcher's tasks (`what` names them) and wait
        for all; raises when one failed. False: this launcher runs work in the calling process,
        so the caller runs it there (`retry` of a local run)."""
        return False

    def explicit_shards(self, cfg) -> Optional[int]:
        """The shard count the plan must have; None: default_shards decides."""
        return cfg.num_shards

    def returns_before_done(self, cfg) -> bool:
        """True when a launch returns once its work is submitted, before it is done (what a
        sweep tells the user when its points' commands return)."""
        return False

    @abstractmethod
    def execute(self, cfg, accepted: Callable) -> Dict:
        """Prepare the run (plan.prepare_run with this launcher), call accepted(run) once the
        plan is accepted, run or submit the missing shards; returns the launch's summary."""
