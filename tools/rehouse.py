#!/usr/bin/env python3
"""Issue 38: move runner/'s top-level modules into sub-packages by responsibility, by script.

Run from the root of a caffe-runner checkout whose work tree is clean:

    python3 tools/rehouse.py            # do the move (git mv + rewrites), then commit
    python3 tools/rehouse.py --dry-run  # say what would change, change nothing

What it does, in order, and nothing else (every other byte stays as it was):
  1. refuses a tree it does not understand: a module under runner/ that is neither in MAPPING
     nor in KEEP, a dotted name `runner.x` or a path `runner/x.py` it cannot map, a `__file__`
     use in a moving module it cannot adjust, an import it cannot resolve;
  2. rewrites, in every tracked text file of runner/ tests/ bench/ docker/ slurm/ conf/ docs/,
     Makefile, README.md, pyproject.toml:
       - Python imports, read with ast (`from .x import y`, `from . import x`, `import runner.x`,
         `from runner.x import y`), regenerated from the module's NEW place: relative inside
         runner/ (as today), absolute from outside; a statement is re-spelt only where it must be,
         split in two where its names now live in two packages;
       - every other mention of a module: dotted (`"runner.status.WATCH"`, `-m runner.isolate`,
         `run_module('runner.isolate')`, `_target_: runner.launch.local.LocalLauncher`,
         `runner.cli:main`) and as a path (`runner/plan.py`);
       - `__file__`-relative climbs to the repo root in a module that moves deeper
         (`Path(__file__).resolve().parent.parent`, `os.path.dirname(os.path.dirname(...))`);
  3. `git mv`s every module to its new place and writes each new package's __init__.py (its
     docstring: what it owns and what it may import; no imports);
  4. tests/test_layers.py: its LAYERS list (one layer per package, lowest first);
     pyproject.toml: the new packages in [tool.setuptools] packages, bench/ on pytest's path (the
     benchmark tools that left the product package); README.md / docs/layout.md: the Layout
     section's tree and its list of layers.

Idempotent: on a tree already moved (every old module gone, every new one present) it says so
and changes nothing; a half-moved tree is refused.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# ---- the cut ------------------------------------------------------------------------------------

# old dotted name -> new dotted name (modules inside the product package)
MAPPING: Dict[str, str] = {
    # jobs/: what Slurm says about a run's jobs (below the run directory, which asks it)
    "runner.slurmjobs": "runner.jobs.slurm",
    "runner.inflight": "runner.jobs.inflight",
    # store/: the run directory on disk, its files and their protocols
    "runner.atomic": "runner.store.atomic",
    "runner.locks": "runner.store.locks",
    "runner.digest": "runner.store.digest",
    "runner.events": "runner.store.events",
    "runner.stats": "runner.store.stats",
    "runner.manifest": "runner.store.manifest",
    "runner.rundir": "runner.store.rundir",
    "runner.shard": "runner.store.shard",
    "runner.private": "runner.store.private",
    "runner.liveness": "runner.store.liveness",
    "runner.lastwords": "runner.store.lastwords",
    "runner.h5": "runner.store.h5",             # (main after e4bdb0d) the one HDF5 opener
    # engine/: nets, engines, the converter, pixels, devices
    "runner.model": "runner.engine.model",
    "runner.onnxport": "runner.engine.onnxport",
    "runner.fold": "runner.engine.fold",
    "runner.netstate": "runner.engine.netstate",
    "runner.modelcheck": "runner.engine.modelcheck",
    "runner.selfcheck": "runner.engine.selfcheck",
    "runner.preprocess": "runner.engine.preprocess",
    "runner.decode": "runner.engine.decode",
    "runner.decodepool": "runner.engine.decodepool",
    "runner.flops": "runner.engine.flops",
    "runner.features": "runner.engine.features",
    "runner.device": "runner.engine.device",
    "runner.gpu": "runner.engine.gpu",
    "runner.fetch": "runner.engine.fetch",
    "runner.engine": "runner.engine.base",      # (main, coming) what every engine is, as inputs/base.py
    "runner.simulated": "runner.engine.simulated",  # (main, coming) the simulated engine
    # run/: what a run is and where it stands: config -> plan, sweeps, status
    "runner.config": "runner.run.config",
    "runner.overrides": "runner.run.overrides",
    "runner.plan": "runner.run.plan",
    "runner.changes": "runner.run.changes",
    "runner.sweep": "runner.run.sweep",
    "runner.sharedpass": "runner.run.sharedpass",
    "runner.status": "runner.run.status",
    # results/: the features a run writes: shard writer, merge, verify, export
    "runner.write": "runner.results.write",
    "runner.merge": "runner.results.merge",
    "runner.verify": "runner.results.verify",
    "runner.embeddings": "runner.results.embeddings",
    # task/: what runs inside one array task or local worker
    "runner.extract": "runner.task.extract",
    "runner.steal": "runner.task.steal",
    "runner.isolate": "runner.task.isolate",
    "runner.task": "runner.task.identity",
    "runner.child": "runner.task.child",        # (branch workers) a child process of ours: workers, isolate
    # ui/: the commands and what people read
    "runner.cli": "runner.ui.cli",
    "runner.inspect": "runner.ui.inspect",
    "runner.report": "runner.ui.report",
    "runner.sweeppage": "runner.ui.sweeppage",
    "runner.compare": "runner.ui.compare",
    "runner.retry": "runner.ui.retry",
    "runner.samples": "runner.ui.samples",
}

# benchmark and test tools that leave the product package: old dotted name -> (new file, the
# name it is imported by from there: bench/ scripts run with bench/ first on sys.path, tests
# with tests/, and pytest gets bench/ on its path)
OUTSIDE: Dict[str, Tuple[str, str]] = {
    "runner.capacity": ("bench/capacity.py", "capacity"),
    "runner.peakmem": ("bench/peakmem.py", "peakmem"),
    "runner.synthetic": ("tests/synthetic.py", "synthetic"),
}

# MAPPING entries a tree may not have yet (modules other branches add)
OPTIONAL = {"runner.child", "runner.h5", "runner.engine", "runner.simulated"}

# old modules whose name must stay importable: Slurm jobs queued by an earlier version carry
# their config pickled with the schema's classes under this name. After the move it is a shim
# re-exporting them from the module named here (the names: the old module's re-export marked
# `# noqa: F401`, which leaves the moved module).
LEGACY: Dict[str, Tuple[str, str]] = {
    "runner.config": ("runner.schema", """The config schema's classes under their oldest name: Slurm jobs queued (or requeued) by a
