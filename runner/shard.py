"""Shard arithmetic (pure) and the one place that reads "who am I" from the environment."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple


def shard_bounds(n_items: int, num_shards: int, index: int) -> Tuple[int, int]:
    """Contiguous [start, stop) of shard `index`: sizes differ by at most one, larger first."""
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} out of range for {num_shards} shards")
    base, extra = divmod(n_items, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def array_chunks(indices, max_array_size: int):
    """Split shard indices into submissions of at most max_array_size tasks (MaxArraySize caps
    the array *index*, and submitit numbers each array from 0, so the size is what counts)."""
    if max_array_size < 1:
        raise ValueError("max_array_size must be >= 1")
    indices = list(indices)
    return [indices[i:i + max_array_size] for i in range(0, len(indices), max_array_size)]


@dataclass(frozen=True)
class TaskIdentity:
    """Where a task runs, resolved once at the edge; the extraction code gets plain values."""
    host: str
    pid: int
    job_id: Optional[str]          # "1234_5" under Slurm
    array_task_id: Optional[int]
    restart_count: int             # Slurm requeues
    visible_gpus: Optional[str]    # CUDA_VISIBLE_DEVICES as the task saw it

    @property
    def gpu(self) -> Optional[int]:
        """The first visible GPU's index on the node (what Slurm bound this task to)."""
        if not self.visible_gpus:
            return None
        first = self.visible_gpus.split(",")[0].strip()
        return int(first) if first.isdigit() else None


def task_identity(environ: Mapping[str, str] = os.environ) -> TaskIdentity:
    job = environ.get("SLURM_ARRAY_JOB_ID")
    task = environ.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        job_id: Optional[str] = f"{job}_{task}"
    else:
        job_id = environ.get("SLURM_JOB_ID")
    return TaskIdentity(
        host=socket.gethostname(),
        pid=os.getpid(),
        job_id=job_id,
        array_task_id=int(task) if task and task.isdigit() else None,
        restart_count=int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
        visible_gpus=environ.get("CUDA_VISIBLE_DEVICES"),
    )
