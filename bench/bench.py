"""`make bench`: speed and memory, measured side by side in one run, as ratios and medians.

  python bench/bench.py [--images 240] [--camera-images 96] [--repeats 3] [--quick]
                        [--only extract|merge|limits|forward|stragglers|fscalls|million|sweep] [--million]
                        [--gpu-feeding-only] [--out bench/results.json]

(Kept out of the installed package: it needs the repository and writes bench/results.json.
bench/README.md has the figures, the machine and its load.) This file is the driver: it parses
the arguments, runs the chosen rows and writes results.json; each row lives in its own module
(bench/rows/, and bench/fscalls.py and bench/million.py, which are scripts of their own too):

 1. classic per-image loop (caffe.io.load_image + Transformer + forward at batch 1, features
    kept in a list) vs caffe-runner, same model, cores and images (rows/extract.py);
 2. photo-sized JPEGs: the forward-only ceiling (one single-threaded process per core), decode
    and forward cost per image per core, the limit they imply when they share the cores, and
    caffe-runner's ratio to it with its defaults (and with the previous default, one worker
    with every core a BLAS thread) (rows/limits.py);
 3. the `simulated` device (sleeps per batch, as a GPU would): busy fraction (rows/extract.py);
 4. peak memory of one task at N and 10xN images (tiny net, large blob): the task's own VmHWM
    (rows/rss.py);
 5. manifest build times (1,000,000-line list, 100,000-file tree) and what one task of 1,000
    reads (rows/manifest.py);
 6. backend=opencv vs backend=caffe, end to end (rows/extract.py);
 7. decode images/s per thread, photo-sized and 12-MP camera JPEGs, and the decode threads that
    keep one GPU busy (at an assumed 2,000 img/s), checked with the simulated device at that rate
    (rows/gpu.py);
 8. with a usable GPU only: GPU forward-only and end to end (device=gpu) (rows/gpu.py);
 9. merge, verify and export (h5, and embeddings: npy + parquet) at scale: 100 vs 1,000 shards,
    and 100,000 vs 1,000,000 rows (synthetic runs written by the real ShardWriter): time and each
    step's own peak memory (rows/merge.py);
10. row 2 for 12-MP camera photos (generated once, cached under ~/.cache/caffe-runner/bench)
    (rows/limits.py);
11. decode.reduced_jpeg: fc7 cosine against full decoding, and of both against an anti-aliased
    reference (full decode + area resize) (rows/agreement.py);
12. Caffe's CPU forward (res10 to fc7, open_nsfw to pool; one process, one BLAS thread, batch 16)
    in GFLOP/s as a fraction of one core's numpy SGEMM (2048^3) measured in the same round: the
    upstream path (one GEMM per image, BN/Scale as layers), the batched convolution, and
    Caffe's default (batched + BN folded...), with OpenCV DNN and ONNX Runtime (backend=auto's
    engine on the CPU) beside them (--only forward: this row only) (rows/forward.py);
13. stragglers on the 3-node dev cluster (--only stragglers) (rows/stragglers.py);
14. file-system calls per array task at 16, 64 and 256 simulated tasks, counted with strace
    (--only fscalls): flat within 1.5x as the task count grows (fscalls.py);
15. with --million (or --only million): a simulated run through plan, run, merge, verify,
    status and export at 100,000 and 1,000,000 images, each step's time and peak memory, and
    its time against 10x the smaller (million.py; minutes);
16. a sweep of 3 blobs in one shared pass vs one blob alone and vs one run per blob (--only
    sweep) (rows/sweep.py).
Rows 1-11 run in the same rounds (rows/extract.py runs them side by side), then 4, 5 and 12.
Each measurement runs in fresh spawned processes (rows/common.py: BLAS threads set before Caffe
loads); peak memory is each process's own high-water mark (VmHWM), never ru_maxrss, which a
spawned child inherits from its parent. Every spawned child imports this file again (as
__mp_main__): what it imports at its top, every measured process loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from fscalls import fscalls_bench, print_fscalls_row
from million import million_bench, print_million_row
from rows.common import photo_set
from rows.extract import extract_bench, print_table
from rows.forward import FORWARD_COLUMNS, FORWARD_MODELS, forward_vs_sgemm, print_forward_row
from rows.gpu import print_gpu_rows
from rows.limits import print_limits
from rows.merge import merge_bench, print_merge_table
from rows.stragglers import print_straggler_row, straggler_bench
from rows.sweep import print_sweep_row, sweep_bench


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/bench.py")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "caffe-runner-bench"))
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--camera-images", type=int, default=96, help="12-MP JPEGs for rows 7, 10, 11")
    ap.add_argument("--pipeline-batches", type=int, default=24,
                    help="rows 2 and 10: batches of 16 per worker in each pipeline run (the JPEGs reused in "
                         "turn); steady state is measured between its 6th and its 6th-last")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "caffe-runner"),
                    help="where the generated camera photos are kept between runs")
    ap.add_argument("--quick", action="store_true",
                    help="for development: 48 photo-sized and 24 camera JPEGs, 1 round (ratios are rough)")
    ap.add_argument("--gpu-feeding-only", action="store_true", help="rows 7-8 only (decode vs a GPU)")
    ap.add_argument("--million", action="store_true",
                    help="also row 15: a simulated run through plan, run, merge, verify, status and export at "
                         "--million-sizes images (minutes: 1,000,000 images take about 7-10 min on 2 quiet cores)")
    ap.add_argument("--million-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--only", choices=("all", "extract", "merge", "limits", "forward", "stragglers", "fscalls",
                                       "million", "sweep"), default="all",
                    help="merge: row 9 only; limits: rows 2 and 10 only (under key limits_only); forward: row 12 "
                         "only; stragglers: row 13 only (starts a 3-node dev cluster at DEV_CLUSTER_PORT_BASE); "
                         "fscalls: row 14 only (file-system calls per task, strace); million: row 15 only; "
                         "sweep: row 16 only; each kept beside the other rows already in --out")
    a = ap.parse_args()
    if a.quick:
        a.images, a.camera_images, a.repeats = min(a.images, 48), min(a.camera_images, 24), 1
        a.pipeline_batches = min(a.pipeline_batches, 14)
    os.environ.setdefault("GLOG_minloglevel", "2")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    r = json.loads(out.read_text()) if a.only != "all" and out.exists() else {}
    if a.only in ("all", "extract", "limits"):
        r.update(extract_bench(a.images, a.repeats, work, a.threads, Path(a.cache), a.camera_images,
                               gpu_feeding_only=a.gpu_feeding_only, limits_only=a.only == "limits",
                               pipeline_batches=max(14, a.pipeline_batches)))
    if a.only == "forward":
        r["forward_vs_sgemm"] = forward_vs_sgemm(FORWARD_MODELS, FORWARD_COLUMNS, a.repeats)
    if a.only in ("all", "merge") and not a.gpu_feeding_only:
        r["merge_scale"] = merge_bench(work)
    if a.only in ("all", "stragglers") and not a.gpu_feeding_only:
        r["stragglers"] = straggler_bench(work, repeats=a.repeats)
    if a.only in ("all", "fscalls") and not a.gpu_feeding_only:
        r["fscalls_per_task"] = fscalls_bench(work)
    if (a.only == "million" or (a.only == "all" and a.million)) and not a.gpu_feeding_only:
        r["million"] = million_bench(work, tuple(a.million_sizes))
    if a.only in ("all", "sweep") and not a.gpu_feeding_only:
        r["sweep"] = sweep_bench(photo_set(work, a.images), work, a.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    if a.gpu_feeding_only:
        print_gpu_rows(r["gpu_feeding"])
    elif a.only == "limits":
        print_limits(r["limits_only"])
    elif "images_per_s_median" in r and a.only not in ("forward", "stragglers", "fscalls", "million"):
        print_table(r)
    if "merge_scale" in r and a.only not in ("stragglers", "fscalls", "million"):
        print_merge_table(r["merge_scale"])
    if "forward_vs_sgemm" in r:
        print_forward_row(r["forward_vs_sgemm"])
    if "stragglers" in r:
        print_straggler_row(r["stragglers"])
    if "fscalls_per_task" in r:
        print_fscalls_row(r["fscalls_per_task"])
    if "million" in r:
        print_million_row(r["million"])
    if "sweep" in r and a.only in ("all", "sweep"):
        print_sweep_row(r["sweep"])
    print(f"\nwritten: {a.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