version before the schema moved to schema.py carry their config pickled as
runner.config.<class>, and unpickle through this module (tests/test_units.py:
test_configs_pickled_*). Nothing imports it; the config's composition is runner/run/config.py."""),
}

# modules and packages that stay where they are (globs: a trailing .*)
KEEP = ["runner", "runner.__main__", "runner.errors", "runner.schema", "runner.testgate", "runner.faults", "runner.api",
        "runner.launch", "runner.launch.*", "runner.inputs", "runner.inputs.*", "runner.runtimes", "runner.runtimes.*"]
# names `runner.<x>` that are no module of runner/ but are fine to meet (attributes, conf/)
KNOWN_ATTRIBUTES = {"log", "__version__", "__file__", "conf"}

# new packages, lowest first: (package, what it owns and may import)
PACKAGES: List[Tuple[str, str]] = [
    ("runner.jobs", """What Slurm says about a run's jobs: the pure parsers of squeue, sacct and scontrol
and the one function that asks them (slurm.py), and which of a run's recorded submissions are
still queued or running (inflight.py, from submissions.json).

May import: runner (log), runner.errors. It sits below the run directory (store.rundir refuses
to overwrite a run whose jobs are alive)."""),
    ("runner.store", """The run directory on disk, its files and their protocols: the one way to put a
file in place (atomic.py), the one lock (locks.py), sha256 (digest.py), the run directory's
layout and life (rundir.py), the manifest format (manifest.py), shard arithmetic and names
(shard.py), each shard's event log (events.py), stats.json (stats.py), a run directory only
its owner can write (private.py), heartbeats (liveness.py), a death in words (lastwords.py),
the one HDF5 opener (h5.py).

May import: runner (log), runner.errors, runner.schema, runner.@GATES@, runner.jobs."""),
    ("runner.engine", """Nets and pixels: the net and its engines (model.py: Caffe, ONNX Runtime, OpenCV
DNN), the converter to ONNX (onnxport.py), BatchNorm folding (fold.py), a net's parameters
(netstate.py), the model proven loadable (modelcheck.py), the GPU self-check (selfcheck.py),
decoding and preprocessing (decode.py, decodepool.py, preprocess.py), pooling (features.py),
FLOPs (flops.py), devices and GPUs (device.py, gpu.py), model downloads (fetch.py).

May import: runner (log), runner.errors, runner.schema, runner.@GATES@, runner.jobs,
runner.store."""),
    ("runner.run", """What a run is and where it stands: the config's composition (config.py,
overrides.py), the plan that validates it and writes run.json (plan.py), a change described in
words (changes.py), sweeps (sweep.py, sharedpass.py), a run's state read from its directory
and Slurm's word (status.py).

May import: everything below it: runner (log, errors, schema, @GATES@), runner.jobs,
runner.store, runner.engine, runner.inputs, runner.runtimes."""),
    ("runner.results", """The features a run writes: the shard writer (write.py), the merge into one file
(merge.py), verify (verify.py), the export for search tools (embeddings.py).

May import: runner.run and everything below it."""),
    ("runner.task", """What runs inside one array task or local worker: the shard function (extract.py),
taking free shards (steal.py), a poison shard decoded image by image in child processes
(isolate.py), the task's identity, threads, logging and death with its parent (identity.py).

May import: runner.results and everything below it; never a launcher."""),
    ("runner.ui", """The commands and what people read: the command line (cli.py), inspect (inspect.py),
the HTML report (report.py), a sweep's page (sweeppage.py) and CKA comparison (compare.py),
retry (retry.py), the demo's sample photos (samples.py: python -m runner.ui.samples). The
Python API stays runner.api (users import it by that name).

May import: everything (runner.launch and below)."""),
]

