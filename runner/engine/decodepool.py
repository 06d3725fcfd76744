"""Decode threads with a time bound per image (decode.max_image_s).

A decoder can hang on one file: a crafted image that loops in native code, a read that never
returns from a stuck file server. A thread cannot be stopped from outside, so the pool gives up
on it instead: an image whose decoding has run longer than the bound is recorded as a failure
with that reason, its thread is left behind (a daemon: it never holds the process's exit) and a
fresh thread takes its place, so the shard goes on at full width. A thread that comes back later
finds its image given up and ends. Past MAX_ABANDONED threads left behind in one attempt the
shard stops with an error instead (something systemic hangs: the file system), which ends the
attempt in words; its partial file is kept and resumed.

Image by image in child processes (isolate.py), a hang takes its child along: the isolated
decoder's children are killed when the attempt ends.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from itertools import islice
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from ..errors import RunnerError

MAX_ABANDONED = 8
_POLL_S = 1.0  # how often a wait for a job not yet started looks again


def hang_reason(max_image_s: float) -> str:
    return (f"decoding took more than decode.max_image_s={max_image_s:g} s: given up (a file that hangs the "
            "decoder, or a stuck read; raise decode.max_image_s if such images are real)")


class _Job:
    __slots__ = ("fn", "t0", "done", "result", "error", "abandoned")

    def __init__(self, fn: Callable):
        self.fn = fn
        self.t0: Optional[float] = None
        self.done = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None
        self.abandoned = False


class DecodePool:
    """`workers` daemon threads running jobs (each returns (image|None, reason)) in the order
    submitted; result(job) waits for one, at most max_image_s from when a thread started it
    (0: no bound)."""

    def __init__(self, workers: int, max_image_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.max_image_s = float(max_image_s or 0)
        self.clock = clock
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.abandoned = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        self.threads += 1
        threading.Thread(target=self._run, name=f"decode-{self.threads}", daemon=True).start()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            with self.lock:
                job.t0 = self.clock()
            try:
                result, error = job.fn(), None
            except BaseException as e:  # handed to the waiting thread, as a Future does
                result, error = None, e
            with self.lock:
                job.result, job.error = result, error
                job.done.set()
                if job.abandoned:
                    return  # a fresh thread took this one's place meanwhile

    def submit(self, fn: Callable) -> _Job:
        job = _Job(fn)
        self.q.put(job)
        return job

    def result(self, job: _Job) -> Tuple:
        while True:
            with self.lock:
                t0 = job.t0
            if t0 is None or not self.max_image_s:
                wait = _POLL_S if self.max_image_s else None
            else:
                wait = max(0.0, t0 + self.max_image_s - self.clock())
            if job.done.wait(wait):
                break
            with self.lock:
                if job.done.is_set():
                    break
                if job.t0 is None or self.clock() - job.t0 < self.max_image_s:
                    continue
                job.abandoned = True
                self.abandoned += 1
                over = self.abandoned > MAX_ABANDONED
                if not over:
                    self._spawn()
            if over:
                raise RunnerError(
                    f"{self.abandoned} images each took more than decode.max_image_s={self.max_image_s:g} s to "
                    "decode: something hangs every read or decode (a stuck file server?). The shard stops here; "
                    "its rows so far are kept and the next attempt resumes: check the input's file system, or "
                    "raise decode.max_image_s")
            return None, hang_reason(self.max_image_s)
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        """Ends the threads once they finish what they hold (those left behind end on their own)."""
        for _ in range(self.threads):
            self.q.put(None)


def _batches(items: Iterable, batch_size: int) -> Iterator[List]:
    it = iter(items)
    while True:
        b = list(islice(it, batch_size))
        if not b:
            return
        yield b


def decode_window(items, batch_size: int, workers: int, prefetch: int, max_image_s: float = 0.0):
    """Yield (batch of readers.Item, [(image|None, reason)]) per batch, decoding up to `prefetch`
    batches ahead in `workers` threads (bounded: memory does not grow with the input). With
    workers=0 the images are decoded in the calling thread, without a time bound."""
    batches = _batches(items, batch_size)
    if workers <= 0:
        for b in batches:
            yield b, [it.job() for it in b]
        return
    pool = DecodePool(workers, max_image_s)
    try:
        window: deque = deque()
        for b in batches:
            window.append((b, [pool.submit(it.job) for it in b]))
            if len(window) > prefetch:
                b0, jobs = window.popleft()
                yield b0, [pool.result(j) for j in jobs]
        while window:
            b0, jobs = window.popleft()
            yield b0, [pool.result(j) for j in jobs]
    finally:
        pool.close()
