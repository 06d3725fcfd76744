"""What this machine's Caffe and GPUs can do, asked without letting Caffe abort the process.

A CPU-only pycaffe aborts (glog FATAL) on set_mode_gpu + forward, and a CUDA pycaffe aborts
(`Check failed: error == cudaSuccess (35 vs. 0)`, core dump) on set_mode_gpu when no usable
driver is there: every question here is answered by looking at files or through cheap probes,
before Caffe is asked for a GPU.

cuda_probe() asks the CUDA runtime Caffe itself links (the libcudart that _caffe.so loads
through its rpath, not whichever one ldconfig knows) for the driver version and the device
count through ctypes. It runs in a short child process: the CUDA runtime never initialises in
the launcher (workers are spawned, but a parent holding a CUDA context is still a hazard),
and whatever happens there cannot take the caller down.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import ConfigError

# cudaError_t values the probe explains (cuda_runtime_api.h)
CUDA_SUCCESS = 0
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
# the NVIDIA driver branch that first supports CUDA 13 (the pinned toolchain of build-pycaffe.sh --cuda)
MIN_DRIVER_CUDA13 = 580


def caffe_so_path() -> Optional[str]:
    """The installed caffe/_caffe.so, found without importing caffe."""
    spec = importlib.util.find_spec("caffe._caffe")
    return spec.origin if spec is not None and spec.origin else None


def caffe_has_gpu() -> bool:
    """Whether the installed _caffe.so was built with CUDA (it links the CUDA runtime)."""
    so = caffe_so_path()
    if so is None:
        return False
    with open(so, "rb") as f:
        data = f.read()
    return b"libcudart" in data or b"cudaGetDevice" in data


def caffe_has_cudnn() -> bool:
    """Whether the installed _caffe.so was built with cuDNN (it needs libcudnn.so.N)."""
    return _needed_soname(caffe_so_path(), rb"libcudnn\.so(\.[0-9]+)*") is not None


def require_gpu_caffe() -> None:
    if not caffe_has_gpu():
        raise ConfigError("device=gpu but this pycaffe is CPU-only (built by docker/build-pycaffe.sh): use "
                          "device=cpu, or install the CUDA build (`make setup CAFFE=gpu`, or the image "
                          "docker/Dockerfile.gpu) on a GPU machine")


@dataclass(frozen=True)
class CudaProbe:
    # cudaGetDeviceCount's cudaError_t; -1: the runtime could not be asked at all
    code: int
    # cudaGetErrorString(code), or why the runtime could not be loaded
    message: str
    # devices visible to this process (after CUDA_VISIBLE_DEVICES)
    devices: int = 0
    # cudaDriverGetVersion: the CUDA version the driver supports (13000 = 13.0); 0: no driver
    driver_cuda: int = 0
    # cudaRuntimeGetVersion: the CUDA version Caffe was built with (13000 = 13.0)
    runtime_cuda: int = 0
    # whether libcuda.so.1 (the driver's user-space library) can be loaded here
    driver_lib: bool = False
    # the libcudart file that was asked (the one _caffe.so loads)
    library: str = ""
    # cudnnGetVersion() of the libcudnn _caffe.so loads (92400 = 9.24.0); 0: no cuDNN in this build
    cudnn_version: int = 0
    # that libcudnn file, or why it could not be loaded
    cudnn_library: str = ""

    @property
    def usable(self) -> bool:
        return self.code == CUDA_SUCCESS and self.devices > 0


# Runs in the child: load _caffe.so as Python would (its rpath decides which libcudart comes
# with it), then take that same already-loaded libcudart by its soname and ask it.
_PROBE_CHILD = r"""
import ctypes, json, sys
so, soname, cudnn = sys.argv[1], sys.argv[2], sys.argv[3]
out = {"code": -1, "message": "", "devices": 0, "driver_cuda": 0, "runtime_cuda": 0,
       "driver_lib": False, "library": "", "cudnn_version": 0, "cudnn_library": ""}
try:
    ctypes.CDLL("libcuda.so.1")
    out["driver_lib"] = True
except OSError:
    pass
try:
    ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
    rt = ctypes.CDLL(soname)
except OSError as e:
    out["message"] = str(e)
    print(json.dumps(out)); sys.exit(0)
