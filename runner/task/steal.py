"""No straggler holds the run: an array task extracts its own shard (its array index), then takes
the shards that are neither done nor held by a live task, one at a time, until none is left.

The shard lock (write.ShardLock, one flock per shard) decides who holds a shard: a task that
loses the race for a shard's lock moves on to the next free one, so every shard has exactly one
writer, as with one task per shard. A lock's holder that dies drops it (the kernel or the file
server releases a flock), so its shard becomes free again and is taken by whoever looks next.
A task whose shards are all done ends before it loads the model.

Metadata that grows with the tasks, not their square (issue 37): on Lustre or NFS every stat,
open and lock goes to one metadata server the whole site shares, so a decision costs a bounded
number of calls whatever the task count T:
  - one listing of the shards folder per decision says which shards are done: the committed final
    name is trusted (write.py commits by link, first commit wins, so a name there is a complete
    shard of some attempt; a task's own shard, and a shard it takes, are still checked in full by
    run_shard before any work). No stat per shard, no HDF5 open of other tasks' shards;
  - no lock probes: trying a shard's lock is the probe (ShardBusyError), and a task tries at most
    MAX_BUSY_TRIES held shards per decision and each held shard once (a holder finishes its own
    shard; one that dies frees its lock for whoever tries it next);
  - each task walks the shards from a start of its own (take_order): tasks that free up together
    take different shards instead of all trying the lowest free one;
  - whether to leave the last shards to faster tasks reads at most MAX_PEERS heartbeats.
"""
from __future__ import annotations

import heapq
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .. import log
from ..errors import ShardBusyError
from ..store.liveness import beat_age_s, stale_after_s
from ..run.plan import load_run
from ..store.rundir import pid_alive
from ..run.sharedpass import companions
from .identity import task_identity

MAX_BUSY_TRIES = 8   # held shards a task tries per decision before it ends (or re-looks)
MAX_PEERS = 16       # other tasks' heartbeats read to decide whether to leave a shard to them
# a task whose own shard's lock is held by a dead holder (an NFSv4 lease, a Lustre eviction not
# yet over: the file server still holds a lost node's lock) waits for it this long, then breaks it
DEAD_HOLDER_WAIT_S = 150.0
DEAD_HOLDER_POLL_S = 5.0
# a task that leaves the last free shards to faster tasks does not end: it waits until one of
# them should have freed up and looks again (a faster task that died meanwhile no longer counts,
# its beat gone stale), at most MAX_LEAVES times, then takes a shard itself
MAX_LEAVES = 3
LEAVE_WAIT_MIN_S = 5.0
LEAVE_WAIT_MAX_S = 600.0


