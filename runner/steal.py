"""No straggler holds the run: an array task extracts its own shard (its array index), then takes
the shards that are neither done nor held by a live task, one at a time, until none is left.

The shard lock (write.ShardLock, one flock per shard) decides who holds a shard: a task that
loses the race for a shard's lock moves on to the next free one, so every shard has exactly one
writer, as with one task per shard. A lock's holder that dies drops it (the kernel or the file
server releases a flock), so its shard becomes free again and is taken by whoever looks next.
A task whose shards are all done ends before it loads the model.
"""
from __future__ import annotations

import heapq
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import log
from .errors import ShardBusyError
from .locks import lock_holder
from .plan import load_run


def take_order(own: int, num_shards: int) -> List[int]:
    """The order a task looks at the shards in (pure): its own first, then the others in index
    order, so the tasks started together start on different shards and later ones take the
    lowest free one."""
    return [own] + [i for i in range(num_shards) if i != own]


def free_shards(order: Iterable[int], done: Callable[[int], bool], held: Callable[[int], Optional[str]]) -> List[int]:
    """The shards of `order` neither done nor held by a live task (pure given its two questions)."""
    return [i for i in order if not done(i) and not held(i)]


def worth_taking(my_rate: float, sizes: Sequence[int], others: Sequence[Tuple[float, float]]) -> bool:
    """Whether this task should take one of the free shards (`sizes`: their images) now (pure).
    `others`: (seconds until free, images/s) of the other tasks writing shards. The free shards
    are handed out in turn to whichever task would finish each first (free time + size / rate);
    this task takes one when it gets any. A slow task thus leaves the last shards to faster ones
    that free up soon, instead of holding the run for one more slow shard. Without rates (a
    first shard, tasks still loading) it takes one."""
    if my_rate <= 0 or not sizes:
        return bool(sizes)
    heap = [(0.0, 0, my_rate)] + [(max(0.0, t), k + 1, r) for k, (t, r) in enumerate(others) if r > 0]
    heapq.heapify(heap)
    for size in sorted(sizes, reverse=True):
        best = min(heap, key=lambda h: h[0] + size / h[2])
        if best[1] == 0:
            return True
        heap.remove(best)
        heap.append((best[0] + size / best[2], best[1], best[2]))
        heapq.heapify(heap)
    return False


def _others(run, order: Iterable[int], mine: int) -> List[Tuple[float, float]]:
    """(seconds until free, images/s) of the tasks writing other shards now, from their beats."""
    out = []
    for i in order:
        if i == mine or run.shard_done(i) or not lock_holder(run.lock_path(i)):
            continue
        hb = run.read_heartbeat(i) or {}
        rate = float(hb.get("rate") or 0)
        if hb.get("state") == "running" and rate > 0:
            out.append((max(0, int(hb.get("total") or 0) - int(hb.get("done") or 0)) / rate, rate))
    return out


def take_shards(cfg, own: int, run_one: Callable, threads: Optional[int] = None) -> Dict:
    """Extract shard `own`, then every free shard, one at a time, with `run_one(cfg, index,
    threads, own=, keep=)` (extract.run_shard). Returns what it did: {"shard": own, "shards":
    [results], "taken": [indices of others' shards it extracted]}."""
    run = load_run(cfg)
    order = take_order(own, run.num_shards)
    keep: Dict = {}  # the engine and pipeline, loaded once for all the shards this task extracts
    results: List[Dict] = []
    taken: List[int] = []
    tried_busy: set = set()
    lost: set = set()  # shards another attempt committed or took over from this task: never again
    my_rate = 0.0  # images/s of this task's last shard
    while True:
        free = [i for i in free_shards(order, run.shard_done, lambda i: lock_holder(run.lock_path(i)))
                if i not in tried_busy and i not in lost]
        if not free:
            break
        i = free[0]
        if results and not worth_taking(my_rate, [len(range(*run.shard_range(k))) for k in free],
                                        _others(run, order, -1)):
            log.info("leaving the %d free shard(s) to faster tasks that free up sooner (this task: %.1f img/s)",
                     len(free), my_rate)
            break
        try:
            r = run_one(cfg, i, threads, own=own, keep=keep)
        except ShardBusyError:
            # another task took its lock between our look and ours: it is its shard now
            tried_busy.add(i)
            continue
        tried_busy.clear()  # a holder seen before may have died since: look at every shard again
        results.append(r)
        if r.get("lost_to"):
            lost.add(i)
            continue
        if r.get("images_per_s"):
            my_rate = float(r["images_per_s"])
        if i != own and not r.get("skipped"):
            taken.append(i)
    if taken:
        log.info("this task (own shard %d) also extracted shard(s) %s that no task held", own,
                 ", ".join(map(str, taken)))
    elif not results:
        log.info("shard %d and every other shard are done or held by other tasks: nothing to do here", own)
    return {"shard": own, "shards": results, "taken": taken}
