"""Load a Caffe model once per task and run it on batches.

Users name blobs (fc7, pool5); Caffe's forward(end=...) takes layer names. A blob maps to
the last layer that writes it (in-place ReLUs included, so fc7 is post-ReLU as in
net.blobs after a full forward). The net is cut after the last layer the requested blobs
need, so a deploy prototxt whose tail has layers this Caffe does not know still loads, and
no time is spent on layers nobody asked for.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import fold
from .. import log
from ..errors import ConfigError, RunnerError
from .netstate import RuleError, running_layers, test_state
from ..schema import CPU_ONLY
from .base import Engine
from .simulated import SimulatedEngine, host_value


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    bottoms: Tuple[str, ...]
    tops: Tuple[str, ...]


@dataclass(frozen=True)
class NetSpec:
    """What the prototxt says, parsed without instantiating the net."""
    param: object                           # caffe_pb2.NetParameter
    layers: Tuple[LayerInfo, ...]
    input_name: str
    input_shape: Optional[Tuple[int, ...]]  # N, C, H, W if the prototxt gives it

    @property
    def blobs(self) -> List[str]:
        seen: Dict[str, None] = {self.input_name: None}
        for layer in self.layers:
            for t in layer.tops:
                seen.setdefault(t, None)
        return list(seen)

    def producer(self, blob: str) -> int:
        """Index of the last layer that writes `blob`."""
        for i in range(len(self.layers) - 1, -1, -1):
            if blob in self.layers[i].tops:
                return i
        raise ConfigError(unknown_blob_message(blob, self.layers, self.input_name))

    def end_layer(self, blobs: Sequence[str]) -> int:
        return max(self.producer(b) for b in blobs)

    def variable_blobs(self) -> Dict[str, LayerInfo]:
        return variable_shape_blobs(self.layers)


def unknown_blob_message(blob: str, layers: Sequence[LayerInfo], input_name: str) -> str:
    """One short line for an output.blobs entry that is no blob the net writes: a layer's name
    (the blobs it writes), the net's input, or a typo (the closest blobs)."""
    import difflib

    blobs = list(dict.fromkeys(t for layer in layers for t in layer.tops if t != input_name))
    hint = "`caffe-runner inspect` lists every blob with its shape"
    if blob == input_name:
        return (f"output.blobs: {blob!r} is the net's input (the preprocessed image), not a feature: choose a "
                f"blob the net computes, e.g. {blobs[-1] if blobs else '...'}; {hint}")
    writes = [t for layer in layers if layer.name == blob for t in layer.tops]
    if writes:
        return (f"output.blobs: {blob!r} is a layer, not a blob; it writes {', '.join(dict.fromkeys(writes))}: "
                f"write output.blobs=[{writes[-1]}] ({hint})")
    if len(blobs) <= 12:  # a small net: all of them fit on the line
        return f"output.blobs: blob {blob!r} is not in the net; its blobs are: {', '.join(blobs)}"
    close = difflib.get_close_matches(blob, blobs, n=3, cutoff=0.5)
    return (f"output.blobs: blob {blob!r} is not in the net" +
            (f" (did you mean {' or '.join(close)}?)" if close else "") + f"; {hint}")


# layers whose output shape depends on the image itself (a list of detections, proposals or
# selected rows), not only on the input size: such a blob has no fixed row shape to store
VARIABLE_SHAPE_LAYERS = ("DetectionOutput", "Proposal", "Filter", "BatchReindex")


def variable_shape_blobs(layers: Sequence[LayerInfo]) -> Dict[str, LayerInfo]:
    """blob -> the layer that makes its shape vary from image to image (itself, or upstream)."""
    out: Dict[str, LayerInfo] = {}
    for layer in layers:
        cause = layer if layer.type in VARIABLE_SHAPE_LAYERS else next(
            (out[b] for b in layer.bottoms if b in out), None)
        for t in layer.tops:
            if cause is not None:
                out[t] = cause
            else:
                out.pop(t, None)  # written again, in place, by a fixed-shape layer: still varies if its input did
    return out


