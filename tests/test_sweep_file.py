"""Issue 36: sweeps the way researchers run them. A sweep file (models x their own blobs x
poolings, or a list of points) and one shared pass per model: points that differ only in what
they keep of the output are written by one extraction, each point still its own run, bit for bit
the point run alone. Pure parts first, then real runs of the tiny net on the sample photos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import fix_broken_file, folder_with_a_broken_file, run_cli, tiny_model_args, wait_until
from runner.run.sharedpass import pass_key, why_not_shared
from runner.run.sweep import file_points, override_value


@pytest.mark.unit
def test_models_cross_their_own_blobs_and_the_poolings():
    pts = file_points(yaml.safe_load("""
models:
  googlenet: [inception_3a/output, inception_4a/output]
  mine: {blobs: ["fc:a"], overrides: {model.prototxt: /m/d.prototxt, model: own}}
pooling: [avg, max]
overrides: {batch_size: 8}
"""))
    assert pts == [
        ["batch_size=8", "model=googlenet", "output.blobs=[inception_3a/output]", "output.pooling=avg"],
        ["batch_size=8", "model=googlenet", "output.blobs=[inception_3a/output]", "output.pooling=max"],
        ["batch_size=8", "model=googlenet", "output.blobs=[inception_4a/output]", "output.pooling=avg"],
        ["batch_size=8", "model=googlenet", "output.blobs=[inception_4a/output]", "output.pooling=max"],
        # a model of one's own names itself in its overrides: no model=mine
        ["batch_size=8", "model.prototxt=/m/d.prototxt", "model=own", "output.blobs=['fc:a']", "output.pooling=avg"],
        ["batch_size=8", "model.prototxt=/m/d.prototxt", "model=own", "output.blobs=['fc:a']", "output.pooling=max"],
    ]


@pytest.mark.unit
def test_points_as_mappings_lists_or_strings():
    pts = file_points({"points": [{"model": "caffenet", "output.blobs": ["conv5", "fc7"]},
                                  ["model=googlenet", "output.blobs=[pool5/7x7_s1]"],
                                  "model=vgg16 output.pooling=avg"]})
    assert pts == [["model=caffenet", "output.blobs=[conv5,fc7]"], ["model=googlenet", "output.blobs=[pool5/7x7_s1]"],
                   ["model=vgg16", "output.pooling=avg"]]


@pytest.mark.unit
@pytest.mark.parametrize("data, words", [
    ({"models": {"a": ["x"]}, "poolings": ["avg"]}, "unknown key(s) poolings"),
    ({"models": {"a": ["x"]}, "points": [{"model": "a"}]}, "either `points`"),
    ({}, "either `points`"),
    ({"models": {"a": []}}, "model a: a list of blobs"),
    ({"models": {"a": {"blob": ["x"]}}}, "model a: a list of blobs"),
    ({"models": {"a": {"blobs": ["x"], "pooling": "avg"}}}, "unknown key(s) pooling"),
    ({"points": [{"model": "a"}], "pooling": ["avg"]}, "give output.pooling per point"),
    ({"points": [["model"]]}, "point 0: a mapping"),
    ({"models": {"a": ["x"]}, "overrides": {"output.blobs": "[y]"}}, "output.blobs set both"),
    (["model=a"], "a sweep file is a mapping"),
])
def test_a_bad_sweep_file_names_what_is_wrong(data, words):
    with pytest.raises(ValueError) as e:
        file_points(data)
    assert words in str(e.value)


@pytest.mark.unit
def test_values_read_back_by_the_override_grammar_as_written():
    from runner.run.config import _parse_overrides

    for value in ["inception_3a/output", "fc:a", "conv one", "it's", "a,b", "true", 3, 0.5, True, None,
                  ["stage1/conv", "fc:a", "x y"]]:
        o = _parse_overrides([f"output.blobs={override_value(value)}"])[0]
        assert o.value() == value, (value, override_value(value))


@pytest.mark.unit
def test_points_share_a_pass_only_when_they_differ_in_what_they_keep():
    base = {"model": {"name": "g", "prototxt": "p", "default_blobs": ["a"]}, "batch_size": 16,
            "output": {"dir": "/s/0", "blobs": ["a"], "pooling": "none", "dtype": "float32", "merge": True},
            "sweep": {"shared_pass": True, "companions": []}}
    other_out = json.loads(json.dumps(base))
    other_out["output"].update(dir="/s/1", blobs=["b", "c"], pooling="avg", dtype="float16")
    other_out["model"]["default_blobs"] = ["z"]
    other_out["sweep"]["companions"] = ["/s/2"]
    assert pass_key(base) == pass_key(other_out)
    for key, value in [("batch_size", 8), ("model", {"name": "h", "prototxt": "p"})]:
        changed = dict(base, **{key: value})
        assert pass_key(changed) != pass_key(base), key
    merged_off = json.loads(json.dumps(base))
    merged_off["output"]["merge"] = False
    assert pass_key(merged_off) != pass_key(base)


@pytest.mark.unit
def test_a_companion_planned_for_another_extraction_is_left_out():
    plan = {"identity": {"model": {"weights_sha256": "w"}, "blobs": ["a"], "output": {"pooling": "none"},
                         "backend": "auto", "input": "dir"},
            "count": 10, "segments": [{"first": 0, "num_shards": 2}], "input_stamp": {"names": "n1"},
            "input_hw": [32, 40]}
    same = json.loads(json.dumps(plan))
    same["identity"].update(blobs=["b"], output={"pooling": "avg"})
    assert why_not_shared(plan, same) is None
    for change, words in [(("identity", "model", {"weights_sha256": "v"}), "model, backend or decoding"),
                          (("count", None, 11), "image count"), (("input_stamp", None, {"names": "n2"}), "input listing"),
                          (("segments", None, [{"first": 0, "num_shards": 3}]), "shards")]:
        other = json.loads(json.dumps(plan))
        top, sub, value = change
        if sub:
            other[top][sub] = value
        else:
            other[top] = value
        assert words in why_not_shared(plan, other)


# ---- real runs ------------------------------------------------------------------------------

def _as_yaml(overrides):
    """key=value overrides as a sweep file's mapping (values as YAML reads them)."""
    return {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}


