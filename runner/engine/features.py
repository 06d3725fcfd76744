"""Feature post-processing between the net and the writer: pooling conv blobs over H, W
(avg, max, GeM) and L2 normalisation. Pure numpy; the HDF5 writer only stores what it gets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


def postprocess(x: np.ndarray, pooling: str = "none", gem_p: float = 3.0, l2: bool = False) -> np.ndarray:
    """Pool N x C x H x W over H, W; L2-normalise rows. Vectors pass through pooling unchanged."""
    if pooling != "none" and x.ndim == 4:
        if pooling == "avg":
            x = x.mean(axis=(2, 3))
        elif pooling == "max":
            x = x.max(axis=(2, 3))
        elif pooling == "gem":
            x = np.power(np.clip(x, 1e-6, None), gem_p).mean(axis=(2, 3)) ** (1.0 / gem_p)
        else:
            raise ValueError(f"output.pooling must be none, avg, max or gem, got {pooling!r}")
    if l2:
        flat = x.reshape(len(x), -1)
        norms = np.linalg.norm(flat, axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
        x = x / np.maximum(norms, 1e-12)
    return x


def pooled_shape(shape: Tuple[int, ...], pooling: str) -> Tuple[int, ...]:
    return shape[:1] if pooling != "none" and len(shape) == 3 else tuple(shape)


@dataclass(frozen=True)
class FeaturePost:
    """The run's post-processing, applied to each blob of a batch."""
    pooling: str = "none"
    gem_p: float = 3.0
    l2: bool = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return postprocess(x, self.pooling, self.gem_p, self.l2)
