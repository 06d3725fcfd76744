"""Row 4: peak memory of one task at N and 10N images (a tiny net with a large blob): the task's
own high-water mark (VmHWM), flat when every buffer is bounded. Run by extract.py's full run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from .common import in_child, prepare, shard_run


TINY_BIG_BLOB = """
name: "tiny_big_blob"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 112 dim: 112 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 stride: 2 weight_filler { type: "gaussian" std: 0.05 } } }
"""


def rss_ratio(work: Path, threads: int, n: int = 200) -> Dict:
    """Peak RSS of one task at N and 10N images, tiny net with a 64x56x56 blob (800 KB a row):
    N is 12 batches, enough for every bounded buffer to be full at both sizes."""
    import cv2

    from runner.ui.samples import write_corpus

    small = work / "small"
    if not (work / "small.done").exists():
        write_corpus(small, 10 * n, seed=2, min_wh=(120, 120), max_wh=(160, 150))
        (work / "small.done").write_text("ok")
    proto = work / "tiny_big_blob.prototxt"
    proto.write_text(TINY_BIG_BLOB)
    weights = work / "tiny_big_blob.caffemodel"
    if not weights.exists():
        in_child(_save_tiny, threads, proto=str(proto), weights=str(weights))
    listing = sorted(str(p) for p in small.rglob("*.jpg"))
    out = {}
    for label, count in (("N", n), ("10N", 10 * n)):
        lst = work / f"list-{label}.txt"
        lst.write_text("\n".join(listing[:count]) + "\n")
        cfg_yaml = prepare(work / f"rss-{label}", [f"input.list={lst}", "model=res10_ssd", f"model.prototxt={proto}",
                                                   f"model.weights={weights}", "model.name=tiny_big_blob",
                                                   "model.input_size=[112,112]", "model.default_blobs=[conv1]",
                                                   "batch_size=16", f"decode.workers={threads}"])
        r = in_child(shard_run, threads, cfg_yaml=cfg_yaml)
        out[label] = {"images": count, "peak_rss_mb": r["peak_rss_mb"]}
        for p in (work / f"rss-{label}" / "shards").glob("*.h5"):
            p.unlink()  # 3 GB of features: do not keep
    out["ratio"] = out["10N"]["peak_rss_mb"] / out["N"]["peak_rss_mb"]
    del cv2
    return out


def _save_tiny(proto: str, weights: str) -> Dict:
    import caffe

    from runner.engine.model import set_caffe_cpu_mode

    set_caffe_cpu_mode(caffe)
    caffe.Net(proto, caffe.TEST).save(weights)
    return {}
