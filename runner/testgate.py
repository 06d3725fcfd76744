"""Gates a test holds a task at (a no-op unless CAFFE_RUNNER_TEST_GATES names a folder).

A test that must act while a task is at a given moment (kill it while it loads the net, mid-shard,
while it finishes its file) creates `<folder>/<name>.hold` before the run. The task, reaching
gate `name`, writes its pid to `<name>.reached` (and to `<name>.reached.<host>`, so a test can
tell that tasks on two nodes are both there) and waits until the test removes the `.hold`
file: the moment lasts as long as the test needs, however fast or slow the machine is.
"""
from __future__ import annotations

import os
import socket
import threading

from .atomic import atomic_write_text

ENV = "CAFFE_RUNNER_TEST_GATES"


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
