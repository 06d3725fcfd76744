"""`caffe-runner export RUN OUT --format embeddings`: the features in the layout similarity-search
tools read (clip-retrieval's and embedding-reader's "npy + parquet"; autofaiss builds an index on
it as it is):

  OUT/img_emb/img_emb_NNNN.npy          float32 [rows of the part, dim]  one blob, rows flattened
  OUT/metadata/metadata_NNNN.parquet    image_path, label, row, index    the same rows, same order

`row` is the row's position in the whole export (0-based, across parts): the id a faiss index
built from OUT/img_emb gives it, and its row in features.h5. `index` is its position in the
run's manifest, `label` the input's label (-1: none). Failed images have no embedding and are
not in the export. Part numbers are zero-padded so name order is row order. Parts hold at most
`part_rows` rows (default: PART_BYTES of embeddings).

Streamed: one shard file open at a time, rows copied in bounded chunks into an open .npy (its
header written first) and a parquet row group per chunk; memory does not grow with the rows.
Written into OUT.partial-PID and renamed to OUT when complete: a killed export leaves no OUT.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..store.atomic import commit
from ..errors import ConfigError, did_you_mean
from .write import dataset_name
from ..store.h5 import open_h5

PART_BYTES = 512 << 20
CHUNK_BYTES = 32 << 20


def part_name(prefix: str, k: int, width: int, ext: str) -> str:
    return f"{prefix}_{k:0{width}d}.{ext}"


def plan_parts(total_rows: int, part_rows: int) -> list:
    """[(start, stop)] of each part (pure); at least one part, even for no rows."""
    part_rows = max(1, int(part_rows))
    return [(a, min(total_rows, a + part_rows)) for a in range(0, total_rows, part_rows)] or [(0, 0)]


def pick_blob(blobs: Sequence[str], blob: Optional[str]) -> str:
    if blob is None:
        if len(blobs) == 1:
            return blobs[0]
        raise ConfigError(f"the run has {len(blobs)} blobs ({', '.join(blobs)}): pick one with --blob NAME "
                          "(an embedding export holds one)")
    if blob in blobs:
        return blob
    raise ConfigError(f"--blob {blob}: the run has no such blob{did_you_mean(blob, blobs)}; its blobs: "
                      f"{', '.join(blobs)}")


def check_target(out: Path) -> None:
    """OUT must be new (or an empty folder) and its parent writable: checked before any work."""
    if out.is_symlink():
        raise ConfigError(f"export target {out} is a symlink (to {os.readlink(out)}): export writes a folder of its "
                          "own and never through a link someone planted; give a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export target {out} already exists and is not an empty folder: give a new folder")
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(f"export target {out}: its folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"export target {out}: cannot write in {parent} (permission denied): choose another "
                          "folder or fix its permissions")


def export_embeddings(paths: Sequence[Path], out: Path, blob: Optional[str], blobs: Sequence[str],
                      part_rows: Optional[int] = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    blob = pick_blob(list(blobs), blob)
    ds = f"features/{dataset_name(blob)}"
    total, dim = 0, None
    has_labels = True
    for p in paths:
        with open_h5(p, "r") as f:
            total += len(f["index"])
            dim = int(np.prod(f[ds].shape[1:])) if dim is None else dim
            has_labels = has_labels and "labels" in f
    dim = dim or 0
    row_bytes = max(1, dim * 4)
    part_rows = int(part_rows) if part_rows else max(1, PART_BYTES // row_bytes)
    parts = plan_parts(total, part_rows)
    width = max(4, len(str(len(parts) - 1)))
    chunk = max(1, min(65536, CHUNK_BYTES // row_bytes))
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img_emb").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    schema = pa.schema([("image_path", pa.string()), ("label", pa.int64()), ("row", pa.int64()),
                        ("index", pa.int64())])
    try:
        k, pos = 0, 0          # current part, rows written so far
        npy = meta = None

        def open_part(k):
            a, b = parts[k]
            f = open(tmp / "img_emb" / part_name("img_emb", k, width, "npy"), "wb")
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (b - a, dim)})
            w = pq.ParquetWriter(str(tmp / "metadata" / part_name("metadata", k, width, "parquet")), schema)
            return f, w

        def close_part():
            npy.close()
            meta.close()

        npy, meta = open_part(0)
        for p in paths:
            with open_h5(p, "r") as f:
                n = len(f["index"])
                a = 0
                while a < n:
                    if pos >= parts[k][1]:
                        close_part()
                        k += 1
                        npy, meta = open_part(k)
                    b = min(n, a + chunk, a + parts[k][1] - pos)
                    x = np.asarray(f[ds][a:b], dtype="<f4").reshape(b - a, dim)
                    npy.write(np.ascontiguousarray(x).tobytes())
                    labels = f["labels"][a:b] if has_labels else np.full(b - a, -1, np.int64)
                    meta.write_table(pa.table({
                        "image_path": pa.array(list(f["names"].asstr()[a:b]), pa.string()),
                        "label": pa.array(np.asarray(labels, np.int64)),
                        "row": pa.array(np.arange(pos, pos + b - a, dtype=np.int64)),
                        "index": pa.array(np.asarray(f["index"][a:b], np.int64))}, schema=schema))
                    pos += b - a
                    a = b
        close_part()
        while k + 1 < len(parts):  # only when there were no rows at all
            k += 1
            npy, meta = open_part(k)
            close_part()
        (tmp / "export.json").write_text(json.dumps({"format": "embeddings", "blob": blob, "dim": dim,
                                                     "rows": total, "parts": len(parts), "part_rows": part_rows,
                                                     "dtype": "float32"}, indent=1))
        if out.exists():
            out.rmdir()  # empty (checked before)
        commit(tmp, out)  # every file fsync'd, then renamed, then the folder fsync'd
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
