"""After the run, end to end on real photos with a real Caffe net: `report` opened in headless
Chromium, `export --format embeddings` indexed by autofaiss, `retry` of images that were missing
(and killed half-way), `status --watch`, and the bad-input answers of the three commands."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import CLI, REPO, fix_broken_file, folder_with_a_broken_file, run_cli, tiny_model_args, wait_until
from report_check import check_report

pytestmark = pytest.mark.slow

MISSING = ["coffee.jpg", "stereo/motorcycle_left.jpg", "rocket.jpg"]


def _tree_state(run: Path):
    """Every file of the run that a retry may change, with its bytes' hash."""
    import hashlib

    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.parts[len(run.parts)] in ("shards", "features.h5", "stats.json", "retries.json"):
            out[str(p.relative_to(run))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def _rows(run: Path):
    with h5py.File(run / "features.h5", "r") as f:
        return (list(f["names"].asstr()[:]), f["feats"][:], f["labels"][:] if "labels" in f else None,
                list(f["failures/names"].asstr()[:]), list(f["failures/reason"].asstr()[:]))


@pytest.fixture(scope="module")
def inputs(photos, tmp_path_factory):
    """A labelled Caffe list over a copy of the photos, plus a file that is not an image."""
    d = tmp_path_factory.mktemp("after")
    shutil.copytree(photos, d / "in")
    (d / "in" / "notes.jpg").write_text("not an image")
    names = sorted(str(p.relative_to(d / "in")) for p in (d / "in").rglob("*") if p.is_file())
    (d / "list.txt").write_text("".join(f"in/{n} {k % 5}\n" for k, n in enumerate(names)))
    return d


def _model(tiny_net):
    return [*tiny_model_args(tiny_net), "batch_size=4"]


@pytest.fixture(scope="module")
def runs(inputs, tiny_net, tmp_path_factory):
    """`failed`: a 3-shard run made while MISSING were gone (then restored); `ref`: the same
    input, nothing missing."""
    d = tmp_path_factory.mktemp("runs")
    # a few broken files among ~20 photos: more than run.max_failure_fraction's default 5%
    base = [f"input.list={inputs / 'list.txt'}", "num_shards=3", "launcher.workers=2", *_model(tiny_net),
            "run.max_failure_fraction=null"]
    run_cli(*base, f"output.dir={d / 'ref'}")
    away = d / "away"
    for n in MISSING:
        (away / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(inputs / "in" / n, away / n)
    try:
        run_cli(*base, f"output.dir={d / 'failed'}")
    finally:
        for n in MISSING:
            shutil.move(away / n, inputs / "in" / n)
    return {"failed": d / "failed", "ref": d / "ref", "dir": d}


def test_report_of_a_local_run_in_chromium(runs, tmp_path):
    run = runs["failed"]
    p = run_cli("report", run)
    out = run / "report.html"
    assert str(out) in p.stdout and out.stat().st_size < 500_000
    seen = check_report(out, screenshot=tmp_path / "report.png")
    assert seen["state"] == "merged"
    text = seen["text"]
    assert "listed but not found" in text and "not an image" in text and "in/notes.jpg" in text
    assert all(f"in/{n}" in text for n in MISSING)  # examples of the reason, by name
    assert "Commands that made the run" in text and "input.list=" in text
    assert "forward_busy_fraction" in text  # per-shard figures from the shard files
    # one attempt per shard, each finished (the attempts table, folded in the page)
    assert out.read_text().count("<td>finished</td>") == 3
    events = sorted((run / "events").glob("*.jsonl"))
    assert len(events) == 3
    kinds = [json.loads(line)["event"] for line in events[0].read_text().splitlines()]
    assert kinds[0] == "started" and kinds[-1] == "finished"


def test_retry_folds_recovered_images_into_the_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["failed"], run)
    names0, _, _, fnames0, reasons0 = _rows(run)
    assert sorted(fnames0) == sorted([f"in/{n}" for n in MISSING] + ["in/notes.jpg"])
    dry = run_cli("retry", run, "--dry-run")
    assert "3 image(s) would be retried" in dry.stdout
    assert all(f"  in/{n}: " in dry.stdout for n in MISSING), dry.stdout  # by name (issue 36), not "entry N"
    p = run_cli("retry", run)
    assert "retried 3 image(s): 3 now feature rows, 0 still failing" in p.stdout, p.stdout
    names, feats, labels, fnames, reasons = _rows(run)
    rnames, rfeats, rlabels, rfnames, _ = _rows(runs["ref"])
    assert names == rnames and fnames == rfnames == ["in/notes.jpg"]
    np.testing.assert_array_equal(feats, rfeats)  # the retried rows equal a clean run's, bit for bit
    np.testing.assert_array_equal(labels, rlabels)
    # ... because they were computed with the BLAS threads of the run's workers (BLAS sums in
    # another order with another thread count: bits differ on some CPUs)
    retried = 0
    for shard in sorted((run / "shards").glob("*.h5")):
        with h5py.File(shard, "r") as f:
            if int(f.attrs.get("retried", 0)):
                retried += 1
                assert int(f.attrs["retry_blas_threads"]) == int(f.attrs["blas_threads"]), dict(f.attrs)
    assert retried
    assert run_cli("verify", run).returncode == 0
    stats = json.loads((run / "stats.json").read_text())
    assert stats["failures"] == 1 and stats["retries"]["recovered"] == 3 and stats["retries"]["retried"] == 3
    assert not (run / "retry").exists()
    # again: nothing transient is left; the one that is not an image is retried only when asked
    out = run_cli("retry", run).stdout
    assert "no failed image to retry (transient: file not found, " in out and "(transient (" not in out, out
    p = run_cli("retry", run, "--reason", "not an image")
    assert "retried 1 image(s): 0 now feature rows, 1 still failing" in p.stdout
    assert run_cli("verify", run).returncode == 0
    assert len(json.loads((run / "retries.json").read_text())) == 2
    run_cli("report", run)
    seen = check_report(run / "report.html")
    assert "Retries" in seen["text"] and "transient" in seen["text"]


def test_retry_killed_at_any_moment_resumes_exactly(runs, tmp_path):
    pristine = runs["failed"]
    before = _tree_state(pristine)
    ref = _rows(runs["ref"])
    # the retry is killed at each of its steps in turn (runner.faults.step: step N waits to
    # be killed once it is reached), from staging to its last write: no clock decides where
    outcomes = {}
    for n in range(64):
        run, hold = tmp_path / f"kill{n}", tmp_path / f"hold{n}"
        shutil.copytree(pristine, run)
        hold.write_text(str(n))
        at = Path(f"{hold}.at")
        p = subprocess.Popen(CLI + ["retry", str(run)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, CAFFE_RUNNER_TEST_STEP_HOLD=str(hold)))
        wait_until(lambda: at.exists() or p.poll() is not None, timeout=300, what=f"the retry at step {n}")
        if not at.exists():  # past its last step: it ran to the end
            assert p.wait() == 0, p.stderr.read()
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        step = at.read_text()
        pending = (run / "retry" / "commit.json").exists()
        state = "commit pending" if pending else "unchanged" if _tree_state(run) == before else "??"
        outcomes[step] = state
        committed = step in ("committed", "merged", "recorded", "stats written") or step.endswith(" applied")
        assert state == ("commit pending" if committed else "unchanged"), \
            f"killed at {step!r}: the run is {state}, neither as it was nor resumable"
        run_cli("retry", run)  # resumes (or starts over) and ends exact
        got = _rows(run)
        assert got[0] == ref[0] and got[3] == ref[3]
        np.testing.assert_array_equal(got[1], ref[1])
        assert run_cli("verify", run).returncode == 0
        assert len(json.loads((run / "retries.json").read_text())) == 1, "a resumed retry is recorded once"
    else:
        pytest.fail("the retry never ran past its held steps")
    print("kill outcomes:", outcomes)
    steps = list(outcomes)
    assert steps[:1] == ["started"] and steps[-1:] == ["stats written"], steps
    for want in ("half-staged", "staged, undescribed", " staged", "committed", " applied", "merged", "recorded"):
        assert any(s.endswith(want) for s in steps), (want, steps)


def test_retry_killed_while_applying_is_finished_by_the_next(runs, tmp_path, monkeypatch):
    """The narrow window between the first staged shard replacing its original and the
    merge: a rerun finds commit.json and completes it."""
    import runner.results.merge
    from runner.ui.retry import retry_run

    run = tmp_path / "run"
    shutil.copytree(runs["failed"], run)

    def killed(*a, **k):
        raise SystemExit("killed while applying")

    monkeypatch.setattr(runner.results.merge, "merge_run", killed)
    with pytest.raises(SystemExit):
        retry_run(run)
    monkeypatch.undo()
    assert (run / "retry" / "commit.json").exists()
    assert run_cli("verify", run, check=False).returncode == 1  # features.h5 is stale until finished
    p = run_cli("retry", run)
    assert "finished an interrupted retry first" in p.stdout
    assert "no failed image to retry" in p.stdout
    got, ref = _rows(run), _rows(runs["ref"])
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[1], ref[1])
    assert run_cli("verify", run).returncode == 0


