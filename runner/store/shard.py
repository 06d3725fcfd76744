"""Shard arithmetic (pure). Who the task is (read from the environment) is runner.task.identity."""
from __future__ import annotations

from typing import Tuple


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

