"""`caffe-runner retry RUN_DIR`: extract again the images a finished run recorded as failed for a
reason that can pass (a read error, a file not found or not readable then), and fold every
success into the run: the shard file then holds the image as a feature row instead of a
failure row, features.h5 and stats.json are rewritten, and retries.json records what was tried.

Crash safety (a retry killed at any moment resumes, or leaves the run exactly as it was):
  1. stage   each shard with candidates is rewritten whole, rows in manifest order, into
             retry/<shard>.h5 (via .partial); the run itself is not touched;
  2. commit  retry/commit.json is written (atomically) naming the staged files and the record;
  3. apply   each staged file replaces its shard (fsync'd, renamed), features.h5 is merged again,
             retries.json and stats.json are rewritten, then commit.json and retry/ are removed.
A rerun finds commit.json and finishes step 3 (every step is idempotent); without it, staged
files are discarded unless they were made from the shard file as it still is.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .. import log
from ..errors import ConfigError, RunBusyError, RunnerError, shell_quote
from ..store.atomic import atomic_write_text, commit as commit_file
from ..inputs import input_stamp, open_reader
from ..store.manifest import display_name, load_manifest
from ..store.private import check_private
from ..store.stats import TRANSIENT, is_transient, reason_kind, write_stats  # noqa: F401 (TRANSIENT: re-exported)
from ..store.rundir import partials_of, probe_writable
from ..results.write import ShardWriter, blobs_attr, dataset_name
from ..store.h5 import open_h5
from ..faults import step

RETRY_DIR = "retry"
COMMIT = "commit.json"
RETRIES_JSON = "retries.json"
COPY_ROWS = 4096


def selector(all_reasons: bool, reasons: Sequence[str]):
    """Which failure reasons to retry: transient ones, those starting with one of `reasons`, or all."""
    if all_reasons:
        return lambda r: True
    if reasons:
        return lambda r: r.startswith(tuple(reasons)) or reason_kind(r) in reasons
    return is_transient


def _source_stamp(path: Path) -> str:
    s = path.stat()
    return f"{s.st_size}:{s.st_mtime_ns}"


def candidates(run, select) -> Dict[int, List[Tuple[int, bytes, str]]]:
    """Per shard: its recorded failures (index, raw name, reason) that `select` picks."""

    out: Dict[int, List[Tuple[int, bytes, str]]] = {}
    for i in range(run.num_shards):
        with open_h5(run.shard_path(i), "r") as f:
            why = f["failures/reason"].asstr()[:]
            pick = [k for k, r in enumerate(why) if select(r)]
            if pick:
                idx, raw = f["failures/index"][:], f["failures/names_raw"][:]
                out[i] = [(int(idx[k]), bytes(raw[k]), str(why[k])) for k in pick]
    return out


class _Extractor:
    """The run's net and decoder, loaded once in this process, applied to chosen manifest entries."""

    def __init__(self, run, threads: int):
        from ..engine.features import FeaturePost
        from ..engine.model import load_engine
        from ..task.identity import configure_threads

        configure_threads(threads)
        self.threads = int(threads)
        cfg = run.cfg
        run.check_model_files()  # the rows it adds are the plan's net's (refused by name if a file changed)
        spec, self.blobs, decoder, self.transform, in_shape = run.pipeline_parts()
        self.oversample = tuple(in_shape[1:]) if bool(cfg.model.preprocess.oversample) else None
        self.engine = load_engine(cfg, spec, self.blobs, in_shape, threads, gpu_device=0)
        self.post = FeaturePost(str(cfg.output.pooling), float(cfg.output.gem_p), bool(cfg.output.l2_normalize))
        self.reader = open_reader(load_manifest(run.rundir.path), decoder)
        self.batch_size = int(cfg.batch_size)
        self.workers = int(cfg.decode.workers)

    def run(self, indices: Sequence[int]) -> Tuple[Dict[int, Dict[str, np.ndarray]], Dict[int, str]]:
        """Features of the entries that decode now, and the reasons of those that still fail."""
        from ..task.extract import decode_window
        from ..engine.preprocess import oversample as oversample_crops

        items = (it for i in indices for it in self.reader.items(i, i + 1))
        feats: Dict[int, Dict[str, np.ndarray]] = {}
        failed: Dict[int, str] = {}
        for batch, results in decode_window(items, self.batch_size, self.workers, 2):
            ok = [(it.index, img) for it, (img, _) in zip(batch, results) if img is not None]
            failed.update({it.index: why for it, (img, why) in zip(batch, results) if img is None})
            if not ok:
                continue
            imgs = np.stack([img for _, img in ok])
            if self.oversample:
                imgs = oversample_crops(imgs, self.oversample)
            out = self.engine.forward(self.transform(imgs))
            if self.oversample:
                out = {b: v.reshape((len(ok), 10) + v.shape[1:]).mean(axis=1) for b, v in out.items()}
            out = {b: self.post(v) for b, v in out.items()}
            for k, (i, _) in enumerate(ok):
                feats[i] = {b: out[b][k] for b in self.blobs}
        return feats, failed

    def close(self) -> None:
        self.reader.close()


