"""`caffe-runner compare SWEEP`: linear CKA (Kornblith et al., 2019, "Similarity of Neural
Network Representations Revisited") between every pair of a sweep's representations (each
point's blobs), on the images every point has as a feature row.

Streaming over rows: for each representation the row count, the column sums and X^T X, for each
pair X^T Y, accumulated in float64 over chunks of rows; centring is applied to these moments at
the end (Xc^T Yc = X^T Y - sx sy^T / n). Memory grows with the feature dimensions (d_i * d_j per
pair), never with the number of images; a pair too wide for `max_gb` is refused, naming the fix
(pooled features: output.pooling=avg).

linear CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), 1 for identical features,
invariant to orthogonal transforms and isotropic scaling of either side.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..store.atomic import atomic_write_text
from ..errors import ConfigError, shell_quote
from ..run.sweep import read_sweep, sweep_points
from ..store.h5 import open_h5

COMPARE_JSON = "compare.json"
COMPARE_SVG = "compare.svg"
CHUNK_ROWS = 4096


def cka_from_moments(n: int, sx: np.ndarray, sy: np.ndarray, xtx: np.ndarray, yty: np.ndarray,
                     xty: np.ndarray) -> float:
    """Linear CKA from uncentred moments of n rows (pure)."""
    cxy = xty - np.outer(sx, sy) / n
    cxx = xtx - np.outer(sx, sx) / n
    cyy = yty - np.outer(sy, sy) / n
    den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
    return float(np.sum(cxy * cxy) / den) if den > 0 else float("nan")


class Moments:
    """Running moments of several representations and of every pair of them."""

    def __init__(self, dims: Sequence[int]):
        self.n = 0
        self.sums = [np.zeros(d) for d in dims]
        self.grams: Dict[Tuple[int, int], np.ndarray] = {
            (i, j): np.zeros((dims[i], dims[j])) for i in range(len(dims)) for j in range(i, len(dims))}

    def add(self, blocks: Sequence[np.ndarray]) -> None:
        """One chunk: the same rows (images) of every representation, each [rows, d_i]."""
        xs = [np.asarray(b, dtype=np.float64).reshape(len(b), -1) for b in blocks]
        self.n += len(xs[0])
        for i, x in enumerate(xs):
            self.sums[i] += x.sum(axis=0)
        for (i, j), g in self.grams.items():
            g += xs[i].T @ xs[j]

    def matrix(self) -> np.ndarray:
        k = len(self.sums)
        m = np.eye(k)
        for i in range(k):
            for j in range(i + 1, k):
                m[i, j] = m[j, i] = cka_from_moments(self.n, self.sums[i], self.sums[j], self.grams[i, i],
                                                     self.grams[j, j], self.grams[i, j])
        return m


@dataclass
class Representation:
    label: str  # point name, and the blob when the point has several
    point: str
    run_dir: Path
    dataset: str  # features/<blob> in the point's features.h5
    dim: int


def _points(root: Path) -> List[Tuple[str, Path]]:
    if read_sweep(root) is None:
        raise ConfigError(f"{root} is not a sweep folder (no sweep.json): compare takes the folder a "
                          f"`caffe-runner -m ...` sweep wrote")
    return sweep_points(root)


def representations(root: Path) -> List[Representation]:
    """Every blob of every finished point, with a check that the points saw the same input."""

    reps: List[Representation] = []
    stamp = None
    for name, d in _points(root):
        merged = d / "features.h5"
        if not merged.exists():
            raise ConfigError(f"sweep point {name} has no features.h5 yet: finish it first "
                              f"(caffe-runner status {shell_quote(root)}), then compare")
        plan = json.loads((d / "run.json").read_text())
        mine = (plan.get("identity", {}).get("input"), plan.get("input_stamp", {}).get("names"), plan.get("count"))
        if stamp is None:
            stamp, first = mine, name
        elif mine != stamp:
            raise ConfigError(f"sweep points {first} and {name} were run on different inputs: compare needs "
                              f"the same images in every point")
        blobs = [str(b) for b in plan.get("blobs") or []]
        with open_h5(merged, "r") as f:
            for b in blobs:  # in the run's own order; '/' in a blob name is '__' in the file
                shape = f["features"][b.replace("/", "__")].shape
                reps.append(Representation(name if len(blobs) == 1 else f"{name}:{b}", name, d,
                                           f"features/{b.replace('/', '__')}", int(np.prod(shape[1:]))))
    if len(reps) < 2:
        raise ConfigError(f"{root}: compare needs at least two representations (points or blobs); found {len(reps)}")
    return reps


def _chunks(files: Dict[str, "object"], count: int, chunk: int) -> Iterator[Dict[str, np.ndarray]]:
    """For each window of `chunk` manifest positions, each point's row positions (in its file)
    of the images every point has as a feature row. Rows are in manifest order (`index`
    ascending), so one cursor per point walks its file once."""
    cursor = {k: 0 for k in files}
    for start in range(0, count, chunk):
        stop = start + chunk
        idx = {}
        for k, f in files.items():
            ix = f["index"][cursor[k]:cursor[k] + chunk]
            ix = ix[ix < stop]
            idx[k] = (cursor[k], ix)
            cursor[k] += len(ix)
        shared = None
        for _, ix in idx.values():
            shared = ix if shared is None else np.intersect1d(shared, ix, assume_unique=True)
        if len(shared):
            yield {k: c + np.searchsorted(ix, shared) for k, (c, ix) in idx.items()}


def compare(root: Path, max_gb: float = 4.0, chunk: int = CHUNK_ROWS) -> Dict:
    """The CKA matrix of a sweep's representations; writes compare.json and compare.svg."""

    root = Path(root)
    reps = representations(root)
    need = sum(a.dim * b.dim for i, a in enumerate(reps) for b in reps[i:]) * 8 / 2**30
    if need > max_gb:
        wide = max(reps, key=lambda r: r.dim)
        raise ConfigError(f"compare would hold {need:.1f} GB of cross-moments ({wide.label} has {wide.dim} "
                          f"dimensions per image; limit --max-gb {max_gb:g}): compare pooled features "
                          f"(output.pooling=avg) or raise --max-gb")
    moments = Moments([r.dim for r in reps])
    points = sorted({r.point: r.run_dir for r in reps}.items())
    with ExitStack() as stack:
        files = {name: stack.enter_context(open_h5(d / "features.h5", "r")) for name, d in points}
        count = int(json.loads((points[0][1] / "run.json").read_text())["count"])
        for rows in _chunks(files, count, chunk):
            blocks = []
            for r in reps:
                pos = rows[r.point]
                lo, hi = int(pos[0]), int(pos[-1]) + 1  # one contiguous read, then the shared rows
                blocks.append(files[r.point][r.dataset][lo:hi][pos - lo])
            moments.add(blocks)
    m = moments.matrix()
    result = {"method": "linear CKA (Kornblith et al., 2019)", "images": moments.n,
              "labels": [r.label for r in reps], "dims": [r.dim for r in reps],
              "matrix": [[round(float(v), 6) for v in row] for row in m]}
    atomic_write_text(root / COMPARE_JSON, json.dumps(result, indent=1))
    atomic_write_text(root / COMPARE_SVG, heatmap_svg(result["labels"], m))
    return result


