"""A run's jobs still in flight (runner/jobs/inflight.py) and what output.overwrite=true removes:
the pure parts, without a cluster."""
from __future__ import annotations

import json

import pytest

from runner.errors import ConfigError
from runner.jobs.inflight import (InFlight, describe, in_flight, live_of, merge_dependency, read_submissions,
                             recorded_jobs, state_where)
from runner.jobs.slurm import parse_squeue
from runner.store.rundir import OLD_RUN_ENTRIES, RUN_JSON, remove_old_run

pytestmark = pytest.mark.unit

SUBS = [
    {"array_job_id": "12", "merge_job_id": "13", "tasks": [{"shard": 0, "job_id": "12_0"}, {"shard": 1, "job_id": "12_1"},
                                                           {"shard": 2, "job_id": "12_2"}]},
    # shard 1 resubmitted: its latest job counts; the merge job kept
    {"array_job_id": "20", "merge_job_id": "13", "tasks": [{"shard": 1, "job_id": "20_0"}]},
    {"array_job_id": "", "merge_job_id": "25", "tasks": []},
]


def test_recorded_jobs_latest_per_shard_and_each_merge_once():
    assert recorded_jobs(SUBS) == ({0: "12_0", 1: "20_0", 2: "12_2"}, ["13", "25"])
    assert recorded_jobs([]) == ({}, [])


def test_squeue_lines_give_state_and_where():
    # slurmjobs' squeue format (%i|%T|%r|%N|%M): a running job's node, a pending one's reason; a
    # pending array still collapsed is one line for each of its tasks
    text = ("12_0|RUNNING|None|node2|0:13\n12_[2-3]|PENDING|Priority||0:00\n13|PENDING|Dependency||0:00\n"
            "14|COMPLETED|None|node1|0:05\n\n")
    assert state_where(parse_squeue(text)) == {"12_0": ("RUNNING", "node2"), "12_2": ("PENDING", "Priority"),
                                               "12_3": ("PENDING", "Priority"), "13": ("PENDING", "Dependency"),
                                               "14": ("COMPLETED", "node1")}


@pytest.mark.parametrize("known, shards, merges", [
    ({}, {}, {}),  # Slurm forgot them all: nothing in flight
    ({"12_0": ("RUNNING", "node1"), "12_2": ("COMPLETED", "node3"), "20_0": ("PENDING", "Priority"),
      "13": ("PENDING", "Dependency"), "25": ("CANCELLED", "")},
     {0: ("12_0", "RUNNING", "node1"), 1: ("20_0", "PENDING", "Priority")}, {"13": ("PENDING", "Dependency")}),
    # a requeued task is alive; one the old array ran before shard 1 was resubmitted is not asked about
    ({"12_1": ("RUNNING", "node1"), "20_0": ("REQUEUED", ""), "12_2": ("OUT_OF_MEMORY", "node2"),
      "13": ("COMPLETING", "node1")},
     {1: ("20_0", "REQUEUED", "")}, {"13": ("COMPLETING", "node1")}),
])
def test_live_of_keeps_states_that_are_not_an_end(known, shards, merges):
    tasks, ms = recorded_jobs(SUBS)
    fl = live_of(tasks, ms, known)
    assert fl.shards == shards and fl.merges == merges
    assert bool(fl) == bool(shards or merges)


def test_describe_and_arrays():
    fl = InFlight(shards={1: ("20_0", "PENDING", "Priority"), 0: ("12_0", "RUNNING", "node1")},
                  merges={"13": ("PENDING", "Dependency")})
    assert describe(fl) == ("shard 0: job 12_0 RUNNING on node1; shard 1: job 20_0 PENDING (Priority); "
                            "merge job 13 PENDING (Dependency)")
    assert fl.arrays == ["12", "20"]
    many = InFlight(shards={i: (f"7_{i}", "PENDING", "None") for i in range(9)})
    assert describe(many, limit=2) == "shard 0: job 7_0 PENDING; shard 1: job 7_1 PENDING; 7 more"


def test_merge_dependency():
    assert merge_dependency(["12", "20"]) == "afterany:12:20"
    assert merge_dependency(["20"], after="13") == "afterany:20:13"


def test_damaged_submissions_is_named(tmp_path):
    (tmp_path / "submissions.json").write_text("{not json")
    with pytest.raises(ConfigError, match="submissions.json is damaged"):
        read_submissions(tmp_path)
    assert read_submissions(tmp_path / "none") == []
    assert not in_flight(tmp_path / "none")


def test_overwrite_removes_everything_of_the_old_run(tmp_path):
    run = tmp_path / "run"
    for name in ("shards", "status", "manifest", "events", "retry", "logs", ".hydra"):
        (run / name / "sub").mkdir(parents=True)
        (run / name / "sub" / "f").write_text("old")
    for name in ("features.h5", "features.h5.tmp", "stats.json", "retries.json", "report.html", RUN_JSON):
        (run / name).write_text("old")
    (run / "submissions.json").write_text(json.dumps([]))  # no job ids: nothing to ask Slurm
    (run / "launch.lock").write_text("")  # held by whoever replaces the run: kept
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    (run / ".features.h5.node2.123.ab12cd34.tmp").write_text("a merge killed mid-write")
    remove_old_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["launch.lock", "notes.txt"]
    assert set(OLD_RUN_ENTRIES) >= {"events", "submissions.json", "retries.json", "retry", "logs"}


@pytest.mark.parametrize("path, shared, folder", [
    ("/tmp/run", "", "/tmp"),
    ("/dev/shm/x/y", "", "/dev/shm"),
    ("/tmp/run", "/tmp", None),  # the site (the dev cluster) declares /tmp shared by all nodes
    ("/tmp/run", "/scratch:/tmp/", None),
    ("/var/tmp/run", "/tmp", "/var/tmp"),
    ("/tmpfoo/run", "", None),
    ("/scratch/u/run", "", None),
])
def test_node_local_folder_unless_declared_shared(path, shared, folder):
    from runner.launch.slurm import node_local_folder

    assert node_local_folder(path, shared) == folder
