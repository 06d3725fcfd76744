"""The run directory is the truth about a run: every state below is read from files in it,
so status, resume and verify work without Slurm accounting and after any crash.

  run.json                 plan: fingerprint, shard count, model files and sha256, config
  manifest/                the input, listed once (manifest.py; each kind lists itself, inputs/)
  shards/<name>.h5         complete shard files (the completion marker)
  shards/<name>.h5.partial a shard in progress (resumable)
  status/<name>.json       heartbeat: state, progress, rate, host, job, log path
  features.h5              merged view of all shards
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .errors import ConfigError
from .shard import shard_name

RUN_JSON = "run.json"


def partial_of(final: Path) -> Path:
    """The name a shard file has while it is written (the one place that spells it)."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    @property
    def status_dir(self) -> Path:
        return self.path / "status"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def merged(self) -> Path:
        return self.path / "features.h5"

    def shard_path(self, index: int, num_shards: int) -> Path:
        return self.shards_dir / f"{shard_name(index, num_shards)}.h5"

    def heartbeat_path(self, index: int, num_shards: int) -> Path:
        return self.status_dir / f"{shard_name(index, num_shards)}.json"

    def lock_path(self, index: int, num_shards: int) -> Path:
        return self.shards_dir / f"{shard_name(index, num_shards)}.lock"

    def read_plan(self) -> Dict:
        try:
            return json.loads((self.path / RUN_JSON).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a caffe-runner run directory (no {RUN_JSON}): "
                              "give the output.dir of a run")

    def write_plan(self, plan: Dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / RUN_JSON, json.dumps(plan, indent=1, sort_keys=True))

    def read_heartbeat(self, index: int, num_shards: int) -> Optional[Dict]:
        try:
            return json.loads(self.heartbeat_path(index, num_shards).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_heartbeat(self, index: int, num_shards: int, beat: Dict) -> None:
        self.status_dir.mkdir(parents=True, exist_ok=True)
        beat = dict(beat, updated=time.time())
        atomic_write_text(self.heartbeat_path(index, num_shards), json.dumps(beat))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