def mapped(name):
    for line in open("/proc/self/maps"):
        if name.split(".so")[0] + ".so" in line and "/" in line:
            return line.split(None, 5)[-1].strip()
    return ""
out["library"] = mapped(soname)
if cudnn:  # the libcudnn _caffe.so resolved (already loaded: its rpath decided); needs no GPU
    try:
        dnn = ctypes.CDLL(cudnn)
        dnn.cudnnGetVersion.restype = ctypes.c_size_t
        out["cudnn_version"] = int(dnn.cudnnGetVersion())
        out["cudnn_library"] = mapped(cudnn)
    except (OSError, AttributeError) as e:
        out["cudnn_library"] = "cannot load: %s" % e
v = ctypes.c_int(0)
if rt.cudaDriverGetVersion(ctypes.byref(v)) == 0:
    out["driver_cuda"] = v.value
v = ctypes.c_int(0)
if rt.cudaRuntimeGetVersion(ctypes.byref(v)) == 0:
    out["runtime_cuda"] = v.value
n = ctypes.c_int(0)
code = rt.cudaGetDeviceCount(ctypes.byref(n))
rt.cudaGetErrorString.restype = ctypes.c_char_p
out.update(code=code, devices=n.value if code == 0 else 0,
           message=(rt.cudaGetErrorString(code) or b"").decode(errors="replace"))
print(json.dumps(out))
"""


def _needed_soname(so: Optional[str], pattern: bytes) -> Optional[str]:
    import re

    if so is None:
        return None
    with open(so, "rb") as f:
        m = re.search(pattern, f.read())
    return m.group(0).decode() if m else None


def _cudart_soname(so: str) -> Optional[str]:
    """The libcudart soname _caffe.so needs (libcudart.so.13 for the CUDA 13 build)."""
    return _needed_soname(so, rb"libcudart\.so(\.[0-9]+)*")


@functools.lru_cache(maxsize=None)
def cuda_probe(timeout_s: float = 60.0) -> CudaProbe:
    """Ask the CUDA runtime Caffe links for the driver and the visible devices. Never raises,
    never aborts the caller; cached per process (devices do not come and go during a run)."""
    so = caffe_so_path()
    if so is None:
        return CudaProbe(-1, "pycaffe is not installed (no caffe._caffe module)")
    soname = _cudart_soname(so)
    if soname is None:
        return CudaProbe(-1, "this pycaffe is CPU-only (its _caffe.so does not link libcudart)")
    try:
        cudnn = _needed_soname(so, rb"libcudnn\.so(\.[0-9]+)*") or ""
        p = subprocess.run([sys.executable, "-I", "-c", _PROBE_CHILD, so, soname, cudnn], capture_output=True,
                           text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CudaProbe(-1, f"the CUDA runtime did not answer within {timeout_s:.0f} s (a hung driver?)")
    try:
        return CudaProbe(**json.loads(p.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return CudaProbe(-1, f"the CUDA probe failed: {why}")


def _ver(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def explain_probe(p: CudaProbe, host: str, visible: Optional[str]) -> Optional[str]:
    """Why device=gpu cannot run here, with what to do; None when it can. Pure: table-tested."""
    if p.usable:
        return None
    fix = "run on a GPU node (launcher=slurm with a GPU partition) or use device=cpu"
    seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    if p.code == -1:
        return f"device=gpu but the CUDA runtime of this pycaffe cannot be asked on {host}: {p.message}; " \
               "reinstall the CUDA build (`make setup CAFFE=gpu`) or use device=cpu"
    if not p.driver_lib or (p.code == CUDA_ERROR_INSUFFICIENT_DRIVER and p.driver_cuda == 0):
        return f"device=gpu but {host} has no NVIDIA driver (libcuda.so.1 not found; CUDA said: {p.message}): {fix}"
    if p.code == CUDA_ERROR_INSUFFICIENT_DRIVER or (p.runtime_cuda and p.driver_cuda < p.runtime_cuda):
        need = _ver(p.runtime_cuda) if p.runtime_cuda else "this runtime"
        drv = f" >= {MIN_DRIVER_CUDA13}" if p.runtime_cuda >= 13000 else " for it"
        return (f"device=gpu but the NVIDIA driver on {host} supports CUDA {_ver(p.driver_cuda)} and this pycaffe "
                f"needs CUDA {need} (a driver{drv}; CUDA said: {p.message}): update the driver, or rebuild pycaffe "
                "against the site's CUDA (docker/build-pycaffe.sh --cuda --cuda-home $CUDA_HOME), or use device=cpu")
    if p.code in (CUDA_SUCCESS, CUDA_ERROR_NO_DEVICE):
        return (f"device=gpu but no GPU is visible on {host} ({seen}; CUDA said: "
                f"{p.message if p.code else 'no devices'}): check CUDA_VISIBLE_DEVICES and `nvidia-smi`, "
                f"or {fix}")
    return f"device=gpu but CUDA cannot use the GPUs on {host} ({seen}; CUDA error {p.code}: {p.message}): " \
           f"check `nvidia-smi`, or {fix}"


def require_cuda_device() -> CudaProbe:
    """device=gpu: a CUDA pycaffe and a usable driver and device here, or one ConfigError saying
    which is missing and what to do. Called by the local launcher at plan time and by each
    task before Caffe touches the GPU (a Slurm login node need not have a GPU)."""
    require_gpu_caffe()
    p = cuda_probe()
    why = explain_probe(p, socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if why:
        raise ConfigError(why)
    return p


# ---- GPU numerics and cuDNN: what a task sets, and what runs ---------------------------

def gpu_numerics_env(tf32: bool, cudnn_workspace_mb: int) -> Dict[str, Optional[str]]:
    """The environment a GPU task runs with (None: unset). NVIDIA_TF32_OVERRIDE=0 makes cuDNN
    and cuBLAS compute FP32 in full FP32 on Ampere and newer; CAFFE_CUDNN_WORKSPACE_MB bounds
    each cuDNN convolution layer's workspace (docker/pycaffe-cudnn9.patch)."""
    return {"NVIDIA_TF32_OVERRIDE": None if tf32 else "0",
            "CAFFE_CUDNN_WORKSPACE_MB": str(int(cudnn_workspace_mb))}


