"""The GPU image (docker/build-image.sh --gpu builds localhost/caffe-runner:gpu with podman),
checked without a GPU: its pycaffe is the CUDA build with cuDNN for the architectures on its
label, device=gpu without a driver is one clear error, and in CPU mode it extracts the same
features as the host's CPU build. Run by `make test-gpu-image`, which builds the image first
(CUDA_ARCH=90: one architecture, about 30 min on 2 cores)."""
from __future__ import annotations

import json
import os
import subprocess

import h5py
import numpy as np
import pytest

from conftest import podman_image, run_cli

IMAGE = os.environ.get("CAFFE_RUNNER_GPU_IMAGE", "localhost/caffe-runner:gpu")
pytestmark = [pytest.mark.gpu_image, pytest.mark.slow]


@pytest.fixture(scope="module")
def image():
    return podman_image(IMAGE, "test-gpu-image")


def _podman(*args, timeout=600):
    return subprocess.run(["podman", "run", "--rm", "--pull", "never", *args], capture_output=True, text=True,
                          timeout=timeout)


def _label(image, key):
    p = subprocess.run(["podman", "image", "inspect", image, "--format", "{{json .Labels}}"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)[key]


def test_its_pycaffe_is_the_cuda_build_with_cudnn_for_its_architectures(image):
    p = _podman("--entrypoint", "python", image, "-m", "runner.engine.gpu")
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout)
    assert seen["caffe_has_gpu"] and seen["caffe_has_cudnn"], seen
    assert seen["cudnn"] and seen["cudnn"].startswith("9."), seen  # the pinned cuDNN wheel loads
    code = ("from runner.engine.gpu import caffe_so_path, fatbin_archs; import json; f = fatbin_archs(caffe_so_path()); "
            "print(json.dumps([list(f.sm), list(f.ptx)]))")
    p = _podman("--entrypoint", "python", image, "-c", code)
    assert p.returncode == 0, p.stderr[-2000:]
    sm, ptx = json.loads(p.stdout)
    archs = sorted(int(a) for a in _label(image, "caffe-runner.cuda-arch").split())
    assert sm == archs and ptx == [archs[-1]], (sm, ptx, archs)


@pytest.mark.parametrize("extra, says", [
    ([], "no GPU is visible"),                 # the launcher's own check
    (["launcher.gpus=[0]"], "NVIDIA driver"),  # past it, the CUDA probe inside the image
])
def test_device_gpu_without_a_driver_is_one_clear_error(image, photos, tmp_path, extra, says):
    out = tmp_path / "out"
    out.mkdir()
    p = _podman("-v", f"{photos}:/data:ro", "-v", f"{out}:/out", image, "input.dir=/data", "output.dir=/out/run",
                "device=gpu", *extra)
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("caffe-runner: error:"), p.stderr[-3000:]
    assert says in errors[0] and "Traceback" not in p.stderr, errors[0]
    assert not list(out.rglob("*.h5")), "nothing may be extracted"


def test_cpu_mode_inside_equals_the_host_cpu_build(image, photos, tmp_path):
    host = tmp_path / "host"
    run_cli(f"input.dir={photos}", f"output.dir={host}", "num_shards=1", "launcher.workers=1", "device=cpu")
    out = tmp_path / "out"
    out.mkdir()
    p = _podman("-v", f"{photos}:/data:ro", "-v", f"{out}:/out", image, "input.dir=/data", "output.dir=/out/run",
                "num_shards=2", "launcher.workers=2", "device=cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "images:        20 (20 extracted, 0 failed)" in p.stdout

    def feats(path):
        with h5py.File(path, "r") as f:
            return f["feats"][:], [bytes(n) for n in f["names_raw"][:]], str(f.attrs.get("container", ""))

    a, na, container = feats(out / "run" / "features.h5")
    b, nb, _ = feats(host / "features.h5")
    assert na == nb and "CUDA 13" in container and IMAGE in container, container
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
