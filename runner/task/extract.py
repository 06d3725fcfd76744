"""run_shard(cfg, index): the one shard function both launchers call.

Inside a task: decode threads feed a bounded window of batches, the net runs batch after
batch in this thread, a writer thread streams results to HDF5 and flushes each batch.
Memory is bounded by the window (decode.prefetch_batches) and the writer queue, whatever
the number of images.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import log
from ..engine.decodepool import decode_window
from ..engine.device import resolve_local_device
from ..store.manifest import display_name, load_manifest
from ..inputs import open_reader
from ..engine.model import load_engine
from ..run.sharedpass import companions, pass_blobs
from ..engine.modelcheck import check_model_loads
from ..run.plan import load_run
from ..engine.preprocess import oversample as oversample_crops
from ..errors import ShardBusyError, ShardLostError, shown
from ..store.events import EventLog, events_path, task_fields
from ..engine.features import FeaturePost, pooled_shape
from .isolate import IsolatedDecoder, isolate_attempt, shard_deaths
from ..store.liveness import Heart, last_beat
from ..store.locks import attempt_id
from ..runtimes.identity import image_label
from .identity import TaskIdentity, configure_threads, default_threads, task_identity
from ..faults import gate
from ..results.write import ShardLock, ShardWriter


class _Progress:
    """Counts what has been committed to disk; writes heartbeats and, under Slurm, log lines."""

    def __init__(self, run, index: int, total: int, done: int, ident: TaskIdentity,
                 heartbeat_s: float, log_interval_s: float, log_path: Optional[str], events: "EventLog",
                 heart: Optional[Heart] = None, taken: Optional[Dict] = None):
        self.run, self.index, self.num_shards = run, index, run.num_shards
        self.taken = taken or {}  # {"own_shard": k} when this task took another's shard
        self.events = events
        self.total, self.done, self.start_done = total, done, done
        self.rows = self.failures = 0
        self.ident = ident
        self.heartbeat_s, self.log_interval_s = heartbeat_s, log_interval_s
        self.log_path = log_path
        # writes the beats, and beats between them from its own thread (once started)
        self.heart = heart if heart is not None else Heart(lambda b: run.write_heartbeat(index, b), heartbeat_s, {})
        self.t0 = time.time()
        self.last_beat = self.last_log = 0.0
        # when the count last moved: a beat that goes on while it does not is a stalled task
        self.moved_t, self.moved_done = self.t0, done
        self.beat("running", force=True)

    @property
    def rate(self) -> float:
        dt = time.time() - self.t0
        return (self.done - self.start_done) / dt if dt > 0 else 0.0

    def beat(self, state: str, force: bool = False, **extra) -> None:
        now = time.time()
        if self.done != self.moved_done:
            self.moved_t, self.moved_done = now, self.done
        fields = dict(state=state, shard=self.index, done=self.done, total=self.total, rows=self.rows,
                      failures=self.failures, rate=round(self.rate, 3), job_id=self.ident.job_id, started=self.t0,
                      log=self.log_path, image=image_label(), moved_t=round(self.moved_t, 3),
                      batch_size=self.run.cfg.get("batch_size"), **self.taken, **extra)
        if self.rate > 0:  # the shard's length is known: beats at a rate that scales with it
            self.heart.pace((self.total - self.start_done) / self.rate)
        if force or now - self.last_beat >= self.heart.interval_s:
            self.last_beat = now
            if state != "running":
                self.heart.stop()  # the last word: no "running" beat from the thread after it
            self.heart.beat(fields)
            if state == "running":
                self.events.progress(done=self.done, rows=self.rows, failures=self.failures)
        else:
            self.heart.update(fields)  # the beat thread's next beat carries the latest counts
        if self.log_interval_s and (now - self.last_log >= self.log_interval_s or state != "running"):
            self.last_log = now
            eta = (self.total - self.done) / self.rate if self.rate > 0 else float("nan")
            log.info("shard %d/%d %s: %d/%d images (%d failed), %.1f img/s, ETA %.0f s", self.index,
                     self.num_shards, state, self.done, self.total, self.failures, self.rate, eta)


class _Feeder(threading.Thread):
    """Decoded batches -> ready net inputs (stack, crops, float, mean) in a thread of its own,
    so the forward thread does nothing but forward: a fast device never waits on numpy."""

    def __init__(self, window, transform, oversample_hw, maxsize: int):
        super().__init__(name="feeder", daemon=True)
        self.window, self.transform, self.oversample_hw = window, transform, oversample_hw
        self.q: "queue.Queue" = queue.Queue(maxsize=maxsize)
        self.stop = threading.Event()

    def run(self):
        try:
            for batch, results in self.window:
                ok = [(it.index, it.name, img) for it, (img, _) in zip(batch, results) if img is not None]
                failures = [(it.index, it.name, why) for it, (img, why) in zip(batch, results) if img is None]
                x = None
                if ok:
                    imgs = np.stack([img for _, _, img in ok])
                    if self.oversample_hw:
                        imgs = oversample_crops(imgs, self.oversample_hw)
                    x = self.transform(imgs)
                if not self._put(("batch", batch, ok, failures, x)):
                    return
            self._put(("end",))
        except BaseException as e:
            self._put(("error", e))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self.q.get()
            if item[0] == "end":
                return
            if item[0] == "error":
                raise item[1]
            yield item[1:]


@dataclass
class _Sink:
    """One shard file a forward pass writes: its run's own, or a sweep companion's
    (sharedpass.py), with that run's blobs and post-processing. `first`: the first manifest entry
    the file still needs (a resumed file may be further on than the others of the pass)."""
    writer: ShardWriter
    post: FeaturePost
    blobs: List[str]
    first: int
    progress: Optional[_Progress] = None


class _Writer(threading.Thread):
    """Drains forward results to HDF5 so the net never waits on the disk."""

    def __init__(self, sinks: List[_Sink], maxsize: int = 1, shard: int = 0):
        super().__init__(name="h5writer", daemon=True)
        self.sinks = sinks
        self.shard = shard
        self.q: "queue.Queue" = queue.Queue(maxsize=maxsize)
        self.error: Optional[BaseException] = None
        self.written = 0  # batches written by this thread

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self):
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                start, n_items, indices, names, feats, failures, labels = item
                for sink in self.sinks:
                    if start + n_items <= sink.first:
                        continue  # this file holds the batch already (it resumed further on)
                    if start < sink.first:  # batches start where every file of the pass resumes
                        raise RuntimeError(f"batch at {start} overlaps a file that resumes at {sink.first}")
                    rows = {b: sink.post(feats[b]) for b in sink.blobs if b in feats}  # none: every image failed
                    sink.writer.write_batch(n_items, indices, names, rows, failures, labels)
                    p = sink.progress
                    p.done += n_items
                    p.rows += len(indices)
                    p.failures += len(failures)
                    p.beat("running")
                self.written += 1
                gate(f"written-{self.shard}-{self.written}")
        except BaseException as e:  # surfaced in the forward thread
            self.error = e

    def close(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """The forward thread failed: write what is queued (each batch was computed whole),
        then stop, and return only when this thread has ended. The caller closes the HDF5
        file next: closing it under a batch being written could record that batch's rows with
        an old `next`, and the resume would then write the batch twice."""
        while self.is_alive():
            try:
                self.q.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.join()


@dataclass
class _Opened:
    """A shard ready to run: its writer (resumed or new), engine and the manifest range left to do."""
    writer: ShardWriter
    engine: object
    first: int  # the first manifest entry left (start + what a resumed writer already holds)
    start: int
    stop: int
    load_s: float
    gpu_attrs: Dict  # what every writer of the shard records of the GPU (a companion's too)
    loaded: bool  # False: the net this task loaded for an earlier shard


def _shard_writer(run, index: int, ident: TaskIdentity, threads: int, manifest, engine, gpu_attrs: Dict,
                  loaded: bool, lock: Optional[ShardLock]) -> ShardWriter:
    """Shard `index`'s writer for `run` (resumed or new): the run's own blobs, pooled as it asks,
    from an engine that may compute more blobs (a sweep's shared pass)."""
    cfg = run.cfg
    start, stop = run.shard_range(index)
    shapes = {b: pooled_shape(engine.blob_shapes[b], cfg.output.pooling) for b in run.plan["blobs"]}
    attrs = dict(run.shard_attrs(), shard=index, num_shards=run.num_shards, start=start, stop=stop,
                 host=ident.host, pid=ident.pid, job_id=ident.job_id or "",
                 visible_gpus=ident.visible_gpus or "", device=engine.device_desc,
                 blas_threads=threads,  # what `retry` runs with, to stay bit-identical
                 net_loaded=int(loaded),  # 0: the net this task loaded for an earlier shard
                 blob_shapes=str({b: list(s) for b, s in shapes.items()}), **gpu_attrs)
    return ShardWriter(run.shard_path(index), shapes, str(cfg.output.dtype), attrs, run.plan["fingerprint"],
                       cfg.batch_size, labels=manifest.labels, attempt=lock.attempt if lock else None,
                       guard=lock.check if lock else None)


def _open_shard(run, index: int, ident: TaskIdentity, threads: int, manifest, parts, numerics: Dict,
                keep: Optional[Dict] = None, lock: Optional[ShardLock] = None) -> _Opened:
    """Load the engine (or reuse the one `keep` holds: a task taking shard after shard loads
    the net once) and open (or resume) the shard's writer."""
    cfg = run.cfg
    start, stop = run.shard_range(index)
    blobs = parts.blobs
    t_load = time.time()
    gate(f"load-{index}")
    engine = keep.get("engine") if keep is not None else None
    loaded = engine is None
    if engine is None:
        engine = load_engine(cfg, parts.spec, blobs, parts.in_shape, threads, gpu_device=0,
                             transform=parts.transform)
        if keep is not None:
            keep["engine"] = engine
    # every shard's first batch is checked (backend=auto/onnxruntime: against Caffe), also with
    # an engine this task kept from an earlier shard
    engine.start_shard()
    load_s = time.time() - t_load
    gpu_attrs = _gpu_attrs(parts.spec, blobs, engine, numerics)
    if gpu_attrs:
        log.info("shard %d/%d on %s: %s, %s, cuDNN workspace <= %s MB per layer", index, run.num_shards,
                 gpu_attrs["gpu"], gpu_attrs["cudnn"], "TF32 allowed (model.tf32=true)" if gpu_attrs.get("tf32")
                 else "full FP32 (TF32 off)", gpu_attrs.get("cudnn_workspace_mb", "?"))
    writer = _shard_writer(run, index, ident, threads, manifest, engine, gpu_attrs, loaded, lock)
    if writer.next:
        log.info("shard %d/%d resumes at %d/%d (rows %d, failures %d)", index, run.num_shards,
                 writer.next, stop - start, writer.rows, writer.n_failures)
    return _Opened(writer, engine, start + writer.next, start, stop, load_s, gpu_attrs, loaded)


def _gpu_attrs(spec, blobs, engine, numerics: Dict) -> Dict[str, object]:
    """What a GPU shard records and logs: the GPU, whether cuDNN runs the convolutions, TF32."""
    if not getattr(engine, "on_gpu", False):
        return {}
    from ..engine.gpu import caffe_has_cudnn, cuda_probe, cudnn_conv_layers, describe_cudnn

    used = {layer.name for layer in spec.layers[:spec.end_layer(blobs) + 1]}
    n_cudnn, n_conv = cudnn_conv_layers(lp for lp in spec.param.layer if lp.name in used)
    has = caffe_has_cudnn()
    return dict(numerics, gpu=engine.gpu_label, cudnn_conv_layers=n_cudnn if has else 0,
                cudnn=describe_cudnn("gpu", has, cuda_probe().cudnn_version, n_cudnn, n_conv))


def _post(cfg) -> FeaturePost:
    return FeaturePost(str(cfg.output.pooling), float(cfg.output.gem_p), bool(cfg.output.l2_normalize))


def _forward_loop(run, index: int, op: _Opened, reader, sinks: List[_Sink], parts) -> Dict[str, float]:
    """Decode -> forward -> write every item left, into every file of the pass (`sinks`: the
    run's own first); returns the timing statistics."""
    cfg = run.cfg
    transform, in_shape = parts.transform, parts.in_shape
    oversample = bool(cfg.model.preprocess.oversample)
    first = min(s.first for s in sinks)
    wthread = _Writer(sinks, shard=index)
    busy = 0.0
    t0, c0 = time.time(), time.process_time()
    t_first = None  # pipeline fill: until the first batch is ready
    # steady state: between two batches at which the decode window is equally full, so that
    # neither the pipeline fill and Caffe's first allocations nor images decoded ahead count
    marks = steady_marks(op.stop - first, cfg.batch_size, int(cfg.decode.prefetch_batches))
    seen: List[Tuple[float, float, int]] = []  # (time, CPU time, images done) at the marks
    n_batches = done = 0
    window = decode_window(reader.items(first, op.stop), cfg.batch_size, int(cfg.decode.workers),
                            int(cfg.decode.prefetch_batches), float(cfg.decode.get("max_image_s", 0) or 0))
    feeder = _Feeder(window, transform, tuple(in_shape[1:]) if oversample else None, maxsize=2)
    check = None  # the GPU self-check's result, once the first batch is done
    # started last, just before the block whose every exit joins it
    feeder.start()
    wthread.start()
    try:
        for batch, ok, failures, x in feeder:
            feats: Dict[str, np.ndarray] = {}
            if t_first is None:
                t_first = time.time() - t0
                gate(f"first-batch-{index}")
            if ok:
                tf = time.perf_counter()
                feats = op.engine.forward(x)
                busy += time.perf_counter() - tf
                if check is None and op.engine.on_gpu and cfg.get("gpu_selfcheck", True):
                    check = _selfcheck(cfg, index, op.engine, x, feats)
                if oversample:  # the 10 crops of an image are averaged
                    feats = {b: v.reshape((len(ok), 10) + v.shape[1:]).mean(axis=1) for b, v in feats.items()}
            for i, n, why in failures:
                log.warning("shard %d: image %d %s failed: %s", index, i, shown(display_name(n)), shown(why))
            labels = {it.index: it.label for it in batch}
            wthread.put((batch[0].index, len(batch), [i for i, _, _ in ok], [n for _, n, _ in ok], feats, failures,
                         labels))
            n_batches, done = n_batches + 1, done + len(batch)
            if marks and n_batches in marks:
                seen.append((time.time(), time.process_time(), done))
    except BaseException:
        wthread.abandon()
        raise
    finally:
        feeder.stop.set()
    wthread.close()
    t_end, c_end = time.time(), time.process_time()
    stats = shard_statistics(t_end - t0, op.stop - first, busy, t_first, op.load_s, cpu_s=c_end - c0)
    if len(seen) == 2:
        (ta, ca, na), (tb, cb, nb) = seen
        stats.update(steady_s=tb - ta, steady_cpu_s=cb - ca, steady_images=nb - na)
    # what computed the rows, beside the backend configured for them (a resumed shard's other
    # attributes are its first task's: these two are always the finishing task's)
    stats.update(op.engine.attrs(), backend=str(cfg.backend))
    return dict(stats, **check.attrs()) if check is not None else stats


def _selfcheck(cfg, index: int, engine, x, gpu_out):
    """The first batch's GPU rows against the CPU, before any row is written (raises
    SelfCheckError with the one line to show)."""
    from ..engine.selfcheck import run_selfcheck, tolerance

    tf32 = bool(cfg.model.get("tf32", False))
    chk = run_selfcheck(engine, x, gpu_out, tolerance(cfg.get("gpu_selfcheck_tolerance"), tf32), tf32)
    log.info("shard %d: GPU self-check passed: max |gpu-cpu| / max |cpu| = %.3g (blob %s, %d images, "
             "tolerance %.3g, CPU pass %.2f s)", index, chk.max_rel_diff, chk.blob, chk.images, chk.tolerance,
             chk.cpu_s)
    return chk


def steady_marks(images: int, batch_size: int, prefetch_batches: int) -> Optional[Tuple[int, int]]:
    """The batches (counted from 1) between which a shard runs in steady state: past the fill of
    its decode window (prefetch batches, the feeder's queue of 2 and the one being formed) at
    the start, and before that window drains at the end. None if the shard is too short."""
    n = -(-images // batch_size)
    window = prefetch_batches + 3
    return (window, n - window) if n - window > window else None


def shard_statistics(elapsed: float, done_now: int, busy: float, t_first: Optional[float],
                     load_s: float, cpu_s: float = 0.0) -> Dict[str, float]:
    """A shard's own speed figures (kept in its file and heartbeat; never a run's attribute).
    cpu_s: CPU time of every thread of the task while it extracted (decode, feeder, net, writer)."""
    steady = elapsed - (t_first or 0.0)
    return dict(elapsed_s=elapsed, cpu_s=cpu_s, images_per_s=done_now / elapsed if elapsed > 0 else 0.0,
                forward_busy_fraction=busy / elapsed if elapsed > 0 else 0.0,
                forward_busy_fraction_steady=busy / steady if steady > 0 else 0.0,
                first_batch_s=t_first or 0.0, load_s=load_s)


class _Companion:
    """A sweep companion's shard in this task's pass (sharedpass.py): its own lock, heartbeat,
    events and writer, fed the pass's rows (its own blobs and post-processing)."""

    def __init__(self, run, index: int, ident: TaskIdentity, attempt: str, log_path: Optional[str]):
        self.run, self.index, self.ident, self.log_path = run, index, ident, log_path
        self.lock = ShardLock(run.lock_path(index), attempt)
        self.events = EventLog(events_path(run.rundir.path, run.shard_path(index).stem), task_fields(ident))
        self.heart: Optional[Heart] = None
        self.progress: Optional[_Progress] = None
        self.writer: Optional[ShardWriter] = None
        self.sink: Optional[_Sink] = None

    def take(self, stack: ExitStack) -> bool:
        """Its lock, unless another process writes that shard (it is left to that one)."""
        if self.run.shard_done(self.index):
            return False
        self.run.rundir.shards_dir.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(self.lock)
        except ShardBusyError as e:
            log.info("shared pass: %s", e)
            return False
        return not self.run.shard_done(self.index)

    def open(self, op: _Opened, manifest, threads: int, t_lock: float, lead_dir: str) -> _Sink:
        run, index = self.run, self.index
        self.heart = Heart(lambda beat: run.write_heartbeat(index, beat), run.cfg.heartbeat_s,
                           dict(state="running", phase="loading", shard=index, job_id=self.ident.job_id,
                                started=t_lock, log=self.log_path, image=image_label())).start()
        self.writer = w = _shard_writer(run, index, self.ident, threads, manifest, op.engine, op.gpu_attrs,
                                        op.loaded, self.lock)
        start, stop = run.shard_range(index)
        self.events.write("resumed" if w.next else "started", t=round(t_lock, 3), done=w.next, rows=w.rows,
                          failures=w.n_failures, total=stop - start, device=op.engine.device_desc, shared_pass=lead_dir)
        self.sink = _Sink(w, _post(run.cfg), list(run.plan["blobs"]), start + w.next)
        return self.sink

    def start(self, log_interval_s: float) -> None:
        start, stop = self.run.shard_range(self.index)
        w = self.writer
        self.progress = _Progress(self.run, self.index, stop - start, w.next, self.ident, self.run.cfg.heartbeat_s,
                                  log_interval_s, self.log_path, self.events, self.heart)
        self.progress.rows, self.progress.failures = w.rows, w.n_failures
        self.sink.progress = self.progress

    def finish(self, stats: Dict) -> None:
        p = self.progress
        try:
            self.writer.finish(stats)
        except ShardLostError as e:
            self.writer.discard()
            self.heart.stop()
            log.warning("shard %d of %s: %s", self.index, self.run.rundir.path, e)
            self.events.write("lost", attempt=self.lock.attempt, other=e.other[:300], done=self.writer.next)
            return
        p.beat("done", force=True, **stats)
        self.events.write("finished", done=p.done, rows=p.rows, failures=p.failures, elapsed_s=round(stats["elapsed_s"], 3))
        log.info("shard %d/%d of %s done: %d rows, %d failures", self.index, self.run.num_shards, self.run.rundir.path,
                 p.rows, p.failures)

    def fail(self, e: BaseException) -> None:
        if self.heart is not None:
            self.heart.stop()
            _last_word(self.run, self.index, e, self.ident, self.log_path, self.progress, self.heart, self.events)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.heart is not None:
            self.heart.stop()


def run_shard(cfg, index: int, threads: Optional[int] = None, own: Optional[int] = None,
              keep: Optional[Dict] = None, break_lock: bool = False) -> Dict:
    """Extract shard `index` of the run in cfg.output.dir. Idempotent: a complete shard is
    skipped, a partial one resumes from its last flushed batch. `own`: the shard this task was
    started for, when `index` is another one it took (steal.py); `keep`: what the task keeps
    between its shards (the loaded engine and pipeline); `break_lock`: write the shard although
    its lock is held (a dead holder the file server still keeps: steal.py; first-commit-wins
    keeps the shard correct). A sweep's shared pass (cfg.sweep.companions) writes the same shard
    of each companion run too (sharedpass.py)."""
    if threads is None:
        threads = default_threads()
    configure_threads(threads)
    from ..engine.gpu import apply_gpu_numerics

    # TF32 and the cuDNN workspace: like the BLAS threads, before Caffe (cuBLAS, cuDNN) loads here
    numerics = apply_gpu_numerics(cfg.model)
    ident = task_identity()
    if cfg.device == "auto":  # launchers resolve it; a direct caller gets this task's view
        cfg.device = resolve_local_device(cfg)
    run, manifest = _task_run(cfg, keep)
    group = [run] + companions(run)
    blobs = pass_blobs(group)  # the net computes every blob of the pass, whichever files are left
    if run.shard_done(index) and len(group) > 1:
        # this run's file is complete: the first companion still missing the shard leads the pass
        # (the same listing: sharedpass.why_not_shared checked it)
        run = next((r for r in group[1:] if not r.shard_done(index)), run)
        cfg = run.cfg
    others = [r for r in group if r is not run]
    num_shards = run.num_shards
    final = run.shard_path(index)
    if run.shard_done(index):
        log.info("shard %d/%d already complete: %s", index, num_shards, final)
        return {"shard": index, "skipped": True}
    if final.exists():
        log.warning("shard %d/%d: %s is not a complete shard of this run (another config's, or damaged): "
                    "it is extracted again and replaced", index, num_shards, final)
    # made once per task and folder (a sweep companion leading a shard has its own)
    if keep is None or keep.get("shards_dir") != str(run.rundir.shards_dir):
        run.rundir.shards_dir.mkdir(parents=True, exist_ok=True)
        if keep is not None:
            keep["shards_dir"] = str(run.rundir.shards_dir)
    log_path = os.environ.get("CAFFE_RUNNER_LOG")
    progress = heart = events = None
    attempt = attempt_id()  # this attempt's own partial file and holder line (write.py)
    comps: List[_Companion] = []
    try:
        with ShardLock(run.lock_path(index), attempt, force=break_lock) as lock, ExitStack() as held:
            if run.shard_done(index):  # finished by the lock's previous holder
                return {"shard": index, "skipped": True}
            # opened once the shard is this attempt's (it reads the log's length: a task that
            # finds a shard held reads nothing of it)
            events = EventLog(events_path(run.rundir.path, final.stem), task_fields(ident))
            comps = [c for c in (_Companion(r, index, ident, attempt, log_path) for r in others) if c.take(held)]
            taken = {"own_shard": own} if own is not None and own != index else {}
            if taken:
                log.info("shard %d/%d taken by this task (its own shard %d is done or held by another)", index,
                         num_shards, own)
            t_lock = time.time()
            # beats from now on, also while the model loads (no "done" yet: status reads the
            # partial file's count until the first batch's beat)
            heart = Heart(lambda beat: run.write_heartbeat(index, beat), cfg.heartbeat_s,
                          dict(state="running", phase="loading", shard=index, job_id=ident.job_id,
                               started=t_lock, log=log_path, image=image_label(), **taken)).start()
            # the files may have changed since the plan hashed them: before every shard, a task
            # keeping its net included, the prototxt, weights and mean file must be the plan's
            # (refused by name; a stat per file while unchanged: runner/engine/modelcheck.py)
            run.check_model_files()
            # a pair Caffe cannot load would abort this process inside load_engine; the check's
            # child dies instead, and its line is this shard's error (cheap when this pair was
            # proven). A task that keeps the net it loaded for an earlier shard loads nothing here
            if keep is None or keep.get("engine") is None:
                check_model_loads(cfg)
            # once per shard (once per task with `keep`): the prototxt parsed, the mean file loaded
            parts = keep.get("parts") if keep is not None else None
            if parts is None:
                parts = run.pipeline_parts()._replace(blobs=blobs)
                if keep is not None:
                    keep["parts"] = parts
            op = _open_shard(run, index, ident, threads, manifest, parts, numerics, keep, lock)
            # a shard whose process died twice: its images are decoded one by one in child
            # processes, so the one that kills its process is found and recorded (isolate.py)
            died = shard_deaths(events.path)
            isolated = isolate_attempt(died, bool(taken))
            events.write("resumed" if op.writer.next else "started", t=round(t_lock, 3), done=op.writer.next,
                         rows=op.writer.rows, failures=op.writer.n_failures, total=op.stop - op.start,
                         device=op.engine.device_desc, **taken, **({"isolated": died} if isolated else {}),
                         **({"shared_pass": [str(c.run.rundir.path) for c in comps]} if comps else {}))
            sinks = [_Sink(op.writer, _post(cfg), list(run.plan["blobs"]), op.first)]
            sinks += [c.open(op, manifest, threads, t_lock, str(run.rundir.path)) for c in comps]
            decoder = parts.decoder
            if isolated:
                log.warning("shard %d/%d: %d earlier attempts at it died; this one decodes its images one by one "
                            "in child processes, to find and record the image(s) that kill the process", index,
                            num_shards, died)
                decoder = IsolatedDecoder(parts.decoder)
            # the reader turns manifest entries into the decoder's jobs
            reader = open_reader(manifest, decoder)
            try:
                slurm = bool(ident.job_id)
                log_every = float(cfg.launcher.get("log_interval_s", 30)) if slurm else 0.0
                progress = _Progress(run, index, op.stop - op.start, op.writer.next, ident, cfg.heartbeat_s,
                                     log_every, log_path, events, heart, taken)
                progress.rows, progress.failures = op.writer.rows, op.writer.n_failures
                sinks[0].progress = progress
                for c in comps:
                    c.start(log_every)
                stats = _forward_loop(run, index, op, reader, sinks, parts)
                gate(f"finish-{index}")
                if reader.stats:
                    stats = dict(stats, input_read=json.dumps(reader.stats))
                for c in comps:  # before this run's own commit: its file is what says the pass is done
                    c.finish(stats)
                op.writer.finish(stats)
            except ShardLostError as e:
                # another attempt committed the shard first, or took it over: ours is discarded
                op.writer.discard()
                heart.stop()
                log.warning("shard %d/%d: %s", index, num_shards, e)
                events.write("lost", attempt=attempt, other=e.other[:300], done=op.writer.next)
                return {"shard": index, "skipped": True, "lost_to": e.other, "attempt": attempt}
            finally:
                reader.close()
                if isolated:
                    decoder.close()
                op.writer.close()
                for c in comps:
                    c.close()
            progress.beat("done", force=True, **stats)
            events.write("finished", done=progress.done, rows=progress.rows, failures=progress.failures,
                         elapsed_s=round(stats["elapsed_s"], 3))
            log.info("shard %d/%d done: %d rows, %d failures -> %s", index, num_shards, progress.rows,
                     progress.failures, final)
            return {"shard": index, "rows": progress.rows, "failures": progress.failures, **stats}
    except BaseException as e:
        if heart is not None:
            heart.stop()
        if not isinstance(e, (KeyboardInterrupt, ShardBusyError)):
            if events is None:
                events = EventLog(events_path(run.rundir.path, final.stem), task_fields(ident))
            _last_word(run, index, e, ident, log_path, progress, heart, events)
            for c in comps:
                c.fail(e)
        raise
    finally:
        if heart is not None:
            heart.stop()


def _task_run(cfg, keep: Optional[Dict]):
    """The run and its manifest for a shard: read afresh, or, for a task taking shard after shard
    (`keep`), reused while run.json is the same file (one stat instead of reading run.json and
    the manifest for every shard it tries: on a shared file system each is a metadata call).
    A run.json replaced meanwhile (output.overwrite=true, input.relist) is read again, and a
    replaced plan is refused by load_run as before."""
    path = os.path.join(os.path.abspath(os.path.expanduser(cfg.output.dir)), "run.json")
    try:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if keep is not None and key is not None and keep.get("run_key") == key:
        return keep["run"], keep["manifest"]
    run = load_run(cfg)
    manifest = load_manifest(run.rundir.path)
    if keep is not None and key is not None:
        keep.update(run_key=key, run=run, manifest=manifest)
    return run, manifest


def _last_word(run, index: int, e: BaseException, ident: TaskIdentity, log_path: Optional[str],
               progress: Optional[_Progress], heart: Optional[Heart], events: EventLog) -> None:
    """The heartbeat and event a stopped task leaves. Under Slurm a SystemExit is submitit
    requeueing the task (its SIGUSR2 handler, on timeout or preemption, runs `scontrol requeue`
    then sys.exit(-1)): the shard is "requeued" and resumes when Slurm restarts the task; it
    has not failed. Anything else is a failure, with its error."""
    requeued = isinstance(e, SystemExit) and bool(ident.job_id)
    beat = dict(state="requeued" if requeued else "failed", shard=index, host=ident.host, pid=ident.pid,
                job_id=ident.job_id, log=log_path, restart=ident.restart_count)
    if heart is not None:
        beat.update(heart.where, interval_s=heart.interval_s)
    if not requeued:
        beat.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    if progress is not None:
        beat.update(done=progress.done, total=progress.total, rows=progress.rows, failures=progress.failures)
    counts = {k: beat[k] for k in ("done", "rows", "failures") if k in beat}
    if requeued:
        events.write("requeued", **counts)
    else:
        events.write("failed", error=beat["error"][:300], **counts)
    try:
        last_beat(lambda b: run.write_heartbeat(index, b), {"seq": heart.seq if heart is not None else 0}, **beat)
    except Exception:  # the task is dying of another error already: that one is the news
        pass
