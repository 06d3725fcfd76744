"""`make bench-gpu`: the GPU report a user runs on a GPU node and sends back.

  python bench/bench_gpu.py [--models res10_ssd open_nsfw] [--batch-size 32] [--iters 20]
                            [--out bench/results-gpu.json]

Per model, each configuration in a fresh process (NVIDIA_TF32_OVERRIDE and the layer engines
are per process), medians of --repeats:
- forward-only images/s with cuDNN (the prototxt as is) and without (every layer that has an
  `engine` switched to engine: CAFFE: Caffe's im2col + cuBLAS convolutions), full FP32;
- forward-only images/s with model.tf32=true (cuDNN), and how far TF32 moves the features
  (the self-check's metric against the CPU);
- GPU memory the net takes (cudaMemGetInfo before loading and after the first forward);
- the self-check: its measured difference and the seconds its CPU pass costs;
- end-to-end images/s: a real `caffe-runner` run (device=gpu, one shard) on the sample
  photos repeated to --images files.
Without a usable GPU it stops with the reason (exit 2) and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLOG_minloglevel", "2")

# layer types that have a cuDNN engine, and the parameter holding their `engine`
ENGINE_FIELDS = {"Convolution": "convolution_param", "Pooling": "pooling_param", "ReLU": "relu_param",
                 "Sigmoid": "sigmoid_param", "TanH": "tanh_param", "Softmax": "softmax_param", "LRN": "lrn_param"}


def without_cudnn(prototxt_text: str) -> str:
    """The same net with every layer that has an engine set to CAFFE (no cuDNN layer at all)."""
    from google.protobuf import text_format

    from runner.engine.model import caffe_pb2

    pb = caffe_pb2()
    p = pb.NetParameter()
    text_format.Merge(prototxt_text, p)
    for lp in p.layer:
        if lp.type in ENGINE_FIELDS:
            getattr(lp, ENGINE_FIELDS[lp.type]).engine = 1  # CAFFE in every *Parameter.Engine enum
    return text_format.MessageToString(p)


def _mem_used_mb() -> float:
    import ctypes

    from runner.engine.gpu import _cudart_soname, caffe_so_path

    rt = ctypes.CDLL(_cudart_soname(caffe_so_path()))
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    return (total.value - free.value) / 2**20


def one(model: str, cudnn: bool, tf32: bool, batch: int, iters: int) -> Dict:
    """In a fresh process: load the net on GPU 0, time forward-only, measure memory and the
    self-check."""
    from runner.run.config import compose
    from runner.engine.gpu import apply_gpu_numerics, caffe_has_cudnn, cuda_probe, cudnn_conv_layers, describe_cudnn
    from runner.engine.model import CaffeEngine, input_hw, parse_prototxt
    from runner.engine.selfcheck import compare

    cfg = compose([f"model={model}", f"model.tf32={str(tf32).lower()}"], require_output=False)
    apply_gpu_numerics(cfg.model)
    m = cfg.model
    blobs = list(m.default_blobs)
    tmp = None
    if not cudnn:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False)
        tmp.write(without_cudnn(Path(m.prototxt).read_text()))
        tmp.close()
        m.prototxt = tmp.name
    spec = parse_prototxt(m.prototxt)
    h, w = input_hw(m, spec)
    import caffe

    caffe.set_mode_gpu()
    caffe.set_device(0)
    mem0 = _mem_used_mb()
    eng = CaffeEngine(m, spec, blobs, (3, h, w), device="gpu")
    rng = np.random.default_rng(0)
    x = (rng.random((batch, 3, h, w), dtype=np.float32) * 255 - 120).astype(np.float32)
    gpu = eng.forward(x)
    mem1 = _mem_used_mb()
    for _ in range(3):
        eng.forward(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        eng.forward(x)  # host copies of the blobs: the GPU work is done
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cpu = eng.forward_cpu(x[:4])
    cpu_s = time.perf_counter() - t0
    diff = compare({b: v[:4] for b, v in gpu.items()}, cpu)
    n_cudnn, n_conv = cudnn_conv_layers(spec.param.layer)
    if tmp:
        os.unlink(tmp.name)
    return {"model": model, "cudnn": cudnn, "tf32": tf32, "batch": batch,
            "forward_images_per_s": batch / statistics.median(times),
            "gpu_memory_mb": round(mem1 - mem0, 1),
            "selfcheck_max_rel_diff": max(diff.values()), "selfcheck_cpu_s_4_images": round(cpu_s, 4),
            "what_runs": describe_cudnn("gpu", caffe_has_cudnn(), cuda_probe().cudnn_version, n_cudnn, n_conv),
            "gpu": eng.gpu_label}


def in_child(**kw) -> Dict:
    p = subprocess.run([sys.executable, __file__, "--one", json.dumps(kw)], capture_output=True, text=True,
                       cwd=REPO, timeout=3600)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1], **kw}
    return json.loads(p.stdout.strip().splitlines()[-1])


def end_to_end(model: str, batch: int, n_images: int, work: Path) -> Dict:
    from runner.ui.samples import write_samples

    src = work / "samples"
    write_samples(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    photos = work / f"photos-{n_images}"
    photos.mkdir(exist_ok=True)
    for i in range(n_images):
        f = files[i % len(files)]
        dst = photos / f"{i:06d}{f.suffix}"
        if not dst.exists():
            os.symlink(f, dst)
    out = work / f"run-{model}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "runner", f"model={model}", f"input.dir={photos}", f"output.dir={out}",
                        "device=gpu", "num_shards=1", f"batch_size={batch}", "decode.reduced_jpeg=true",
                        "launcher.progress=false"], capture_output=True, text=True, cwd=REPO, timeout=3600)
    wall = time.time() - t0
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    st = json.loads((out / "stats.json").read_text())
    shard = st["shards"][0]
    return {"images": n_images, "end_to_end_images_per_s": shard["images_per_s"], "wall_s_with_load": round(wall, 2),
            "selfcheck_max_rel_diff": shard.get("selfcheck_max_rel_diff"), "selfcheck_cpu_s": shard.get("selfcheck_cpu_s"),
            "cudnn": shard.get("cudnn")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["res10_ssd", "open_nsfw"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", default="bench/results-gpu.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(**json.loads(a.one))))
        return
    from runner.engine.gpu import caffe_has_gpu, cuda_probe, explain_probe

    why = ("this venv has the CPU build of pycaffe (make bench-gpu installs the CUDA one)" if not caffe_has_gpu()
           else explain_probe(cuda_probe(), platform.node(), os.environ.get("CUDA_VISIBLE_DEVICES")))
    if why:
        print(f"bench-gpu: skipped: {why}", file=sys.stderr)
        sys.exit(2)
    results: Dict = {"host": platform.node(), "probe": cuda_probe().__dict__, "batch_size": a.batch_size, "models": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    for model in a.models:
        rows: Dict[str, List[Dict]] = {"cudnn": [], "caffe_engine": [], "cudnn_tf32": []}
        for _ in range(a.repeats):
            rows["cudnn"].append(in_child(model=model, cudnn=True, tf32=False, batch=a.batch_size, iters=a.iters))
            rows["caffe_engine"].append(in_child(model=model, cudnn=False, tf32=False, batch=a.batch_size,
                                                 iters=a.iters))
            rows["cudnn_tf32"].append(in_child(model=model, cudnn=True, tf32=True, batch=a.batch_size, iters=a.iters))
        summary = {}
        for k, rs in rows.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                summary[k] = {"error": rs[0]["error"]}
                continue
            summary[k] = dict(ok[0], forward_images_per_s=statistics.median(r["forward_images_per_s"] for r in ok),
                              runs=[round(r["forward_images_per_s"], 1) for r in ok])
        if "error" not in summary["cudnn"] and "error" not in summary["caffe_engine"]:
            summary["cudnn_speedup"] = round(summary["cudnn"]["forward_images_per_s"]
                                             / summary["caffe_engine"]["forward_images_per_s"], 2)
        summary["end_to_end"] = end_to_end(model, a.batch_size, a.images, work)
        results["models"][model] = summary
        print(model, json.dumps(summary, indent=1), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"written {a.out}: send it back with the GPU model and driver (nvidia-smi)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