def check_fixed_shape(blobs: Sequence[str], spec: "NetSpec") -> None:
    """Refuse, at plan time, a blob whose shape changes per image (res10's detection_out): its
    rows could not be stacked, and every shard would fail after the run started."""
    var = spec.variable_blobs()
    for b in blobs:
        if b in var:
            layer = var[b]
            fixed = [x for x in layer.bottoms if x not in var]
            raise ConfigError(
                f"output.blobs: {b!r} changes shape from image to image (it comes from {layer.type} layer "
                f"{layer.name!r}: a variable number of results), so it cannot be stored one row per image: "
                f"choose a fixed-size blob" + (f", e.g. one it is computed from: {', '.join(fixed)}" if fixed else ""))


def caffe_pb2():
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        from caffe.proto import caffe_pb2 as pb
    except ImportError as e:
        raise ConfigError(f"pycaffe is not importable ({e}): run `make setup` (builds it with "
                          "docker/build-pycaffe.sh) or activate the environment that has it") from e
    return pb


def parse_prototxt(path: str) -> NetSpec:
    from google.protobuf import text_format

    pb = caffe_pb2()
    param = pb.NetParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), param)
    except text_format.ParseError as e:
        raise ConfigError(f"cannot parse prototxt {path}: {e}") from e
    if param.layers:  # V1 "layers {}" format
        raise ConfigError(f"{path} uses the old V1 'layers' format: upgrade it with Caffe's "
                          "upgrade_net_proto_text tool")
    layers = []
    input_name, shape = None, None
    if param.input:
        input_name = param.input[0]
        if param.input_shape:
            shape = tuple(param.input_shape[0].dim)
        elif len(param.input_dim) >= 4:
            shape = tuple(param.input_dim[:4])
    try:  # Caffe's include/exclude rules, as caffe.Net(..., caffe.TEST) applies them
        running = running_layers(param)
    except RuleError as e:
        raise ConfigError(f"{path}: {e}") from None
    for lp in running:
        layers.append(LayerInfo(lp.name, lp.type, tuple(lp.bottom), tuple(lp.top)))
        if lp.type == "Input" and input_name is None:
            input_name = lp.top[0]
            if lp.input_param.shape:
                shape = tuple(lp.input_param.shape[0].dim)
    if input_name is None:
        raise ConfigError(f"{path} declares no input (neither `input:` nor an Input layer): "
                          "use a deploy prototxt, not a train_val one")
    return NetSpec(param, tuple(layers), input_name, shape)


def truncated_param(spec: NetSpec, end_index: int):
    """The NetParameter holding the layers that run in TEST (runner/engine/netstate.py), [0, end_index]
    of them only (spec.layers' indices)."""
    pb = caffe_pb2()
    param = pb.NetParameter()
    param.CopyFrom(spec.param)
    del param.layer[:]
    for lp in running_layers(spec.param)[:end_index + 1]:
        param.layer.add().CopyFrom(lp)
    return param


def truncated_prototxt(spec: NetSpec, end_index: int) -> str:
    """Prototxt text of truncated_param."""
    from google.protobuf import text_format

    return text_format.MessageToString(truncated_param(spec, end_index))


def chosen_blobs(cfg) -> List[str]:
    """The blobs a run extracts: output.blobs, else the model's default_blobs; none or one
    named twice is refused, and so is an empty output.blobs=[] (it would silently mean the defaults)."""
    if cfg.output.blobs is not None and len(cfg.output.blobs) == 0:
        default = ",".join(cfg.model.default_blobs)
        raise ConfigError("output.blobs=[] names no blob: give at least one, e.g. output.blobs=[fc7], or leave "
                          f"output.blobs unset for the model's default_blobs ({default or 'none'})")
    blobs = list(cfg.output.blobs) if cfg.output.blobs else list(cfg.model.default_blobs)
    if not blobs:
        raise ConfigError(f"no blobs to extract: set output.blobs=[name,...] (model {cfg.model.name} "
                          "has no default_blobs; `caffe-runner inspect` with the same model keys lists every blob)")
    if len(set(blobs)) != len(blobs):
        raise ConfigError(f"output.blobs names a blob twice: {blobs}")
    return blobs