def stage_shard(run, i: int, cands: List[Tuple[int, bytes, str]], ex: _Extractor, staged: Path) -> Dict:
    """Write shard i with its recovered images as feature rows to `staged` (via .partial)."""

    src_path = run.shard_path(i)
    feats, still = ex.run([j for j, _, _ in cands])
    with open_h5(src_path, "r") as src:
        a = dict(src.attrs)
        blobs = blobs_attr(a)
        shapes = {b: tuple(src[f"features/{dataset_name(b)}"].shape[1:]) for b in blobs}
        dtype = src[f"features/{dataset_name(blobs[0])}"].dtype
        labels = "labels" in src
        fail = {k: src[f"failures/{k}"][:] for k in ("index", "names_raw", "reason") + (("labels",) if labels else ())}
        reasons = fail["reason"].astype(object)
        reasons = np.array([r.decode() if isinstance(r, bytes) else str(r) for r in reasons], dtype=object)
        # the recovered rows, in manifest order, with their names and labels from the failure record
        pos_of = {int(j): k for k, j in enumerate(fail["index"])}
        new = sorted(j for j in feats)
        new_raw = [bytes(fail["names_raw"][pos_of[j]]) for j in new]
        new_lab = {j: int(fail["labels"][pos_of[j]]) for j in new} if labels else {}
        tried = {j for j, _, _ in cands}
        a.update(retried=int(a.get("retried", 0)) + len(tried), retry_recovered=len(new),
                 retry_source=_source_stamp(src_path), retry_blas_threads=ex.threads)
        for partial in partials_of(staged):
            partial.unlink(missing_ok=True)
        # a fresh file, put in place over any older staged one (the launch lock guards a retry)
        w = ShardWriter(staged, {b: s for b, s in shapes.items()}, str(dtype), a, str(a["fingerprint"]),
                        int(run.cfg.batch_size), labels=labels, resume=False, first_wins=False)
        try:
            idx = src["index"]
            n = len(idx)
            ins = np.searchsorted(idx[:], np.asarray(new, np.int64)) if new else np.zeros(0, np.int64)
            lab_ds = src["labels"] if labels else None
            for s in range(0, max(n, 1), COPY_ROWS):
                e = min(n, s + COPY_ROWS)
                last = e >= n
                take = [k for k, p in enumerate(ins) if s <= p < e or (last and p >= e)]
                old_ix = idx[s:e].tolist()
                merged = sorted([(j, 0, k) for k, j in enumerate(old_ix)] + [(new[k], 1, k) for k in take])
                rows_ix = [j for j, _, _ in merged]
                names = [bytes(src["names_raw"][s + k]) if o == 0 else new_raw[k] for _, o, k in merged]
                out = {}
                for b in blobs:
                    old = src[f"features/{dataset_name(b)}"][s:e]
                    out[b] = np.stack([old[k] if o == 0 else feats[new[k]][b].astype(dtype) for _, o, k in merged]) \
                        if merged else np.zeros((0,) + shapes[b], dtype)
                lab = {}
                if labels:
                    olab = lab_ds[s:e]
                    lab = {j: (int(olab[k]) if o == 0 else new_lab[new[k]]) for j, o, k in merged}
                w.write_batch(0, rows_ix, names, out, [], lab)
                step(f"shard {i} half-staged")
            keep = [k for k, j in enumerate(fail["index"]) if int(j) not in feats]
            failures = [(int(fail["index"][k]), bytes(fail["names_raw"][k]),
                         still.get(int(fail["index"][k]), reasons[k])) for k in keep]
            flab = {int(fail["index"][k]): int(fail["labels"][k]) for k in keep} if labels else {}
            w.write_batch(0, [], [], {}, failures, flab)
            w.set_done(int(a.get("next", a["stop"] - a["start"])))
            w.finish()
        finally:
            w.close()
    from collections import Counter

    return {"shard": i, "retried": len(tried), "recovered": len(new), "tried": sorted(tried),
            "still_failing": dict(Counter(reason_kind(r) for r in still.values()))}