# tests/test_layers.py: lowest first; a module imports from its own layer and the ones before it
LAYERS: List[Tuple[str, List[str]]] = [
    ("base", ["runner", "runner.errors", "runner.schema", "runner.config"]),
    ("jobs", ["runner.jobs", "runner.jobs.*"]),
    ("store", ["runner.store", "runner.store.*", "runner.testgate", "runner.faults"]),
    ("engine", ["runner.engine", "runner.engine.*"]),
    ("inputs", ["runner.inputs", "runner.inputs.*"]),
    ("runtimes", ["runner.runtimes", "runner.runtimes.*"]),
    ("run", ["runner.run", "runner.run.*"]),
    ("results", ["runner.results", "runner.results.*"]),
    ("task", ["runner.task", "runner.task.*"]),
    ("launch", ["runner.launch", "runner.launch.*"]),
    ("ui", ["runner.ui", "runner.ui.*", "runner.api", "runner.__main__"]),
]

LAYOUT_TREE = """\
conf/                  model presets and the defaults lists (installed as runner.conf)
runner/                one package per responsibility; imports run only downward (tests/test_layers.py)
  __init__.py          the one named logger; errors.py: errors that name the fix (ConfigError ...);
  errors.py schema.py  schema.py: the config schema (dataclasses: every default and its comment);
  @GATES@.py@PAD@@GATES@.py: @GATES_WHAT@;
  config.py            config.py: the schema's classes under their oldest name (jobs queued by
                       old versions unpickle through it; the composition is run/config.py)
  jobs/                Slurm's word on a run's jobs: slurm.py (squeue, sacct, scontrol: pure
                       parsers, one function that asks), inflight.py (submissions still alive)
  store/               the run directory on disk: atomic.py (the one way to put a file in place),
                       locks.py (flock naming its holder), digest.py (sha256), rundir.py (layout,
                       overwrite, resume), manifest.py, shard.py (shard arithmetic and names),
                       events.py (each shard's event log), stats.py (stats.json), private.py (a
                       run directory only its owner can write), liveness.py (heartbeats judged
                       across hosts), lastwords.py (Caffe's fatal line, a death in words),
                       h5.py (the one HDF5 opener)
  engine/              nets and pixels: model.py (Caffe, ONNX Runtime, OpenCV DNN, simulated;
                       backend=auto), onnxport.py (the net as an ONNX graph), fold.py, netstate.py,
                       modelcheck.py (Caffe loads it in a child; a sha256 cache), selfcheck.py,
                       decode.py decodepool.py preprocess.py, features.py (pooling), flops.py,
                       device.py gpu.py (the device a run computes on), fetch.py (model downloads)
  inputs/              one module per input kind behind one interface, and their registry:
                       files.py (input.dir, input.list), lmdb.py, tar.py; base.py (Item);
                       listing.py: a folder's walk, and what it skipped and why
  runtimes/            container runtimes, one module per family (apptainer, charliecloud,
                       oci for podman/docker, pyxis) behind one interface, and their registry;
                       identity.py: the image label a task records
  run/                 what a run is: config.py (Hydra compose, resolvers, override errors),
                       overrides.py, plan.py (validate the config, list the input once, write
                       run.json), changes.py, sweep.py and sharedpass.py (a sweep's points, one
                       extraction for several), status.py (a run's state)
  results/             what a run writes: write.py (the shard files), merge.py, verify.py,
                       embeddings.py (npy + parquet export)
  task/                inside one task: extract.py (a shard: read -> decode -> forward -> write,
                       both launchers run it), steal.py (a Slurm task's own shard, then the free
                       ones), isolate.py (a shard that died twice decoded image by image in
                       child processes), identity.py (task identity, threads, logging)
  launch/              launchers behind one interface (base.py), chosen by launcher._target_
                       (registry.py): local.py (processes), slurm.py (submitit arrays);
                       workers.py: local workers that never import the user's __main__
  ui/                  the commands: cli.py, inspect.py, report.py (one HTML page),
                       sweeppage.py, compare.py (linear CKA between a sweep's points), retry.py,
                       samples.py (the demo and bench photos)
  api.py               the Python API (from runner.api import extract)
bench/                 make bench, the measurements (bench/README.md), and its tools:
                       capacity.py (what the cores can do), peakmem.py (a process's peak memory)
slurm/                 a real multi-node Slurm cluster on one machine, for tests (slurm/README.md)
docker/                the pycaffe build and the container images
tests/                 unit (fast), local end-to-end, Slurm integration; synthetic.py: run
                       directories made without a net
"""

