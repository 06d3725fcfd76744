"""The CPU image (docker/build-image.sh builds localhost/caffe-runner:cpu with podman): the demo
inside it equals a host run, and Slurm array tasks run inside it. Run by `make test-image`,
which builds the image first."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import podman_image, run_cli

IMAGE = os.environ.get("CAFFE_RUNNER_IMAGE", "localhost/caffe-runner:cpu")
pytestmark = [pytest.mark.container, pytest.mark.slow]


@pytest.fixture(scope="module")
def image():
    return podman_image(IMAGE, "test-image")


def _feats(path):
    with h5py.File(path, "r") as f:
        return f["feats"][:], [bytes(n) for n in f["names_raw"][:]], f.attrs.get("container", "")


@pytest.fixture(scope="module")
def host_run(photos, tmp_path_factory):
    run = tmp_path_factory.mktemp("host") / "run"
    run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=2")
    return run


def test_demo_inside_the_image_equals_host(image, photos, host_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run(["podman", "run", "--rm", "--pull", "never", "-v", f"{photos}:/data:ro", "-v", f"{out}:/out",
                        image, "input.dir=/data", "output.dir=/out/run", "num_shards=2", "launcher.workers=2"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "images:        20 (20 extracted, 0 failed)" in p.stdout
    a, na, container = _feats(out / "run" / "features.h5")
    b, nb, host = _feats(host_run / "features.h5")
    assert na == nb and host == "" and "Debian 12" in container and IMAGE in container
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_slurm_tasks_run_inside_the_container(image, cluster, photos, host_run, tmp_path):
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher=slurm",
                "launcher.cpus_per_task=1", "launcher.mem_gb=2", "launcher.timeout_min=10", "launcher.wait=true",
                "container.runtime=podman", f"container.image={image}")
    assert "submitted array job" in p.stdout
    # 2 tasks, launcher.shards_per_task shards each: every shard ran in the image, whichever task took it
    for path in _shard_files(run, at_least=2):
        with h5py.File(path, "r") as f:
            assert IMAGE in f.attrs["container"], "the task ran on the host, not in the image"
            assert f.attrs["job_id"]
    a, na, _ = _feats(run / "features.h5")
    b, nb, _ = _feats(host_run / "features.h5")
    assert na == nb
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- Charliecloud on the SquashFS image (docker/build-image.sh --squashfs, make image-squashfs) ----

SQUASHFS = Path(os.environ.get("CAFFE_RUNNER_SQUASHFS",
                               Path.home() / ".cache/caffe-runner/images/caffe-runner-cpu.sqfs"))


@pytest.fixture(scope="module")
def squashfs():
    if not shutil.which("ch-run"):
        pytest.skip("ch-run is absent: run `make test-image` (it installs charliecloud and builds the image)")
    if not SQUASHFS.is_file():
        pytest.skip(f"{SQUASHFS} is absent: run `make test-image` (make image-squashfs builds it)")
    return SQUASHFS


def _shard_files(run, at_least: int):
    """The run's shard files, as its plan names them (a Slurm run has launcher.shards_per_task
    shards per task), each complete."""
    from runner.run.plan import load_run_dir

    r = load_run_dir(run)
    assert r.num_shards >= at_least and r.done_shards() == list(range(r.num_shards))
    return r.shard_paths()


def _check_shards_ran_in(run, n, squashfs):
    """Every shard of the run (at least n) ran inside the image."""
    from runner.runtimes import image_identity
    from runner.runtimes.identity import image_label

    ident = image_identity("charliecloud", str(squashfs))
    assert ident.startswith("size=")
    paths = _shard_files(run, at_least=n)
    for path in paths:
        with h5py.File(path, "r") as f:
            a = f.attrs
            assert a["container_runtime"] == "charliecloud" and a["container_image"] == str(squashfs)
            assert a["container_image_id"] == ident
            # set by the image's own environment (/ch/environment): present only inside it
            assert "caffe-runner" in a["container"] and "Debian 12" in a["container"], a["container"]
    label = image_label({"container_runtime": "charliecloud", "container_image": str(squashfs),
                         "container_image_id": ident})
    with h5py.File(run / "features.h5", "r") as f:
        assert json.loads(f.attrs["container_images"]) == {label: list(range(len(paths)))}
    return label


def test_charliecloud_slurm_array_equals_host(squashfs, cluster, photos, host_run, tmp_path):
    """3 array tasks, each `ch-run` on the SquashFS file, submitted from a shell without USER
    (as under some batch systems and CI; ch-run alone would refuse to start)."""
    from conftest import CLI, REPO

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "USER"}
    p = subprocess.run(CLI + [f"input.dir={photos}", f"output.dir={run}", "num_shards=3", "launcher=slurm",
                              "launcher.cpus_per_task=1", "launcher.mem_gb=2", "launcher.timeout_min=10",
                              "launcher.wait=true", "container.runtime=charliecloud", f"container.image={squashfs}"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    assert "submitted array job" in p.stdout
    sbatch = next((run / "logs").rglob("*_submission.sh")).read_text()
    assert "ch-run" in sbatch and str(squashfs) in sbatch
    for path in _shard_files(run, at_least=3):
        with h5py.File(path, "r") as f:
            assert f.attrs["job_id"], "not a Slurm task"
    label = _check_shards_ran_in(run, 3, squashfs)
    a, na, _ = _feats(run / "features.h5")
    b, nb, _ = _feats(host_run / "features.h5")
    assert na == nb
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    st = run_cli("status", run).stdout
    assert f"image: {label}" in st and "WARNING" not in st


def test_charliecloud_local_equals_host(squashfs, photos, host_run, tmp_path):
    from conftest import CLI, REPO

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "USER"}
    p = subprocess.run(CLI + [f"input.dir={photos}", f"output.dir={run}", "num_shards=2", "launcher.workers=2",
                              "container.runtime=charliecloud", f"container.image={squashfs}"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    _check_shards_ran_in(run, 2, squashfs)
    a, na, _ = _feats(run / "features.h5")
    b, nb, _ = _feats(host_run / "features.h5")
    assert na == nb
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gpu_refused_in_the_cpu_image(squashfs, photos, tmp_path):
    # launcher.gpus names a GPU, so the local GPU check passes and the image's is the one that refuses
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'run'}", "device=gpu", "launcher.gpus=[0]",
                "container.runtime=charliecloud", f"container.image={squashfs}", check=False)
    assert p.returncode == 2 and "caffe-runner: error: device=gpu but container.image" in p.stderr, p.stderr[-2000:]
    assert "no NVIDIA driver libraries" in p.stderr and "ch-fromhost --nvidia" in p.stderr
