"""pycaffe's Net.forward releases the GIL (docker/pycaffe-nogil.patch): the decode threads of a
task keep running while its net computes. Seen, not timed: with a switch interval too long to
ever preempt, another Python thread can run only if the forward lets go of the GIL, so the test
asks whether that thread ran while a forward was in progress."""
from __future__ import annotations

import sys
import threading

import numpy as np


def test_forward_lets_other_threads_run(res10):
    import caffe

    from runner.engine.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    net = caffe.Net(str(res10[0]), caffe.TEST, weights=str(res10[1]))
    net.blobs["data"].reshape(2, 3, 300, 300)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(0).uniform(-100, 100, net.blobs["data"].data.shape)
    end = list(net._layer_names).index("last_relu")  # the layer that ends in fc7
    net._forward(0, end)  # first allocations

    in_forward, seen, go = [False], [], threading.Event()

    def other():
        go.wait()  # blocks without the GIL; once set it needs the GIL to go on
        seen.append(in_forward[0])

    t = threading.Thread(target=other, daemon=True)
    t.start()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # this thread is never preempted: only a GIL release lets `other` in
    try:
        go.set()
        for _ in range(50):  # as many forwards as the other thread needs to wake (a loaded machine)
            in_forward[0] = True
            net._forward(0, end)  # only C++ between the two writes
            in_forward[0] = False
            if seen:
                break
    finally:
        sys.setswitchinterval(old)
        t.join()
    # without the patch the other thread runs only after the loop (the forwards never let go of
    # the GIL, and this thread never blocks): it sees False
    assert seen == [True], seen