def shard_threads(run, i: int) -> int:
    """The BLAS threads shard i was extracted with (run_shard records them): BLAS sums in another
    order with another thread count, so a retry that is to be bit-identical runs with these.
    A shard made before they were recorded: this task's default (cores, or the Slurm allocation)."""

    from ..task.identity import default_threads

    with open_h5(run.shard_path(i), "r") as f:
        t = f.attrs.get("blas_threads")
    if t is not None:
        return int(t)
    n = default_threads()
    log.warning("retry: shard %d does not record the BLAS threads it was extracted with (an older caffe-runner): "
                "retrying with %d; its retried rows may differ from a clean run's in the last bits", i, n)
    return n


def run_threads(run, shards: Sequence[int]) -> int:
    """One thread count for this process's Caffe (BLAS reads it once, when it loads): the shards'."""
    from collections import Counter

    counts = Counter(shard_threads(run, i) for i in shards)
    threads = counts.most_common(1)[0][0]
    if len(counts) > 1:
        log.warning("retry: the shards were extracted with different BLAS thread counts (%s): retrying with %d; "
                    "rows of the other shards may differ from a clean run's in the last bits",
                    ", ".join(f"{t}: {n} shard(s)" for t, n in sorted(counts.items())), threads)
    return threads


def stage_task(run_dir: str, i: int, cands: List[Tuple[int, bytes, str]], threads: Optional[int] = None) -> Dict:
    """Stage one shard in a process of its own (a Slurm array task of `retry` on a Slurm run),
    with the BLAS threads the shard was extracted with."""
    from ..run.plan import load_run_dir
    from ..task.identity import setup_task_logging

    setup_task_logging()
    run = load_run_dir(run_dir)
    ex = _Extractor(run, threads or shard_threads(run, i))
    try:
        return _stage_and_describe(run, i, cands, ex)
    finally:
        ex.close()


def _stage_and_describe(run, i: int, cands, ex) -> Dict:
    d = _retry_dir(run)
    stem = run.shard_path(i).stem
    info = stage_shard(run, i, cands, ex, d / f"{stem}.h5")
    step(f"shard {i} staged, undescribed")
    info.update(stem=stem, source=_source_stamp(run.shard_path(i)))
    atomic_write_text(d / f"{stem}.json", json.dumps(info))
    log.info("retry: shard %d: %d of %d recovered (%d BLAS thread(s))", i, info["recovered"], info["retried"],
             ex.threads)
    step(f"shard {i} staged")
    return info


