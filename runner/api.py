"""Python API for notebooks and pipelines: the command line's extraction, with a handle on
the run (in the spirit of submitit's jobs).

    from runner.api import extract
    run = extract("input.dir=samples", "output.dir=/tmp/run1", "launcher.workers=2")
    run.status()["state"]            # "merged"; with launcher=slurm, "running" until the array ends
    run.wait()                       # returns when features.h5 is there (raises if shards failed)
    with run.features() as f:        # an open, read-only h5py.File
        feats, names = f["feats"][:], f["names"].asstr()[:]
    arrays = run.features(arrays=True)   # or plain numpy arrays

It composes the config and launches exactly as `caffe-runner` does (config.compose, then
launch.launch): the same checks, run directory, resume and errors (RunnerError subclasses,
whose message names the fix). A local run returns when it is done; a Slurm run returns once
submitted, unless launcher.wait=true.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

from .errors import RunnerError, ShardFailedError, shell_quote


class Run:
    """A run directory: its state, its result."""

    def __init__(self, path: Union[str, Path], summary: Optional[Dict] = None):
        self.path = Path(path)
        # what the launch returned (shards run now, stats, Slurm job ids)
        self.summary = summary or {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "Run":
        from .store.rundir import RunDir

        RunDir(Path(path)).read_plan()  # a clear error when it is not a run directory
        return cls(path)

    def status(self) -> Dict:
        """What `caffe-runner status --json` prints: state, counts, per-shard progress, and for
        a Slurm run Slurm's word on every shard whose files fell silent."""
        from .run.status import run_status

        return run_status(self.path)

    def done(self) -> bool:
        return self.status()["state"] == "merged"

    def wait(self, timeout_s: Optional[float] = None, poll_s: float = 2.0) -> "Run":
        """Block until the merged features exist. Returns or raises within a bounded time once
        no task of the run is alive (Slurm says pending/running/requeued, or a fresh heartbeat):
        ShardFailedError when a shard failed or was killed (its cause and next step in the
        message), RunnerError when the run stopped unfinished; TimeoutError after timeout_s."""
        from .store.rundir import launch_holder

        t0 = time.time()
        while True:
            st = self.status()
            if st["state"] == "merged":
                return self
            settled = not st.get("alive") and not launch_holder(self.path)
            merge = (st.get("slurm_word") or {}).get("merge") or {}
            if settled and st["state"] == "failed":
                bad = [s for s in st["shards"] if s["state"] == "failed"]
                raise ShardFailedError(f"{len(bad)} shard(s) of {self.path} failed: "
                                       + "; ".join(f"shard {s['shard']}: {s.get('error')}" for s in bad[:5])
                                       + ("; ..." if len(bad) > 5 else "")
                                       + "; run the same extraction again to redo only those")
            if settled and st["state"] == "done" and not merge.get("alive"):
                raise RunnerError(f"every shard of {self.path} is complete but nothing merges them"
                                  + (f" (merge job {merge['job_id']}: {merge.get('state') or 'gone'})" if merge else "")
                                  + f": `caffe-runner merge {shell_quote(self.path)}` merges them")
            if settled and st["state"] == "incomplete":
                raise RunnerError(f"{self.path} is not finished and nothing runs it any more ({st['done']}/"
                                  f"{st['images']} images, shards: " + ", ".join(
                                      f"{v} {k}" for k, v in sorted(st["counts"].items()))
                                  + "): run the same extraction again to finish it")
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"{self.path} is not finished after {timeout_s} s: {st['state']}, "
                                   f"{st['done']}/{st['images']} images")
            time.sleep(poll_s)

    def stats(self) -> Dict:
        """stats.json: images, rows, failures by reason, throughput, per shard."""
        import json

        return json.loads((self.path / "stats.json").read_text())

    def features(self, arrays: bool = False):
        """The merged result: an open read-only h5py.File (close it, or use `with`), or with
        arrays=True a dict of numpy arrays (feats, features/<blob>, names, index, failures); a blob
        whose name holds '/' is there under the file's dataset name (features/a__b) and its own
        (features/a/b), one array."""
        from .results.merge import open_merged

        merged = self.path / "features.h5"
        if not merged.exists():
            raise RunnerError(f"{merged} does not exist yet: run.wait() first (state: {self.status()['state']})")
        # the command line's check: a view whose shard files cannot all be read would give NaN rows
        f = open_merged(merged)
        if not arrays:
            return f
        with f:
            out = {"feats": f["feats"][:], "names": f["names"].asstr()[:], "index": f["index"][:],
                   "failures/names": f["failures/names"].asstr()[:],
                   "failures/reason": f["failures/reason"].asstr()[:]}
            for k in f["features"]:
                out[f"features/{k}"] = out[f"features/{f['features'][k].attrs['blob']}"] = f["features"][k][:]
        return out


def extract(*overrides: Union[str, Iterable[str]]) -> Run:
    """Run (or, with launcher=slurm, submit) an extraction: overrides as on the command line,
    e.g. extract("input.dir=/data/images", "output.dir=/scratch/run1", "model=res10_ssd")."""
    from . import log
    from .ui.cli import setup_cli_logging
    from .run.config import compose
    from .launch import launch
    from .store.stats import check_failure_share

    flat = []
    for o in overrides:
        flat.extend([o] if isinstance(o, str) else list(o))
    cfg = compose(flat)
    if not log.handlers:
        setup_cli_logging()
    summary = launch(cfg, overrides=flat) or {}
    if summary.get("stats") and (not summary.get("submitted") or summary.get("waited")):
        check_failure_share(cfg, summary["stats"])
    return Run(cfg.output.dir, summary)