LAYER_LIST = """\
1. base: `runner` (the logger), `errors`, `schema` (and `config`: the schema's old name for old pickles)
2. `jobs/`: Slurm's word on a run's jobs
3. `store/`: the run directory and its files (and `@GATES@`, which writes through `store.atomic`)
4. `engine/`: nets, engines, decoding, devices
5. `inputs/`: each kind knows its config fields, how it lists into the manifest, its change
   stamp, the paths a node must read, its reader; the rest of the runner asks the registry, so a
   new kind is one new file plus its field in `schema.InputConf`
6. `runtimes/`: bind mounts, command wrapping, plan-time checks
7. `run/`: config, plan (calls the launcher's hooks; imports no launcher), sweeps, status
8. `results/`: shard writer, merge, verify, export
9. `task/`: the shard function and what a task needs
10. `launch/`: the launchers
11. `ui/` and `api`: the front doors
"""

def gates_words(text: str) -> str:
    """The texts above name the module where a test acts on a running task: testgate.py, or
    faults.py (its successor: one fault-injection interface), whichever this tree has."""
    name = "faults" if Path("runner/faults.py").exists() else "testgate"
    what = ("one fault-injection interface (inert unless a test sets it)" if name == "faults"
            else "gates a test holds a task at (a no-op outside tests)")
    return (text.replace("@GATES@.py@PAD@", f"{name}.py".ljust(21)).replace("@GATES_WHAT@", what)
            .replace("@GATES@", name))


SCOPE_DIRS = ["runner", "tests", "bench", "docker", "slurm", "conf", "docs", "tools"]
SCOPE_FILES = ["Makefile", "README.md", "pyproject.toml"]
SELF = "tools/rehouse.py"


class Refused(Exception):
    pass


# ---- names --------------------------------------------------------------------------------------

