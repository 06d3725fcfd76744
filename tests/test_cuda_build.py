"""The CUDA build of pycaffe, checked on a machine without a GPU (make test-cuda-build).

The CUDA wheel is installed in its own venv (CAFFE_RUNNER_GPU_VENV, default .venv-gpu);
these tests run from the CPU venv and drive that one through subprocesses, so each side has
its own real pycaffe: the fat binary holds every architecture the build asked for, every
CUDA library resolves inside the venv (not the machine's partial /usr/local/cuda runtime that
ldconfig knows), CPU-mode features equal the CPU build's, and device=gpu without a driver is
one clear error, never a Caffe check failure or a core dump.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, run_cli
from runner.engine.gpu import caffe_has_gpu, fatbin_archs

pytestmark = pytest.mark.cuda_build

GPU_VENV = Path(os.environ.get("CAFFE_RUNNER_GPU_VENV", REPO / ".venv-gpu"))
CUDA_LIBS = ("libcudart", "libcublas", "libcublasLt", "libcurand")


def _clean_env(**extra):
    """No LD_LIBRARY_PATH, no CUDA_HOME: the wheel must find its libraries by itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH")}
    env.update(GLOG_minloglevel="2", **extra)
    return env


def _gpu_py(code: str, check=True):
    p = subprocess.run([str(GPU_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
                       env=_clean_env(), cwd=REPO, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def gpu_caffe():
    """(the CUDA _caffe.so, its site-packages, the build's cuda_build.json) in GPU_VENV."""
    if not (GPU_VENV / "bin" / "python").exists():
        pytest.skip(f"no CUDA build venv at {GPU_VENV}: `make test-cuda-build` makes it")
    p = _gpu_py("import importlib.util, sysconfig; print(importlib.util.find_spec('caffe._caffe').origin); "
                "print(sysconfig.get_paths()['purelib'])")
    so, site = p.stdout.split()
    info = Path(so).with_name("cuda_build.json")
    assert info.is_file(), f"{so} has no cuda_build.json beside it: not a build-pycaffe.sh --cuda wheel"
    return Path(so), Path(site), json.loads(info.read_text())


def test_this_venv_is_the_cpu_build():
    """The comparisons below need a CPU build here, the CUDA one there."""
    assert not caffe_has_gpu(), "run these from the CPU venv (make test-cuda-build does)"


def test_fat_binary_holds_every_requested_architecture(gpu_caffe):
    so, _, info = gpu_caffe
    fat = fatbin_archs(str(so))
    assert info["sm"], info
    missing = [a for a in info["sm"] if a not in fat.sm]
    assert not missing, f"requested sm_{missing} not in {so}: cubins {fat.sm}"
    assert set(info["ptx"]) <= set(fat.ptx), (info["ptx"], fat.ptx)
    assert max(info["ptx"]) == max(info["sm"]), "PTX for the newest architecture, so newer GPUs JIT-compile it"


def test_cuda_libraries_resolve_inside_the_venv(gpu_caffe):
    so, site, _ = gpu_caffe
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, env=_clean_env(), check=True).stdout
    assert "not found" not in ldd, ldd
    resolved = dict(re.findall(r"^\s*(lib[\w.+-]+?)\.so\S*\s+=>\s+(\S+)", ldd, re.M))
    for lib in CUDA_LIBS:
        assert lib in resolved, f"{lib} not linked by {so}:\n{ldd}"
        path = Path(resolved[lib]).resolve()
        assert str(path).startswith(str(site.resolve())), f"{lib} resolves to {path}, outside {site}"


def test_every_nvidia_wheel_in_the_venv_is_pinned_by_the_caffe_wheel(gpu_caffe):
    """Pinned runtime, nothing newer slipped in through a dependency (cuBLAS requires NVRTC
    without a version: unpinned, pip takes a newer CUDA minor than the 13.0 runtime)."""
    _, _, info = gpu_caffe
    if not info["toolkit"].startswith("pinned wheels"):
        pytest.skip(f"built against a site toolkit ({info['toolkit']}): no runtime wheels")
    p = _gpu_py("import json, importlib.metadata as m\n"
                "print(json.dumps({'requires': m.requires('caffe'), 'nvidia': {d.metadata['Name']: d.version "
                "for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')}}))")
    got = json.loads(p.stdout)
    pins = dict(r.split("==") for r in got["requires"] if "==" in r)
    assert got["nvidia"], "no nvidia runtime wheels installed beside the CUDA build"
    unpinned = {n: v for n, v in got["nvidia"].items() if pins.get(n) != v}
    assert not unpinned, f"installed but not pinned (at this version) by the caffe wheel: {unpinned}; pins {pins}"


def test_import_without_ld_library_path_loads_the_wheels_runtime(gpu_caffe):
    """`import caffe` in the venv with no environment help, and the libcudart in the process
    is the venv's, not the machine's /usr/local/cuda one that ldconfig lists."""
    _, site, _ = gpu_caffe
    p = _gpu_py("import caffe; caffe.set_mode_cpu()\n"
                "print([l.split()[-1] for l in open('/proc/self/maps') if 'libcudart' in l][0])")
    assert Path(p.stdout.split()[-1]).resolve().is_relative_to(site.resolve()), p.stdout


def test_the_probe_asks_the_venvs_runtime(gpu_caffe):
    _, site, _ = gpu_caffe
    p = json.loads(_gpu_py("import json; from runner.engine.gpu import cuda_probe; print(json.dumps(cuda_probe().__dict__))")
                   .stdout)
    assert p["runtime_cuda"] >= 11000 and p["code"] != -1, p
    assert Path(p["library"]).resolve().is_relative_to(site.resolve()), p


# ---- cuDNN (issue 18) -----------------------------------------------------------------------

def _needs_cudnn(info):
    if not info.get("cudnn"):
        pytest.skip("this CUDA build has no cuDNN (--no-cudnn)")


def test_cudnn_is_needed_by_soname_and_resolves_inside_the_venv(gpu_caffe):
    so, site, info = gpu_caffe
    _needs_cudnn(info)
    major = info["cudnn"].split(".")[0]
    dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", dyn)
    assert f"libcudnn.so.{major}" in needed and "libcudnn.so" not in needed, needed
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, env=_clean_env(), check=True).stdout
    m = re.search(rf"libcudnn\.so\.{major}\s+=>\s+(\S+)", ldd)
    assert m, ldd
    assert Path(m.group(1)).resolve().is_relative_to(site.resolve()), f"libcudnn resolves to {m.group(1)}"


def test_the_conv_layer_calls_the_ranked_lists_not_the_removed_queries(gpu_caffe):
    so, _, info = gpu_caffe
    _needs_cudnn(info)
    # symbols carry their version: cudnnGetConvolutionForwardAlgorithm_v7@libcudnn.so.9
    und = {w.split("@")[0] for w in subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                                                   text=True, check=True).stdout.split()}
    for d in ("Forward", "BackwardFilter", "BackwardData"):
        assert f"cudnnGetConvolution{d}Algorithm_v7" in und and f"cudnnGetConvolution{d}AlgorithmMaxCount" in und
        assert f"cudnnGetConvolution{d}Algorithm" not in und, f"{so} calls the removed cudnnGetConvolution{d}Algorithm"
    assert "cudnnConvolutionForward" in und