def _sweep_file(tmp_path: Path, tiny_net) -> Path:
    """The tiny net twice: as `tiny` (three blobs, one of them a conv map pooled) and as `tinier`
    (its own preprocessing, two blobs): two passes of five points."""
    args = _as_yaml(tiny_model_args(tiny_net))
    tinier = dict(args, **{"model.preprocess.scale": 0.03, "model.name": "tinier"})
    data = {"models": {"tiny": {"blobs": ["stage1/conv", "emb", "emb_t"], "overrides": dict(args, model="own")},
                       "tinier": {"blobs": ["p1", "emb"], "overrides": dict(tinier, model="own")}},
            "pooling": ["avg"]}
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def read_features(path: Path):
    """({dataset: rows} of every blob, names as bytes, index) of a features.h5."""
    import h5py

    with h5py.File(path, "r") as f:
        return ({k: f["features"][k][:] for k in f["features"]}, [bytes(n) for n in f["names_raw"][:]],
                f["index"][:])


def _points(sweep: Path):
    return [(p["name"], p["overrides"]) for p in json.loads((sweep / "sweep.json").read_text())["points"]]


def test_a_sweep_file_runs_one_pass_per_model_and_each_point_is_the_point_run_alone(tiny_net, photos, tmp_path):
    f = _sweep_file(tmp_path, tiny_net)
    sweep = tmp_path / "sweep"
    common = [f"input.dir={photos}", f"output.dir={sweep}", "launcher.workers=1", "num_shards=3", "batch_size=4"]
    out = run_cli("--sweep", f, *common)
    assert "5 point(s)" in out.stdout and "5 of them in 2 shared pass(es)" in out.stdout, out.stdout
    points = _points(sweep)
    assert len(points) == 5
    assert sum("one pass, also writing" in ln for ln in out.stdout.splitlines()) == 2, out.stdout
    # readable folder names, blob names with '/' included
    assert any("stage1_conv" in n for n, _ in points), points
    # the companions were written by their lead's tasks: their shards' events name the pass
    # (the file's models in YAML's order: tinier's 2 points, then tiny's 3)
    for k, lead in ((1, 0), (3, 2), (4, 2)):
        started = [json.loads(ln) for e in sorted((sweep / points[k][0] / "events").glob("*.jsonl"))
                   for ln in e.read_text().splitlines() if '"started"' in ln]
        assert len(started) == 3 and all(s.get("shared_pass") == str(sweep / points[lead][0]) for s in started), started
    lead = sweep / points[2][0]
    # each point is bit for bit the same point run alone
    for k in (1, 3):  # a companion of each pass
        name, overrides = points[k]
        alone = tmp_path / f"alone-{k}"
        run_cli(*[o for o in overrides if not o.startswith("output.dir=")], f"input.dir={photos}",
                f"output.dir={alone}", "launcher.workers=1", "num_shards=3", "batch_size=4")
        a, b = read_features(alone / "features.h5"), read_features(sweep / name / "features.h5")
        assert set(a[0]) == set(b[0]) and len(a[0]) == 1
        for blob in a[0]:
            assert np.array_equal(a[0][blob], b[0][blob]), (name, blob)
        assert a[1] == b[1] and np.array_equal(a[2], b[2])
    # one table, verify and compare on the whole sweep
    st = run_cli("status", sweep)
    assert len([ln for ln in st.stdout.splitlines() if "merged" in ln]) == 5, st.stdout
    assert "OK" in run_cli("verify", sweep).stdout
    run_cli("compare", sweep)
    assert len(json.loads((sweep / "compare.json").read_text())["labels"]) == 5

    # a companion's shard lost: the same command extracts only that one, and leaves the lead's
    # merged file as it was (nothing of the lead changed)
    name = points[4][0]
    before = read_features(sweep / name / "features.h5")
    lead_merged = (lead / "features.h5").stat().st_mtime_ns
    shard = sorted((sweep / name / "shards").glob("shard-00001-*.h5"))[0]
    shard.unlink()
    again = run_cli("--sweep", f, *common)
    assert shard.exists(), again.stdout
    after = read_features(sweep / name / "features.h5")
    assert all(np.array_equal(before[0][b], after[0][b]) for b in before[0])
    assert (lead / "features.h5").stat().st_mtime_ns == lead_merged
    resumed = [json.loads(ln) for ln in (sweep / name / "events" / f"{shard.stem}.jsonl").read_text().splitlines()]
    assert [e["event"] for e in resumed if e["event"] in ("started", "finished")][-2:] == ["started", "finished"]