def apply_gpu_numerics(model_cfg) -> Dict[str, object]:
    """Set gpu_numerics_env in this process; must run before Caffe loads here (cuBLAS and cuDNN
    read NVIDIA_TF32_OVERRIDE once). Returns what a shard records."""
    tf32 = bool(model_cfg.get("tf32", False))
    mb = int(model_cfg.get("cudnn_workspace_mb", 64))
    for k, v in gpu_numerics_env(tf32, mb).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return {"tf32": tf32, "cudnn_workspace_mb": mb}


# ConvolutionParameter.Engine (caffe.proto)
_CONV_ENGINE_CUDNN = (0, 2)  # DEFAULT, CUDNN


def cudnn_conv_layers(layers) -> Tuple[int, int]:
    """(convolution layers that run on cuDNN in GPU mode, all convolution layers) among
    LayerParameters, by Caffe's own rule (layer_factory.cpp): engine DEFAULT or CUDNN, not dilated."""
    n_conv = n_cudnn = 0
    for lp in layers:
        if lp.type != "Convolution":
            continue
        n_conv += 1
        cp = lp.convolution_param
        if cp.engine in _CONV_ENGINE_CUDNN and not any(d > 1 for d in cp.dilation):
            n_cudnn += 1
    return n_cudnn, n_conv


def _cudnn_ver(v: int) -> str:
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def describe_cudnn(device: str, has_cudnn: bool, cudnn_version: int, n_cudnn: int, n_conv: int) -> str:
    """Whether the net's convolutions run on cuDNN, in one phrase. Pure: table-tested."""
    if device != "gpu":
        return f"no cuDNN: device={device} (Caffe's CPU code)"
    if not has_cudnn:
        return ("no cuDNN: this pycaffe was built without it (Caffe's im2col + cuBLAS convolutions; "
                "`make setup CAFFE=gpu` builds with cuDNN 9)")
    ver = f"cuDNN {_cudnn_ver(cudnn_version)}" if cudnn_version else "cuDNN (version unknown: libcudnn not loadable)"
    if n_conv == 0:
        return f"{ver} (the net has no convolution layers)"
    if n_cudnn == 0:
        return f"{ver} built in, but no convolution layer picks it (engine: CAFFE or dilated): Caffe's own path"
    return f"{ver} for {n_cudnn} of {n_conv} convolution layers"