def _staged(run, i: int, cands) -> Optional[Dict]:
    """A shard staged by an earlier (killed) retry of the same images, from the shard file as it
    still is."""
    d = _retry_dir(run)
    stem = run.shard_path(i).stem
    try:
        info = json.loads((d / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if (d / f"{stem}.h5").exists() and info.get("source") == _source_stamp(run.shard_path(i)) and \
            info.get("tried") == sorted(j for j, _, _ in cands):
        return info
    return None


def _retry_dir(run) -> Path:
    return Path(run.rundir.path) / RETRY_DIR


def apply_commit(run) -> bool:
    """Step 3 (idempotent): put staged shards in place, merge, record. False: no commit pending."""
    from ..results.merge import merge_run

    d = _retry_dir(run)
    commit_path = d / COMMIT
    if not commit_path.exists():
        return False
    commit = json.loads(commit_path.read_text())
    for stem in commit["shards"]:
        staged = d / f"{stem}.h5"
        if staged.exists():
            commit_file(staged, run.rundir.shards_dir / f"{stem}.h5")
            step(f"{stem} applied")
    if commit.get("merge"):
        merge_run(run)
        step("merged")
    path = Path(run.rundir.path) / RETRIES_JSON
    history = json.loads(path.read_text()) if path.exists() else []
    if not any(h.get("id") == commit["record"]["id"] for h in history):
        history.append(commit["record"])
        atomic_write_text(path, json.dumps(history, indent=1))
        step("recorded")
    old = {}
    try:
        old = json.loads((Path(run.rundir.path) / "stats.json").read_text())
    except (OSError, ValueError):
        pass
    write_stats(run, old.get("elapsed_s"))
    step("stats written")
    commit_path.unlink()
    shutil.rmtree(d, ignore_errors=True)
    return True


def check_ready(run) -> None:
    """Retry works on a finished run only: refuse (exit 2) a running or unfinished one."""
    from ..run.status import run_status

    st = run_status(run.rundir.path, use_sacct=False)
    running = st["counts"].get("running", 0)
    if running:
        raise ConfigError(f"{run.rundir.path} is still running ({running} shard(s) running): wait until it ends "
                          f"(caffe-runner status --watch {shell_quote(run.rundir.path)}), then retry; nothing was changed")
    missing = run.missing_shards()
    if missing:
        raise ConfigError(f"{run.rundir.path} is not finished ({len(missing)} of {run.num_shards} shards not "
                          "complete): rerun the extraction (same command) to finish it, then retry; nothing was "
                          "changed")


def check_writable(path: Path) -> None:
    try:
        probe_writable(Path(path))
    except OSError as e:
        raise ConfigError(f"{path} is not writable ({e.strerror}): retry rewrites shard files there; fix the "
                          "permissions or run as the run's owner; nothing was changed") from e


def retry_run(run_dir: Path, select=is_transient, reasons_text: Iterable[str] = ("transient",), dry_run: bool = False,
              threads: Optional[int] = None, args: Sequence[str] = (), here: bool = False) -> Dict:
    """Retry the selected failures of a finished run, staging the shards as the run's launcher
    runs tasks (a Slurm run: one array task per shard), or in this process (`here`, and runs
    whose launcher runs work in the calling process)."""
    from ..store.events import record_command
    from ..launch import launch_lock, launcher_for
    from ..run.plan import load_run_dir

    run = load_run_dir(run_dir)
    rd = Path(run.rundir.path)
    check_private(rd, "the run directory")  # before anything is written: its retry tasks' pickles are read back from logs/
    check_writable(rd)
    try:
        lock = launch_lock(rd)
        lock.__enter__()
    except RunBusyError as e:
        raise ConfigError(f"{rd} is still running (held by {e.holder}): wait until it ends (caffe-runner status "
                          f"--watch {rd}), then retry; nothing was changed") from None
    try:
        resumed = apply_commit(run)  # a retry killed while applying: finish it first
        if resumed:
            log.warning("finished applying an interrupted retry of %s", rd)
        check_ready(run)
        cands = candidates(run, select)
        n = sum(len(v) for v in cands.values())
        result = {"run_dir": str(rd), "retried": n, "recovered": 0, "still_failing": 0, "shards": [],
                  "resumed_commit": resumed}
        if not n or dry_run:
            result["dry_run"] = dry_run
            result["candidates"] = {i: [(j, display_name(raw), r) for j, raw, r in v] for i, v in cands.items()}
            return result
        d = rd / RETRY_DIR
        d.mkdir(exist_ok=True)
        for stale in d.glob("*.partial*"):
            stale.unlink()
        step("started")
        t0 = time.time()
        # the input as this retry reads it: a file fixed for the retry is no "change since listing" (verify)
        stamp = input_stamp(run.cfg.input)
        staged_info = {i: info for i in cands for info in [_staged(run, i, cands[i])] if info}
        todo = {i: cs for i, cs in cands.items() if i not in staged_info}
        shards = sorted(todo)
        if todo and not here and launcher_for(run.cfg).run_tasks(
                run, stage_task, [(str(rd), i, todo[i], threads or shard_threads(run, i)) for i in shards], "retry"):
            staged_info.update({i: _staged(run, i, todo[i]) for i in todo})
            missing = [i for i, info in staged_info.items() if not info]
            if missing:
                raise RunnerError(f"retry tasks ended without staging shards {missing}: rerun `caffe-runner retry`")
        elif todo:
            ex = _Extractor(run, threads or run_threads(run, sorted(todo)))
            try:
                for i, cs in sorted(todo.items()):
                    staged_info[i] = _stage_and_describe(run, i, cs, ex)
            finally:
                ex.close()
        staged_info = [staged_info[i] for i in sorted(staged_info)]
        still: Dict[str, int] = {}
        for info in staged_info:
            for k, v in info["still_failing"].items():
                still[k] = still.get(k, 0) + v
        record = {"id": f"{time.time():.6f}-{os.getpid()}", "t": time.time(), "host": socket.gethostname(),
                  "reasons": list(reasons_text), "retried": n, "recovered": sum(x["recovered"] for x in staged_info),
                  "still_failing": sum(still.values()), "still_failing_by_reason": still,
                  "elapsed_s": round(time.time() - t0, 3), "input_stamp": stamp,
                  "shards": {str(x["shard"]): {"retried": x["retried"], "recovered": x["recovered"]}
                             for x in staged_info}}
        atomic_write_text(d / COMMIT, json.dumps({"shards": [x["stem"] for x in staged_info], "record": record,
                                                  "merge": run.rundir.merged.exists()}))
        step("committed")
        apply_commit(run)
        record_command(rd, "retry", list(args))
        result.update(recovered=record["recovered"], still_failing=record["still_failing"],
                      still_failing_by_reason=still, shards=staged_info)
        return result
    finally:
        lock.__exit__(None, None, None)
