"""Row 5: manifest build times (a 1,000,000-line list, a 100,000-file tree) and the bytes one
task of 1,000 reads of it. Run by extract.py's full run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict

import numpy as np


def manifest_bench(work: Path) -> Dict:
    """Row 5: the manifest of a 1M-line list and of a 100k-file tree, timed; what one task of 1,000 reads."""
    from omegaconf import OmegaConf

    from runner.inputs import build_manifest
    from runner.store.manifest import load_manifest
    from runner.schema import InputConf
    from runner.store.shard import shard_bounds

    out = {}
    from runner.inputs.files import LIST_SAMPLE

    # an ImageNet-style list relative to input.root; the first paths exist, as the plan's check
    # of the root looks them up (the rest need not: listing does not open them)
    lst, root = work / "million-v2.txt", work / "imagenet"
    if not lst.exists():
        with open(lst, "w") as f:
            for i in range(1_000_000):
                f.write(f"train/n{i % 1000:08d}/img_{i:07d}.JPEG\n")
    for i in range(LIST_SAMPLE):
        p = root / f"train/n{i % 1000:08d}/img_{i:07d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    t0 = time.perf_counter()
    m = build_manifest(work / "manifest-list", OmegaConf.structured(InputConf(list=str(lst), root=str(root))))
    out["list_1M_s"] = time.perf_counter() - t0
    tree = work / "tree100k"
    if not (work / "tree100k.done").exists():
        for d in range(100):
            sub = tree / f"d{d:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(1000):
                (sub / f"{i:05d}.jpg").touch()
        (work / "tree100k.done").write_text("ok")
    t0 = time.perf_counter()
    build_manifest(work / "manifest-tree", OmegaConf.structured(InputConf(dir=str(tree))))
    out["tree_100k_s"] = time.perf_counter() - t0
    # what one task of 1,000 reads: its slice of offsets.npy (memory-mapped) and of paths.bin
    m = load_manifest(work / "manifest-list")
    start, stop = shard_bounds(m.count, 1000, 500)
    offsets = np.load(m.dir / "offsets.npy", mmap_mode="r")
    task_bytes = (stop - start + 1) * 8 + int(offsets[stop] - offsets[start])
    total = (m.dir / "offsets.npy").stat().st_size + (m.dir / "paths.bin").stat().st_size
    names = m.read_slice(start, stop)
    assert len(names) == stop - start
    out.update(task_of_1000_bytes=task_bytes, manifest_bytes=total, task_fraction=task_bytes / total)
    return out