def test_shared_pass_off_runs_each_point_alone(tiny_net, photos, tmp_path):
    f = tmp_path / "s.yaml"
    args = _as_yaml(tiny_model_args(tiny_net))
    f.write_text(yaml.safe_dump({"models": {"tiny": {"blobs": ["emb", "emb_t"], "overrides": dict(args, model="own")}}}))
    sweep = tmp_path / "sweep"
    out = run_cli("--sweep", f, f"input.dir={photos}", f"output.dir={sweep}", "launcher.workers=1", "num_shards=2",
                  "sweep.shared_pass=false")
    assert "shared pass" not in out.stdout and "one pass" not in out.stdout, out.stdout
    for name, _ in _points(sweep):
        started = [json.loads(ln) for e in (sweep / name / "events").glob("*.jsonl")
                   for ln in e.read_text().splitlines() if '"started"' in ln]
        assert started and not any("shared_pass" in s for s in started)


def test_a_bad_sweep_file_is_refused_in_one_line_before_anything_runs(photos, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("models:\n  caffenet: {blobs: [fc7], pooling: avg}\n")
    sweep = tmp_path / "sweep"
    p = run_cli("--sweep", f, f"input.dir={photos}", f"output.dir={sweep}", check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "unknown key(s) pooling" in lines[0] and str(f) in lines[0], p.stderr
    assert not sweep.exists()
    f.write_text("models: {caffenet: [fc7]}\n")
    p = run_cli("--sweep", f, f"input.dir={photos}", f"output.dir={sweep}", "output.blobs=[conv5]", check=False)
    assert p.returncode == 2 and "output.blobs set both on the command line and in sweep file" in p.stderr, p.stderr
    p = run_cli("--sweep", tmp_path / "nope.yaml", f"input.dir={photos}", f"output.dir={sweep}", check=False)
    assert p.returncode == 2 and "nope.yaml" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not sweep.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_file_on_the_dev_cluster_submits_one_array_per_model_and_equals_local(cluster, tiny_net, photos,
                                                                                    tmp_path):
    f = _sweep_file(tmp_path, tiny_net)
    common = [f"input.dir={photos}", "num_shards=3", "batch_size=4"]
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    run_cli("--sweep", f, *common, f"output.dir={local}", "launcher.workers=1")
    out = run_cli("--sweep", f, *common, f"output.dir={slurm}", "launcher=slurm", "launcher.wait=true",
                  "launcher.shards_per_task=1", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
                  "launcher.timeout_min=10", "launcher.gpus_per_task=0")
    points = _points(slurm)
    assert [n for n, _ in points] == [n for n, _ in _points(local)]
    # one array per model: each pass's lead submitted one array, and its companions name the same
    arrays = {}
    for name, _ in points:
        subs = json.loads((slurm / name / "submissions.json").read_text())
        arrays[name] = {s["array_job_id"] for s in subs if s["array_job_id"]}
    assert all(len(a) == 1 for a in arrays.values()), arrays
    assert len(set().union(*arrays.values())) == 2, arrays
    assert arrays[points[0][0]] == arrays[points[1][0]] and arrays[points[2][0]] == arrays[points[3][0]] \
        == arrays[points[4][0]], arrays
    for name, _ in points:  # the same rows as the local sweep, bit for bit
        a, b = read_features(local / name / "features.h5"), read_features(slurm / name / "features.h5")
        assert a[1] == b[1] and all(np.array_equal(a[0][k], b[0][k]) for k in a[0]), name
    st = run_cli("status", slurm)
    assert len([ln for ln in st.stdout.splitlines() if "merged" in ln]) == 5, st.stdout + out.stdout
    # launcher.wait=false: the command returns once submitted, says so, and each pass's merge job
    # merges its companions too
    nowait = tmp_path / "nowait"
    out = run_cli("--sweep", f, *common, f"output.dir={nowait}", "launcher=slurm", "launcher.shards_per_task=1",
                  "launcher.cpus_per_task=1", "launcher.mem_gb=0.5", "launcher.timeout_min=10",
                  "launcher.gpus_per_task=0")
    assert "merged by its merge job" in out.stdout and "submitted" in out.stdout.splitlines()[-1], out.stdout
    wait_until(lambda: all((nowait / n / "features.h5").exists() and (nowait / n / "stats.json").exists()
                           for n, _ in points), timeout=600, what="the merge jobs")
    for name, _ in points:
        a, b = read_features(local / name / "features.h5"), read_features(nowait / name / "features.h5")
        assert a[1] == b[1] and all(np.array_equal(a[0][k], b[0][k]) for k in a[0]), name


def test_report_and_export_of_a_whole_sweep(tiny_net, photos, tmp_path):
    """`report SWEEP`: one page (the table, a link to each point's own report, the CKA heatmap),
    seen in a real Chromium; `export SWEEP OUT`: every point's self-contained file."""
    from report_check import coloured_share, need_chromium

    need_chromium()
    from browser import Browser

    sweep = tmp_path / "sweep"
    run_cli("-m", f"input.dir={photos}", f"output.dir={sweep}", *tiny_model_args(tiny_net),
            "output.blobs=[emb],[p1],[emb_t]", "output.pooling=avg", "launcher.workers=1", "num_shards=2")
    points = _points(sweep)
    out = run_cli("report", sweep)
    page = sweep / "report.html"
    assert str(page) in out.stdout and (sweep / "compare.json").exists()
    text = page.read_text()
    for name, _ in points:
        assert f'href="{name}/report.html"' in text and (sweep / name / "report.html").exists()
    with Browser() as b:
        b.open(page)
        assert b.problems() == [], b.problems()
        assert [u for u in b.requests() if not u.startswith("data:")] == [page.resolve().as_uri()]
        m = b.evaluate("""(() => { const s = document.querySelector('svg').getBoundingClientRect();
            return {rows: document.querySelectorAll('table tr').length, x: s.x, y: s.y + window.scrollY,
                    width: s.width, height: s.height, rects: document.querySelectorAll('svg rect').length}; })()""")
        assert m["rows"] == 1 + len(points) and m["rects"] == len(points) ** 2, m
        png = b.screenshot(clip={"x": m["x"], "y": m["y"], "width": m["width"], "height": m["height"]})
        assert coloured_share(png) > 0.05, "the heatmap has no colour"
    # export: each point's self-contained file, equal to its run's rows
    exported = tmp_path / "exported"
    run_cli("export", sweep, exported)
    for name, _ in points:
        a, b2 = read_features(sweep / name / "features.h5"), read_features(exported / f"{name}.h5")
        assert a[1] == b2[1] and all(np.array_equal(a[0][k], b2[0][k]) for k in a[0])
    bad = run_cli("export", sweep, tmp_path / "e2", "--format", "embeddings", check=False)
    assert bad.returncode == 2 and "one point" in bad.stderr, bad.stderr


@pytest.mark.unit
def test_how_a_silent_attempt_ended_is_slurms_word_on_that_run_of_its_job():
    from runner.ui.report import attempt_word
    from runner.jobs.slurm import JobWord

    requeued_then_done = JobWord("5_0", "COMPLETED", "sacct", runs=("REQUEUED", "COMPLETED"), node="node2")
    assert attempt_word({"restart": 0}, requeued_then_done) == ("requeued", "requeued by Slurm (REQUEUED)")
    assert attempt_word({"restart": 1}, requeued_then_done) is None  # it finished: its own words say so
    cancelled = JobWord("6_1", "CANCELLED", "sacct", runs=("CANCELLED",), node="node1")
    assert attempt_word({"restart": 0}, cancelled) == ("killed", "killed by Slurm: CANCELLED (scancel) on node1")
    failed = JobWord("7_0", "FAILED", "scontrol", exit_code="3:0")
    assert attempt_word({}, failed) == ("killed", "killed by Slurm: FAILED, exit code 3:0")
    assert attempt_word({}, JobWord("8", "RUNNING", "squeue")) is None


def test_retry_of_a_point_written_by_a_shared_pass_stays_that_points_own(tiny_net, photos, tmp_path):
    """A companion point (written by its lead's pass) is retried as itself: the image fixed since
    becomes its row, and the point then holds the rows of the same point run alone on the fixed
    input; the lead is not touched."""
    folder = tmp_path / "in"
    good = folder_with_a_broken_file(photos, folder)
    sweep = tmp_path / "sweep"
    common = [f"input.dir={folder}", *tiny_model_args(tiny_net), "launcher.workers=1", "num_shards=1",
              "run.max_failure_fraction=null"]
    out = run_cli("-m", *common, f"output.dir={sweep}", "output.blobs=[emb],[emb_t]")
    assert "2 of them in 1 shared pass" in out.stdout, out.stdout
    (lead, _), (comp, overrides) = _points(sweep)
    lead_before = read_features(sweep / lead / "features.h5")
    fix_broken_file(folder, good[0])
    p = run_cli("retry", sweep / comp, "--reason", "empty file")
    assert "1 now feature rows" in p.stdout, p.stdout
    assert run_cli("verify", sweep / comp).returncode == 0
    alone = tmp_path / "alone"
    run_cli(*common, f"output.dir={alone}", "output.blobs=[emb_t]")
    a, b = read_features(alone / "features.h5"), read_features(sweep / comp / "features.h5")
    assert a[1] == b[1] and len(a[1]) == 5 and np.array_equal(a[0]["emb_t"], b[0]["emb_t"])
    after = read_features(sweep / lead / "features.h5")
    assert after[1] == lead_before[1] and np.array_equal(after[0]["emb"], lead_before[0]["emb"])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_taking_free_shards_takes_those_only_a_companion_lacks(cluster, tiny_net, photos, tmp_path):
    """One task for three shards (launcher.shards_per_task=3): after two of a companion's shards are
    lost, the same command's one task redoes its own and takes the other (free while any point of
    the pass lacks it): the companion needs no array of its own."""
    sweep = tmp_path / "sweep"
    args = ["-m", f"input.dir={photos}", f"output.dir={sweep}", *tiny_model_args(tiny_net),
            "output.blobs=[emb],[emb_t]", "launcher=slurm", "launcher.wait=true", "num_shards=1",
            "launcher.shards_per_task=3", "launcher.cpus_per_task=1", "launcher.mem_gb=0.5",
            "launcher.timeout_min=10", "launcher.gpus_per_task=0"]
    run_cli(*args)
    (lead, _), (comp, _) = _points(sweep)
    before = read_features(sweep / comp / "features.h5")
    shards = sorted((sweep / comp / "shards").glob("shard-*.h5"))
    assert len(shards) == 3
    for s in shards[1:]:
        s.unlink()
    run_cli(*args)
    assert all(s.exists() for s in shards)
    arrays = lambda name: {s["array_job_id"] for s in json.loads(  # noqa: E731
        (sweep / name / "submissions.json").read_text()) if s["array_job_id"]}
    assert len(arrays(lead)) == 2 and arrays(comp) <= arrays(lead), (arrays(lead), arrays(comp))
    after = read_features(sweep / comp / "features.h5")
    assert before[1] == after[1] and all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