def format_table(result: Dict) -> str:
    labels = result["labels"]
    w = max(len(x) for x in labels)
    lines = [f"linear CKA on {result['images']} shared images ({COMPARE_JSON}, {COMPARE_SVG})",
             " " * (w + 2) + " ".join(f"{k:>6}" for k in range(len(labels)))]
    for k, (lab, row) in enumerate(zip(labels, result["matrix"])):
        lines.append(f"{lab:<{w}}  " + " ".join(f"{v:6.3f}" for v in row) + f"   [{k}]")
    return "\n".join(lines)


def heatmap_svg(labels: List[str], m: np.ndarray, cell: int = 36) -> str:
    """The matrix as a self-contained SVG heatmap (pure): white 0 .. dark blue 1, values written in."""
    from html import escape

    k = len(labels)
    pad = 8 + 7 * max(len(x) for x in labels)
    size = pad + k * cell + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
           f'font-size="11"><title>linear CKA</title>']
    for i, lab in enumerate(labels):
        y = pad + i * cell + cell / 2 + 4
        out.append(f'<text x="{pad - 4}" y="{y:.0f}" text-anchor="end">{escape(lab)}</text>')
        out.append(f'<text transform="translate({pad + i * cell + cell / 2 + 4:.0f},{pad - 4}) rotate(-90)">'
                   f'{escape(lab)}</text>')
        for j in range(k):
            v = float(m[i, j])
            t = 0.0 if np.isnan(v) else min(max(v, 0.0), 1.0)
            r, g, b = (int(255 - t * (255 - c)) for c in (8, 48, 107))
            fg = "#fff" if t > 0.55 else "#000"
            x, y0 = pad + j * cell, pad + i * cell
            out.append(f'<rect x="{x}" y="{y0}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})"/>'
                       f'<text x="{x + cell / 2:.0f}" y="{y0 + cell / 2 + 4:.0f}" text-anchor="middle" '
                       f'fill="{fg}">{"nan" if np.isnan(v) else f"{v:.2f}"}</text>')
    out.append("</svg>")
    return "\n".join(out)
