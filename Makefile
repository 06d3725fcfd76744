# caffe-runner: `make demo` and `make test` work on a fresh Debian 12 machine (as root, or
# with sudo for the apt step). Caches: the pycaffe wheel under ~/.cache/caffe-runner, the venv in .venv.
SHELL := /bin/bash
# a pipe fails when any of its commands fails (`build-pycaffe.sh | tail -n 1` must fail on a failed build)
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/caffe-runner
DEMO_DIR ?= demo-run
SAMPLES ?= samples
PYTEST_ARGS ?=
# CAFFE=gpu: the CUDA build of pycaffe (GPU clusters; ~30 min on 2 cores, minutes on a login
# node, cached) instead of the CPU one. CUDA_ARCH: compute capabilities to build for, or
# `native` (the GPUs nvidia-smi shows here); CUDA_HOME_DIR: a site toolkit instead of the
# pinned CUDA 13 wheels (needed with drivers older than 580). cuDNN 9 (pinned wheel) is built in;
# NO_CUDNN=1: Caffe's own convolutions only; CUDNN_HOME_DIR: a site cuDNN >= 8 (with CUDA_HOME_DIR).
CAFFE ?= cpu
CUDA_ARCH ?= 75 80 86 89 90 100 120
CUDA_HOME_DIR ?=
NO_CUDNN ?=
CUDNN_HOME_DIR ?=
GPU_VENV ?= .venv-gpu
CUDA_ARGS = --cuda --cuda-arch "$(CUDA_ARCH)" $(if $(CUDA_HOME_DIR),--cuda-home $(CUDA_HOME_DIR)) \
	$(if $(NO_CUDNN),--no-cudnn) $(if $(CUDNN_HOME_DIR),--cudnn-home $(CUDNN_HOME_DIR))
ifeq ($(CAFFE),gpu)
PYCAFFE_ARGS := $(CUDA_ARGS)
SETUP_STAMP := $(VENV)/.setup-done-gpu
else ifeq ($(CAFFE),cpu)
PYCAFFE_ARGS :=
SETUP_STAMP := $(VENV)/.setup-done
else
$(error CAFFE=$(CAFFE): use CAFFE=cpu (default) or CAFFE=gpu)
endif

.PHONY: setup demo test test-unit fresh-machine test-slurm bench image image-squashfs test-image clean cluster-up cluster-down \
	cuda-wheel test-cuda-build test-gpu test-gpu-image bench-gpu

# apt run-time libraries, the pycaffe wheel (built once per machine, ~6 min), the venv
setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml docker/build-pycaffe.sh docker/pycaffe-nogil.patch docker/pycaffe-convbatch.patch docker/pycaffe-poolmax.patch $(if $(filter gpu,$(CAFFE)),docker/pycaffe-cudnn9.patch)
	@command -v apt-get >/dev/null || { echo "setup needs Debian/Ubuntu (apt-get)"; exit 1; }
	@# the wheel's path is its last line; the script's own error (on stderr) ends make when it fails
	bash docker/build-pycaffe.sh --apt --python $(PYTHON) --cache $(CACHE) $(PYCAFFE_ARGS) | tail -n 1 > $(VENV).pycaffe-wheel
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the wheel's version does not change with the recipe: replace an installed one outright
	$(PY) -m pip install -q --force-reinstall --no-deps "$$(cat $(VENV).pycaffe-wheel)"
	$(PY) -m pip install -q "$$(cat $(VENV).pycaffe-wheel)" -e '.[test]'
	$(PY) -c "import caffe, cv2, h5py, hydra, submitit; print('pycaffe', caffe.__file__)"
	rm -f $(VENV)/.setup-done $(VENV)/.setup-done-gpu
	touch $@

$(SAMPLES).done: | setup
	$(PY) -m runner.ui.samples $(SAMPLES)
	touch $@

# a real extraction of the bundled sample photos with the bundled model, 2 local workers
demo: setup $(SAMPLES).done
	$(VENV)/bin/caffe-runner input.dir=$(SAMPLES) output.dir=$(DEMO_DIR) launcher.workers=2 num_shards=3 output.overwrite=true
	$(VENV)/bin/caffe-runner verify $(DEMO_DIR)

UNIT := unit and not slow