def check_model_files(model_cfg, preset_paths: Optional[Callable[[], Dict[str, str]]] = None) -> None:
    """Both model files exist and can be read. preset_paths() (asked only when a file is
    missing; config.preset_model_paths) says where the preset model.name keeps its files: a
    missing file elsewhere is the user's own, told to check its path, not the preset's source."""
    for key in ("prototxt", "weights"):
        p = getattr(model_cfg, key)
        if not p or not os.path.isfile(p):
            if p and os.path.isdir(p):
                raise ConfigError(f"model.{key} {p!r} is a folder: give the {key} file itself")
            own = preset_paths is not None and (preset_paths() or {}).get(key) != p
            if not p or own:
                raise ConfigError(f"model.{key} file not found: {p!r}: check the path (model.{key}=/path/to/file)")
            hint = f" Such files come from: {model_cfg.source}." if model_cfg.source else ""
            if model_cfg.get("files"):
                hint += f" Fetch them with: caffe-runner fetch {model_cfg.name}."
            raise ConfigError(f"model.{key} file not found: {p!r} (model={model_cfg.name}).{hint} "
                              f"Or point model.{key}=/path/to/file at your copy.")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"model.{key} {p!r} is not readable: fix its permissions")


def input_hw(model_cfg, spec: NetSpec) -> Tuple[int, int]:
    if model_cfg.input_size:
        h, w = (list(model_cfg.input_size) * 2)[:2]
        return int(h), int(w)
    if spec.input_shape and len(spec.input_shape) == 4:
        return int(spec.input_shape[2]), int(spec.input_shape[3])
    raise ConfigError(f"cannot tell the input size of {model_cfg.prototxt}: set model.input_size=[H,W]")


# What a CUDA build of Caffe logs, on a machine without a usable GPU, when it makes its per-thread
# context (cuBLAS handle, cuRAND generator): harmless in CPU mode, alarming to read, and raw
# writes to fd 2 that tear the local progress bar.
_CPU_MODE_NOISE = re.compile(r"Cannot create (Cublas handle|Curand generator)\.|Logging before InitGoogleLogging")


