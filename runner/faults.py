"""Fault injection: every place a test acts on a running task, behind one small interface that
the runtime calls at named points. Each is inert unless a test sets it, through an environment
variable no real run has (a leaf).

Points (gate): CAFFE_RUNNER_TEST_GATES=FOLDER. A test that must act while a task is at a given
moment (kill it while it loads the net, mid-shard, while it finishes its file, while a merge
holds its lock) creates `FOLDER/NAME.hold` before the run. The task, reaching point NAME,
writes its pid to `NAME.reached` (and to `NAME.reached.HOST`, so a test can tell that tasks on
two nodes are both there) and waits until the test removes the `.hold` file: the moment lasts
as long as the test needs, however fast or slow the machine is. Points: load-I, first-batch-I,
written-I-N, finish-I (extract.py), read-FILENAME (decode.py), lock-probed (locks.py),
merge-locked (merge.py).

Steps (step): CAFFE_RUNNER_TEST_STEP_HOLD=FILE holding N. Tests kill a process at each of its
steps in turn, not at a moment a clock picks: the N-th step this process reaches (from 0) writes
FILE.at naming itself and waits there to be killed (retry.py marks its steps).

Switches (switch): CAFFE_RUNNER_FAULT_NAME=VALUE, read once where the fault acts:
  CRASH_ON=TEXT          a decoder kills its process (SIGSEGV) on a file whose path holds TEXT
  HANG_ON=TEXT           a decoder never returns on such a file (decode.max_image_s)
  NODE_LOCAL_LOCKS=1     every flock private to its host (Lustre localflock, NFS local_lock)
The simulated engine (backend=simulated) is a benchmark tool with keys of its own.
"""
from __future__ import annotations

import os
import socket
import threading

from .store.atomic import atomic_write_text

ENV = "CAFFE_RUNNER_TEST_GATES"
STEP_HOLD = "CAFFE_RUNNER_TEST_STEP_HOLD"
FAULT_CRASH_ON = "CAFFE_RUNNER_FAULT_CRASH_ON"
FAULT_HANG_ON = "CAFFE_RUNNER_FAULT_HANG_ON"
FAULT_NODE_LOCAL_LOCKS = "CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS"


def gate(name: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    hold = os.path.join(folder, name + ".hold")
    if not os.path.exists(hold):
        return
    atomic_write_text(os.path.join(folder, f"{name}.reached.{socket.gethostname()}"), str(os.getpid()), durable=False)
    atomic_write_text(os.path.join(folder, name + ".reached"), str(os.getpid()), durable=False)
    while os.path.exists(hold):
        threading.Event().wait(0.02)


_steps_reached = 0


def step(name: str) -> None:
    global _steps_reached
    hold = os.environ.get(STEP_HOLD)
    if not hold:
        return
    with open(hold) as f:
        wanted = int(f.read())
    if _steps_reached == wanted:
        atomic_write_text(hold + ".at", name, durable=False)
        while True:
            threading.Event().wait(1)
    _steps_reached += 1


def switch(var: str) -> str:
    """A fault switch's value ("" when unset: off)."""
    return os.environ.get(var, "")