def test_python_m_runner_gpu_reports_the_cudnn_the_wheel_loads(gpu_caffe):
    """cudnnGetVersion() of the libcudnn _caffe.so resolves, asked without a GPU."""
    _, site, info = gpu_caffe
    _needs_cudnn(info)
    p = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner.engine.gpu"], capture_output=True, text=True,
                       env=_clean_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert out["caffe_has_cudnn"] and out["cudnn"] == info["cudnn"], out
    assert Path(out["cudnn_library"]).resolve().is_relative_to(site.resolve()), out


def test_inspect_says_the_convolutions_run_on_cudnn(gpu_caffe):
    _, _, info = gpu_caffe
    _needs_cudnn(info)
    env = _clean_env()
    gpu = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner", "inspect", "device=gpu"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    assert f"convolutions: cuDNN {info['cudnn']} for 11 of 12 convolution layers" in gpu.stdout, gpu.stdout[-800:]
    cpu = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner", "inspect", "device=cpu"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert "convolutions: no cuDNN: device=cpu" in cpu.stdout, cpu.stdout[-800:]


@pytest.mark.slow
def test_cpu_mode_features_equal_the_cpu_build(gpu_caffe, photos, tmp_path):
    """res10 fc7 on the sample photos, once with each build, in CPU mode (with cuDNN built in, a
    net made in CPU mode must hold no cuDNN layer: they create CUDA streams, which abort here)."""
    cpu_run, gpu_run = tmp_path / "cpu", tmp_path / "gpu"
    args = [f"input.dir={photos}", "device=cpu", "launcher.workers=1", "num_shards=1", "batch_size=8"]
    run_cli(*args, f"output.dir={cpu_run}")
    p = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner", *args, f"output.dir={gpu_run}"],
                       capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    # the CUDA build's context logs cuBLAS/cuRAND errors without a driver: harmless in CPU mode,
    # so they must not reach the user (they also tear the progress bar)
    assert "Cannot create" not in p.stderr and "InitGoogleLogging" not in p.stderr, p.stderr[-3000:]
    with h5py.File(cpu_run / "features.h5") as a, h5py.File(gpu_run / "features.h5") as b:
        assert list(a["names"][:]) == list(b["names"][:]) and len(a["names"]) >= 10
        fa, fb = a["feats"][:].astype(np.float64), b["feats"][:].astype(np.float64)
    rel = np.abs(fa - fb).max() / np.abs(fa).max()
    assert fa.shape == fb.shape and rel <= 1e-5, rel


