"""docker/build-pycaffe.sh's arguments and cache key, checked without building anything
(--print-key stops where a build would start): bad CUDA arguments are one clear line and
exit 2, the key follows the toolkit version and the architectures, the CPU key stays put."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, docs_text

pytestmark = pytest.mark.unit

SCRIPT = REPO / "docker" / "build-pycaffe.sh"


def _script(*args, cache):
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, "--cache", str(cache), *args],
                          capture_output=True, text=True, timeout=60)


def _key(*args, cache):
    p = _script(*args, "--print-key", cache=cache)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.fixture
def site_toolkit(tmp_path):
    """A site CUDA 12.4 toolkit as `module load cuda/12.4` shows it: its nvcc reports the version."""
    tk = tmp_path / "cuda-12.4"
    (tk / "bin").mkdir(parents=True)
    nvcc = tk / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    return tk


@pytest.mark.parametrize("args, message", [
    (["--cuda-home", "/nonexistent/cuda"], "no such folder"),
    (["--cuda-home", "/tmp"], "has no bin/nvcc"),
    (["--cuda-arch", "70"], "CUDA 13 supports 7.5 and newer"),
    (["--cuda-arch", "sm_90"], "is not a compute capability"),
    (["--cuda-arch", " "], "empty list"),
    (["--bogus"], "unknown argument --bogus"),
])
def test_bad_cuda_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    p = _script("--cuda", *args, "--print-key", cache=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written before the arguments are checked"


def test_native_without_a_gpu_says_what_to_do(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is here: --cuda-arch native builds for this node's GPUs")
    p = _script("--cuda-arch", "native", "--print-key", cache=tmp_path)
    assert p.returncode == 2 and "nvidia-smi shows no GPU" in p.stderr and "--cuda-arch" in p.stderr, p.stderr


def test_cache_key_follows_toolkit_and_architectures(tmp_path, site_toolkit):
    cpu = _key(cache=tmp_path)
    default = _key("--cuda", cache=tmp_path)
    sm90 = _key("--cuda-arch", "90", cache=tmp_path)
    assert len({cpu, default, sm90}) == 3
    assert _key("--cuda-arch", "90 80", cache=tmp_path) == _key("--cuda-arch", "8.0 9.0", cache=tmp_path)
    assert _key("--cuda-arch", "75 80 86 89 90 100 120", cache=tmp_path) == default
    site = _key("--cuda-home", str(site_toolkit), "--cuda-arch", "90", cache=tmp_path)
    assert site not in (cpu, default, sm90)
    # CUDA 12 still builds Volta (sm_70), which CUDA 13 dropped
    assert _key("--cuda-home", str(site_toolkit), "--cuda-arch", "70 90", cache=tmp_path) != site


def test_the_cpu_key_is_the_one_ci_caches(tmp_path):
    """The CPU recipe is untouched by the CUDA work: CI's cached wheel stays valid (this
    literal changes only with a deliberate change of the recipe: RECIPE_REV, the sdist, Python,
    docker/pycaffe-nogil.patch, docker/pycaffe-convbatch.patch, docker/pycaffe-poolmax.patch)."""
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
        pytest.skip("the literal is for CPython 3.11 on x86_64 (Debian 12)")
    assert _key(cache=tmp_path) == "9a7e1ffec5f9ca0d"


def test_the_cuda_pins_include_nvrtc():
    p = subprocess.run(["bash", str(SCRIPT), "--print-cuda-pins"], capture_output=True, text=True, check=True)
    pins = dict(x.split("==") for x in p.stdout.split())
    assert pins["nvidia-cuda-nvrtc"].split(".")[:2] == pins["nvidia-cuda-runtime"].split(".")[:2], pins


# ---- cuDNN (--no-cudnn, --cudnn-home, the pinned wheel) ------------------------------------

def _site_cudnn(root, version, lib=True):
    """A site cuDNN as `module load cudnn` shows it: include/cudnn_version.h, lib64/libcudnn.so.N."""
    major, minor, patch = version.split(".")
    (root / "include").mkdir(parents=True)
    (root / "include" / "cudnn_version.h").write_text(
        f"#define CUDNN_MAJOR {major}\n#define CUDNN_MINOR {minor}\n#define CUDNN_PATCHLEVEL {patch}\n")
    if lib:
        (root / "lib64").mkdir()
        (root / "lib64" / f"libcudnn.so.{major}").write_bytes(b"")
    return root


@pytest.mark.parametrize("case, message", [
    ("no-toolkit", "--cudnn-home needs --cuda-home"),
    ("both", "--no-cudnn and --cudnn-home contradict"),
    ("missing", "no such folder"),
    ("no-header", "has no include/cudnn_version.h"),
    ("cudnn7", "is cuDNN 7.6.5: need cuDNN >= 8"),
    ("no-lib", "no lib64/ or lib/ holding libcudnn.so.8"),
])
def test_bad_cudnn_arguments_are_one_line_and_exit_2(tmp_path, site_toolkit, case, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    home = {"missing": tmp_path / "nope", "no-header": tmp_path,
            "cudnn7": _site_cudnn(tmp_path / "c7", "7.6.5"),
            "no-lib": _site_cudnn(tmp_path / "c8", "8.9.7", lib=False)}.get(case, tmp_path)
    args = {"no-toolkit": ["--cudnn-home", str(home)],
            "both": ["--cuda-home", str(site_toolkit), "--no-cudnn", "--cudnn-home", str(home)]
            }.get(case, ["--cuda-home", str(site_toolkit), "--cudnn-home", str(home)])
    p = _script("--cuda", *args, "--print-key", cache=cache)
    assert p.returncode == 2, (p.returncode, p.stderr)
    errors = [ln for ln in p.stderr.splitlines() if ln.strip() and "CUDA 12.4" not in ln]
    assert len(errors) == 1 and message in errors[0], p.stderr
    assert not list(cache.iterdir()), "nothing may be written before the arguments are checked"


def test_cache_key_follows_cudnn(tmp_path, site_toolkit):
    default = _key("--cuda", cache=tmp_path)
    no_cudnn = _key("--cuda", "--no-cudnn", cache=tmp_path)
    assert default != no_cudnn
    site = ["--cuda-home", str(site_toolkit)]
    s8 = _key(*site, "--cudnn-home", str(_site_cudnn(tmp_path / "c8", "8.9.7")), cache=tmp_path)
    s9 = _key(*site, "--cudnn-home", str(_site_cudnn(tmp_path / "c9", "9.1.0")), cache=tmp_path)
    s_none = _key(*site, "--no-cudnn", cache=tmp_path)
    assert len({s8, s9, s_none, _key(*site, cache=tmp_path)}) == 4


def _script_copy(tmp_path):
    """The script and its patches in a folder of their own (to change a patch), and a runner of
    its --print-key there."""
    d = tmp_path / "docker"
    d.mkdir()
    shutil.copy(SCRIPT, d / SCRIPT.name)
    for patch in ("pycaffe-cudnn9.patch", "pycaffe-nogil.patch", "pycaffe-convbatch.patch", "pycaffe-poolmax.patch"):
        shutil.copy(SCRIPT.with_name(patch), d / patch)

    def run(*args):
        return subprocess.run(["bash", str(d / SCRIPT.name), "--python", sys.executable, "--cache", str(tmp_path),
                               *args, "--print-key"], capture_output=True, text=True, timeout=60)
    return d, run


def test_the_cudnn_patch_is_part_of_the_key(tmp_path):
    """A changed docker/pycaffe-cudnn9.patch is a new recipe; --no-cudnn does not apply it."""
    d, run = _script_copy(tmp_path)

    def key(*args):
        p = run("--cuda", *args)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    before, before_none = key(), key("--no-cudnn")
    with open(d / "pycaffe-cudnn9.patch", "a") as f:
        f.write("\n")
    assert key() != before and key("--no-cudnn") == before_none


def test_no_cudnn_key_is_pinned(tmp_path):
    """--no-cudnn's key changes only with its recipe (the literal changes with
    docker/pycaffe-nogil.patch, pycaffe-convbatch.patch and pycaffe-poolmax.patch, which every build applies)."""
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
        pytest.skip("the literal is for CPython 3.11 on x86_64 (Debian 12)")
    assert _key("--cuda", "--no-cudnn", cache=tmp_path) == "971faa354f3b5019"


def test_the_cuda_pins_include_a_cudnn9_wheel():
    p = subprocess.run(["bash", str(SCRIPT), "--print-cuda-pins"], capture_output=True, text=True, check=True)
    pins = dict(x.split("==") for x in p.stdout.split())
    assert pins["nvidia-cudnn-cu13"].split(".")[0] == "9", pins


def test_the_script_run_by_hand_finds_the_wheel_make_setup_cached(tmp_path):
    """The documented cache folder (docs/install.md) is the one `make setup` fills and the one the script, run by
    hand without --cache, looks in (a cached wheel is found at once; a miss would start a build,
    made to fail fast here: no package index)."""
    import re

    make_cache = re.search(r"^CACHE \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert make_cache == "$(HOME)/.cache/caffe-runner"
    assert "`~/.cache/caffe-runner/<key>/`" in docs_text("docs/install.md")
    key = _key(cache=tmp_path / "any")
    wheel = tmp_path / ".cache" / "caffe-runner" / key / "caffe-1.0.0-cp3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    p = subprocess.run(["bash", str(SCRIPT), "--python", sys.executable], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == str(wheel), (p.stdout, p.stderr[-2000:])


@pytest.mark.parametrize("patch", ["pycaffe-nogil.patch", "pycaffe-convbatch.patch", "pycaffe-poolmax.patch"])
def test_every_build_patch_is_part_of_every_key(tmp_path, patch):
    """A changed docker/pycaffe-nogil.patch, pycaffe-convbatch.patch or pycaffe-poolmax.patch is a new recipe, CPU and
    CUDA alike; without it the script stops in one line before building."""
    d, run = _script_copy(tmp_path)
    before = {a: run(*a).stdout.strip() for a in ((), ("--cuda",))}
    with open(d / patch, "a") as f:
        f.write("\n")
    assert all(run(*a).stdout.strip() != k for a, k in before.items())
    (d / patch).unlink()
    p = run()
    assert p.returncode == 1 and f"{patch} is missing" in p.stderr.strip().splitlines()[-1]


def hostile_sdist(folder, name: str, version: str, marker) -> "Path":
    """An sdist named like the pinned one whose build backend (in-tree, no build requirements)
    writes `marker` when pip asks it anything: what a tampered index or mirror could serve."""
    import io
    import tarfile

    top = f"{name}-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": f"open({str(marker)!r}, 'w').write('build hook ran')\n"
                      "def get_requires_for_build_wheel(config_settings=None):\n    return []\n",
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def pip_env_serving(folder) -> dict:
    """pip sees only `folder` (no index, no config file, no constraints): the test's own mirror."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(folder),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_a_tampered_sdist_is_refused_before_its_build_hooks_run(tmp_path):
    """`pip download --no-binary :all:` prepares an sdist's metadata (runs its build backend)
    before the script could compare the sha256: the hash is given to pip (--require-hashes), so
    a file that differs from the pinned one is refused before anything in it runs."""
    marker = tmp_path / "hook-ran"
    hostile_sdist(tmp_path / "mirror", "brocolli-caffe", "9.0.2", marker)
    p = subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, "--cache", str(tmp_path / "cache"),
                        "--fetch-sdist"], capture_output=True, text=True, timeout=300,
                       env=pip_env_serving(tmp_path / "mirror"))
    assert p.returncode == 1, (p.stdout, p.stderr[-3000:])
    assert not marker.exists(), "the sdist's build backend ran before its sha256 was checked"
    last = p.stderr.strip().splitlines()[-1]
    assert "sha256" in last and "c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a" in last, p.stderr
    assert not (tmp_path / "cache" / "sdist").exists() or not any((tmp_path / "cache" / "sdist").iterdir())


def test_a_failed_build_fails_make_setup_with_its_own_error(tmp_path):
    """`build-pycaffe.sh ... | tail -n 1` in the Makefile: without pipefail a failed build went on
    to make a venv and failed later in pip ("Invalid requirement: ''"). A build that stops (here
    at once: a bad --cuda-arch) must stop make there, with the script's own line."""
    import shutil

    if not shutil.which("make") or not shutil.which("apt-get"):
        pytest.skip("make setup needs make and apt-get (Debian)")
    venv = tmp_path / "venv"
    p = subprocess.run(["make", "-C", str(REPO), "setup", "CAFFE=gpu", "CUDA_ARCH=sm_90", f"VENV={venv}",
                        f"PYTHON={sys.executable}", f"CACHE={tmp_path / 'cache'}"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0, p.stdout
    assert "build-pycaffe: --cuda-arch: 'sm_90' is not a compute capability" in p.stderr, p.stderr[-2000:]
    assert not venv.exists(), "make went on after the failed build"
    assert "Invalid requirement" not in p.stderr