def take_order(own: int, num_shards: int, tasks: Optional[int] = None) -> List[int]:
    """The order a task looks at the shards in (pure): its own first, then every other one once.
    With `tasks` (the array's task count T; the first T shards are the tasks' own) the shards
    above them are cut into T stretches: task k walks its own stretch (k) up, then the others
    (k+1, k+2, ... cyclically) each from its top down, so tasks that finish their own shards
    together each take a different one, and a task that helps another's stretch meets its owner
    (walking up) once instead of at every shard. Without `tasks` it walks up cyclically from
    just above its own shard."""
    if num_shards <= 0:
        return []
    if tasks and 0 < tasks < num_shards:
        extra = num_shards - tasks
        bounds = [tasks + (j * extra) // tasks for j in range(tasks + 1)]
        k = own % tasks
        stretches = [list(range(bounds[k], bounds[k + 1]))]
        stretches += [list(range(bounds[j + 1] - 1, bounds[j] - 1, -1))
                      for j in ((k + m) % tasks for m in range(1, tasks))]
        rest = [i for st in stretches for i in st] + list(range(tasks))
        return [own] + [i for i in rest if i != own]
    start = own + 1
    return [own] + [k for k in ((start + j) % num_shards for j in range(num_shards)) if k != own]


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


def leave_wait_s(others: Sequence[Tuple[float, float, float]]) -> float:
    """How long a task that left the free shards to faster tasks waits before it looks again
    (pure): until the soonest of them should be free, plus the time its beat takes to go stale
    (so a task that died instead is known dead by then). `others`: (seconds until free,
    images/s, seconds until stale)."""
    if not others:
        return LEAVE_WAIT_MIN_S
    t = min(free + stale for free, _, stale in others)
    return min(LEAVE_WAIT_MAX_S, max(LEAVE_WAIT_MIN_S, t))


def done_names(run) -> Set[str]:
    """The entries of the shards folder, in one listing (a committed shard's final name among them)."""
    try:
        return set(os.listdir(run.rundir.shards_dir))
    except FileNotFoundError:
        return set()


def _others(run, shards: Iterable[int], now: float) -> List[Tuple[float, float, float]]:
    """(seconds until free, images/s, seconds until its beat goes stale) of the tasks writing
    `shards` (at most MAX_PEERS of them read), from their beats; a beat that is not fresh (its
    task may be dead) does not count."""
    out = []
    for n, i in enumerate(shards):
        if n >= MAX_PEERS:
            break
        hb = run.read_heartbeat(i) or {}
        rate = float(hb.get("rate") or 0)
        if hb.get("state") == "running" and rate > 0 and beat_age_s(hb, None, now) <= stale_after_s(hb):
            out.append((max(0, int(hb.get("total") or 0) - int(hb.get("done") or 0)) / rate, rate,
                        stale_after_s(hb)))
    return out


def holder_is_dead(beat: Optional[Dict], job_id: Optional[str], host: str, pid_alive: Callable) -> bool:
    """Whether a shard's last beat shows that the task holding its lock is gone (pure but for
    pid_alive): it names this very Slurm job (a requeued task's previous run: Slurm runs one at a
    time), or a pid of this host that no longer runs (with its start time, liveness.pid_start)."""
    if not beat:
        return False
    if job_id and beat.get("job_id") == job_id:
        return True
    pid = beat.get("pid")
    if pid and beat.get("host") == host and beat.get("state") in ("running", None):
        return not pid_alive(int(pid), beat.get("pid_start"))
    return False


def _own_shard(cfg, run, own: int, run_one: Callable, threads, keep: Dict, wait_s: float,
               poll_s: float) -> Optional[Dict]:
    """Extract this task's own shard. Its lock held: by a live task that took it (a result of
    None: this task goes on to others), or by a dead holder the file server still keeps (an
    NFSv4 lease, a Lustre eviction, after a node failure): then wait, up to `wait_s`, and break
    it (the shard is written without the flock; first-commit-wins keeps it correct) instead of
    leaving the task's own shard to nobody."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return run_one(cfg, own, threads, own=own, keep=keep)
        except ShardBusyError as e:
            ident = task_identity()
            beat = run.read_heartbeat(own)
            if holder_is_dead(beat, ident.job_id, ident.host, pid_alive):
                why = "its holder is gone (" + (f"this task's previous run, job {ident.job_id}"
                                                if ident.job_id and (beat or {}).get("job_id") == ident.job_id
                                                else f"pid {(beat or {}).get('pid')} no longer runs") + ")"
            elif beat and beat.get("state") == "running" and beat_age_s(beat, None, time.time()) <= stale_after_s(beat):
                log.info("shard %d (this task's own) is written by another live task: %s", own, e)
                return None
            elif time.monotonic() >= deadline:
                why = f"its holder wrote no fresh heartbeat in {wait_s:.0f} s"
            else:
                time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
                continue
            log.warning("shard %d (this task's own): the lock is still held, but %s: this task breaks it and "
                        "writes the shard (the first commit stands)", own, why)
            return run_one(cfg, own, threads, own=own, keep=keep, break_lock=True)


def take_shards(cfg, own: int, run_one: Callable, threads: Optional[int] = None,
                wait_s: float = DEAD_HOLDER_WAIT_S, poll_s: float = DEAD_HOLDER_POLL_S,
                sleep: Callable[[float], None] = time.sleep) -> Dict:
    """Extract shard `own`, then every free shard, one at a time, with `run_one(cfg, index,
    threads, own=, keep=)` (extract.run_shard). Returns what it did: {"shard": own, "shards":
    [results], "taken": [indices of others' shards it extracted]}."""
    run = load_run(cfg)
    # a sweep's shared pass: a shard is free while any run of the pass lacks it (sharedpass.py);
    # one listing per run of the pass and decision
    group = [run] + companions(run)
    tasks = cfg.get("num_shards")
    tasks = int(tasks) if isinstance(tasks, int) else None
    order = take_order(own, run.num_shards, tasks)
    keep: Dict = {}  # the engine and pipeline, loaded once for all the shards this task extracts
    results: List[Dict] = []
    taken: List[int] = []
    busy: List[int] = []  # held by another task when tried: tried once more at the end at most
    lost: set = set()  # shards another attempt committed or took over from this task: never again
    my_rate = 0.0  # images/s of this task's last shard
    # its own shard checked in full (the one shard file a task opens besides those it writes): a
    # task whose own shard is done runs nothing for it (and loads no model for it)
    r0 = {} if all(r.shard_done(own) for r in group) else _own_shard(cfg, run, own, run_one, threads, keep, wait_s,
                                                                      poll_s)
    if r0 is None:
        busy.append(own)
    elif r0:
        results.append(r0)
        if r0.get("lost_to"):
            lost.add(own)
        elif r0.get("images_per_s"):
            my_rate = float(r0["images_per_s"])
    relooked = False
    leaves = 0  # times this task left the free shards to faster tasks and waited
    while True:
        listings = [(r, done_names(r)) for r in group]
        names = listings[0][1]

        def left(i: int) -> bool:
            return any(r.shard_path(i).name not in n for r, n in listings)

        tried = set(busy) | lost
        free = [i for i in order if left(i) and i not in tried]
        if not free and busy and not relooked:
            # the end: the held shards once more (a holder may have died since), a bounded few
            relooked, free = True, [i for i in busy[:MAX_BUSY_TRIES] if left(i)]
            busy = busy[MAX_BUSY_TRIES:]
        if not free:
            break
        # the other tasks' beats matter only when there are fewer shards left than tasks (the tail)
        others = (_others(run, [b for b in busy if run.shard_path(b).name not in names], time.time())
                  if results and leaves < MAX_LEAVES and (not tasks or len(free) <= int(tasks)) else None)
        if others is not None and not worth_taking(my_rate, [len(range(*run.shard_range(k))) for k in free],
                                                   [(t, r) for t, r, _ in others]):
            # not an end: if the faster tasks die before they free up, nobody else may be left
            leaves += 1
            pause = leave_wait_s(others)
            log.info("leaving the %d free shard(s) to faster tasks that free up sooner (this task: %.1f img/s); "
                     "looking again in %.0f s", len(free), my_rate, pause)
            sleep(pause)
            relooked = False  # the held shards may be looked at once more after this wait
            continue
        r = None
        for i in free[:MAX_BUSY_TRIES]:
            try:
                r = run_one(cfg, i, threads, own=own, keep=keep)
                break
            except ShardBusyError:
                busy.append(i)  # another task holds it: its shard now
        if r is None:
            # MAX_BUSY_TRIES held in a row (or every held one looked at again): the shards left
            # are being written by their holders, the tail of the run; this task ends
            break
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
