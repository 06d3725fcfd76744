"""Slurm launch errors as a new user meets them: checked at plan time where Slurm can say
(the partition, its time limit), else sbatch's own message as one error line; and the
one-line progress of launcher.wait=true without a terminal."""
from __future__ import annotations

import pytest

from conftest import run_cli, tiny_model_args
from runner.launch.slurm import parse_slurm_minutes


@pytest.mark.parametrize("text,minutes", [("UNLIMITED", None), ("INFINITE", None), ("30", 30), ("1:00:00", 60),
                                          ("2-00:00:00", 2880), ("1-12", 2160), ("00:30:30", 31), ("10:00", 10)])
def test_parse_slurm_minutes(text, minutes):
    assert parse_slurm_minutes(text) == minutes


SLURM = ["launcher=slurm", "launcher.shards_per_task=1", "launcher.take_free_shards=false", "launcher.gpus_per_task=0", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
         "launcher.timeout_min=10"]


def _one_error(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr + p.stdout and p.stderr.count("caffe-runner: error:") == 1
    return p.stderr


@pytest.mark.slurm
def test_unknown_partition_is_refused_at_plan_time(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.partition=debgu", *tiny_model_args(tiny_net), check=False))
    assert "launcher.partition=debgu: the cluster has no such partition" in err and "did you mean debug?" in err
    assert not run.exists(), "nothing is written before the plan is accepted"


@pytest.mark.slurm
def test_more_cpus_per_task_than_any_node_has_is_refused_at_plan_time(cluster, tiny_net, photos, tmp_path):
    """The README's Slurm lines keep the default launcher.cpus_per_task=8; the dev cluster's
    nodes have 4 CPUs: sbatch refused it after the plan was written, naming neither key."""
    run = tmp_path / "run"
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.cpus_per_task=64", *tiny_model_args(tiny_net), check=False))
    assert "launcher.cpus_per_task=64" in err and "has 4 CPUs" in err and "launcher.cpus_per_task<=4" in err, err
    assert not run.exists(), "nothing is written before the plan is accepted"
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.partition=debug", "launcher.cpus_per_task=5", *tiny_model_args(tiny_net),
                             check=False))
    assert "partition debug" in err and "launcher.cpus_per_task<=4" in err, err
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.shards_per_task=0", *tiny_model_args(tiny_net), check=False))
    assert "launcher.shards_per_task=0: use 1 or more" in err, err
    assert not run.exists()


@pytest.mark.slurm
def test_sbatch_refusal_is_one_line_with_its_message(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    # more memory than the node has: sbatch refuses at submission
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.mem_gb=100000", *tiny_model_args(tiny_net), check=False))
    assert "sbatch refused the array job" in err and "Batch job submission failed" in err, err
    assert "launcher.mem_gb" in err and "launcher.cpus_per_task" in err, "the keys a refusal is often about"
    assert "submitit" not in err


@pytest.mark.slurm
def test_wait_prints_progress_lines_not_dicts(cluster, tiny_net, photos, tmp_path):
    run = tmp_path / "run"
    p = run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM, "launcher.wait=true",
                *tiny_model_args(tiny_net), "launcher.log_interval_s=1")
    assert "{'" not in p.stdout + p.stderr
    assert "slurm: " in p.stderr and " images (" in p.stderr and "shards: " in p.stderr
    assert "done:" in p.stdout and (run / "stats.json").exists()


def test_no_cluster_is_one_line_at_plan_time(tiny_net, photos, tmp_path):
    """scontrol is installed, but no controller answers (its slurm.conf names one that is down):
    one line, exit 2, not scontrol's raw error lines."""
    run = tmp_path / "run"
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=gone\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=9\n")
    err = _one_error(run_cli(f"input.dir={photos}", f"output.dir={run}", "num_shards=2", *SLURM,
                             "launcher.partition=gpu", *tiny_model_args(tiny_net), check=False,
                             env={"SLURM_CONF": str(conf)}))
    assert "no Slurm cluster answers from this machine" in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()