# the fast layer first (with Slurm, tmux, chromium and the container runtimes out of reach, as
# on a new machine: it needs none of them), then local end-to-end + integration tests against a
# real dev Slurm cluster, which it installs first
test: setup
	bash tests/without-tools $(PY) -m pytest -ra -m "$(UNIT)" $(PYTEST_ARGS)
	bash slurm/dev-cluster install
	@# tmux: the progress-bar test runs the CLI in a real terminal
	command -v tmux >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; }
	@# chromium: the report tests open the HTML report in a real headless browser
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@# strace: the file-system-calls test counts every call a task makes on the run directory
	command -v strace >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null; }
	$(PY) -m pytest -ra -m "not ($(UNIT)) and not container and not gpu_image and not cuda_build" $(PYTEST_ARGS)

# the CUDA wheel only (cached; prints its path)
cuda-wheel:
	bash docker/build-pycaffe.sh --apt --python $(PYTHON) --cache $(CACHE) $(CUDA_ARGS)

# builds the CUDA wheel into $(GPU_VENV) (not part of `make test`: ~30 min the first time on 2
# cores) and checks it without a GPU: the fat binary holds every requested architecture,
# CUDA libraries resolve inside the venv, CPU-mode features equal the CPU build's, device=gpu
# without a driver is one clear error
test-cuda-build: setup
	$(MAKE) setup CAFFE=gpu VENV=$(GPU_VENV)
	CAFFE_RUNNER_GPU_VENV=$(GPU_VENV) $(PY) -m pytest -ra -m cuda_build $(PYTEST_ARGS)

# tests that need a GPU (skipped with the reason elsewhere), with the CUDA build in
# $(GPU_VENV); on a GPU node `make test-gpu CUDA_ARCH=native` builds for its GPUs only
test-gpu:
	$(MAKE) setup CAFFE=gpu VENV=$(GPU_VENV)
	bash slurm/dev-cluster install
	$(GPU_VENV)/bin/python -m pytest -ra -m gpu $(PYTEST_ARGS)

# the CPU image (podman here, ~10 min the first time) and its tests: the demo inside it, and
# Slurm array tasks running inside it
image:
	bash docker/build-image.sh

# the GPU image for GPU_IMAGE_ARCH (one architecture: 11-20 min on 2 cores), checked without
# a GPU: the CUDA build with cuDNN for its architectures, device=gpu's one-line error, CPU-mode
# features equal to the host's
GPU_IMAGE_ARCH ?= 90
test-gpu-image: setup
	CUDA_ARCH="$(GPU_IMAGE_ARCH)" bash docker/build-image.sh --gpu
	$(PY) -m pytest -ra -m gpu_image $(PYTEST_ARGS)

# the same image as one SquashFS file (Charliecloud, Pyxis/enroot), where a cluster keeps it: on
# a shared file system, not /tmp (the launcher refuses node-local image paths for Slurm)
SQUASHFS ?= $(CACHE)/images/caffe-runner-cpu.sqfs
image-squashfs:
	bash docker/build-image.sh --squashfs $(SQUASHFS)

test-image: setup image-squashfs
	bash slurm/dev-cluster install
	CAFFE_RUNNER_SQUASHFS=$(SQUASHFS) $(PY) -m pytest -ra -m container $(PYTEST_ARGS)

# seconds, no pycaffe import and no cluster: schema, device choice, checks, writer resume, merge
test-unit: setup
	bash tests/without-tools $(PY) -m pytest -ra -m "$(UNIT)" $(PYTEST_ARGS)

# `make demo` and `make test` from a clean clone of HEAD in a fresh Debian 12 root (as root;
# about 40 min on 2 cores): the proof that the install steps work on a new machine
fresh-machine:
	bash tests/fresh-machine

BENCH_ARGS ?=
bench: setup
	bash slurm/dev-cluster install  # row 13 runs on a 3-node dev cluster of its own
	$(PY) bench/bench.py --out bench/results.json $(BENCH_ARGS)

# the GPU report, on a GPU node: forward img/s with cuDNN and without (conv layers switched to
# engine: CAFFE), end-to-end img/s, GPU memory, the self-check's cost -> bench/results-gpu.json
# (send it back). Without a GPU it stops with the reason. MODELS: presets to measure.
GPU_BENCH_ARGS ?=
bench-gpu:
	$(MAKE) setup CAFFE=gpu VENV=$(GPU_VENV)
	$(GPU_VENV)/bin/python bench/bench_gpu.py --out bench/results-gpu.json $(GPU_BENCH_ARGS)

cluster-up:
	bash slurm/dev-cluster up

cluster-down:
	bash slurm/dev-cluster down

clean:
	rm -rf $(DEMO_DIR) $(SAMPLES) $(SAMPLES).done .pytest_cache