AUTOFAISS = "2.18.0"


@pytest.fixture(scope="session")
def autofaiss_python():
    """autofaiss pins numpy<2 (this venv has numpy 2): it lives in a venv of its own, made once
    and cached (pyarrow<20: later pyarrow needs numpy 2)."""
    cache = Path(os.environ.get("CAFFE_RUNNER_CACHE", Path.home() / ".cache" / "caffe-runner"))
    venv = cache / f"autofaiss-{AUTOFAISS}"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import autofaiss, faiss, pyarrow"]
    if not py.exists() or subprocess.run(check, capture_output=True).returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"autofaiss=={AUTOFAISS}", "numpy<2", "pyarrow<20"],
                       check=True, timeout=900)
    return py


SEARCH = """
import json, sys, faiss, numpy as np
index = faiss.read_index(sys.argv[1])
q = np.load(sys.argv[2])
_, ids = index.search(q, 1)
print(json.dumps(ids[:, 0].tolist()))
"""


def test_export_embeddings_autofaiss_finds_each_image(runs, tmp_path, autofaiss_python):
    import pyarrow.parquet as pq

    run, out = runs["ref"], tmp_path / "emb"
    p = run_cli("export", run, out, "--format", "embeddings", "--part-rows", "8")
    assert str(out) in p.stdout
    embs = sorted((out / "img_emb").glob("*.npy"))
    metas = sorted((out / "metadata").glob("*.parquet"))
    names, feats, labels, _, _ = _rows(run)
    assert [e.name for e in embs] == ["img_emb_0000.npy", "img_emb_0001.npy", "img_emb_0002.npy"]
    assert [m.stem.split("_")[1] for m in metas] == [e.stem.split("_")[2] for e in embs]
    table = [pq.read_table(m).to_pydict() for m in metas]
    meta = {k: sum((t[k] for t in table), []) for k in table[0]}
    assert meta["image_path"] == names and meta["row"] == list(range(len(names)))
    assert meta["label"] == labels.tolist() and len(set(meta["label"])) > 1  # labels carried
    x = np.concatenate([np.load(e) for e in embs])
    np.testing.assert_array_equal(x, feats.reshape(len(feats), -1))
    assert max(len(np.load(e)) for e in embs) == 8
    idx = tmp_path / "knn.index"
    b = subprocess.run([str(autofaiss_python), "-m", "autofaiss.external.quantize", "build_index",
                        f"--embeddings={out / 'img_emb'}", f"--index_path={idx}",
                        f"--index_infos_path={tmp_path / 'infos.json'}", "--metric_type=l2",
                        "--file_format=npy"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if b.returncode != 0:  # the console script, as the README shows it
        b = subprocess.run([str(Path(autofaiss_python).parent / "autofaiss"), "build_index",
                            f"--embeddings={out / 'img_emb'}", f"--index_path={idx}",
                            f"--index_infos_path={tmp_path / 'infos.json'}", "--metric_type=l2",
                            "--file_format=npy"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert b.returncode == 0 and idx.exists(), b.stderr[-3000:]
    pick = [0, 5, len(names) - 1]
    q = tmp_path / "q.npy"
    np.save(q, feats.reshape(len(feats), -1)[pick].astype(np.float32))
    s = subprocess.run([str(autofaiss_python), "-c", SEARCH, str(idx), str(q)], capture_output=True, text=True,
                       check=True)
    found = json.loads(s.stdout)
    assert found == pick  # each image is its own nearest neighbour
    assert [meta["image_path"][i] for i in found] == [names[i] for i in pick]  # ids map back to names


def _held_run(inputs, tiny_net, out: Path, gate: Path, batch_s: float = 0.0, source: str = ""):
    """A live run the test holds with a gate file (runner.engine.simulated.gate_allows): each shard's k-th
    image that decodes (batches of 1, each taking at least batch_s) is done once the gate holds a
    number >= k, or "open" (an image that fails to decode needs no forward: it passes the gate)."""
    args = [source or f"input.list={inputs / 'list.txt'}", f"output.dir={out}", "num_shards=2", "launcher.workers=2",
            *tiny_model_args(tiny_net), "backend=simulated", f"simulated_batch_s={batch_s}", "batch_size=1",
            "heartbeat_s=0.000001", f"simulated_gate={gate}"]
    return subprocess.Popen(CLI + args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(run: Path) -> int:
    total = 0
    for p in (run / "status").glob("*.json"):
        try:
            total += int(json.loads(p.read_text()).get("done", 0))
        except ValueError:
            pass
    return total


def test_report_watch_and_refusals_on_a_run_in_progress(inputs, tiny_net, tmp_path):
    run, gate = tmp_path / "live", tmp_path / "gate"
    gate.write_text("2")  # each shard holds after 2 images (1 s each: the report's rate chart has a slope)
    proc = _held_run(inputs, tiny_net, run, gate, batch_s=1.0)
    try:
        wait_until(lambda: _done(run) == 4 or proc.poll() is not None, timeout=120, what="the live run, held")
        assert proc.poll() is None, proc.communicate()
        # report: made for a run in progress, and says so
        run_cli("report", run)
        seen = check_report(run / "report.html")
        assert seen["state"] == "running" and "still in progress" in seen["text"]
        assert "running now" in seen["text"]
        # export and retry refuse a run in progress: one line, exit 2, nothing written
        before = sorted(p.name for p in run.iterdir())
        for args, what in ((["export", run, tmp_path / "emb", "--format", "embeddings"], "export"),
                           (["retry", run], "retry")):
            p = run_cli(*args, check=False)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 2 and len(lines) == 1 and "still running" in lines[0], (what, p.stderr)
            assert "Traceback" not in p.stderr
        assert not (tmp_path / "emb").exists() and sorted(p.name for p in run.iterdir()) == before
        # status --watch follows it to the end (no terminal here: one view per refresh): three
        # views of the held run, then the gate opens
        w = subprocess.Popen(CLI + ["status", "--watch", "--interval", "0.5", str(run)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        while sum("(refreshed " in ln for ln in seen) < 3 and (line := w.stdout.readline()):
            seen.append(line)
        assert sum("running, 4/21 images" in ln for ln in seen) >= 3, seen
        gate.write_text("open")
        out, err = w.communicate(timeout=300)
        out = "".join(seen) + out
        assert w.returncode == 0 and out.count("(refreshed ") >= 3, (out, err)
        # the last view says the run has ended (issue 29 item 7), not when the next refresh is
        assert out.rstrip().splitlines()[-1].startswith("(the run is merged: nothing is running")
        assert ": merged, 21/21 images" in out
    finally:
        gate.write_text("open")
        proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_cli("report", run)
    seen = check_report(run / "report.html")
    assert seen["state"] == "merged" and "still in progress" not in seen["text"]


def test_status_watch_redraws_in_place_in_a_terminal(inputs, photos, tiny_net, tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("needs tmux (make test installs it)")
    run, gate = tmp_path / "live", tmp_path / "gate"
    gate.write_text("0")
    proc = _held_run(inputs, tiny_net, run, gate, source=f"input.dir={photos}")  # 20 images that all decode
    session = f"crwatch{os.getpid()}"

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-"], capture_output=True,
                              text=True).stdout

    try:
        wait_until(lambda: (run / "run.json").exists(), timeout=120, what="the run's plan")
        cmd = f"cd {REPO} && {' '.join(CLI)} status --watch --interval 0.3 {run}; sleep 30"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", cmd], check=True)
        screens = []
        for k in (1, 2, 3):  # the run moves on only when the test says; the view follows it
            gate.write_text(str(k))
            wait_until(lambda: f"running, {2 * k}/20 images" in screen(), timeout=120,
                       what=f"the view of the run at {2 * k} images")
            screens.append(screen())
        for s in screens:
            # redrawn in place: the history never holds two views
            assert s.count("(refreshed ") == 1, s
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        gate.write_text("open")
        proc.wait(timeout=300)


def test_bad_input_one_line_exit_2_nothing_changed(runs, tmp_path):
    not_a_run = tmp_path / "photos"
    not_a_run.mkdir()
    (not_a_run / "a.jpg").write_bytes(b"x")
    for args in (["report", not_a_run], ["retry", not_a_run],
                 ["export", not_a_run, tmp_path / "e", "--format", "embeddings"]):
        p = run_cli(*args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert "not a caffe-runner run directory" in p.stderr
    assert [x.name for x in not_a_run.iterdir()] == ["a.jpg"] and not (tmp_path / "e").exists()

    run = tmp_path / "run"
    shutil.copytree(runs["failed"], run)
    before = _tree_state(run)
    # unwritable targets: a report into a missing folder, an export onto an existing file,
    # a retry of a run whose folder is read-only (root writes anywhere: a read-only bind mount
    # would need privileges tests do not take, so a file stands where the run's retry/ goes)
    cases = [(["report", run, "-o", tmp_path / "nowhere" / "r.html"], "not writable"),
             (["export", run, run / "run.json", "--format", "embeddings"], "already exists"),
             (["export", run, tmp_path / "nodir" / "emb", "--format", "embeddings"], "does not exist"),
             (["export", run, tmp_path / "e2", "--format", "embeddings", "--blob", "nope"], "no such blob")]
    for args, words in cases:
        p = run_cli(*args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, (args, p.stderr)
    assert _tree_state(run) == before and not (tmp_path / "e2").exists()
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="cr-ro-"))  # pytest's tmp_path is 0700: nobody could not enter it
    os.chmod(top, 0o755)
    ro = top / "ro"
    shutil.copytree(runs["failed"], ro)
    for p in [ro, *ro.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        # root ignores permission bits: without the capabilities for it, it does not (still root, so
        # the venv is reachable wherever it lives, e.g. under a fresh machine's 0700 /root)
        nocaps = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
        p = subprocess.run([*nocaps, *CLI, "retry", str(ro)],
                           capture_output=True, text=True, cwd="/", env=dict(os.environ, HOME="/tmp",
                                                                             PYTHONPATH=str(REPO)))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "not writable" in p.stderr, p.stderr
        assert _tree_state(ro) == before
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_verify_stays_ok_after_a_file_fixed_for_a_retry(photos, tiny_net, tmp_path):
    """Issue 36: a broken file fixed in the input folder, then `retry --reason 'empty file'`: the
    retry read the input as it is now, so verify says OK (it said the input changed since listing)."""
    folder = tmp_path / "in"
    good = folder_with_a_broken_file(photos, folder)
    run = tmp_path / "run"
    args = [f"input.dir={folder}", f"output.dir={run}", *_model(tiny_net), "launcher.workers=1", "num_shards=1",
            "run.max_failure_fraction=null"]
    run_cli(*args)
    assert run_cli("verify", run).returncode == 0
    fix_broken_file(folder, good[0])
    p = run_cli("retry", run, "--reason", "empty file")
    assert "1 now feature rows" in p.stdout, p.stdout
    v = run_cli("verify", run, check=False)
    assert v.returncode == 0 and "changed since it was listed" not in v.stdout, v.stdout
    # a change after the retry is still seen
    shutil.copyfile(good[1], folder / "new.jpg")
    v = run_cli("verify", run, check=False)
    assert "changed since it was listed" in v.stdout, v.stdout
