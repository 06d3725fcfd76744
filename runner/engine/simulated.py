"""The simulated engine (backend=simulated): a benchmark and test tool, not a net. Each batch
takes `simulated_batch_s` of wall time and no CPU, so benchmarks can tell whether decoding keeps
a fast device fed; unequal nodes come from the node's environment (CAFFE_RUNNER_SIM_SLOW_HOSTS,
CAFFE_RUNNER_SIM_HANG_HOSTS), and a gate file (simulated_gate) holds a task at a batch for as
long as a test needs."""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np

from .base import Engine


def gate_allows(text: Optional[str], batch: int) -> bool:
    """Whether a simulated gate file holding `text` (None: no file yet) lets batch `batch`
    (counted from 0) start: "open", or a number greater than it."""
    if text is None:
        return False
    t = text.strip()
    if t == "open":
        return True
    return t.isdigit() and int(t) > batch


def _read_gate(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


class SimulatedEngine(Engine):
    """Stands in for an accelerator: each batch takes `batch_s` of wall time and no CPU
    (sleep), so benchmarks can tell whether decoding keeps a fast device fed. With a gate file,
    each batch first waits until the gate lets it start (gate_allows): a test holds the task
    there for as long as it needs, on a fast or a loaded machine alike."""

    def __init__(self, blobs: Sequence[str], in_shape, batch_s: float, device: str = "cpu",
                 gpu_device: int = 0, gate: Optional[str] = None):
        self.blobs = list(blobs)
        self.batch_s = float(batch_s)
        self.gate = gate
        self.batches = 0
        self.blob_shapes = {b: (int(in_shape[0]),) for b in self.blobs}
        self.device_desc = f"simulated-{device}" + (f":{gpu_device}" if device == "gpu" else "")

    def attrs(self) -> Dict[str, object]:
        return {"engine": "simulated"}

    def forward(self, x):
        if self.gate:
            while not gate_allows(_read_gate(self.gate), self.batches):
                time.sleep(0.02)  # polls a file the test writes: the test decides, not the clock
        self.batches += 1
        t0 = time.perf_counter()
        out = x.mean(axis=(2, 3), dtype=np.float32)
        left = self.batch_s - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return {b: out.copy() for b in self.blobs}


def host_value(spec: str, host: str) -> Optional[str]:
    """'node2:3,node3:1.5' -> '3' for host node2 (pure): the simulated engine's per-host slow
    factor (CAFFE_RUNNER_SIM_SLOW_HOSTS) or gate file (CAFFE_RUNNER_SIM_HANG_HOSTS: gate_allows)."""
    for item in spec.split(","):
        name, sep, value = item.strip().partition(":")
        if sep and name == host:
            return value
    return None
