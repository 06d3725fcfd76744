"""One suite for every launcher in the registry, each with a fake executor that runs the tasks
in this process (no pycaffe: backend=simulated; no cluster: a fake `scontrol` on PATH and a
fake submitit executor). What every launcher must do: check the plan through the same hooks,
hand each missing shard to its executor exactly once, record the command, end with a merged
file that holds every image once, and on a rerun hand out only what is missing."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import cv2
import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import TINY_PROTOTXT
from runner.schema import InputConf, LocalLauncherConf, ModelConf, OutputConf, RunConf, SlurmLauncherConf
from runner.errors import ConfigError
from runner.task.extract import run_shard
from runner.launch import launch
from runner.launch.local import LocalLauncher
from runner.launch.workers import TaskError
from runner.launch.registry import LAUNCHERS, launcher_for
from runner.launch.slurm import SlurmLauncher

pytestmark = pytest.mark.unit

N_IMAGES, N_SHARDS = 7, 3


class FakePool:
    """The part of workers.WorkerPool the local launcher uses, run in this process."""
    pids = []

    def __init__(self, ran):
        self.ran = ran

    def apply_async(self, fn, args, label=None):
        self.ran.append(label)
        try:
            value, error = fn(*args), None
        except Exception as e:  # noqa: BLE001  handed back through get(), as the pool does
            value, error = None, TaskError(f"{type(e).__name__}: {e}")
        return SimpleNamespace(ready=lambda: True, get=lambda: _raise(error) if error else value)

    def wait(self, timeout):
        return []  # no worker dies here

    def close(self):
        pass

    terminate = close


def _raise(e):
    raise e


class FakeSlurmExecutor:
    """submitit.SlurmExecutor's part the Slurm launcher uses; each task runs here, as the node
    would run it (run_shard), the merge job too."""
    jobs = 0

    def __init__(self, ran, folder, python, max_num_timeout=None):
        self.ran, self.folder, self.python, self.parameters = ran, folder, python, {}

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    def _job(self, job_id):
        return SimpleNamespace(job_id=job_id, paths=SimpleNamespace(stderr=Path(self.folder) / f"{job_id}.err"),
                               done=lambda: True, state="COMPLETED")

    def map_array(self, task, cfgs, indices, *more):
        FakeSlurmExecutor.jobs += 1
        out = []
        for k, (cfg, i) in enumerate(zip(cfgs, indices)):
            self.ran.append(i)
            run_shard(cfg, i, threads=1)
            out.append(self._job(f"{FakeSlurmExecutor.jobs}_{k}"))
        return out

    def submit(self, fn, *args):
        FakeSlurmExecutor.jobs += 1
        fn(*args)
        return self._job(str(FakeSlurmExecutor.jobs))


def _fake(name, ran):
    if name == "local":
        return LocalLauncher(pool=lambda initializer, initargs, on_log: FakePool(ran))
    return SlurmLauncher(executor=lambda **kw: FakeSlurmExecutor(ran, **kw))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Images, a net description, and a `scontrol` that answers like a small cluster."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        cv2.imwrite(str(imgs / f"im{i}.jpg"), rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY_PROTOTXT)
    (tmp_path / "w.caffemodel").write_bytes(b"")  # never loaded by the simulated backend
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize = 2'\n")  # 3 shards: two arrays
    (bin_dir / "scontrol").chmod(0o755)
    (bin_dir / "squeue").write_text("#!/bin/sh\n")  # the run's recorded jobs: none still queued
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CAFFE_RUNNER_SHARED_PATHS", "/tmp")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOG_minloglevel"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))  # run_shard sets them: restored after
    return imgs, proto, tmp_path / "run"


def _cfg(name, world):
    imgs, proto, run = world
    # one shard per Slurm task, nothing taken: each launcher hands out each shard once
    lc = LocalLauncherConf(workers=2) if name == "local" else SlurmLauncherConf(
        gpus_per_task=0, cpus_per_task=1, merge_job=True, shards_per_task=1, take_free_shards=False)
    return OmegaConf.structured(RunConf(
        model=ModelConf(name="tiny", prototxt=str(proto), weights=str(proto.parent / "w.caffemodel"),
                        input_size=[32, 40], default_blobs=["emb"]),
        launcher=lc, input=InputConf(dir=str(imgs)), output=OutputConf(dir=str(run)), num_shards=N_SHARDS,
        backend="simulated", simulated_batch_s=0.0, batch_size=2, device="cpu"))


def test_the_registry_knows_every_launcher_and_refuses_others():
    cfg = OmegaConf.create({"launcher": {"name": "pbs"}})
    with pytest.raises(ConfigError, match="launcher='pbs': use launcher=local or launcher=slurm"):
        launcher_for(cfg)
    assert set(LAUNCHERS) == {"local", "slurm"}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_runs_each_missing_shard_once(name, world):
    cfg = _cfg(name, world)
    assert type(launcher_for(cfg)).__name__ == type(_fake(name, [])).__name__  # the config names it
    run = world[2]
    ran = []
    launch(cfg.copy(), overrides=[f"launcher={name}"], launcher=_fake(name, ran))
    assert sorted(ran) == list(range(N_SHARDS)), ran
    assert (run / ".hydra" / "overrides.yaml").read_text().strip() == f"- launcher={name}"
    with h5py.File(run / "features.h5", "r") as f:
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in f["names"][:])
        failures = len(f["failures/index"]) if "failures" in f else 0
    assert len(names) + failures == N_IMAGES and len(set(names)) == len(names)
    # a lost shard: the rerun hands out that one alone, and the merged file is whole again
    (run / "shards" / f"shard-00001-of-{N_SHARDS:05d}.h5").unlink()
    (run / "features.h5").unlink()
    ran.clear()
    launch(cfg.copy(), launcher=_fake(name, ran))
    assert ran == [1]
    with h5py.File(run / "features.h5", "r") as f:
        assert len(f["names"]) == N_IMAGES


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_a_refused_plan_hands_out_nothing(name, world):
    cfg = _cfg(name, world)
    cfg.output.blobs = ["nope"]
    ran = []
    with pytest.raises(ConfigError, match="nope"):
        launch(cfg, launcher=_fake(name, ran))
    assert ran == [] and not world[2].exists()  # nothing left behind either


def test_the_merge_job_asks_for_the_launcher_merge_resources(world):
    """launcher.merge_cpus_per_task, merge_mem_gb and merge_timeout_min reach the merge job's
    sbatch parameters (they were 1 CPU, 2 GB and 60 min whatever the run)."""
    cfg = _cfg("slurm", world)
    cfg.launcher.merge_cpus_per_task, cfg.launcher.merge_mem_gb, cfg.launcher.merge_timeout_min = 3, 12.5, 240
    seen = []

    class Recording(FakeSlurmExecutor):
        def submit(self, fn, *args):
            seen.append(dict(self.parameters))
            return super().submit(fn, *args)

    launch(cfg, launcher=SlurmLauncher(executor=lambda **kw: Recording([], **kw)))
    assert len(seen) == 1 and seen[0]["job_name"].endswith("-merge"), seen
    assert (seen[0]["cpus_per_task"], seen[0]["mem"], seen[0]["time"]) == (3, "12800M", 240), seen
