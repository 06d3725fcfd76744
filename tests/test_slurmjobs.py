"""Slurm's word, without a cluster: the parsers fed output captured on the dev cluster
(tests/golden/slurm/: an array with a task cancelled by `scancel -s KILL`, one requeued by
`scontrol requeue`, a job killed by OverMemoryKill, one failed with exit 3, tasks requeued after
`scontrol update nodename=... state=down` (NODE_FAIL) and one of them then over its time limit,
a throttled array pending), the state each shard then reads, the heartbeat's verdicts across
hosts, and Caffe's last words."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.store.lastwords import caffe_last_words
from runner.store.liveness import Heart, beat_age_s, beat_interval_s, judge_beat, lost, pid_namespace
from runner.jobs.slurm import (JobWord, expand_job_ids, expand_ranges, parse_duration_s, parse_sacct,
                              parse_scontrol_jobs, parse_squeue, squeue_command)
from runner.run.status import apply_slurm_word, death_message, slurm_cause

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "slurm"


def _read(name: str) -> str:
    return (GOLDEN / name).read_text()


@pytest.mark.parametrize("text,ids", [
    ("7_3", ["7_3"]), ("125", ["125"]), ("7_[3-4%1]", ["7_3", "7_4"]), ("7_[1,3-4]", ["7_1", "7_3", "7_4"]),
    ("7_[0-6:2]", ["7_0", "7_2", "7_4", "7_6"]), ("", [])])
def test_expand_job_ids(text, ids):
    assert expand_job_ids(text) == ids


@pytest.mark.parametrize("text,s", [("0:13", 13), ("6:55", 415), ("1:02:03", 3723), ("2-01:00:00", 2 * 86400 + 3600),
                                    ("00:04:34", 274), ("", None), ("INVALID", None)])
def test_parse_duration(text, s):
    assert parse_duration_s(text) == s


def test_expand_ranges_drops_the_throttle():
    assert expand_ranges("3-4%1") == [3, 4] and expand_ranges("2") == [2]


def test_squeue_expanded_and_collapsed_arrays():
    for name in ("squeue_r.txt", "squeue_collapsed.txt"):
        q = parse_squeue(_read(name))
        assert sorted(q) == ["11_5", "11_6", "7_1", "7_2", "7_3", "7_4"], name
        assert q["7_3"].state == "PENDING" and q["7_3"].reason == "JobArrayTaskLimit" and q["7_3"].alive
        assert q["7_2"].state == "RUNNING" and q["7_2"].node == "vm" and q["7_2"].elapsed_s == 415
        assert q["11_5"].source == "squeue" and not q["11_5"].reason


@pytest.mark.parametrize("ids,all_states,cmd", [
    # one query per array (its tasks listed with -r), arrays in numeric order
    (["12_0", "9_1", "12_3", "13"], False, ["squeue", "-h", "-r", "-o", "%i|%T|%r|%N|%M", "-j", "9,12,13"]),
    # inflight asks for every state, so that an ended job reads as ended, not as absent
    (["20_0"], True, ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%N|%M", "-j", "20"])])
def test_squeue_command(ids, all_states, cmd):
    assert squeue_command(ids, all_states) == cmd


def test_sacct_history_of_requeued_jobs():
    a = parse_sacct(_read("sacct.txt"))
    # scancel -s KILL: "CANCELLED by 0" is CANCELLED
    assert a["1_0"].state == "CANCELLED" and not a["1_0"].alive and a["1_0"].elapsed_s == 4
    # scontrol requeue, then it ran to the end: its earlier run reads REQUEUED
    assert a["1_1"].state == "COMPLETED" and a["1_1"].earlier == ("REQUEUED",) and a["1_1"].requeued
    # OverMemoryKill: sacct says only FAILED (the log says why); exit 3
    assert a["2"].state == "FAILED" and a["2"].exit_code == "9:0"
    assert a["3_0"].state == "FAILED" and a["3_0"].exit_code == "3:0"
    # node lost: requeued (pending again), and 8_7 then over its time limit
    assert a["7_1"].state == "PENDING" and a["7_1"].earlier == ("NODE_FAIL",) and a["7_1"].alive
    assert a["7_1"].node == ""  # "None assigned"
    assert a["8_7"].state == "TIMEOUT" and a["8_7"].earlier == ("NODE_FAIL",) and a["8_7"].elapsed_s == 81
    assert a["11_5"].state == "RUNNING" and a["11_5"].restarts == 1
    # a throttled array's pending tasks in one line
    assert a["7_3"].state == a["7_4"].state == "PENDING"


def test_scontrol_jobs_where_there_is_no_accounting():
    j = parse_scontrol_jobs(_read("scontrol_7.txt"))
    assert j["7_3"].state == "PENDING" and j["7_4"].reason == "JobArrayTaskLimit"
    assert j["7_2"].state == "RUNNING" and j["7_2"].node == "vm"
    assert j["7_1"].state == "PENDING" and j["7_1"].restarts == 1 and j["7_1"].requeued
    early = parse_scontrol_jobs(_read("scontrol_7_early.txt"))  # 7_0 within MinJobAge of its end
    assert early["7_0"].state == "COMPLETED" and early["7_0"].exit_code == "0:0" and not early["7_0"].alive
    assert early["7_1"].state == "RUNNING" and early["7_2"].state == "PENDING" and early["7_4"].state == "PENDING"
    k = parse_scontrol_jobs(_read("scontrol_11.txt"))
    assert k["11_5"].state == "RUNNING" and k["11_5"].restarts == 1 and k["11_5"].elapsed_s == 274


# ---- the state a shard then reads (pure) -----------------------------------------------------

def _st(state="running", **kw):
    base = {"shard": 3, "total": 8000, "done": 3120, "rows": 3100, "failures": 20, "state": state,
            "job_id": "41_3", "beat": "stale", "age_s": 95.0, "rate": None}
    base.update(kw)
    return base


def _word(state, **kw):
    return JobWord(kw.pop("job_id", "41_3"), state, kw.pop("source", "sacct"), **kw)


def test_oom_kill_named_with_the_next_step():
    log = "slurmstepd-node2: error: StepId=41.0 exceeded memory limit (388222976 > 314572800), being killed\n"
    w = _word("FAILED", node="node2", elapsed_s=725, exit_code="9:0")
    assert slurm_cause(w, log) == "OUT_OF_MEMORY" and slurm_cause(w, "") == "FAILED"
    st = apply_slurm_word(_st(), w, log, mem_gb=1.0, timeout_min=10)
    assert st["state"] == "failed" and not st["alive"] and st["cause"] == "OUT_OF_MEMORY"
    assert st["error"] == ("killed by Slurm: OUT_OF_MEMORY on node2 after 12 min; raise launcher.mem_gb (now 1) "
                           "and rerun the command: 3,120 of 8,000 images are kept")


@pytest.mark.parametrize("state,expect", [
    ("CANCELLED", "killed by Slurm: CANCELLED (scancel) on n1 after 40 s; rerun the command to finish it"),
    ("TIMEOUT", "killed by Slurm: TIMEOUT on n1 after 40 s, not requeued (launcher.max_num_timeout used up); "
                "raise launcher.timeout_min (now 10) or num_shards and rerun the command"),
    ("NODE_FAIL", "killed by Slurm: NODE_FAIL (its node was lost) on n1 after 40 s; rerun the command"),
    ("PREEMPTED", "killed by Slurm: PREEMPTED on n1 after 40 s, not requeued; rerun the command"),
    ("FAILED", "the task failed in Slurm: FAILED, exit code 3:0 on n1 after 40 s; its log: L; fix the cause and "
               "rerun the command"),
    ("OUT_OF_MEMORY", "killed by Slurm: OUT_OF_MEMORY on n1 after 40 s; raise launcher.mem_gb (now 2) and rerun "
                      "the command")])
def test_death_messages(state, expect):
    w = _word(state, node="n1", elapsed_s=40, exit_code="3:0")
    assert death_message(state, w, 0, 10, 2.0, 10, "L") == expect + " (the shard starts over)"


def test_requeued_pending_and_running_are_alive_not_failed():
    # the task's own word: submitit requeued it (timeout/preemption); Slurm has it pending again
    st = apply_slurm_word(_st("requeued"), _word("PENDING", source="squeue", reason="BeginTime"))
    assert st["state"] == "requeued" and st["alive"] and "pending (BeginTime: Slurm holds" in st["note"]
    # killed without a word by `scontrol requeue` / a node loss: pending again under the same job id
    st = apply_slurm_word(_st("interrupted", beat="dead"), _word("PENDING", reason="BeginTime",
                                                                  earlier=("NODE_FAIL",), restarts=1))
    assert st["state"] == "requeued" and st["note"].startswith("requeued by Slurm after NODE_FAIL")
    # never started: pending, and why
    st = apply_slurm_word(_st("pending", job_id=None, beat=None, age_s=None),
                          _word("PENDING", reason="JobArrayTaskLimit", source="squeue"))
    assert st["state"] == "pending" and st["alive"] and "JobArrayTaskLimit" in st["note"]
    # running per Slurm with a silent heartbeat (a model loading on a slow file system)
    st = apply_slurm_word(_st("running"), _word("RUNNING", node="node3", source="squeue"))
    assert st["state"] == "running" and st["alive"] and "RUNNING on node3" in st["note"]
    # Slurm cannot be asked: the files decide
    assert apply_slurm_word(_st("interrupted", beat="dead"), None)["alive"] is False


def test_a_task_that_said_why_keeps_its_words_and_caffe_is_quoted():
    st = apply_slurm_word(_st("failed", error="ValueError: bad"), _word("FAILED", exit_code="1:0"))
    assert st["error"] == "ValueError: bad" and st["cause"] == "FAILED"
    log = ("I1205 10:00:00.000000  4242 net.cpp:100] Creating layer conv\n"
           "F1205 10:00:01.123456  4242 blob.cpp:133] Check failed: data_\n*** Check failure stack trace: ***\n")
    st = apply_slurm_word(_st(), _word("FAILED", exit_code="0:6"), log)
    assert st["last_words"] == "Check failed: data_"
    assert st["error"].endswith("; Caffe said: Check failed: data_")


@pytest.mark.parametrize("text,words", [
    ("F1205 10:00:01.123456  4242 blob.cpp:133] Check failed: data_\n", "Check failed: data_"),
    ("E1205 x\nF0101 00:00:00.000001 7 net.cpp:1] first\nF0101 00:00:00.000002 7 net.cpp:2] second\n",
     "second"),
    ("terminate: Check failed: x == y (1 vs. 2)\n", "Check failed: x == y (1 vs. 2)"),
    ("I1205 10:00:00.000000 1 net.cpp:100] fine\nFOO 1\n", None), ("", None)])
def test_caffe_last_words(text, words):
    assert caffe_last_words(text) == words


# ---- liveness across hosts (pure) ------------------------------------------------------------

def test_judge_checks_pids_only_on_the_beats_own_host_and_namespace():
    ns = pid_namespace()
    beat = {"pid": 12345, "host": "node1", "pidns": ns, "interval_s": 1.0}
    dead = lambda pid: False  # noqa: E731
    assert judge_beat(beat, 0.5, "node1", ns, dead) == "dead"
    # another host, or the same hostname in another pid namespace: its pid means nothing here
    assert judge_beat(beat, 0.5, "login", ns, dead) == "fresh"
    assert judge_beat(beat, 0.5, "node1", "pid:[1]", dead) == "fresh"
    assert judge_beat(beat, 3.5, "node1", "pid:[1]", dead) == "stale"
    assert judge_beat(dict(beat, pid=os.getpid()), 999, "node1", ns, os.path.exists) in ("alive", "dead")


def test_stale_by_its_own_interval_and_skew_changes_no_verdict():
    now = 10_000.0
    beat = {"updated": now - 20, "interval_s": 10.0}
    assert beat_age_s(beat, None, now) == 20 and judge_beat(beat, 20, "h", "", lambda p: True) == "fresh"
    # a writer whose clock is 60 s behind: the file's mtime (the file server's clock) says how old
    behind = {"updated": now - 65, "interval_s": 10.0}
    assert beat_age_s(behind, now - 5, now) == 5
    # a writer 60 s ahead: fresh, never negative
    assert beat_age_s({"updated": now + 60}, None, now) == 0
    # stale, but dead only past the skew allowance when no one else can say
    assert judge_beat(beat, 31, "h", "", lambda p: True) == "stale" and not lost(beat, 31) and lost(beat, 91)
    # from this very host (a container's pid namespace): one clock, no allowance
    assert lost(dict(beat, host="h"), 31, "h") and not lost(dict(beat, host="n2"), 31, "h")
    # old beats (no interval recorded): stale after 120 s as before
    assert judge_beat({}, 119, "h", "", lambda p: True) == "fresh" and judge_beat({}, 121, "h", "", lambda p: True) == "stale"
    assert beat_interval_s(3600) == 30 and beat_interval_s(0.2) == 0.2


def test_heart_beats_between_batches_and_stops_before_the_last_word():
    import threading

    written = []
    seen = threading.Event()

    def write(b):
        written.append(b)
        if len(written) >= 4:
            seen.set()

    h = Heart(write, 0.05, {"state": "running", "phase": "loading"}).start()
    assert seen.wait(10), written  # the thread beat on its own, nobody called beat()
    h.stop()
    n = len(written)
    h.beat({"state": "done"})
    assert written[-1]["state"] == "done" and len(written) == n + 1
    seqs = [b["seq"] for b in written]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert written[0]["interval_s"] == 0.05 and written[0]["pidns"] == pid_namespace() and written[0]["pid"] == os.getpid()


# ---- Run.wait is bounded (no cluster: a task that died without a word) ----------------------

def test_run_wait_ends_once_nothing_is_alive(tmp_path):
    import socket

    from runner.api import Run
    from runner.errors import RunnerError, ShardFailedError
    from runner.run.plan import load_run_dir
    from synthetic import make_run, shard_file

    run_dir = make_run(tmp_path / "run", 20, 2, dim=2)
    run = load_run_dir(run_dir)
    os.unlink(shard_file(run_dir, 1, 2))
    # a task on this host and pid namespace that died without a word: its pid is gone
    dead = {"state": "running", "pid": 2 ** 22 + 12345, "host": socket.gethostname(), "pidns": pid_namespace(),
            "interval_s": 30.0, "seq": 3, "done": 4}
    run.write_heartbeat(1, dead)
    with pytest.raises(RunnerError, match=r"not finished and nothing runs it any more .*run the same extraction"):
        Run(run_dir).wait(timeout_s=60, poll_s=0.01)
    # a requeued task with no Slurm to ask is not "failed": the wait ends without ShardFailedError
    run.write_heartbeat(1, dict(dead, state="requeued"))
    st = Run(run_dir).status()
    assert st["shards"][1]["state"] == "requeued" and st["state"] == "incomplete"
    with pytest.raises(RunnerError) as e:
        Run(run_dir).wait(timeout_s=60, poll_s=0.01)
    assert not isinstance(e.value, ShardFailedError)
    # the same beat from another pid namespace (a container, another node's): fresh, so alive
    run.write_heartbeat(1, dict(dead, pidns="pid:[1]"))
    with pytest.raises(TimeoutError):
        Run(run_dir).wait(timeout_s=0.05, poll_s=0.01)


def test_a_watcher_asks_slurm_about_the_same_jobs_at_most_once_per_floor(monkeypatch, tmp_path):
    """status --watch / wait / Run.wait poll every 2 s: squeue and sacct (the controller's and
    the accounting database's load, shared by every user) are asked at most once per
    SLURM_ASK_FLOOR_S about the same jobs of the same run; other jobs or runs are asked at once."""
    from runner.run import status

    asked = []
    monkeypatch.setattr(status, "query_jobs", lambda ids, accounting=True: asked.append(list(ids)) or len(asked))
    clock = [1000.0]
    monkeypatch.setattr(status.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(status, "_asked", {})
    assert status._ask_slurm(tmp_path, ["7_0", "7_1"], True) == 1
    clock[0] += status.SLURM_ASK_FLOOR_S / 2
    assert status._ask_slurm(tmp_path, ["7_0", "7_1"], True) == 1  # the word of a moment ago
    assert status._ask_slurm(tmp_path, ["7_1"], True) == 2  # another set of jobs: asked
    assert status._ask_slurm(tmp_path / "other", ["7_0", "7_1"], True) == 3  # another run: asked
    clock[0] += status.SLURM_ASK_FLOOR_S
    assert status._ask_slurm(tmp_path, ["7_0", "7_1"], True) == 4  # the floor passed: asked again
    assert len(asked) == 4


@pytest.mark.unit
def test_one_list_of_slurm_states_for_every_reader():
    """A resubmission's in-flight check, wait/status (JobWord.alive) and the report read the same
    list: a STOPPED or SPECIAL_EXIT job (held, requeued) and a state this Slurm release adds are
    alive to all of them (no twin submitted, no death reported); the ends are ended to all."""
    from runner.jobs.inflight import live_of
    from runner.ui.report import attempt_word
    from runner.jobs.slurm import ENDED_STATES, JobWord, state_alive

    for state in ("STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD", "PENDING", "RUNNING", "SOME_NEW_STATE"):
        assert state_alive(state) and JobWord("7_0", state, "squeue").alive, state
        assert 0 in live_of({0: "7_0"}, [], {"7_0": (state, "")}).shards, state
    for state in ENDED_STATES:
        assert not state_alive(state) and not JobWord("7_0", state, "sacct").alive, state
        assert not live_of({0: "7_0"}, [], {"7_0": (state, "")}), state
    assert attempt_word({}, JobWord("7_0", "STOPPED", "sacct")) is None
    assert attempt_word({}, JobWord("7_0", "SPECIAL_EXIT", "sacct"))[0] == "requeued"
    assert attempt_word({}, JobWord("7_0", "CANCELLED", "sacct"))[0] == "killed"


@pytest.mark.unit
def test_a_damaged_submissions_file_reads_the_same_to_status_as_to_a_resubmission(tmp_path):
    """One reader of submissions.json: the resubmission's in-flight check refuses a damaged file
    with the fix; status says the same line (and reads the files alone) instead of ignoring it."""
    from runner.errors import ConfigError
    from runner.jobs.inflight import in_flight
    from runner.run.status import format_status, run_status
    from synthetic import make_run

    run_dir = make_run(tmp_path / "run", 8, 2, dim=2)
    (run_dir / "submissions.json").write_text('[{"array_job_id": "12", "tasks": [')
    with pytest.raises(ConfigError, match="submissions.json is damaged") as e:
        in_flight(run_dir)
    st = run_status(run_dir)
    assert st["slurm_word"]["problems"] == [str(e.value)]
    assert f"Slurm: {e.value}" in format_status(st)


@pytest.mark.unit
def test_a_last_beat_keeps_the_previous_fields_and_moves_the_sequence_on(tmp_path):
    """One writer for the beats no Heart writes (a task's last word, a launcher's record of a dead
    worker): the previous beat's fields stay, the new ones go over them, and the sequence number
    moves on, so a watcher sees the change; a full disk is not an error there."""
    from runner.store.liveness import last_beat

    written = []
    prev = {"state": "running", "seq": 41, "host": "node1", "pid": 7, "done": 3}
    beat = last_beat(written.append, prev, state="failed", error="died")
    assert written == [beat] and beat["seq"] == 42 and beat["state"] == "failed" and beat["done"] == 3
    assert prev["state"] == "running"  # the caller's dict is not changed

    def full(_):
        raise OSError(28, "No space left on device")
    assert last_beat(full, {}, state="failed")["seq"] == 1
