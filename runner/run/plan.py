"""Check the plan before any work starts, and describe the run for the tasks.

prepare_run (launcher side): validate config and inputs, list the input once, fingerprint
what determines the output, and write run.json. A run directory holding a run with another
fingerprint is refused (output.overwrite=true replaces it); the same fingerprint resumes.
load_run (task side): read that plan back and build the pipeline pieces.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from omegaconf import OmegaConf

from .. import __version__, log
from ..errors import ConfigError, unwritable
from .changes import describe_change, identity_changes, input_change_advice, stamp_changed
from .config import preset_model_paths
from ..engine.fetch import check_pins, ensure_model_files
from ..inputs import build_manifest, input_source, input_stamp, list_input, refuse_caffe_io
from ..store.manifest import extend_manifest, load_manifest
from ..inputs.listing import describe as describe_listing
from ..store.locks import probe_flock
from ..engine.model import check_fixed_shape, check_model_files, chosen_blobs, input_hw, parse_prototxt
from ..engine.modelcheck import check_model_loads, check_planned_files, files_sha256
from ..store.rundir import (RUN_JSON, DamagedPlanError, RunDir, partials_of, probe_writable, remove_old_run,
                     shard_file_of_run)
from ..runtimes import check_container
from ..runtimes.identity import task_container
from ..store.shard import shard_bounds
from ..schema import CAFFE_LOADED, CPU_ONLY, OWN_MODEL, DecodeConf, identity_backend



@dataclass(frozen=True)
class Checked:
    """What validate() learned from the config and the net, before anything is listed."""
    blobs: List[str]
    input_hw: Tuple[int, int]
    channels: int
    device: str          # resolved: cpu | gpu
    gpus_per_task: int   # launcher=slurm: resolved GPUs per task (0 for local)


def _check_ranges(cfg) -> None:
    if not isinstance(cfg.batch_size, int) or not 1 <= cfg.batch_size <= 4096:
        raise ConfigError(f"batch_size={cfg.batch_size} is out of range: use 1..4096 (16-64 is typical)")
    if cfg.num_shards is not None and (not isinstance(cfg.num_shards, int) or cfg.num_shards < 1):
        raise ConfigError(f"num_shards={cfg.num_shards} is out of range: use an integer >= 1 "
                          "(one per GPU is typical)")
    if cfg.decode.workers < 0 or cfg.decode.prefetch_batches < 1:
        raise ConfigError("decode.workers must be >= 0 and decode.prefetch_batches >= 1")
    if not float(cfg.decode.get("max_file_mb", 1)) > 0:
        raise ConfigError(f"decode.max_file_mb={cfg.decode.max_file_mb}: use a positive number of MB (files larger "
                          "are recorded as failures; 256 is the default)")
    if not float(cfg.decode.get("max_image_s", 0)) >= 0:
        raise ConfigError(f"decode.max_image_s={cfg.decode.max_image_s}: use a number of seconds >= 0 (an image "
                          "whose decoding takes longer is recorded as a failure; 0: no bound; 300 is the default)")
    if cfg.output.gem_p <= 0:
        raise ConfigError(f"output.gem_p={cfg.output.gem_p}: use a positive exponent (3 is typical)")
    if cfg.output.get("view_max_shards", 0) < 0:
        raise ConfigError("output.view_max_shards must be >= 0 (0: features.h5 is always a real copy)")
    if cfg.heartbeat_s <= 0:
        raise ConfigError(f"heartbeat_s={cfg.heartbeat_s}: use a positive number of seconds")
    if not 0 <= cfg.model.get("cudnn_workspace_mb", 0) <= 1 << 24:
        raise ConfigError(f"model.cudnn_workspace_mb={cfg.model.cudnn_workspace_mb}: use 0 (no workspace: the "
                          "slowest algorithms) or more MB per convolution layer (64 is the default)")
    if not 0 <= cfg.model.get("conv_batch_mb", 0) <= 1 << 20:
        raise ConfigError(f"model.conv_batch_mb={cfg.model.conv_batch_mb}: use 0 (one image per GEMM, as Caffe "
                          "upstream) or more MB of column buffer per convolution (32 is the default)")
    tol = cfg.get("gpu_selfcheck_tolerance")
    if tol is not None and not tol > 0:
        raise ConfigError(f"gpu_selfcheck_tolerance={tol}: use a positive bound, or null for the default "
                          "(1e-4, 1e-2 with model.tf32=true), or gpu_selfcheck=false to turn the check off")
    mff = cfg.run.max_failure_fraction if "run" in cfg else None
    if mff is not None and not 0 <= float(mff) <= 1:
        raise ConfigError(f"run.max_failure_fraction={mff}: use a share of the images between 0 and 1 "
                          "(0.01: fail the run when more than 1% of the images could not be used), or null")


def _check_preprocess(cfg, hw: Tuple[int, int], channels: int) -> None:
    """Cross-field checks a shard would otherwise hit after the run has started."""
    pp = cfg.model.preprocess
    refuse_caffe_io(cfg.input, pp.mode)
    if channels != 3:
        raise ConfigError(f"the net takes {channels} input channels; caffe-runner feeds colour images "
                          "(3 channels): use a deploy prototxt with a 3-channel input")
    if pp.mean_file:
        if not os.path.isfile(pp.mean_file):
            raise ConfigError(f"model.preprocess.mean_file {pp.mean_file!r} does not exist: give a .binaryproto "
                              "or .npy mean image, or per-channel values with model.preprocess.mean=[...]")
    elif pp.mean is not None and len(pp.mean) != channels:
        raise ConfigError(f"model.preprocess.mean has {len(pp.mean)} values but the net takes {channels} "
                          f"channels: give {channels} values, in the net's channel order ({pp.channel_order})")
    if pp.resize_size is not None:
        if pp.resize_size < 1:
            raise ConfigError(f"model.preprocess.resize_size={pp.resize_size}: use a positive size or null")
        if pp.resize_size < max(hw):
            raise ConfigError(f"model.preprocess.resize_size={pp.resize_size} is smaller than the net input "
                              f"{hw[0]}x{hw[1]}: the centre crop would not fit; use resize_size >= {max(hw)} "
                              "or leave it null (resize straight to the input size)")
    if pp.oversample and (pp.resize != "stretch" or not pp.resize_size):
        raise ConfigError("model.preprocess.oversample=true takes 10 crops of a square image, as "
                          "caffe.Classifier does: set model.preprocess.resize=stretch and "
                          "model.preprocess.resize_size (e.g. 256)")
    if cfg.model.input_size is not None and len(cfg.model.input_size) not in (1, 2):
        raise ConfigError(f"model.input_size={list(cfg.model.input_size)}: give [H, W] (or [S] for S x S)")


def _check_device(cfg, launcher) -> Tuple[str, int]:
    if cfg.backend in CPU_ONLY and cfg.device == "gpu":
        raise ConfigError(f"backend={cfg.backend} runs on the CPU only: set device=cpu (or backend=caffe)")
    device, gpus = launcher.resolve_device(cfg)
    if device == "gpu" and cfg.backend in CAFFE_LOADED and cfg.container.runtime == "none":
        launcher.require_gpu_here()  # with a container, the image's Caffe runs, not this one
    return device, gpus


def _check_container(cfg, device: str, launcher) -> None:
    """The runtime is here, the image exists, is readable, is visible from the nodes and fits
    the device (runner/runtimes/)."""
    check_container(cfg, launcher.placement, device)


def _check_model_loads(cfg) -> None:
    """Caffe loads the weights into the prototxt (a child process: runner/engine/modelcheck.py)."""
    if cfg.backend in CAFFE_LOADED and cfg.container.runtime != "none":
        # the image's Caffe runs the tasks, not this one (which may be missing or another build):
        # each task makes the same check first, inside the image
        log.info("model load check: done by each task inside the %s image (container.runtime=%s)",
                 cfg.container.image, cfg.container.runtime)
        return
    check_model_loads(cfg)


def _model_sha(cfg) -> Dict[str, str]:
    """The model files' sha256: prototxt, weights and the mean file when one is given
    (stat-cached: a 500 MB model is hashed once per change)."""
    paths = {k: str(cfg.model[k]) for k in ("prototxt", "weights") if cfg.model[k] and os.path.isfile(cfg.model[k])}
    mean_file = cfg.model.preprocess.get("mean_file")
    if mean_file and os.path.isfile(mean_file):
        paths["mean_file"] = str(mean_file)
    sha = files_sha256(paths)
    sha.setdefault("weights", "")
    return sha


def validate(cfg, launcher) -> Checked:
    """Every check that needs no listing: ranges, model files, the net's blobs and channels,
    preprocessing against the net, device and GPU request, container, and the launcher's own
    (Slurm partition and account). Both launchers call it (through prepare_run) before
    anything is listed, locked or submitted."""
    _check_ranges(cfg)
    input_source(cfg.input)
    if cfg.backend != "simulated":
        preset_paths = lambda: preset_model_paths(cfg.model.name)  # noqa: E731 (asked only when a file is missing)
        ensure_model_files(cfg.model, preset_paths)  # here, on the submitting node: tasks never download
        check_model_files(cfg.model, preset_paths)
    blobs = chosen_blobs(cfg)
    spec = parse_prototxt(cfg.model.prototxt)
    for b in blobs:
        spec.producer(b)  # raises, naming the closest blobs
    check_fixed_shape(blobs, spec)  # detection outputs change shape per image
    hw = input_hw(cfg.model, spec)
    channels = int(spec.input_shape[1]) if spec.input_shape and len(spec.input_shape) == 4 else 3
    _check_preprocess(cfg, hw, channels)
    device, gpus = _check_device(cfg, launcher)
    _check_container(cfg, device, launcher)
    launcher.check(cfg)
    # a fetched file that changed since (its pin beside it) is refused by name, before Caffe
    # would say only that it cannot parse it
    check_pins(cfg.model, _model_sha(cfg))
    _check_model_loads(cfg)  # last: the only check that takes seconds
    return Checked(blobs, hw, channels, device, gpus)


def identity(cfg, blobs: List[str], model_sha: Dict[str, str], input_source: str) -> Dict:
    """What determines the output files: a run dir holding another identity is refused."""
    pp = OmegaConf.to_container(cfg.model.preprocess, resolve=True)
    model = {"prototxt_sha256": model_sha["prototxt"], "weights_sha256": model_sha["weights"],
             "input_size": OmegaConf.to_container(cfg.model.input_size) if cfg.model.input_size else None,
             "preprocess": pp}
    if model_sha.get("mean_file"):  # its content, not only its path (absent without one: older runs resume)
        model["mean_file_sha256"] = model_sha["mean_file"]
    return {
        "model": model,
        "blobs": blobs,
        "output": {k: cfg.output[k] for k in ("pooling", "gem_p", "l2_normalize", "dtype")},
        "decode": decode_identity(cfg.decode),
        "backend": identity_backend(cfg.backend),
        "input": input_source,
    }


def decode_identity(dc) -> Dict:
    """The decode settings that decide which images become rows. decode.max_file_mb counts only
    when it is not its default, so runs planned before it existed keep their fingerprint.
    decode.max_image_s does not count: a time bound is the machine's, not the data's (a retry
    with a larger one re-decodes the images it gave up on)."""
    out = {k: dc[k] for k in ("exif_orientation", "max_pixels", "reduced_jpeg")}
    if float(dc.get("max_file_mb", DecodeConf.max_file_mb)) != DecodeConf.max_file_mb:
        out["max_file_mb"] = float(dc.max_file_mb)
    return out


def _same_identity(old: Optional[Dict], new: Dict) -> bool:
    """Whether a run directory's identity is this config's. A run planned before the mean
    file's content was part of it (its path was) resumes, with a warning."""
    if old == new:
        return True
    model = dict(new.get("model", {}))
    if old and "mean_file_sha256" in model and "mean_file_sha256" not in old.get("model", {}):
        model.pop("mean_file_sha256")
        if old == dict(new, model=model):
            log.warning("this run was planned before the mean file's content was recorded: its tasks check "
                        "model.preprocess.mean_file by path only (a new output.dir records and checks its content)")
            return True
    return False