@contextlib.contextmanager
def _drop_cuda_noise_on_fd2():
    """Capture fd 2 (glog writes there from C++) around Caffe's context creation; hand every
    other line back to stderr."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to tear
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _CPU_MODE_NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def set_caffe_cpu_mode(caffe) -> None:
    """caffe.set_mode_cpu() without the CUDA build's harmless no-driver noise (the first Caffe
    call of a thread makes its context)."""
    with _drop_cuda_noise_on_fd2():
        caffe.set_mode_cpu()


# model.conv_batch_mb's default (runner/schema.py): the column buffer one CPU convolution may
# use to cover several images with one GEMM
CONV_BATCH_MB = 32


class CaffeEngine(Engine):
    def __init__(self, model_cfg, spec: NetSpec, blobs: Sequence[str], in_shape: Tuple[int, int, int],
                 device: str = "cpu", gpu_device: int = 0):
        os.environ.setdefault("GLOG_minloglevel", "2")
        import caffe

        if device == "gpu":
            from .gpu import require_cuda_device

            require_cuda_device()  # Caffe would abort the process (core dump) without a usable driver
            caffe.set_mode_gpu()
            caffe.set_device(gpu_device)
            self.device_desc = f"gpu:{gpu_device}"
            self.on_gpu = True
            self.gpu_device = gpu_device
            from .gpu import cuda_device_label

            self.gpu_label = cuda_device_label(gpu_device)
        else:
            set_caffe_cpu_mode(caffe)
            self.device_desc = "cpu"
        self.blobs = list(blobs)
        end = spec.end_layer(self.blobs)
        # the CPU convolution's batched GEMM (docker/pycaffe-convbatch.patch reads it per forward)
        os.environ["CAFFE_CONV_BATCH_MB"] = str(int(getattr(model_cfg, "conv_batch_mb", CONV_BATCH_MB)))
        text = truncated_prototxt(spec, end)
        if getattr(model_cfg, "fold_batchnorm", True):
            # looked up per load (the bench swaps fold.load_folded for one of its columns)
            self.net, self.folds = fold.load_folded(caffe, text, model_cfg.weights, self.blobs)
        else:
            self.net, self.folds = fold.net_from_text(caffe, text, model_cfg.weights), []
        self.input = self.net.inputs[0]
        self._reshape((1,) + tuple(in_shape))
        self.net.forward()
        self.blob_shapes = {b: tuple(self.net.blobs[b].data.shape[1:]) for b in self.blobs}

    def _reshape(self, shape):
        if tuple(self.net.blobs[self.input].data.shape) != tuple(shape):
            self.net.blobs[self.input].reshape(*shape)
            self.net.reshape()

    def forward(self, x):
        self._reshape(x.shape)
        self.net.blobs[self.input].data[...] = x
        self.net.forward()
        return {b: self.net.blobs[b].data.copy() for b in self.blobs}

    def attrs(self) -> Dict[str, object]:
        return {"engine": "caffe"}

    def forward_cpu(self, x):
        """The same Net in CPU mode (a net made in GPU mode keeps its cuDNN layers; their CPU
        forward is Caffe's own), then back to the GPU."""
        if not self.on_gpu:
            return self.forward(x)
        import caffe

        set_caffe_cpu_mode(caffe)
        try:
            return self.forward(x)
        finally:
            caffe.set_mode_gpu()
            caffe.set_device(self.gpu_device)


# backend=auto/onnxruntime: the largest per-channel difference (channel_difference) over the
# checked images (the fidelity bound the tests hold Caffe's own paths to; measured 1.0e-6 on res10
# fc7, 5.6e-7 on open_nsfw pool with the per-blob metric)
ONNX_CHECK_TOLERANCE = 1e-5
# a channel whose largest |value| is below this fraction of its blob's largest is judged against
# that fraction instead: an all-zero channel of a ReLU net divides by no zero, and a channel of
# small values is held to the float32 noise of its blob's scale, which both engines' sums carry
# in every channel alike. Measured (random weights, noise and photo-like inputs, the per-blob
# metric 3e-7..1.1e-6): AlexNet fc7/fc8 and GoogLeNet inception_4e 4.4e-6 at 0.2, 8.6e-6 at 0.1,
# 6e-5 at 0.01; at 0.25 a channel's own error is held 4x tighter than the per-blob metric held
# it, with 2.5x left below the bound on the BVLC nets.
CHANNEL_FLOOR = 0.25
CHECK_METRIC = (f"max over channels of max |onnx - caffe| / max(max |caffe| of the channel, {CHANNEL_FLOOR:g} x "
                "max |caffe| of the blob)")
# the noise probe: random images over the whole pixel range, preprocessed as the run's, through
# both engines when the net loads (before any image): every border and every padded window of
# the net sees values a photo's dark borders would hide
PROBE_IMAGES = 2
PROBE_SEED = 20260401


def channel_difference(new: np.ndarray, ref: np.ndarray, floor: float = CHANNEL_FLOOR) -> float:
    """max over channels (axis 1) of max |new - ref| / max(max |ref| of that channel, floor x
    max |ref| of the whole blob); inf when the shapes differ, or new has NaN/inf where ref has
    not, or ref is all zeros where new is not. A blob without a channel axis: the whole blob."""
    new = np.asarray(new, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if new.shape != ref.shape:
        return float("inf")
    if not np.array_equal(np.isfinite(new), np.isfinite(ref)):
        return float("inf")
    fin = np.isfinite(ref)
    diff = np.where(fin, np.abs(new - ref), 0.0)
    mag = np.where(fin, np.abs(ref), 0.0)
    if ref.ndim < 2 or ref.size == 0:
        diff, mag = diff.reshape(1, 1, -1), mag.reshape(1, 1, -1)
    axes = tuple(i for i in range(diff.ndim) if i != 1)
    d, m = diff.max(axis=axes), mag.max(axis=axes)
    if not d.any():
        return 0.0
    scale = float(m.max())
    if scale == 0.0:
        return float("inf")
    return float(np.max(d / np.maximum(m, floor * scale)))


def probe_batch(transform, in_shape: Sequence[int], n: int = PROBE_IMAGES, seed: int = PROBE_SEED) -> np.ndarray:
    """n images of uniform noise over the whole pixel range, preprocessed by `transform` (the
    run's: preprocess.Transform, source pixels 0..transform.source_max); without one, the net's
    input uniform in [-128, 128)."""
    rng = np.random.default_rng(seed)
    c, h, w = (int(v) for v in in_shape)
    if transform is None:
        return rng.uniform(-128, 128, (n, c, h, w)).astype(np.float32)
    top = float(getattr(transform, "source_max", 255.0))
    return np.ascontiguousarray(transform(rng.uniform(0, top, (n, h, w, c)).astype(np.float32)), dtype=np.float32)


class OnnxCheckError(RunnerError):
    """backend=onnxruntime: a shard's first batch differs from Caffe's beyond the bound."""


class OnnxEngine(Engine):
    """The net Caffe loaded, run by ONNX Runtime on the CPU (runner/engine/onnxport.py), kept only
    while it is proven equal to Caffe, per channel, within ONNX_CHECK_TOLERANCE:
    - at load, before any image: every requested blob's shape is Caffe's, and a probe batch of
      noise (probe_batch) agrees; else NotConvertible (auto runs Caffe, onnxruntime refuses);
    - the first batch of every shard (start_shard): else the task goes on with Caffe (auto) or
      stops (onnxruntime). Either way it is recorded (attrs: engine_check_*).
    The rows' shapes (blob_shapes) are Caffe's, so a shard's datasets fit whichever engine
    computes them. Caffe's net is freed after each check and loaded again from the files for
    the next shard's (a read and parse of the weights per shard, ~1 s for AlexNet's 244 MB,
    rather than a second copy of the weights in memory for the task's life)."""

    def __init__(self, model_cfg, spec: NetSpec, blobs: Sequence[str], in_shape, threads: int = 1,
                 required: bool = False, transform=None):
        os.environ.setdefault("GLOG_minloglevel", "2")
        import caffe
        import onnxruntime

        from google.protobuf import text_format

        from .onnxport import session, to_onnx, unsupported

        set_caffe_cpu_mode(caffe)
        self.model_cfg, self.spec, self.in_shape, self.required = model_cfg, spec, tuple(in_shape), required
        self.blobs = list(blobs)
        self.device_desc = "cpu"
        param = truncated_param(spec, spec.end_layer(self.blobs))
        # Caffe reads, upgrades and checks the weights; the graph takes them from it
        self._text = text_format.MessageToString(param)
        net = fold.net_from_text(caffe, self._text, model_cfg.weights)
        net.blobs[net.inputs[0]].reshape(1, *self.in_shape)
        net.reshape()
        layers, state = list(param.layer), test_state(param)
        shapes = {b: tuple(v.data.shape) for b, v in net.blobs.items()}
        # the rows' shapes are Caffe's, whichever engine computes them
        self.blob_shapes = {b: shapes[b][1:] for b in self.blobs}
        why = unsupported(layers, shapes, state)
        if why:
            raise NotConvertible(why)
        params = {name: [np.array(b.data) for b in p] for name, p in net.params.items()}
        self._input = net.inputs[0]
        try:  # Caffe accepted the model: whatever fails from here is ONNX Runtime's
            model, self._outputs = to_onnx(layers, net.inputs[0], shapes[net.inputs[0]], params, shapes, self.blobs,
                                           state)
            del params
            self._session = session(model, threads)
            out = self._run(np.zeros((1,) + self.in_shape, np.float32))
        except Exception as e:  # noqa: BLE001 (any engine error: Caffe runs the net instead)
            raise NotConvertible([f"ONNX Runtime cannot run it: {type(e).__name__}: {str(e)[:300]}"]) from None
        wrong = [f"blob {b!r} is {list(v.shape[1:])} in ONNX Runtime, {list(self.blob_shapes[b])} in Caffe"
                 for b, v in out.items() if tuple(v.shape[1:]) != self.blob_shapes[b]]
        if wrong:
            raise NotConvertible(wrong)
        self._reference = net  # Caffe, until the first batch is checked
        self._fallback: Optional[Engine] = None
        self._pending = True
        self.engine = f"onnxruntime {onnxruntime.__version__}"
        self.check: Dict[str, object] = {}
        self.probe: Dict[str, object] = {}
        if PROBE_IMAGES > 0:
            try:
                x = probe_batch(transform, self.in_shape)
            except Exception as e:  # noqa: BLE001 (a transform this probe cannot feed: noise all the same)
                log.info("noise probe: the run's preprocessing cannot make it (%s): uniform noise instead", e)
                x = probe_batch(None, self.in_shape)
            chk = self._compare(x, self._run(x))
            self.probe = {"engine_check_probe_max_rel_diff": chk.max_rel_diff, "engine_check_probe_blob": chk.blob,
                          "engine_check_probe_images": chk.images, "engine_check_probe_seed": PROBE_SEED}
            if not chk.passed:
                raise NotConvertible([f"ONNX Runtime differs from Caffe on {chk.images} images of random noise (the "
                                      f"load's probe): {chk.max_rel_diff:.3g} on blob {chk.blob!r} ({CHECK_METRIC}), "
                                      f"above {ONNX_CHECK_TOLERANCE:g}"])

    def _run(self, x):
        outs = self._session.run(self._outputs, {self._input: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.blobs, outs))

    def _compare(self, x, out):
        """The first images of x through Caffe (the reference), against `out` (ONNX Runtime's
        rows of x): a selfcheck.SelfCheck under the per-channel metric."""
        import caffe

        from .selfcheck import SELFCHECK_IMAGES, check_verdict

        if self._reference is None:  # a later shard's check: Caffe's net from the files again
            self._reference = fold.net_from_text(caffe, self._text, self.model_cfg.weights)
        net = self._reference
        n = min(len(x), SELFCHECK_IMAGES)
        t0 = time.process_time()
        if tuple(net.blobs[self._input].data.shape) != (n,) + self.in_shape:
            net.blobs[self._input].reshape(n, *self.in_shape)
            net.reshape()
        net.blobs[self._input].data[...] = x[:n]
        net.forward()
        per = {b: channel_difference(out[b][:n], net.blobs[b].data) for b in self.blobs}
        return check_verdict(per, ONNX_CHECK_TOLERANCE, n, time.process_time() - t0)

    def start_shard(self) -> None:
        """A shard begins: its first batch is checked against Caffe."""
        self._pending = self._fallback is None

    def forward(self, x):
        if self._fallback is not None:
            return self._fallback.forward(x)
        out = self._run(x)
        if self._pending:
            out = self._check(x, out)
        return out

    def _check(self, x, out):
        self._pending = False
        chk = self._compare(x, out)
        self._reference = None  # its memory goes back before the run goes on
        # the GPU self-check's record, under this check's own names
        self.check = {k.replace("selfcheck_", "engine_check_"): v for k, v in chk.attrs().items()}
        self.check["engine_check_metric"] = CHECK_METRIC
        if chk.passed:
            return out
        diff, worst, n = chk.max_rel_diff, chk.blob, chk.images
        line = (f"ONNX Runtime's first {n} images differ from Caffe's: {diff:.3g} on blob {worst!r} "
                f"({CHECK_METRIC}), above {ONNX_CHECK_TOLERANCE:g}")
        if self.required:
            raise OnnxCheckError(f"{line}: no row was written; run with backend=caffe (or backend=auto, which "
                                 "goes on with Caffe after such a difference)")
        log.warning("%s: this task goes on with Caffe (backend=auto)", line)
        self.engine = f"caffe (onnxruntime differed by {diff:.3g})"
        self._fallback = CaffeEngine(self.model_cfg, self.spec, self.blobs, self.in_shape)
        return self._fallback.forward(x)

    def attrs(self) -> Dict[str, object]:
        return {"engine": self.engine, **self.probe, **self.check}


class NotConvertible(Exception):
    """The net holds a layer that does not map exactly onto ONNX (the reasons, one per layer)."""

    def __init__(self, reasons: List[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class OpenCVEngine(Engine):
    """The same prototxt and caffemodel through OpenCV DNN (CPU)."""

    def __init__(self, model_cfg, spec: NetSpec, blobs: Sequence[str], in_shape, threads: int = 1):
        import cv2

        cv2.setNumThreads(max(1, threads))
        self.blobs = list(blobs)
        end = spec.end_layer(self.blobs)
        text = truncated_prototxt(spec, end).encode()
        with open(model_cfg.weights, "rb") as f:
            weights = f.read()
        self.net = cv2.dnn.readNetFromCaffe(np.frombuffer(text, np.uint8), np.frombuffer(weights, np.uint8))
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        # OpenCV names outputs by layer; a blob is read at its last producer
        self.layer_of = {b: spec.layers[spec.producer(b)].name for b in self.blobs}
        self.device_desc = "cpu"
        self.engine = f"opencv {cv2.__version__}"
        out = self.forward(np.zeros((1,) + tuple(in_shape), np.float32))
        self.blob_shapes = {b: tuple(v.shape[1:]) for b, v in out.items()}

    def attrs(self) -> Dict[str, object]:
        return {"engine": self.engine}

    def forward(self, x):
        self.net.setInput(np.ascontiguousarray(x, dtype=np.float32))
        names = [self.layer_of[b] for b in self.blobs]
        outs = self.net.forward(names)
        return {b: np.array(o, dtype=np.float32, copy=True) for b, o in zip(self.blobs, outs)}


def load_engine(cfg, spec: NetSpec, blobs: Sequence[str], in_shape, threads: int, gpu_device: int = 0,
                transform=None) -> Engine:
    """transform: the run's preprocessing (the ONNX engine's noise probe is preprocessed by it)."""
    backend = cfg.backend
    if backend == "auto" and cfg.device == "cpu":
        return _onnx_or_caffe(cfg, spec, blobs, in_shape, threads, transform)
    if backend in ("caffe", "auto"):
        return CaffeEngine(cfg.model, spec, blobs, in_shape, cfg.device, gpu_device)
    if backend in CPU_ONLY and cfg.device != "cpu":
        raise ConfigError(f"backend={backend} runs on the CPU only: set device=cpu (or backend=caffe)")
    if backend == "onnxruntime":
        try:
            return OnnxEngine(cfg.model, spec, blobs, in_shape, threads, required=True, transform=transform)
        except NotConvertible as e:
            raise ConfigError(f"backend=onnxruntime: the net does not convert exactly ({e}): use backend=auto "
                              "(Caffe runs such a net) or backend=caffe") from None
    if backend == "opencv":
        return OpenCVEngine(cfg.model, spec, blobs, in_shape, threads)
    if backend == "simulated":
        # unequal nodes for benchmarks and tests, read at this edge from the node's environment:
        # a slow factor, and a gate file for this host only (a hung device on one node)
        host = socket.gethostname()
        factor = host_value(os.environ.get("CAFFE_RUNNER_SIM_SLOW_HOSTS", ""), host)
        gate = host_value(os.environ.get("CAFFE_RUNNER_SIM_HANG_HOSTS", ""), host) or cfg.get("simulated_gate")
        return SimulatedEngine(blobs, in_shape, cfg.simulated_batch_s * float(factor or 1), cfg.device, gpu_device,
                               gate)
    raise ConfigError(f"backend={backend!r} is not one of auto, caffe, onnxruntime, opencv, simulated")


def _onnx_or_caffe(cfg, spec: NetSpec, blobs: Sequence[str], in_shape, threads: int, transform=None) -> Engine:
    """backend=auto on the CPU: ONNX Runtime when the net converts (and, per task, its first
    batch matches Caffe's: OnnxEngine), else Caffe, saying why once."""
    why = ""
    try:
        return OnnxEngine(cfg.model, spec, blobs, in_shape, threads, transform=transform)
    except NotConvertible as e:
        why = f"the net does not convert exactly ({e})"
    except ImportError as e:  # an environment without the wheel (e.g. an older image)
        why = f"onnxruntime is not importable here ({e})"
    log.info("backend=auto: Caffe computes this task: %s", why)
    return CaffeEngine(cfg.model, spec, blobs, in_shape, cfg.device)
