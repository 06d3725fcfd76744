# caffe-runner: `make demo` and `make test` work on a fresh Debian 12 machine (as root, or
# with sudo for the apt step). Caches: the pycaffe wheel under ~/.cache/caffe-runner, the venv in .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/caffe-runner
DEMO_DIR ?= demo-run
SAMPLES ?= samples
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-slurm bench image image-squashfs test-image clean cluster-up cluster-down

# apt run-time libraries, the pycaffe wheel (built once per machine, ~6 min), the venv
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml docker/build-pycaffe.sh
	@command -v apt-get >/dev/null || { echo "setup needs Debian/Ubuntu (apt-get)"; exit 1; }
	bash docker/build-pycaffe.sh --apt --python $(PYTHON) --cache $(CACHE) | tail -n 1 > $(VENV).pycaffe-wheel
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$$(cat $(VENV).pycaffe-wheel)" -e '.[test]'
	$(PY) -c "import caffe, cv2, h5py, hydra, submitit; print('pycaffe', caffe.__file__)"
	touch $@

$(SAMPLES)/.done: | setup
	$(PY) -m runner.samples $(SAMPLES)
	touch $@

# a real extraction of the bundled sample photos with the bundled model, 2 local workers
demo: setup $(SAMPLES)/.done
	$(VENV)/bin/caffe-runner input.dir=$(SAMPLES) output.dir=$(DEMO_DIR) launcher.workers=2 num_shards=3 output.overwrite=true
	$(VENV)/bin/caffe-runner verify $(DEMO_DIR)

# unit + local end-to-end + integration tests against a real dev Slurm cluster
test: setup
	bash slurm/dev-cluster install
	$(PY) -m pytest -ra -m "not container" $(PYTEST_ARGS)

# the CPU image (podman here, ~10 min the first time) and its tests: the demo inside it, and
# Slurm array tasks running inside it
image:
	bash docker/build-image.sh

# the same image as one SquashFS file (Charliecloud, Pyxis/enroot), where a cluster keeps it: on
# a shared file system, not /tmp (the launcher refuses node-local image paths for Slurm)
SQUASHFS ?= $(CACHE)/images/caffe-runner-cpu.sqfs
image-squashfs:
	bash docker/build-image.sh --squashfs $(SQUASHFS)

test-image: setup image-squashfs
	bash slurm/dev-cluster install
	CAFFE_RUNNER_SQUASHFS=$(SQUASHFS) $(PY) -m pytest -ra -m container $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -ra -m "not slurm and not container" $(PYTEST_ARGS)

bench: setup
	$(PY) -m runner.bench --out bench/results.json

cluster-up:
	bash slurm/dev-cluster up

cluster-down:
	bash slurm/dev-cluster down

clean:
	rm -rf $(DEMO_DIR) $(SAMPLES) .pytest_cache
