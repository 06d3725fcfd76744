"""What every engine is (a leaf): a loaded net that maps a preprocessed batch to its blobs.
model.py holds the real engines (Caffe, ONNX Runtime, OpenCV DNN) and picks one; simulated.py
the benchmarks' stand-in."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np


class Engine:
    """A loaded net: forward(x NCHW float32) -> {blob: array N x ...}."""
    blobs: List[str]
    blob_shapes: Dict[str, Tuple[int, ...]]
    device_desc: str
    # computes on a GPU: a task checks its first batch against forward_cpu (runner/engine/selfcheck.py)
    on_gpu: bool = False
    # the GPU, for messages ("NVIDIA H100 ... (device 0, CUDA_VISIBLE_DEVICES=3)")
    gpu_label: str = ""

    def forward(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def forward_cpu(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """The same net and weights on the CPU (the GPU self-check's reference)."""
        raise NotImplementedError

    def attrs(self) -> Dict[str, object]:
        """What computed the rows, for the shard file (engine=...)."""
        return {}

    def start_shard(self) -> None:
        """A shard begins (OnnxEngine checks its first batch again)."""
