"""Check the plan before any work starts, and describe the run for the tasks.

prepare_run (launcher side): validate config and inputs, list the input once, fingerprint
what determines the output, and write run.json. A run directory holding a run with another
fingerprint is refused (output.overwrite=true replaces it); the same fingerprint resumes.
load_run (task side): read that plan back and build the pipeline pieces.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from . import __version__, log
from .errors import ConfigError
from .manifest import build_manifest, load_manifest
from .rundir import RunDir

_POOLING = ("none", "avg", "max", "gem")
_DTYPES = ("float32", "float16")
_BACKENDS = ("caffe", "opencv", "simulated")


def _blobs(cfg) -> List[str]:
    blobs = list(cfg.output.blobs) if cfg.output.blobs else list(cfg.model.default_blobs)
    if not blobs:
        raise ConfigError(f"no blobs to extract: set output.blobs=[name,...] (model {cfg.model.name} "
                          "has no default_blobs)")
    if len(set(blobs)) != len(blobs):
        raise ConfigError(f"output.blobs names a blob twice: {blobs}")
    return blobs


def validate(cfg) -> None:
    if not isinstance(cfg.batch_size, int) or not 1 <= cfg.batch_size <= 4096:
        raise ConfigError(f"batch_size={cfg.batch_size} is out of range: use 1..4096 (16-64 is typical)")
    if cfg.num_shards is not None and (not isinstance(cfg.num_shards, int) or cfg.num_shards < 1):
        raise ConfigError(f"num_shards={cfg.num_shards} is out of range: use an integer >= 1 "
                          "(one per GPU is typical)")
    if cfg.output.pooling not in _POOLING:
        raise ConfigError(f"output.pooling={cfg.output.pooling!r}: use one of {', '.join(_POOLING)}")
    if cfg.output.dtype not in _DTYPES:
        raise ConfigError(f"output.dtype={cfg.output.dtype!r}: use one of {', '.join(_DTYPES)}")
    if cfg.backend not in _BACKENDS:
        raise ConfigError(f"backend={cfg.backend!r}: use one of {', '.join(_BACKENDS)}")
    if cfg.device not in ("cpu", "gpu"):
        raise ConfigError(f"device={cfg.device!r}: use cpu or gpu")
    if cfg.decode.workers < 0 or cfg.decode.prefetch_batches < 1:
        raise ConfigError("decode.workers must be >= 0 and decode.prefetch_batches >= 1")
    pp = cfg.model.preprocess
    if pp.mode not in ("opencv", "caffe_io"):
        raise ConfigError(f"model.preprocess.mode={pp.mode!r}: use opencv or caffe_io")
    if pp.resize not in ("stretch", "shorter_side"):
        raise ConfigError(f"model.preprocess.resize={pp.resize!r}: use stretch or shorter_side")
    if pp.oversample and (pp.resize != "stretch" or not pp.resize_size):
        raise ConfigError("model.preprocess.oversample=true takes 10 crops of a square image, as "
                          "caffe.Classifier does: set model.preprocess.resize=stretch and "
                          "model.preprocess.resize_size (e.g. 256)")


def identity(cfg, blobs: List[str], model_sha: Dict[str, str], input_source: str) -> Dict:
    """What determines the output files: a run dir holding another identity is refused."""
    pp = OmegaConf.to_container(cfg.model.preprocess, resolve=True)
    return {
        "model": {"prototxt_sha256": model_sha["prototxt"], "weights_sha256": model_sha["weights"],
                  "input_size": OmegaConf.to_container(cfg.model.input_size) if cfg.model.input_size else None,
                  "preprocess": pp},
        "blobs": blobs,
        "output": {k: cfg.output[k] for k in ("pooling", "gem_p", "l2_normalize", "dtype")},
        "decode": {k: cfg.decode[k] for k in ("exif_orientation", "max_pixels", "reduced_jpeg")},
        "backend": cfg.backend,
        "input": input_source,
    }


def _input_source(cfg) -> str:
    if cfg.input.dir:
        return "dir:" + os.path.abspath(os.path.expanduser(cfg.input.dir))
    if cfg.input.list:
        return "list:" + os.path.abspath(os.path.expanduser(cfg.input.list))
    raise ConfigError("no input: set input.dir=DIR (a folder of images, listed recursively) or "
                      "input.list=FILE (one path per line)")


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output.dir {path} is not writable ({e.strerror}): choose another output.dir "
                          "or fix its permissions") from e


@dataclass
class Run:
    cfg: object
    rundir: RunDir
    plan: Dict

    @property
    def num_shards(self) -> int:
        return int(self.plan["num_shards"])

    def pipeline_parts(self):
        """(net spec, blobs, decoder, batch transform, input shape C,H,W) for a task."""
        from .decode import Decoder, Geometry
        from .model import parse_prototxt
        from .preprocess import CaffeIODecoder, make_transform

        cfg = self.cfg
        spec = parse_prototxt(cfg.model.prototxt)
        blobs = list(self.plan["blobs"])
        h, w = self.plan["input_hw"]
        pp = cfg.model.preprocess
        geom = Geometry((h, w), pp.resize, pp.resize_size, pp.interpolation)
        # oversample: decode to the full resize size; the 10 crops are cut per batch
        dgeom = Geometry((pp.resize_size,) * 2, "stretch", pp.resize_size, pp.interpolation) if pp.oversample else geom
        if pp.mode == "caffe_io":
            decoder = CaffeIODecoder(dgeom)
        else:
            decoder = Decoder(dgeom, cfg.decode.exif_orientation, cfg.decode.max_pixels, cfg.decode.reduced_jpeg)
        channels = int(self.plan["channels"])
        return spec, blobs, decoder, make_transform(pp, geom, channels), (channels, h, w)

    def shard_attrs(self) -> Dict[str, object]:
        p = self.plan
        return {
            "caffe_runner_version": __version__,
            "model_name": p["model"]["name"],
            "prototxt": p["model"]["prototxt"], "prototxt_sha256": p["model"]["prototxt_sha256"],
            "weights": p["model"]["weights"], "weights_sha256": p["model"]["weights_sha256"],
            "blobs": json.dumps(p["blobs"]),
            "preprocess": json.dumps(p["identity"]["model"]["preprocess"]),
            "backend": p["identity"]["backend"],
            "input_source": p["identity"]["input"],
            "manifest_count": p["count"],
            "config": p["config_yaml"],
            "container": os.environ.get("CAFFE_RUNNER_CONTAINER", ""),
        }


def prepare_run(cfg, default_shards: int, explicit_shards: Optional[int] = None) -> Run:
    """Validate, list the input (or reuse the stored manifest), write run.json."""
    from .model import check_model_files, input_hw, parse_prototxt, sha256_file

    validate(cfg)
    if cfg.backend != "simulated":
        check_model_files(cfg.model)
    if cfg.device == "gpu" and cfg.backend == "caffe":
        from .gpu import require_gpu_caffe

        require_gpu_caffe()
    blobs = _blobs(cfg)
    spec = parse_prototxt(cfg.model.prototxt)
    for b in blobs:
        spec.producer(b)  # raises, listing the blobs that exist
    hw = input_hw(cfg.model, spec)
    channels = int(spec.input_shape[1]) if spec.input_shape and len(spec.input_shape) == 4 else 3
    source = _input_source(cfg)
    run_dir = Path(os.path.abspath(os.path.expanduser(cfg.output.dir)))
    _check_writable(run_dir)
    rd = RunDir(run_dir)
    model_sha = {k: sha256_file(cfg.model[k]) for k in ("prototxt", "weights") if os.path.isfile(cfg.model[k])}
    model_sha.setdefault("weights", "")
    ident = identity(cfg, blobs, model_sha, source)

    old = None
    if (run_dir / "run.json").exists():
        old = rd.read_plan()
    num_shards = explicit_shards
    if old is not None:
        same_ident = old.get("identity") == ident
        same_shards = num_shards is None or num_shards == old["num_shards"]
        if same_ident and same_shards:
            n_done = len(rd.done_shards(old["num_shards"]))
            log.info("run directory %s holds this run: %s (%d of %d shards done)", run_dir,
                     "already complete, nothing to extract" if n_done == old["num_shards"] else "resuming",
                     n_done, old["num_shards"])
            old["config_yaml"] = OmegaConf.to_yaml(cfg, resolve=True)
            return Run(cfg, rd, old)
        diff = [k for k in ident if old.get("identity", {}).get(k) != ident[k]]
        if not same_shards:
            diff.append(f"num_shards ({old['num_shards']} -> {num_shards})")
        if not cfg.output.overwrite:
            raise ConfigError(f"output.dir {run_dir} holds a run with a different config ({', '.join(diff)}): "
                              "choose another output.dir, or add output.overwrite=true to replace it")
        log.warning("output.overwrite=true: replacing the run in %s (differs in %s)", run_dir, ", ".join(diff))
        for sub in ("shards", "status", "manifest"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        for f in ("features.h5", "run.json"):
            (run_dir / f).unlink(missing_ok=True)

    manifest = build_manifest(run_dir, cfg.input)
    if num_shards is None:
        num_shards = max(1, min(default_shards, manifest.count))
    elif num_shards > manifest.count:
        raise ConfigError(f"num_shards={num_shards} is more than the {manifest.count} images: "
                          f"use num_shards<={manifest.count}")
    plan = {
        "version": 1,
        "fingerprint": hashlib.sha256(json.dumps([ident, num_shards], sort_keys=True).encode()).hexdigest(),
        "identity": ident,
        "num_shards": num_shards,
        "count": manifest.count,
        "blobs": blobs,
        "input_hw": list(hw),
        "channels": channels,
        "model": {"name": cfg.model.name, "prototxt": os.path.abspath(cfg.model.prototxt),
                  "weights": os.path.abspath(cfg.model.weights) if cfg.model.weights else "",
                  "prototxt_sha256": model_sha.get("prototxt", ""), "weights_sha256": model_sha["weights"]},
        "config_yaml": OmegaConf.to_yaml(cfg, resolve=True),
    }
    rd.write_plan(plan)
    return Run(cfg, rd, plan)


def load_run(cfg) -> Run:
    rd = RunDir(Path(os.path.abspath(os.path.expanduser(cfg.output.dir))))
    plan = rd.read_plan()
    load_manifest(rd.path)  # fail early with a clear message if it is missing
    return Run(cfg, rd, plan)


def load_run_dir(path) -> Run:
    """A run from its directory alone (merge, status, verify): the config comes from run.json."""
    rd = RunDir(Path(os.path.abspath(os.path.expanduser(str(path)))))
    plan = rd.read_plan()
    return Run(OmegaConf.create(plan["config_yaml"]), rd, plan)


def plan_summary(run: Run) -> str:
    p = run.plan
    done = len(run.rundir.done_shards(run.num_shards))
    return (f"run {run.rundir.path}: {p['count']} images, {run.num_shards} shards ({done} done), "
            f"model {p['model']['name']}, blobs {','.join(p['blobs'])}, input {p['input_hw'][0]}x{p['input_hw'][1]}")