def _check_writable(path: Path) -> None:
    try:
        probe_writable(path)
        # before anything is written: every lock of the run is a flock in this folder
        probe_flock(path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # a rerun after a full disk: the run's files are kept
            raise ConfigError(f"output.dir {path}: no space left on device: free space there, then rerun "
                              "the same command (completed and partial shards are kept)") from e
        raise unwritable("output.dir", path, e, "choose another output.dir (a folder you can write)") from None


def segments(plan: Dict) -> List[Dict]:
    """The run's shard segments: the first listing split into num_shards, and one more per
    input.relist that found new images (appended to the manifest, split into new shards)."""
    return plan.get("segments") or [{"first": 0, "num_shards": int(plan["num_shards"]), "start": 0,
                                      "count": int(plan["count"])}]


class PipelineParts(NamedTuple):
    """A task's pipeline pieces, built from the plan (Run.pipeline_parts)."""
    spec: object                      # the parsed deploy prototxt (model.NetSpec)
    blobs: List[str]
    decoder: object                   # decode.Decoder or preprocess.CaffeIODecoder
    transform: object                 # batch of decoded images -> the net's input array
    in_shape: Tuple[int, int, int]    # C, H, W


@dataclass
class Run:
    cfg: object
    rundir: RunDir
    plan: Dict

    @property
    def num_shards(self) -> int:
        return int(self.plan["num_shards"])

    # one place for a shard's manifest range and file names (segments included)
    def _segment(self, i: int) -> Dict:
        for seg in segments(self.plan):
            if seg["first"] <= i < seg["first"] + seg["num_shards"]:
                return seg
        raise ValueError(f"shard {i} is not in this run of {self.num_shards} shards")

    def shard_range(self, i: int) -> Tuple[int, int]:
        """[start, stop) of shard i in the manifest."""
        seg = self._segment(i)
        a, b = shard_bounds(seg["count"], seg["num_shards"], i - seg["first"])
        return seg["start"] + a, seg["start"] + b

    def name_total(self, i: int) -> int:
        """The NNNNN in shard-IIIII-of-NNNNN: shards of a later segment never rename earlier ones."""
        seg = self._segment(i)
        return seg["first"] + seg["num_shards"]

    def shard_path(self, i: int) -> Path:
        return self.rundir.shard_path(i, self.name_total(i))

    def partial_paths(self, i: int) -> List[Path]:
        """Shard i's partial files, one per attempt that left one (rundir.partials_of)."""
        return partials_of(self.shard_path(i))

    def lock_path(self, i: int) -> Path:
        return self.rundir.lock_path(i, self.name_total(i))

    def read_heartbeat(self, i: int) -> Optional[Dict]:
        return self.rundir.read_heartbeat(i, self.name_total(i))

    def write_heartbeat(self, i: int, beat: Dict) -> None:
        self.rundir.write_heartbeat(i, self.name_total(i), beat)

    def shard_paths(self) -> List[Path]:
        return [self.shard_path(i) for i in range(self.num_shards)]

    def shard_done(self, i: int) -> bool:
        """Shard i's file exists, is complete and was written for this run (fingerprint)."""
        return shard_file_of_run(self.shard_path(i), self.plan["fingerprint"])

    def foreign_shard(self, i: int) -> bool:
        """A file at shard i's name that is not this run's complete shard (it gets replaced)."""
        return self.shard_path(i).exists() and not self.shard_done(i)

    def done_shards(self) -> List[int]:
        return [i for i in range(self.num_shards) if self.shard_done(i)]

    def missing_shards(self) -> List[int]:
        return [i for i in range(self.num_shards) if not self.shard_done(i)]

    def pipeline_parts(self) -> "PipelineParts":
        """What a task builds from the plan before its first batch (parses the prototxt and
        loads the mean file: call once per shard)."""
        from ..engine.decode import Decoder, Geometry  # cv2: loaded by tasks only
        from ..engine.preprocess import CaffeIODecoder, make_transform

        cfg = self.cfg
        spec = parse_prototxt(cfg.model.prototxt)
        blobs = list(self.plan["blobs"])
        h, w = self.plan["input_hw"]
        pp = cfg.model.preprocess
        geom = Geometry((h, w), pp.resize, pp.resize_size, pp.interpolation)
        # oversample: decode to the full resize size; the 10 crops are cut per batch
        dgeom = Geometry((pp.resize_size,) * 2, "stretch", pp.resize_size, pp.interpolation) if pp.oversample else geom
        # a run planned before decode.max_file_mb (retry reads run.json's config) has the default
        max_file_mb = float(cfg.decode.get("max_file_mb", DecodeConf.max_file_mb))
        follow = bool(cfg.input.get("follow_symlinks", True))
        if pp.mode == "caffe_io":
            decoder = CaffeIODecoder(dgeom, max_file_mb=max_file_mb, follow_symlinks=follow)
        else:
            decoder = Decoder(dgeom, cfg.decode.exif_orientation, cfg.decode.max_pixels, cfg.decode.reduced_jpeg,
                              max_file_mb, follow)
        channels = int(self.plan["channels"])
        return PipelineParts(spec, blobs, decoder, make_transform(pp, geom, channels), (channels, h, w))

    def check_model_files(self) -> None:
        """Before each shard (a task keeping its net too): the prototxt, weights and mean file
        this task loads are the ones the plan hashed, else ModelFileChangedError naming the file
        (stat-cached: runner/engine/modelcheck.py)."""
        m, cfg = self.plan["model"], self.cfg.model
        check_planned_files({"prototxt": (cfg.prototxt, m.get("prototxt_sha256")),
                             "weights": (cfg.weights, m.get("weights_sha256")),
                             "mean_file": (cfg.preprocess.get("mean_file"), m.get("mean_file_sha256"))})

    def shard_attrs(self) -> Dict[str, object]:
        p = self.plan
        mean = {k: p["model"][k] for k in ("mean_file", "mean_file_sha256") if p["model"].get(k)}
        return {
            "caffe_runner_version": __version__,
            "model_name": p["model"]["name"],
            "prototxt": p["model"]["prototxt"], "prototxt_sha256": p["model"]["prototxt_sha256"],
            "weights": p["model"]["weights"], "weights_sha256": p["model"]["weights_sha256"],
            **mean,
            "blobs": list(p["blobs"]),  # an array of strings (runs before 35 wrote a JSON string: blobs_attr)
            "preprocess": json.dumps(p["identity"]["model"]["preprocess"]),
            # as configured (auto, caffe, onnxruntime ...); what computed the rows is `engine`
            "backend": str(self.cfg.get("backend", p["identity"]["backend"])),
            "input_source": p["identity"]["input"],
            "manifest_count": p["count"],
            "config": p["config_yaml"],
            **task_container(),
        }


def _relist(cfg, run: Run, new_stamp: Optional[Dict]) -> Run:
    """input.relist=true: append images that are new since the listing as new shards; entries
    already listed keep their positions, complete shards are never touched."""
    plan, rd = run.plan, run.rundir
    root, names, _ = list_input(cfg.input)
    manifest = load_manifest(rd.path)
    if os.fsencode(os.fsdecode(manifest.root)) != root:
        raise ConfigError(f"input.relist=true: the input root is now {os.fsdecode(root)!r}, it was "
                          f"{os.fsdecode(manifest.root)!r}: use a new output.dir")
    count = int(plan["count"])
    old = set(manifest.read_slice(0, count))
    new = [n for n in names if n not in old]
    gone = len(old) - (len(names) - len(new))
    if gone:
        log.warning("input.relist: %d listed image(s) are gone from the input; they stay in the run (rows if "
                    "already extracted, else recorded as failures)", gone)
    if not new:
        log.warning("input.relist: no new images (modified files are not extracted again: use a new output.dir "
                    "for that); the run goes on as listed")
        plan["input_stamp"] = new_stamp
        rd.write_plan(plan)
        return run
    segs = segments(plan)
    per_shard = max(1, -(-segs[0]["count"] // segs[0]["num_shards"]))  # the first listing's shard size
    k = max(1, -(-len(new) // per_shard))
    segs = segs + [{"first": int(plan["num_shards"]), "num_shards": k, "start": count, "count": len(new)}]
    extend_manifest(rd.path, count, new)
    plan.update(segments=segs, num_shards=int(plan["num_shards"]) + k, count=count + len(new),
                input_stamp=new_stamp)
    rd.merged.unlink(missing_ok=True)  # it no longer covers the run
    rd.write_plan(plan)
    log.warning("input.relist: %d new image(s) appended to the run as %d new shard(s) (%d..%d); complete "
                "shards are kept", len(new), k, segs[-1]["first"], segs[-1]["first"] + k - 1)
    return run


def prepare_run(cfg, launcher, explicit_shards: Optional[int] = None) -> Run:
    """Validate, list the input (or reuse the stored manifest), write run.json. The device
    (and what the launcher resolved, e.g. Slurm's GPUs per task) is resolved here and
    written into cfg, so tasks get plain values. `launcher` is a launch.base.Launcher: its
    hooks are the only launcher-specific steps of the plan."""
    checked = validate(cfg, launcher)
    cfg.device = checked.device
    launcher.settle(cfg, checked)
    blobs, hw, channels = checked.blobs, checked.input_hw, checked.channels
    source = input_source(cfg.input)
    run_dir = Path(os.path.abspath(os.path.expanduser(cfg.output.dir)))
    _check_writable(run_dir)
    rd = RunDir(run_dir)
    model_sha = _model_sha(cfg)
    ident = identity(cfg, blobs, model_sha, source)

    old = None
    if (run_dir / RUN_JSON).exists():
        try:
            old = rd.read_plan()
        except DamagedPlanError:
            if not cfg.output.overwrite:
                raise
            old = {}  # nothing of it can be trusted: replaced below like a run of another config
    num_shards = explicit_shards
    if old is not None:
        same_ident = _same_identity(old.get("identity"), ident)
        old_shards = segments(old)[0]["num_shards"] if old else None
        same_shards = num_shards is None or num_shards == old_shards
        if same_ident and same_shards:
            run = Run(cfg, rd, old)
            stamp = input_stamp(cfg.input)
            if old.get("input_stamp") is not None and stamp is not None and stamp_changed(old["input_stamp"], stamp):
                what = describe_change(old["input_stamp"], stamp)
                if not cfg.input.get("relist", False):
                    grew, _ = input_change_advice(old["input_stamp"], stamp)
                    raise ConfigError(f"the input changed since this run listed it ({what}): add input.relist=true "
                                      + ("to extend the run with the new images as new shards (complete shards are "
                                         "kept)" if grew else "to go on with the run as listed (images deleted "
                                                              "since keep their rows)")
                                      + ", or choose a new output.dir for a fresh run")
                run = _relist(cfg, run, stamp)
            n_done = len(run.done_shards())
            log.info("run directory %s holds this run: %s (%d of %d shards done)", run_dir,
                     "already complete, nothing to extract" if n_done == run.num_shards else "resuming",
                     n_done, run.num_shards)
            run.plan["config_yaml"] = OmegaConf.to_yaml(cfg, resolve=True)
            return run
        diff = identity_changes(old.get("identity", {}), ident) if old else [f"its {RUN_JSON} is damaged"]
        if not same_shards:
            diff.append(f"num_shards: {old_shards} -> {num_shards}")
        if not cfg.output.overwrite:
            raise ConfigError(f"output.dir {run_dir} holds a run with a different config ({'; '.join(diff)}): "
                              "choose another output.dir, or add output.overwrite=true to replace it")
        log.warning("output.overwrite=true: replacing the run in %s (%s)", run_dir, "; ".join(diff))
        remove_old_run(run_dir)

    stamp = input_stamp(cfg.input)  # before listing: a change during the listing shows up next time
    manifest = build_manifest(run_dir, cfg.input)
    if num_shards is None:
        # asked only now, after validate() resolved the device
        num_shards = max(1, min(launcher.default_shards(cfg), manifest.count))
    elif num_shards > manifest.count:
        raise ConfigError(f"num_shards={num_shards} is more than the {manifest.count} images: "
                          f"use num_shards<={manifest.count}")
    plan = {
        "version": 1,
        "fingerprint": hashlib.sha256(json.dumps([ident, num_shards], sort_keys=True).encode()).hexdigest(),
        "identity": ident,
        "num_shards": num_shards,
        "count": manifest.count,
        "labels": manifest.labels,
        "segments": [{"first": 0, "num_shards": num_shards, "start": 0, "count": manifest.count}],
        "input_stamp": stamp,
        # a folder: files seen, listed, skipped by reason (status and verify say it)
        "listing": manifest.listing,
        "blobs": blobs,
        "input_hw": list(hw),
        "channels": channels,
        "model": {"name": cfg.model.name, "prototxt": os.path.abspath(cfg.model.prototxt),
                  "weights": os.path.abspath(cfg.model.weights) if cfg.model.weights else "",
                  "prototxt_sha256": model_sha.get("prototxt", ""), "weights_sha256": model_sha["weights"],
                  # what the net is fed: its input and the preprocessing (the log's and inspect's words)
                  "input": describe_input(cfg.model.preprocess, hw, channels, size_source(cfg.model)),
                  **({"mean_file": os.path.abspath(cfg.model.preprocess.mean_file),
                      "mean_file_sha256": model_sha["mean_file"]} if model_sha.get("mean_file") else {})},
        "config_yaml": OmegaConf.to_yaml(cfg, resolve=True),
    }
    rd.write_plan(plan)
    return Run(cfg, rd, plan)


def load_run(cfg, fingerprint: Optional[str] = None) -> Run:
    """The run a task works on. `fingerprint`: the plan the task was submitted for; a task whose
    run.json has since been replaced (output.overwrite=true while it was queued) refuses to
    write: its config is not the run's."""
    rd = RunDir(Path(os.path.abspath(os.path.expanduser(cfg.output.dir))))
    plan = rd.read_plan()
    check_fingerprint(rd, plan, fingerprint)
    load_manifest(rd.path)  # fail early with a clear message if it is missing
    return Run(cfg, rd, plan)


def check_fingerprint(rd: RunDir, plan: Dict, fingerprint: Optional[str]) -> None:
    if fingerprint and plan["fingerprint"] != fingerprint:
        raise ConfigError(f"this task was submitted for run {fingerprint[:12]}, but {rd.path / RUN_JSON} now holds "
                          f"run {plan['fingerprint'][:12]} (replaced, e.g. by output.overwrite=true): it writes "
                          "nothing; the current run's own command submits its tasks")


def load_run_dir(path, fingerprint: Optional[str] = None) -> Run:
    """A run from its directory alone (merge, status, verify): the config comes from run.json."""
    rd = RunDir(Path(os.path.abspath(os.path.expanduser(str(path)))))
    plan = rd.read_plan()
    check_fingerprint(rd, plan, fingerprint)
    try:
        cfg = OmegaConf.create(plan["config_yaml"])
    except Exception as e:  # yaml's and omegaconf's errors: the text is damaged either way
        raise DamagedPlanError(rd.path / RUN_JSON, f"its config_yaml does not parse: {type(e).__name__}") from None
    if not OmegaConf.is_dict(cfg):
        raise DamagedPlanError(rd.path / RUN_JSON, "its config_yaml is not a mapping")
    return Run(cfg, rd, plan)


def describe_input(pp, hw, channels: int, size_from: str) -> str:
    """What the net is fed, in one phrase (pure): its input shape, where that size comes from,
    and the preprocessing (the numbers a run uses, for its log, run.json and inspect)."""
    pp = OmegaConf.to_container(pp, resolve=True) if OmegaConf.is_config(pp) else dict(pp)
    h, w = hw
    if pp.get("resize") == "shorter_side":
        resize = f"shorter side to {pp.get('resize_size')}, centre crop {h}x{w}"
    elif pp.get("resize_size"):
        resize = f"{pp['resize_size']}x{pp['resize_size']}, centre crop {h}x{w}"
    else:
        resize = f"{h}x{w}"
    mean = (f"mean image {pp['mean_file']}" if pp.get("mean_file") else
            f"mean {pp.get('mean')}" if pp.get("mean") is not None else "no mean")
    return (f"input {channels}x{h}x{w} ({size_from}); preprocessing: resize {resize} ({pp.get('interpolation')}), "
            f"{pp.get('channel_order')}, raw_scale {pp.get('raw_scale'):g}, {mean}, scale {pp.get('scale'):g}"
            + (", 10 crops averaged" if pp.get("oversample") else "") + f", mode {pp.get('mode')}")


def size_source(model_cfg) -> str:
    """Where the input size comes from: model.input_size as configured, or the prototxt."""
    if model_cfg.input_size:
        return (f"model.input_size of preset {model_cfg.name}" if model_cfg.name != OWN_MODEL
                else "model.input_size")
    return "the prototxt's own size"


def plan_summary(run: Run) -> str:
    p = run.plan
    done = len(run.done_shards())
    listing = p.get("listing") or {}
    skipped = f" (input: {describe_listing(listing)})" if listing.get("skipped") else ""
    fed = p["model"].get("input")
    return (f"run {run.rundir.path}: {p['count']} images{skipped}, {run.num_shards} shards ({done} done), "
            f"model {p['model']['name']}, blobs {','.join(p['blobs'])}, "
            + (fed if fed else f"input {p['input_hw'][0]}x{p['input_hw'][1]}"))

