"""Gates a test holds a task at (a no-op unless CAFFE_RUNNER_TEST_GATES names a folder).

A test that must act while a task is at a given moment (kill it while it loads the net, mid-shard,
while it finishes its file) creates `<folder>/<name>.hold` before the run. The task, reaching
gate `name`, writes its pid to `<name>.reached` and waits until the test removes the `.hold`
file: the moment lasts as long as the test needs, however fast or slow the machine is.
"""
from __future__ import annotations

import os
import threading

ENV = "CAFFE_RUNNER_TEST_GATES"


def gate(name: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    hold = os.path.join(folder, name + ".hold")
    if not os.path.exists(hold):
        return
    reached = os.path.join(folder, name + ".reached")
    with open(reached + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(reached + ".tmp", reached)
    while os.path.exists(hold):
        threading.Event().wait(0.02)
