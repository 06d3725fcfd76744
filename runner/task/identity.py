"""Task-side helpers both launchers use, resolved once at the task's edge: who the task is
(task_identity), its BLAS threads, its log handler, and dying with the process that started
it. The extraction code gets plain values from here and never reads SLURM_* itself."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional

from .. import log
from ..jobs.slurm import job_id_from_env


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
    task = environ.get("SLURM_ARRAY_TASK_ID")
    return TaskIdentity(
        host=socket.gethostname(),
        pid=os.getpid(),
        job_id=job_id_from_env(environ),
        array_task_id=int(task) if task and task.isdigit() else None,
        restart_count=int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
        visible_gpus=environ.get("CUDA_VISIBLE_DEVICES"),
    )


def configure_threads(threads: int) -> None:
    """BLAS threads must be set before Caffe (OpenBLAS) is loaded into the process."""
    threads = max(1, int(threads))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("GLOG_minloglevel", "2")
    import cv2  # heavy: only tasks need it

    from ..engine.decode import reuse_large_buffers

    cv2.setNumThreads(1)  # decode threads are our parallelism; no nested pools
    reuse_large_buffers()  # full-size photos: no fresh zero-filled mapping per decode


def default_threads() -> int:
    for var in ("CAFFE_RUNNER_THREADS", "SLURM_CPUS_PER_TASK"):
        v = os.environ.get(var)
        if v and v.isdigit():
            return int(v)
    return len(os.sched_getaffinity(0))


def setup_task_logging(level=logging.INFO) -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


def die_with_parent(poll_s: float = 0.5) -> None:
    """A worker whose launcher was killed must not go on writing. (PR_SET_PDEATHSIG would
    fire when the *thread* that started the worker ends, not the launcher: the parent process
    is watched instead.)"""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