def cudnn_summary(layers, device: str) -> str:
    """describe_cudnn for this machine's pycaffe (`caffe-runner inspect`): device=auto is
    described as it would run on a GPU."""
    if device != "cpu" and not caffe_has_gpu():
        return f"device={device}: this pycaffe is CPU-only, so the CPU (no cuDNN)"
    has = caffe_has_cudnn()
    n_cudnn, n_conv = cudnn_conv_layers(layers)
    text = describe_cudnn("cpu" if device == "cpu" else "gpu", has, cuda_probe().cudnn_version if has else 0,
                          n_cudnn, n_conv)
    return f"{text} (device=auto, on a GPU)" if device == "auto" else text


def cuda_device_label(index: int) -> str:
    """'NVIDIA H100 80GB HBM3 (device 0, CUDA_VISIBLE_DEVICES=3)', asked through the libcudart
    Caffe loaded (call only where CUDA is usable: after the probe said so)."""
    import ctypes

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"device {index}" + (f", CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
    name = "GPU"
    try:
        soname = _cudart_soname(caffe_so_path() or "")
        rt = ctypes.CDLL(soname)
        buf = ctypes.create_string_buffer(4096)  # cudaDeviceProp: the name is its first 256 bytes
        if rt.cudaGetDeviceProperties(buf, ctypes.c_int(index)) == 0:
            name = buf.raw[:256].split(b"\0", 1)[0].decode(errors="replace") or name
    except (OSError, AttributeError, TypeError):
        pass
    return f"{name} ({where})"


# ---- What GPU code a library holds (no cuobjdump needed) -------------------------------

_FATBIN_MAGIC = 0xBA55ED50
_EM_CUDA = 190


@dataclass(frozen=True)
class FatBinary:
    # SM versions with machine code (cubins), e.g. [75, 80, 90]
    sm: tuple
    # virtual architectures with PTX (JIT-compiled by the driver on newer GPUs)
    ptx: tuple


def _elf_section(data: bytes, wanted: bytes) -> Optional[bytes]:
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = secs[shstrndx][4]
    for name, _type, _flags, _addr, off, size in secs:
        if data[names + name:data.index(b"\0", names + name)] == wanted:
            return data[off:off + size]
    return None


def fatbin_archs(path: str) -> FatBinary:
    """The GPU architectures a shared library carries, read from its .nv_fatbin section: each
    fat binary container (magic 0xBA55ED50) lists entries of kind 1 (PTX) or 2 (cubin) with
    their SM in the entry header; an uncompressed cubin is an ELF file with e_machine 190
    (EM_CUDA) whose e_flags bits 8-15 repeat the SM, which is checked too."""
    import struct

    with open(path, "rb") as f:
        data = f.read()
    fb = _elf_section(data, b".nv_fatbin")
    sm, ptx = set(), set()
    if fb is None:
        return FatBinary((), ())
    pos = 0
    while pos + 16 <= len(fb):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", fb, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned, with padding between them
            continue
        e, end = pos + hsize, pos + hsize + fsize
        while e + 32 <= end:
            kind, _unk, ehsize, psize = struct.unpack_from("<HHIQ", fb, e)
            arch, = struct.unpack_from("<I", fb, e + 28)
            payload = fb[e + ehsize:e + ehsize + 0x34]
            if kind == 2:
                if payload[:4] == b"\x7fELF":
                    machine, = struct.unpack_from("<H", payload, 0x12)
                    flags, = struct.unpack_from("<I", payload, 0x30)
                    if machine != _EM_CUDA or (flags >> 8) & 0xFF != arch:
                        raise ValueError(f"{path}: a cubin's ELF header (machine {machine}, sm "
                                         f"{(flags >> 8) & 0xFF}) disagrees with its fat binary entry (sm {arch})")
                sm.add(arch)
            elif kind == 1:
                ptx.add(arch)
            if ehsize == 0:
                break
            e += ehsize + psize
        pos = (max(end, pos + 8) + 7) & ~7
    return FatBinary(tuple(sorted(sm)), tuple(sorted(ptx)))


if __name__ == "__main__":  # python -m runner.engine.gpu: what the probe sees here
    _p = cuda_probe()
    print(json.dumps(dict(_p.__dict__, caffe_has_gpu=caffe_has_gpu(), caffe_has_cudnn=caffe_has_cudnn(),
                          cudnn=_cudnn_ver(_p.cudnn_version) if _p.cudnn_version else None, so=caffe_so_path()),
                     indent=1))