def module_name(path: str) -> str:
    parts = list(Path(path).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _glob(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or (p.endswith(".*") and name.startswith(p[:-1])) for p in patterns)


class Names:
    """Old module -> new module, for every module of runner/ (the ones that stay map to themselves)."""

    def __init__(self, old_modules: Dict[str, str]):
        self.old = old_modules                       # dotted -> path
        self.map: Dict[str, str] = {}
        for m in old_modules:
            if m in MAPPING:
                self.map[m] = MAPPING[m]
            elif m in OUTSIDE:
                self.map[m] = OUTSIDE[m][1]
            elif _glob(m, KEEP):
                self.map[m] = m
            else:
                raise Refused(f"{old_modules[m]} is in neither MAPPING nor KEEP of {SELF}: add it to one")
        missing = [m for m in list(MAPPING) + list(OUTSIDE) if m not in old_modules and m not in OPTIONAL]
        if missing:
            raise Refused(f"MAPPING names modules this tree does not have: {missing}")

    def is_outside(self, old: str) -> bool:
        return old in OUTSIDE

    def new_path(self, old: str) -> str:
        if old in OUTSIDE:
            return OUTSIDE[old][0]
        new = self.map[old]
        is_pkg = self.old[old].endswith("__init__.py")
        return "/".join(new.split(".")) + ("/__init__.py" if is_pkg else ".py")

    def dotted(self, text: str, where: str) -> str:
        """`runner.a.b.c` (a dotted mention) with its longest module prefix mapped."""
        parts = text.split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in self.map:
                return ".".join([self.map[prefix]] + parts[n:])
        raise Refused(f"{where}: cannot map {text!r}")


# ---- Python imports -----------------------------------------------------------------------------

def _offsets(text: str):
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    lines = text.splitlines(keepends=True)

    def at(lineno: int, col_byte: int) -> int:
        line = lines[lineno - 1] if lineno - 1 < len(lines) else ""
        return starts[lineno - 1] + len(line.encode()[:col_byte].decode())
    return at


def _relative(from_module: str, is_pkg: bool, target: str) -> str:
    """The relative spelling (dots + module) of `target` from inside `from_module` (both in runner)."""
    base = from_module.split(".") if is_pkg else from_module.split(".")[:-1]
    tparts = target.split(".")
    common = 0
    while common < min(len(base), len(tparts)) and base[common] == tparts[common]:
        common += 1
    level = len(base) - common + 1
    return "." * level + ".".join(tparts[common:])


class PyFile:
    def __init__(self, path: str, text: str, names: Names):
        self.path, self.text, self.names = path, text, names
        self.old_module = module_name(path) if path.startswith("runner/") else None
        self.is_pkg = path.endswith("__init__.py")
        if self.old_module:
            nm = names.map[self.old_module]
            self.in_runner_after = not names.is_outside(self.old_module)
            self.new_module = nm
        else:
            self.in_runner_after = False
            self.new_module = None
        self.edits: List[Tuple[int, int, str]] = []     # (start, end, replacement)

    def _spell(self, target_new: str) -> str:
        """How this file names module `target_new` (a new dotted name, or an outside import name)."""
        if self.in_runner_after and target_new.split(".")[0] == "runner":
            return _relative(self.new_module, self.is_pkg, target_new)
        return target_new

    def _resolve_from(self, node: ast.ImportFrom) -> Optional[str]:
        if node.level:
            if not self.old_module:
                raise Refused(f"{self.path}:{node.lineno}: a relative import outside runner/")
            base = self.old_module.split(".") if self.is_pkg else self.old_module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            return ".".join(base + ([node.module] if node.module else []))
        return node.module

    def imports(self, tree: ast.AST):
        at = _offsets(self.text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = self._resolve_from(node)
                if not src or src.split(".")[0] != "runner":
                    continue
                if src not in self.names.map:
                    raise Refused(f"{self.path}:{node.lineno}: import from unknown module {src}")
                groups: List[Tuple[str, List[str]]] = []   # (new from-part, alias texts)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in self.names.map:               # `from . import fold`: a module
                        new = self.names.map[sub]
                        if "." in new:
                            frm, leaf = new.rsplit(".", 1)
                        else:                               # outside: `import capacity`
                            frm, leaf = None, new
                        local = a.asname or a.name
                        alias = leaf if local == leaf else f"{leaf} as {local}"
                    else:
                        frm = self.names.map[src]
                        alias = a.name if not a.asname else f"{a.name} as {a.asname}"
                    key = frm
                    if groups and groups[-1][0] == key:
                        groups[-1][1].append(alias)
                    elif any(g[0] == key for g in groups):
                        next(g for g in groups if g[0] == key)[1].append(alias)
                    else:
                        groups.append((key, [alias]))
                start, end = at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
                old_text = self.text[start:end]
                old_names_unchanged = all(
                    f"{src}.{a.name}" not in self.names.map or self.names.map[f"{src}.{a.name}"] == f"{src}.{a.name}"
                    for a in node.names)
                if len(groups) == 1 and groups[0][0] is not None and old_names_unchanged:
                    # only the module part changes: keep the statement's own layout
                    m = re.match(r"from\s+([.\w]+)(\s+import\b)", old_text)
                    if not m:
                        raise Refused(f"{self.path}:{node.lineno}: cannot read {old_text!r}")
                    spelt = self._spell(groups[0][0])
                    if spelt != m.group(1):
                        self.edits.append((start + m.start(1), start + m.end(1), spelt))
                    continue
                indent = " " * node.col_offset
                lines = []
                for frm, aliases in groups:
                    if frm is None:
                        lines += [f"import {al}" for al in aliases]
                    else:
                        lines.append(f"from {self._spell(frm)} import {', '.join(aliases)}")
                new_text = ("\n" + indent).join(lines)
                if new_text != old_text:
                    self.edits.append((start, end, new_text))
            elif isinstance(node, ast.Import):
                start = at(node.lineno, node.col_offset)
                end = at(node.end_lineno, node.end_col_offset)
                old_text = self.text[start:end]
                new_text = old_text
                for a in node.names:
                    if a.name.split(".")[0] != "runner" or a.name in self.names.map and self.names.map[a.name] == a.name:
                        continue
                    if a.name not in self.names.map:
                        raise Refused(f"{self.path}:{node.lineno}: import of unknown module {a.name}")
                    new = self.names.map[a.name]
                    if a.asname is None and new.split(".")[0] != "runner":
                        raise Refused(f"{self.path}:{node.lineno}: `import {a.name}` of a module that leaves "
                                      f"runner/: write `from runner import ... as ...` first")
                    new_text = re.sub(rf"(?<![\w.]){re.escape(a.name)}(?![\w.])", new, new_text, count=1)
                if new_text != old_text:
                    self.edits.append((start, end, new_text))

    def file_climbs(self):
        """__file__-relative climbs to the repo root, in a module that moves deeper."""
        uses = len(re.findall(r"(?<![.\w])__file__", self.text))     # this module's own file
        if not self.old_module or not uses:
            return
        old_depth = len(self.names.old[self.old_module].split("/"))
        new_depth = len(self.names.new_path(self.old_module).split("/"))
        k = new_depth - old_depth
        if k == 0:
            return
        spans = []
        for m in re.finditer(r"Path\(__file__\)\.resolve\(\)((?:\.parent)+)", self.text):
            if m.group(1).count(".parent") < 2:
                raise Refused(f"{self.path}: {m.group(0)} names a file beside the module: it moves")
            spans.append((m.start(1), m.end(1), m.group(1) + ".parent" * k))
        for m in re.finditer(r"((?:os\.path\.dirname\()+)os\.path\.abspath\(__file__\)(\)+)", self.text):
            if m.group(1).count("dirname") < 2:
                raise Refused(f"{self.path}: {m.group(0)} names a file beside the module: it moves")
            spans.append((m.start(), m.end(), "os.path.dirname(" * k + m.group(0) + ")" * k))
        if uses != len(spans):
            raise Refused(f"{self.path}: {uses} uses of __file__, {len(spans)} understood: adjust them by hand")
        self.edits += spans


# ---- text mentions ------------------------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w\-.])runner((?:\.\w+)+)")
PATH = re.compile(r"(?<![\w\-.])runner/((?:\w+/)*\w+)\.py\b")
DUNDER_IMPORT = re.compile(r"__import__\((['\"])runner\.([\w.]+)\1\)((?:\.\w+)+)")


def text_edits(text: str, names: Names, where: str, skip: List[Tuple[int, int]]) -> List[Tuple[int, int, str]]:
    edits = []

    def skipped(pos):
        return any(a <= pos < b for a, b in skip)

    taken: List[Tuple[int, int]] = []
    for m in DUNDER_IMPORT.finditer(text):
        if skipped(m.start()):
            continue
        old = "runner." + m.group(2)
        attrs = m.group(3)[1:].split(".")
        if attrs[:len(m.group(2).split("."))] != m.group(2).split("."):
            raise Refused(f"{where}: cannot read {m.group(0)!r}")
        new = names.dotted(old, where)
        rest = attrs[len(m.group(2).split(".")):]
        if new.split(".")[0] != "runner":
            raise Refused(f"{where}: {m.group(0)!r} names a module that leaves runner/")
        q = m.group(1)
        edits.append((m.start(), m.end(), f"__import__({q}{new}{q})." + ".".join(new.split(".")[1:] + rest)))
        taken.append((m.start(), m.end()))
    for m in DOTTED.finditer(text):
        if skipped(m.start()) or any(a <= m.start() < b for a, b in taken):
            continue
        first = m.group(1).split(".")[1]
        if f"runner.{first}" not in names.map:
            if first in KNOWN_ATTRIBUTES:
                continue
            raise Refused(f"{where}: cannot map {m.group(0)!r}")
        new = names.dotted(m.group(0), where)
        if m.group(0) in OUTSIDE and not re.search(r"(from|import)\s+$", text[max(0, m.start() - 8):m.start()]):
            new = OUTSIDE[m.group(0)][0]          # prose: "runs are synthetic (tests/synthetic.py)"
        if new != m.group(0):
            edits.append((m.start(), m.end(), new))
    for m in PATH.finditer(text):
        if skipped(m.start()):
            continue
        old = "runner." + m.group(1).replace("/", ".")
        if old.endswith(".__init__"):
            old = old[:-len(".__init__")]
        if old not in names.map:
            raise Refused(f"{where}: cannot map the path {m.group(0)!r}")
        new = names.new_path(old)
        if new != m.group(0):
            edits.append((m.start(), m.end(), new))
    return edits


def apply(text: str, edits: List[Tuple[int, int, str]], where: str) -> str:
    edits = sorted(edits)
    for (a1, b1, _), (a2, b2, _) in zip(edits, edits[1:]):
        if a2 < b1:
            raise Refused(f"{where}: two rewrites overlap at {a2}")
    for a, b, new in reversed(edits):
        text = text[:a] + new + text[b:]
    return text


# ---- the special files --------------------------------------------------------------------------

def layers_edit(text: str, where: str) -> Tuple[int, int, str]:
    tree = ast.parse(text)
    at = _offsets(text)
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "LAYERS":
            value = node.value
            def here(p):      # testgate or faults: the one this tree has
                return p not in ("runner.testgate", "runner.faults") or Path("runner", p[7:] + ".py").exists()
            layers = [(name, [p for p in patterns if here(p)]) for name, patterns in LAYERS]
            body = "[\n" + "".join(f"    ({name!r}, {patterns!r}),\n".replace("'", '"') for name, patterns in layers) + "]"
            return (at(value.lineno, value.col_offset), at(value.end_lineno, value.end_col_offset), body)
    raise Refused(f"{where}: no LAYERS assignment found")


def pyproject_edits(text: str) -> str:
    m = re.search(r"^packages = (\[.*\])$", text, re.M)
    if not m:
        raise Refused("pyproject.toml: no `packages = [...]` line under [tool.setuptools]")
    pkgs = ast.literal_eval(m.group(1))
    new = [p for p, _ in PACKAGES if p not in pkgs]
    if new:
        i = pkgs.index("runner") + 1
        pkgs = pkgs[:i] + new + pkgs[i:]
        text = text[:m.start(1)] + "[" + ", ".join(f'"{p}"' for p in pkgs) + "]" + text[m.end(1):]
    if OUTSIDE and not re.search(r"^pythonpath = ", text, re.M):
        m = re.search(r"^testpaths = .*\n", text, re.M)
        if not m:
            raise Refused("pyproject.toml: no testpaths line in [tool.pytest.ini_options]")
        line = ('# the benchmark tools (bench/capacity.py, bench/peakmem.py) are imported by their tests\n'
                'pythonpath = ["bench"]\n')
        text = text[:m.end()] + line + text[m.end():]
    return text


def layout_edits(text: str, where: str) -> str:
    """The Layout section's tree (a ```text block starting with conf/) and its list of layers."""
    m = re.search(r"^## Layout\n", text, re.M)
    if not m:
        return text
    block = re.compile(r"^```text\n(conf/.*?)^```\n", re.M | re.S).search(text, m.end())
    if not block:
        raise Refused(f"{where}: the Layout section has no ```text tree starting with conf/")
    text = text[:block.start(1)] + gates_words(LAYOUT_TREE) + text[block.end(1):]
    lst = re.compile(r"^1\. leaves:.*?\n(?=\n)", re.M | re.S).search(text, block.start())
    if not lst:
        raise Refused(f"{where}: the Layout section has no numbered list of layers starting `1. leaves:`")
    text = text[:lst.start()] + gates_words(LAYER_LIST) + text[lst.end():]
    # the section's prose names modules by their file under runner/ (`task.py`): their new file
    end = re.compile(r"^## ", re.M).search(text, lst.start())
    end = end.start() if end else len(text)

    def bare(m):
        old = "runner." + m.group(1)
        if old in MAPPING:
            return "`" + MAPPING[old][len("runner."):].replace(".", "/") + ".py`"
        if old in OUTSIDE:
            return "`" + OUTSIDE[old][0] + "`"
        return m.group(0)
    return text[:lst.start()] + re.sub(r"`(\w+)\.py`", bare, text[lst.start():end]) + text[end:]


# ---- the run ------------------------------------------------------------------------------------

def git(*args: str, capture: bool = True) -> str:
    return subprocess.run(["git", *args], check=True, text=True, capture_output=capture).stdout


def _new_file(m: str) -> str:
    return OUTSIDE[m][0] if m in OUTSIDE else MAPPING[m].replace(".", "/") + ".py"


def legacy_shims(old_paths: Dict[str, str]) -> Tuple[Dict[str, str], Dict[str, Tuple[int, int]]]:
    """For each LEGACY module: the shim's text (the names the old module re-exported for old
    pickles, from the statement marked `# noqa: F401`), and that statement's span (with the comment
    above it) in the old module, which the moved module no longer needs."""
    shims, cut = {}, {}
    for old, (source, doc) in LEGACY.items():
        path = old_paths[old]
        text = Path(path).read_text()
        lines = text.splitlines(keepends=True)
        found = [n for n in ast.parse(text).body if isinstance(n, ast.ImportFrom) and n.level == 1
                 and n.module == source.split(".")[-1] and "noqa: F401" in lines[n.lineno - 1]]
        if len(found) != 1:
            raise Refused(f"{path}: no single `from .{source.split('.')[-1]} import (...)  # noqa: F401` re-export "
                          f"for old pickles: adjust LEGACY in {SELF}")
        node = found[0]
        first = node.lineno - 1
        while first > 0 and lines[first - 1].startswith("#"):
            first -= 1
        if first > 0 and lines[first - 1].strip() == "":
            first -= 1
        at = _offsets(text)
        cut[path] = (sum(len(x) for x in lines[:first]), at(node.end_lineno, node.end_col_offset) + 1)
        names = ", ".join(a.name for a in node.names)
        body = "\n".join(textwrap.wrap(names, 96, initial_indent="from .schema import (",
                                        subsequent_indent="                     ", break_long_words=False))
        first_line, _, rest = body.partition("\n")
        shims[path] = f'"""{doc}\n"""\n{first_line}  # noqa: F401\n{rest})\n'
    return shims, cut


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what would change; change nothing")
    args = ap.parse_args(argv)
    root = Path(git("rev-parse", "--show-toplevel").strip())
    os.chdir(root)

    old_paths = {m: p for p in git("ls-files", "runner").split() if p.endswith(".py") for m in [module_name(p)]}
    sources = [m for m in list(MAPPING) + list(OUTSIDE)
               if not (m in OPTIONAL and not Path(m.replace(".", "/") + ".py").exists() and not Path(_new_file(m)).exists())]
    # by the new file: runner.task is an old module and a new package; runner/config.py a shim after the move
    moved = [m for m in sources if Path(_new_file(m)).exists()]
    if moved and len(moved) == len(sources):
        print("rehouse: already done (every module is in its new place); nothing changed")
        return 0
    if moved:
        raise Refused(f"a half-moved tree: these are in their new place already: {sorted(moved)}")
    absent = [m for m in sources if m not in old_paths]
    if absent:
        raise Refused(f"neither in the old place nor in the new one: {absent}")
    if not args.dry_run and git("status", "--porcelain", "--untracked-files=no").strip():
        raise Refused("the work tree has uncommitted changes: commit or stash them first")

    names = Names(old_paths)
    shims, cut = legacy_shims(old_paths)
    files = [p for p in git("ls-files", *SCOPE_DIRS, *SCOPE_FILES).split() if p != SELF and Path(p).is_file()]
    changed: Dict[str, str] = {}
    warnings: List[str] = []
    for path in files:
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "runner" not in text and not path.startswith("runner/"):     # relative imports say no "runner"
            continue
        edits: List[Tuple[int, int, str]] = []
        skip: List[Tuple[int, int]] = []
        if path in cut:
            edits.append((*cut[path], ""))
            skip.append(cut[path])
        if path.endswith(".py"):
            pf = PyFile(path, text, names)
            tree = ast.parse(text, path)
            pf.imports(tree)
            pf.file_climbs()
            at = _offsets(text)
            for node in ast.walk(tree):
                span = None
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    span = (at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset))
                elif isinstance(node, ast.Constant) and isinstance(node.value, bytes):
                    span = (at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset))  # pickle data
                if span:
                    skip.append(span)
            if path == "tests/test_layers.py":
                a, b, body = layers_edit(text, path)
                pf.edits.append((a, b, body))
                skip.append((a, b))
            edits += [e for e in pf.edits if not (path in cut and cut[path][0] <= e[0] < cut[path][1])]
            warnings += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r} imported in a string "
                         f"(code run elsewhere?): check that {OUTSIDE[m.group(0)][0]} is on its sys.path"
                         for m in DOTTED.finditer(text) if m.group(0) in OUTSIDE
                         and re.search(r"(from|import)\s+$", text[max(0, m.start() - 8):m.start()])
                         and not any(a <= m.start() < b for a, b in skip)]
        edits += text_edits(text, names, path, skip)
        new = apply(text, edits, path)
        if path == "pyproject.toml":
            new = pyproject_edits(new)
        if path in ("README.md", "docs/layout.md"):
            new = layout_edits(new, path)
        if new != text:
            changed[path] = new
            if path.endswith(".py"):
                compile(new, path, "exec")

    moves = [(old_paths[m], names.new_path(m)) for m in sources]
    if args.dry_run:
        for a, b in moves:
            print(f"move {a} -> {b}")
        for p in sorted(changed):
            print(f"rewrite {p}")
        for p in shims:
            print(f"shim {p} (names old pickles use)")
        print("\n".join(warnings))
        return 0

    for path, new in changed.items():
        Path(path).write_text(new, encoding="utf-8")
    for pkg, doc in PACKAGES:
        init = Path(pkg.replace(".", "/")) / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(gates_words(f'"""{doc}\n"""\n'), encoding="utf-8")
        git("add", str(init))
    for a, b in moves:
        Path(b).parent.mkdir(parents=True, exist_ok=True)
        git("mv", a, b)
    for path, text in shims.items():
        Path(path).write_text(text, encoding="utf-8")
        git("add", path)
    git("add", "-u")
    print(f"rehouse: {len(moves)} modules moved, {len(changed)} files rewritten, {len(PACKAGES)} packages made, "
          f"{len(shims)} shims for old pickles")
    for w in warnings:
        print(f"rehouse: warning: {w}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Refused as e:
        print(f"rehouse: refused: {e}", file=sys.stderr)
        sys.exit(2)
