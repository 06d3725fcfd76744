"""A complete run directory made without a net, for tests and benchmarks of merge, verify and
export at scale (1,000 shards, millions of rows): a real manifest, run.json, and shard files
written by the real ShardWriter. Row j's features are j + arange(dim) / dim, so any reader can
check a row without keeping a reference; every `fail_every`-th entry is a recorded failure.
With labels=True, entry j has label expected_label(j) (as a labelled list would give)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from runner.store.manifest import write_manifest
from runner.store.rundir import RunDir
from runner.store.shard import shard_bounds, shard_name
from runner.results.write import ShardWriter

BLOB = "emb"


def expected_row(j, dim: int) -> np.ndarray:
    return (np.asarray(j, np.float32)[..., None] + np.arange(dim, dtype=np.float32) / dim).astype(np.float32)


def expected_label(j):
    return np.asarray(j, np.int64) % 7


def make_run(run_dir: Path, n_items: int, num_shards: int, dim: int = 16, fail_every: int = 0,
             view_max_shards: int = 128, batch: int = 50_000, labels: bool = False,
             legacy_blobs: bool = False) -> Path:
    """legacy_blobs: shards record attrs["blobs"] as a JSON string, as runs before issue 35 did."""
    run_dir = Path(run_dir)
    names = [f"d{i // 1000:05d}/img{i:09d}.jpg".encode() for i in range(n_items)]
    write_manifest(run_dir, b"/synthetic-input", names, "synthetic",
                   expected_label(np.arange(n_items)) if labels else None)
    cfg = {"input": {"dir": None, "list": None}, "output": {"dir": str(run_dir), "view_max_shards": view_max_shards},
           "model": {"name": "synthetic"}}
    ident = {"synthetic": True, "dim": dim}
    plan = {"version": 1, "identity": {"model": {"preprocess": {}}, "backend": "simulated", "input": "synthetic"},
            "fingerprint": hashlib.sha256(json.dumps([ident, num_shards]).encode()).hexdigest(),
            "num_shards": num_shards, "count": n_items, "labels": labels,
            "segments": [{"first": 0, "num_shards": num_shards, "start": 0, "count": n_items}],
            "input_stamp": None, "blobs": [BLOB], "input_hw": [1, 1], "channels": 3,
            "model": {"name": "synthetic", "prototxt": "", "weights": "", "prototxt_sha256": "",
                      "weights_sha256": ""},
            "config_yaml": OmegaConf.to_yaml(OmegaConf.create(cfg))}
    rd = RunDir(run_dir)
    rd.write_plan(plan)
    for i in range(num_shards):
        start, stop = shard_bounds(n_items, num_shards, i)
        attrs = {"blobs": json.dumps([BLOB]) if legacy_blobs else [BLOB], "model_name": "synthetic", "config": plan["config_yaml"],
                 "shard": i, "num_shards": num_shards, "start": start, "stop": stop, "host": "synthetic",
                 "pid": 0, "device": "none"}
        w = ShardWriter(rd.shard_path(i, num_shards), {BLOB: (dim,)}, "float32", attrs, plan["fingerprint"], 16,
                        labels=labels)
        try:
            for a in range(start, stop, batch):
                b = min(stop, a + batch)
                idx = np.arange(a, b)
                bad = (idx % fail_every == fail_every - 1) if fail_every else np.zeros(len(idx), bool)
                ok = idx[~bad]
                w.write_batch(b - a, ok.tolist(), [names[j] for j in ok], {BLOB: expected_row(ok, dim)},
                              [(int(j), names[j], "synthetic failure") for j in idx[bad]],
                              {int(j): int(expected_label(j)) for j in idx} if labels else None)
            w.finish({"elapsed_s": 1.0, "forward_busy_fraction": 0.5, "first_batch_s": 0.1, "load_s": 0.2})
        finally:
            w.close()
    return run_dir


def shard_file(run_dir: Path, i: int, num_shards: int) -> Path:
    return Path(run_dir) / "shards" / f"{shard_name(i, num_shards)}.h5"