def test_inspect_with_the_cuda_build_prints_no_caffe_noise(gpu_caffe):
    p = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner", "inspect"], capture_output=True,
                       text=True, env=_clean_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0 and "fc7" in p.stdout, p.stderr[-3000:]
    assert "Cannot create" not in p.stderr and "InitGoogleLogging" not in p.stderr, p.stderr


def test_device_gpu_without_a_driver_is_one_clear_error(gpu_caffe, photos, tmp_path):
    """The real CUDA wheel and the real probe on this driverless machine: exit 2 with one line
    naming what is missing and what to do, before any work (no shard, no Caffe abort)."""
    probe = json.loads(_gpu_py("import json; from runner.engine.gpu import cuda_probe; print(json.dumps(cuda_probe().__dict__))")
                       .stdout)
    if probe["driver_lib"]:
        pytest.skip(f"this machine has an NVIDIA driver (probe: {probe})")
    run = tmp_path / "run"
    p = subprocess.run([str(GPU_VENV / "bin" / "python"), "-m", "runner", f"input.dir={photos}",
                        f"output.dir={run}", "device=gpu", "launcher.gpus=[0]"],
                       capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    errors = [l for l in p.stderr.splitlines() if l.startswith("caffe-runner: error:")]
    assert len(errors) == 1, p.stderr
    assert "has no NVIDIA driver" in errors[0] and "device=cpu" in errors[0], errors[0]
    assert "Traceback" not in p.stderr and "Check failed" not in p.stderr
    assert not (run / "shards").exists() or not any((run / "shards").iterdir())


@pytest.fixture(scope="module")
def patched_sdist(tmp_path_factory):
    """The sdist with docker/pycaffe-cudnn9.patch applied, its caffe.proto compiled, and the
    cached CUDA/cuDNN headers and cuDNN library (what build-pycaffe.sh --cuda installed):
    g++ flags for a test program built against the patched sources."""
    import glob
    import shutil
    import tarfile

    cache = Path(os.environ.get("CAFFE_RUNNER_CACHE", Path.home() / ".cache" / "caffe-runner"))
    sdists = glob.glob(str(cache / "sdist" / "brocolli-caffe-*.tar.gz")) + \
        glob.glob(str(cache / "pycaffe" / "sdist" / "brocolli-caffe-*.tar.gz"))
    cuda = glob.glob(str(cache / "cuda-toolkit" / "*" / "nvidia" / "cu13" / "include" / "cuda_runtime.h"))
    cudnn = glob.glob(str(cache / "cuda-toolkit" / "cudnn-*" / "nvidia" / "cudnn" / "include" / "cudnn.h"))
    if not (sdists and cuda and cudnn and shutil.which("g++") and shutil.which("protoc")):
        pytest.skip(f"needs the cached sdist, CUDA and cuDNN headers under {cache} (build-pycaffe.sh --cuda)")
    d = tmp_path_factory.mktemp("patched")
    with tarfile.open(sdists[0]) as t:
        t.extractall(d, filter="data")
    src = next(d.glob("brocolli-caffe-*"))
    subprocess.run(["patch", "-s", "-p1", "-i", str(REPO / "docker" / "pycaffe-cudnn9.patch")], cwd=src, check=True)
    (src / "include" / "caffe" / "proto" / "caffe.pb.h").unlink(missing_ok=True)
    gen = d / "gen"
    gen.mkdir()
    subprocess.run(["protoc", "-I", str(src / "src"), f"--cpp_out={gen}", "caffe/proto/caffe.proto"], cwd=src,
                   check=True)
    cudnn_lib = Path(cudnn[0]).parent.parent / "lib"
    return d, ["g++", "-std=c++14", "-DUSE_CUDNN", f"-I{src / 'include'}", f"-I{src / 'src/caffe/layers'}",
               f"-I{gen}", f"-I{Path(cuda[0]).parent}", f"-I{Path(cudnn[0]).parent}", "-I/usr/include/hdf5/serial"], \
        cudnn_lib


@pytest.fixture(scope="module")
def algo_choice(patched_sdist):
    """tests/cuda/cudnn_algo_choice.cpp built against the patched sources."""
    d, gxx, _ = patched_sdist
    exe = d / "algo"
    p = subprocess.run(gxx + [str(REPO / "tests" / "cuda" / "cudnn_algo_choice.cpp"), "-o", str(exe), "-lglog"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    def run(**env):
        r = subprocess.run([str(exe)], capture_output=True, text=True, env=_clean_env(**env), timeout=60)
        return r.returncode, r.stdout.split(), r.stderr
    return run


def test_cudnn_errors_are_named_by_cudnn(patched_sdist):
    """CUDNN_CHECK's message for a status cuDNN 8/9 added: Caffe's own switch said "Unknown cudnn
    status"; the patched header leaves it to cuDNN's cudnnGetErrorString (called here from the
    cached libcudnn, without a GPU)."""
    d, gxx, cudnn_lib = patched_sdist
    exe = d / "errstr"
    p = subprocess.run(gxx + [str(REPO / "tests" / "cuda" / "cudnn_error_string.cpp"), "-o", str(exe),
                              f"-L{cudnn_lib}", "-l:libcudnn.so.9", f"-Wl,-rpath,{cudnn_lib}", "-lglog"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=_clean_env(), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    names = r.stdout.split()
    assert names == ["CUDNN_STATUS_BAD_PARAM", "CUDNN_STATUS_BAD_PARAM_NULL_POINTER",
                     "CUDNN_STATUS_NOT_SUPPORTED_SHAPE"], r.stdout


def test_the_first_ranked_algorithm_that_fits_the_workspace_bound_is_taken(algo_choice):
    """The list, fastest first: algo 6 needs 200 MB, 1 needs 1 MB, 2 is unsupported, 0 and 7
    need nothing. The default 64 MB takes 1; 300 MB takes 6; 0 MB takes 0, the FIRST of the
    two that fit (jolibrain/caffe#75 took the last); an algorithm ranked in another math type
    than the descriptor's is passed over."""
    assert algo_choice()[:2] == (0, ["1", "1", str(64 << 20)])
    assert algo_choice(CAFFE_CUDNN_WORKSPACE_MB="300")[1] == ["1", "6", str(300 << 20)]
    assert algo_choice(CAFFE_CUDNN_WORKSPACE_MB="0")[1] == ["1", "0", "0"]
    assert algo_choice(TEST_TENSOR_OP_SECOND="1")[1][:2] == ["1", "0"]
    rc, _, err = algo_choice(CAFFE_CUDNN_WORKSPACE_MB="lots")
    assert rc != 0 and "CAFFE_CUDNN_WORKSPACE_MB=lots: need a whole number of MB" in err
