"""Command line: the front door.

  caffe-runner input.dir=IMAGES output.dir=RUN [key=value ...]   extract
  caffe-runner -m key=a,b ... output.dir=SWEEP                   sweep: one run dir per combination
  caffe-runner --sweep FILE.yaml ... output.dir=SWEEP            sweep: the points of a sweep file
  caffe-runner status|verify|merge RUN | inspect [key=value ...]
  caffe-runner export RUN OUT.h5 [--format npy] | fetch NAME

Overrides are Hydra's, composed in config.compose (the Python API composes the same way).
Errors are raised as RunnerError subclasses and reported here, once, on stderr, as
`caffe-runner: error: ...`, with the exit codes below.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

from .. import __version__, log
from ..run.config import (USER_CONFIG_ENV, compose, compose_base, config_groups, expand_sweep, override_dirname,
                     override_lines, sweep_dirname, user_presets)
from ..errors import (ConfigError, FailureShareError, RunBusyError, RunnerError, ShardFailedError, Terminated,
                     UsageError, did_you_mean, shell_quote)
from ..errors import shown as terminal_text
from ..run.overrides import normalize_overrides

SUBCOMMANDS = ("status", "verify", "merge", "inspect", "export", "fetch", "report", "retry", "compare")
COMMANDS = SUBCOMMANDS + ("help", "version")

# exit codes (also in docs/troubleshooting.md and in --help)
EXIT_OK = 0
EXIT_FAILED = 1        # the run (or a check) failed: shards failed, too many failed images, verify found problems
EXIT_USAGE = 2         # the command line or the config is wrong; nothing was started
EXIT_INCOMPLETE = 3    # status: the run is not finished yet
EXIT_INTERRUPTED = 130  # Ctrl-C: what was done is kept, the same command resumes
EXIT_TERMINATED = 143   # SIGTERM (kill, a time limit): as Ctrl-C

EXIT_CODES_TEXT = """exit codes:
  0    success
  1    the run failed (shards failed, too many failed images) or a check failed
  2    usage or configuration error, or a refused run directory (one in use): nothing was started
  3    status: the run is not finished yet
  130  interrupted (Ctrl-C): completed work is kept, the same command resumes
  143  terminated (SIGTERM): as 130"""

USAGE = """usage: caffe-runner input.dir=IMAGES output.dir=RUN [key=value ...]   extract features
       caffe-runner -m key=a,b [key=x,y ...] output.dir=SWEEP          sweep (every combination)
       caffe-runner --sweep FILE.yaml [key=value ...] output.dir=SWEEP  sweep (models x their blobs)
       caffe-runner status|verify|merge RUN                           inspect a run directory
       caffe-runner export RUN OUT.h5 [--format npy|embeddings]       a self-contained copy / search-ready
       caffe-runner report RUN | retry RUN | status --watch RUN       after the run: draw, retry, follow
       caffe-runner inspect [model=NAME output.blobs=[...] ...]       blobs, shapes, bytes per image
       caffe-runner fetch NAME                                        download a model preset's files
       caffe-runner help [COMMAND] | version | --cfg job [key=value ...]"""

# the keys shown on the --help page, in this order (text comes from the schema's comments)
_HELP_KEYS = [
    ("input.dir", "InputConf.dir"), ("input.list", "InputConf.list"), ("input.root", "InputConf.root"),
    ("output.dir", "OutputConf.dir"),
    ("output.blobs", "OutputConf.blobs"), ("output.pooling", "OutputConf.pooling"),
    ("output.l2_normalize", "OutputConf.l2_normalize"), ("output.dtype", "OutputConf.dtype"),
    ("output.overwrite", "OutputConf.overwrite"), ("num_shards", "RunConf.num_shards"),
    ("batch_size", "RunConf.batch_size"), ("device", "RunConf.device"), ("backend", "RunConf.backend"),
    ("decode.workers", "DecodeConf.workers"), ("run.max_failure_fraction", "RunOptsConf.max_failure_fraction"),
    ("launcher.workers", "LocalLauncherConf.workers"), ("launcher.partition", "SlurmLauncherConf.partition"),
    ("launcher.timeout_min", "SlurmLauncherConf.timeout_min"), ("launcher.gpus_per_task", "SlurmLauncherConf.gpus_per_task"), ("launcher.setup", "SlurmLauncherConf.setup"),
    ("launcher.wait", "SlurmLauncherConf.wait"), ("container.runtime", "ContainerConf.runtime"),
]


KEY_COLUMN = 38  # "  key (default)" padded to this, then the description


def first_sentence(text: str) -> str:
    """A field comment's first sentence, up to '. ' or '; ' outside parentheses ('e.g. 0.01'
    does not end one), without its last '.'."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if depth == 0 and text[i:i + 2] in (". ", "; ") and not text[max(0, i - 3):i + 1].endswith(("e.g.", "i.e.")):
            return text[:i].rstrip(".")
    return text.rstrip(".")


def key_lines(key: str, default: str, text: str, choices: str, columns: int) -> List[str]:
    """One key of the --help page (pure): the description wrapped to the terminal's width,
    never cut; an Enum's values added only where the description does not name them all."""
    import re
    import textwrap

    text = first_sentence(text)
    if choices and not all(re.search(rf"\b{re.escape(c)}\b", text) for c in choices.split(" | ")):
        text = f"{text} [{choices}]" if text else choices
    head = f"  {key + ' (' + default + ')':<{KEY_COLUMN - 2}}"
    width = max(30, columns - KEY_COLUMN - 1)
    body = textwrap.wrap(text, width) or [""]
    if len(head) > KEY_COLUMN:  # a long key: its description starts on the next line
        return [head.rstrip()] + [" " * KEY_COLUMN + ln for ln in body]
    return [head + body[0]] + [" " * KEY_COLUMN + ln for ln in body[1:]]


def terminal_columns() -> int:
    import shutil

    return shutil.get_terminal_size(fallback=(100, 24)).columns  # COLUMNS, else the terminal, else 100


def help_page() -> str:
    """--help: the keys' lines come from the schema's field comments (schema.field_docs)."""
    import textwrap

    from omegaconf import OmegaConf

    from ..schema import field_docs

    docs = field_docs()
    base = compose_base()

    def default(key: str) -> str:
        if key.startswith("launcher.") and OmegaConf.select(base, key, default="absent") == "absent":
            return "slurm"  # a key of launcher=slurm only
        v = OmegaConf.select(base, key, default=None)
        v = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        if isinstance(v, Enum):
            return v.name
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    def choices(key: str) -> str:
        v = OmegaConf.select(base, key, default=None)
        return " | ".join(m.name for m in type(v)) if isinstance(v, Enum) else ""

    lines = [f"caffe-runner {__version__}: extract Caffe features of many images into one HDF5 file,",
             "on this machine (one process per GPU or per few cores) or as one Slurm array job.",
             "Every image ends up exactly once: as a feature row or as a recorded failure.", "", USAGE, "",
             "required (one input, and the run directory):",
             "  input.dir=DIR | input.list=FILE | input.lmdb=DB | input.tar=SHARDS"]
    columns = terminal_columns()
    lines += textwrap.wrap("the images: a folder (recursive), a file of paths (input.root: their folder), a Caffe "
                           "Datum LMDB, or webdataset tar shards (a glob, a {000..099} range, or a list of tars)",
                           max(30, columns - 7), initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["  output.dir=DIR   the run directory (rerunning the same command resumes)", "",
              "common keys (default):"]
    for key, doc in _HELP_KEYS:
        if key in ("input.dir", "input.list", "output.dir"):
            continue
        lines += key_lines(key, default(key), docs.get(doc, ""), choices(key), columns)
    groups = config_groups()
    try:
        mine = user_presets()
    except ConfigError as e:  # $CAFFE_RUNNER_CONFIG is no folder: said here, the page still shows
        mine, bad = {}, str(e)
    else:
        bad = ""
    lines += ["", "config groups (key=option):"]
    for g, opts in groups.items():
        d = default(f"{g}.name") if g in ("model", "launcher") else ""
        lines.append(f"  {g:<10} {', '.join(opts)}" + (f"   (default {d})" if d else ""))
        if mine.get(g):
            lines.append(f"  {'':<10} yours, in ${USER_CONFIG_ENV}/{g}: {', '.join(mine[g])}")
    lines += textwrap.wrap(
        f"your own net: model.prototxt=FILE model.weights=FILE without model= (its input size from the prototxt; "
        f"give model.preprocess.mean, channel_order, raw_scale and scale); your own presets: "
        f"${USER_CONFIG_ENV}/model/NAME.yaml, then model=NAME" + (f" ({bad})" if bad else
                                                                  "" if os.environ.get(USER_CONFIG_ENV) else
                                                                  f" (${USER_CONFIG_ENV} is not set)"),
        max(30, columns - 3), initial_indent="  ", subsequent_indent="  ")
    lines += ["  (launcher.* keys marked 'slurm' apply with launcher=slurm)", "",
              "subcommands (each has --help):",
              "  status RUN     per-shard state, failures, ETA",
              "  verify RUN     check every image appears exactly once; non-zero exit if not",
              "  merge RUN      merge complete shards into RUN/features.h5",
              "  export RUN OUT a self-contained copy of the features (h5, npy files, or embeddings: npy + parquet)",
              "  report RUN     one offline HTML page: task timeline, images/s, slow shards, failures, identity",
              "  retry RUN      extract failed images again (read errors, not found, permission denied)",
              "  inspect [key=value ...]   a model's blobs, shapes and output bytes per image",
              "  fetch NAME     download a model preset's files (checksum-verified) into $CAFFE_MODELS", "",
              "other options:",
              "  -m, --multirun     run every combination of comma-separated values, one run dir each",
              "  --sweep FILE       run the points of a YAML sweep file (models x their blobs x poolings)",
              "  --cfg job          print the resolved config and exit (add overrides to see their effect)",
              "  --version          print the version", "",
              EXIT_CODES_TEXT, "",
              "docs: README.md, then the pages under docs/ (" + _readme_path() + "); all keys: caffe-runner --cfg job"]
    return "\n".join(lines)


def _readme_path() -> str:
    p = Path(__file__).resolve().parent.parent.parent / "README.md"
    return str(p) if p.exists() else "https://pypi.org/project/caffe-runner/"


def _error(msg: str, code: int = EXIT_USAGE, usage: bool = False) -> int:
    if usage:
        print(USAGE, file=sys.stderr)
    print(f"caffe-runner: error: {_shown(msg)}", file=sys.stderr)
    return code


def _shown(text: str) -> str:
    """Text bound for the terminal, its lines kept, any control character in a line escaped."""
    return "\n".join(terminal_text(ln) for ln in str(text).split("\n"))


# ---- logging: one handler, writing above the progress bar ----------------------------

class _TqdmHandler(logging.Handler):
    """Log lines go through tqdm.write, so they appear above an active progress bar instead
    of breaking it."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_cli_logging(level=logging.INFO) -> None:
    for h in list(log.handlers):
        if isinstance(h, _TqdmHandler):
            return
    h = _TqdmHandler()
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(h)
    log.setLevel(level)
    log.propagate = False


# ---- extraction ------------------------------------------------------------------------

def _parse_flags(argv: List[str]) -> Tuple[dict, List[str]]:
    flags = {"multirun": False, "cfg": None, "sweep": None}
    overrides: List[str] = []
    known = ["-m", "--multirun", "--sweep", "--cfg", "-c", "--resolve", "-h", "--help", "--version"]
    it = iter(argv)
    for a in it:
        if a in ("-m", "--multirun"):
            flags["multirun"] = True
        elif a == "--sweep" or a.startswith("--sweep="):
            flags["sweep"] = a.split("=", 1)[1] if "=" in a else next(it, None)
            if not flags["sweep"]:
                raise UsageError("--sweep takes a file: caffe-runner --sweep SWEEP.yaml input.dir=... output.dir=SWEEP")
        elif a in ("--cfg", "-c"):
            flags["cfg"] = next(it, None)
            if flags["cfg"] not in ("job", "all"):
                raise UsageError(f"--cfg takes `job`: caffe-runner --cfg job [key=value ...]")
        elif a.startswith("--cfg="):
            flags["cfg"] = a.split("=", 1)[1]
        elif a == "--resolve":
            pass  # --cfg job always prints the resolved config
        elif a in ("-h", "--help"):
            flags["help"] = True
        elif a == "--version":
            flags["version"] = True
        elif a.startswith("-") and "=" not in a:
            raise UsageError(f"unknown option {a}{did_you_mean(a, known)}: `caffe-runner --help` lists the options")
        elif "=" not in a:
            if not overrides and not a.startswith(("+", "~")):
                raise UsageError(f"unknown command {a!r}{did_you_mean(a, COMMANDS)}: the commands are "
                                 f"{', '.join(COMMANDS)}, or key=value overrides to extract")
            raise UsageError(f"{a!r} is not key=value: write e.g. input.dir={a}")
        else:
            overrides.append(a)
    return flags, overrides


def print_summary(summary) -> None:
    from ..store.stats import format_summary

    print(format_summary(summary), flush=True)


def _extract_one(overrides: List[str], cfg=None) -> int:
    """One run: compose, launch, summarise. Raises RunnerError / KeyboardInterrupt."""
    from ..launch import launch
    from ..store.stats import check_failure_share

    if cfg is None:
        cfg = compose(overrides)
    summary = launch(cfg, overrides=overrides)
    if summary and summary.get("submitted"):
        if summary.get("waited"):
            check_failure_share(cfg, summary.get("stats"))
        return EXIT_OK
    if summary:
        print_summary(summary)
        check_failure_share(cfg, summary.get("stats"))
    return EXIT_OK


def _sweep_file_points(path: str, overrides: List[str]) -> List[List[str]]:
    """A sweep file's points (sweep.file_points), each after the command line's overrides
    (whose comma values cross them, as -m does)."""
    import yaml

    from ..run.sweep import file_points

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as e:
        raise ConfigError(f"sweep file {path}: {e.strerror or e}: give the path of a YAML sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not YAML ({str(e).splitlines()[0]}): fix it") from None
    try:
        points = file_points(data)
    except ValueError as e:
        raise ConfigError(f"sweep file {path}: {e}") from None
    keys = lambda p: {o.split("=", 1)[0].lstrip("+~") for o in p}  # noqa: E731
    both = sorted(keys(overrides) & set().union(*map(keys, points)))
    if both:
        raise ConfigError(f"{', '.join(both)} set both on the command line and in sweep file {path}: set it in one place")
    return [cli + p for cli in (expand_sweep(overrides) if overrides else [[]]) for p in points]


def _sweep(points: List[List[str]]) -> int:
    """Every point (-m: every combination of Hydra's sweep syntax key=a,b; --sweep FILE: the
    file's points), one run directory each under output.dir; points that differ only in what
    they keep of the net's output share one pass (sharedpass.py); a failed point does not stop
    the others; the failed ones are listed at the end."""
    from ..launch.registry import launcher_for
    from ..store.private import check_private, private_files
    from ..run.sweep import check_sweep_root, name_points, record_sweep, varying

    root = None
    nowait = []  # a Slurm point that does not wait is submitted, not done, when its command returns
    composed = []
    for point in points:  # every point composes before any runs: typos stop the sweep
        cfg = compose(point)
        root = root or cfg.output.dir
        nowait.append(launcher_for(cfg).returns_before_done(cfg))
        composed.append(cfg)
    root = os.path.abspath(os.path.expanduser(root))
    keys = [override_dirname(p) for p in points]
    lines = [override_lines(p) for p in points]
    legacy = [sweep_dirname(n, k) for n, k in enumerate(keys)]
    check_private(Path(root))  # the sweep folder holds the points' run directories
    check_sweep_root(Path(root), keys, legacy)
    names = name_points(Path(root), lines, keys, legacy)
    cfgs = []
    shown = {name: " ".join(ln) for name, ln in zip(names, varying(lines))}
    for name, point in zip(names, points):
        where = os.path.join(root, name).replace("\\", "\\\\").replace("'", "\\'")
        # quoted: the sweep folder's own path may hold characters the override grammar parses
        point = [o for o in point if not o.startswith("output.dir=")] + [f"output.dir='{where}'"]
        cfgs.append((name, point))
    _check_points(cfgs, shown)  # a bad value in the last point stops the sweep before the first runs
    with private_files():
        record_sweep(Path(root), names, keys, lines)  # the name -> overrides mapping: `status SWEEP_DIR` reads it
    groups = pass_groups(composed)
    passes = sum(len(g) > 1 for g in groups)
    print(f"sweep: {len(points)} point(s) under {root}"
          + (f"; {sum(len(g) for g in groups if len(g) > 1)} of them in {passes} shared pass(es) (one extraction "
             "each: sweep.shared_pass)" if passes else ""), flush=True)
    failed = []
    submitted = all(nowait)
    others = "submitted: `caffe-runner status` follows them" if submitted else "done"
    for group in groups:
        failed += _sweep_pass(group, cfgs, nowait)
    if failed:
        listed = "\n".join(f"  {name}  ({shown[name]})" for name, _ in failed)  # each error was printed already
        rest = "" if len(failed) == len(cfgs) else f" (the others are {others})"
        print(f"caffe-runner: error: {len(failed)} of {len(cfgs)} sweep points failed{rest}:\n"
              f"{listed}\n`caffe-runner status {shell_quote(root)}` lists every point and its state", file=sys.stderr)
        return EXIT_FAILED
    print(f"sweep: all {len(cfgs)} point(s) {'submitted' if submitted else 'done'} under {root}"
          + (f": caffe-runner status {shell_quote(root)}" if submitted else ""))
    return EXIT_OK


def pass_groups(composed) -> List[List[int]]:
    """The sweep's points grouped by the extraction they need (sharedpass.pass_key), in the
    order of each group's first point; a point with sweep.shared_pass=false is a group of its own."""
    from omegaconf import OmegaConf

    from ..run.sharedpass import pass_key

    groups: dict = {}
    for n, cfg in enumerate(composed):
        key = pass_key(OmegaConf.to_container(cfg, resolve=True)) if cfg.sweep.shared_pass else f"alone-{n}"
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _sweep_pass(group: List[int], cfgs: List[Tuple[str, List[str]]], nowait: List[bool]) -> List[Tuple[str, str]]:
    """Run one group of sweep points: alone, or as one shared pass. The first point's launch
    writes the others' files too (their plans made first: launch.prepare); each other point is
    then launched as itself, which finds its shards done (or extracts what the pass left) and
    merges. A Slurm pass that returns once submitted leaves the merging to its merge job.
    Returns the failed points (name, error), each already printed."""
    from ..launch import prepare

    failed = []
    total = len(cfgs)

    def one(n: int, cfg=None, note: str = "") -> bool:
        name, point = cfgs[n]
        print(f"[{n + 1}/{total}] {name}{note}", flush=True)
        try:
            _extract_one(point, cfg)
            return True
        except RunnerError as e:
            failed.append((name, str(e)))
            _error(f"sweep point {name}: {e}", EXIT_FAILED)
            return False

    lead, rest = group[0], group[1:]
    if not rest:
        one(lead)
        return failed
    prepared = []  # the points whose plans the pass writes to
    for n in rest:
        name, point = cfgs[n]
        try:
            prepared.append((n, str(prepare(compose(point), point).rundir.path)))
        except RunnerError as e:
            failed.append((name, str(e)))
            _error(f"sweep point {name}: {e}", EXIT_FAILED)
    cfg = compose(cfgs[lead][1])
    cfg.sweep.companions = [d for _, d in prepared]
    also = ", ".join(cfgs[n][0] for n, _ in prepared)
    lead_ok = one(lead, cfg, f" (one pass, also writing {also})" if also else "")
    for n, _ in prepared:
        if nowait[lead] and lead_ok:
            print(f"[{n + 1}/{total}] {cfgs[n][0]}: written by the tasks of {cfgs[lead][0]}, merged by its merge job",
                  flush=True)
        else:
            one(n)  # finds its shards done (or extracts what the pass left), merges, sums up
    return failed


def _check_points(cfgs: List[Tuple[str, List[str]]], shown: dict) -> None:
    """Every point's plan checks (plan.validate: model files, blobs, preprocessing, device,
    container, the launcher's own) before any point runs, so a sweep does not run point 0 for
    hours and then stop on a typo in point 1. Refused with the point named, exit 2."""
    from ..launch.registry import launcher_for
    from ..run.plan import validate

    for name, point in cfgs:
        cfg = compose(point)
        try:
            validate(cfg, launcher_for(cfg))
        except ConfigError as e:
            raise ConfigError(f"sweep point {name} ({shown[name]}): {e}; no point was started") from None


def _extract_main(argv: List[str]) -> int:
    from omegaconf import OmegaConf


    flags, overrides = _parse_flags(argv)
    # before the sweep check: a comma in a quoted path is part of the path
    overrides = normalize_overrides(overrides, multirun=flags["multirun"])
    if flags.get("help"):
        print(help_page())
        return EXIT_OK
    if flags.get("version"):
        print(f"caffe-runner {__version__}")
        return EXIT_OK
    if flags["cfg"]:
        print(OmegaConf.to_yaml(compose(_first_values(overrides), require_output=False)), end="")
        return EXIT_OK
    setup_cli_logging()
    if flags["sweep"]:
        return _sweep(_sweep_file_points(flags["sweep"], overrides))
    if flags["multirun"]:
        return _sweep(expand_sweep(overrides))
    if any(_is_sweep(o) for o in overrides):
        raise UsageError("comma-separated values make a sweep: add -m to run every combination "
                         "(or quote a list as key=[a,b])")
    return _extract_one(overrides)


def _is_sweep(override: str) -> bool:

    try:
        return len(expand_sweep([override])) > 1
    except ConfigError:
        return False


def _first_values(overrides: List[str]) -> List[str]:

    return expand_sweep(overrides)[0] if overrides else []


# ---- run-directory commands --------------------------------------------------------------

def _cmd_merge(args) -> int:
    from ..results.merge import merge_run
    from ..run.plan import load_run_dir
    from ..store.private import private_files
    from ..store.stats import write_stats

    run = load_run_dir(args.run_dir)
    _refuse_running(run, "merge")  # in progress: refused (exit 2); incomplete and stopped: failed (1)
    try:
        out = merge_run(run, copy=args.copy)
    except ShardFailedError as e:
        return _error(f"merge: {e}", EXIT_FAILED)
    with private_files():  # stats.json: the user's alone whatever the umask (the next command checks)
        write_stats(run)
    print(out)
    return EXIT_OK


def _refuse_running(run, what: str) -> None:
    """A run with shards running now (or a launch holding it) is not merged, exported or retried:
    refused as a run directory in use is (exit 2), where an incomplete run that nothing runs
    fails (exit 1)."""
    from ..store.rundir import launch_holder
    from ..run.status import run_status

    st = run_status(run.rundir.path, use_sacct=False)
    holder = launch_holder(run.rundir.path)
    if st["counts"].get("running") or holder:
        who = f"{st['counts']['running']} shard(s) running" if st["counts"].get("running") else f"held by {holder}"
        # exit 2 (a refused run directory, as a second launch is): not 1, which says the run failed
        raise ConfigError(f"{run.rundir.path} is still running ({who}, "
                          f"{st['done']}/{st['images']} images): wait until it ends (caffe-runner status --watch "
                          f"{run.rundir.path}), then {what}; nothing was written")


def _cmd_export(args) -> int:
    from ..results.merge import export_run
    from ..run.plan import load_run_dir
    from ..store.private import check_private

    from ..run.sweep import is_sweep_dir
    from .sweeppage import export_sweep

    if is_sweep_dir(Path(args.run_dir)):  # each point into OUT/POINT.h5 (npy: OUT/POINT/)
        if args.format == "embeddings":
            raise UsageError("--format embeddings exports one point: caffe-runner export SWEEP/POINT OUT "
                             "--format embeddings")
        for path in export_sweep(Path(args.run_dir), Path(args.out), args.format, _refuse_running):
            print(path)
        return 0
    run = load_run_dir(args.run_dir)
    check_private(Path(run.rundir.path), "the run directory")  # what export reads, others must not have planted
    if args.format != "embeddings" and (args.blob or args.part_rows):
        raise UsageError("--blob and --part-rows go with --format embeddings")
    _refuse_running(run, "export")  # every format: a run in progress is refused (exit 2), an incomplete one fails (1)
    if args.format != "embeddings":
        print(export_run(run, Path(args.out), args.format))
        return 0
    from ..results.embeddings import check_target, export_embeddings
    from ..results.merge import export_sources

    out = Path(os.path.abspath(os.path.expanduser(args.out)))
    check_target(out)
    if args.part_rows is not None and args.part_rows < 1:
        raise UsageError("--part-rows must be 1 or more")
    print(export_embeddings(export_sources(run), out, args.blob, run.plan["blobs"], args.part_rows))
    return 0


def _cmd_report(args) -> int:
    from ..run.plan import load_run_dir
    from ..store.private import check_private, private_files
    from .report import write_report

    from ..run.sweep import is_sweep_dir
    from .sweeppage import write_sweep_report

    if is_sweep_dir(Path(args.run_dir)):  # one page: the table, each point's report, the CKA matrix
        check_private(Path(os.path.abspath(args.run_dir)), "the sweep folder")  # its points' reports are written there
        with private_files():
            path = write_sweep_report(Path(args.run_dir), Path(args.out) if args.out else None)
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
        return EXIT_OK
    run = load_run_dir(args.run_dir)
    out = Path(os.path.abspath(os.path.expanduser(args.out))) if args.out else run.rundir.path / "report.html"
    if out.is_dir():
        out = out / "report.html"
    if Path(os.path.abspath(out)).parent == Path(run.rundir.path):  # written into the run directory
        check_private(Path(run.rundir.path), "the run directory")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK) or (
            out.exists() and not os.access(out, os.W_OK)):
        raise ConfigError(f"cannot write the report to {out} (its folder is missing or not writable): give "
                          "-o PATH in a writable folder")
    with private_files():  # report.html in the run directory must not make it refused next time (umask 002)
        path = write_report(run.rundir.path, out)
    print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    return EXIT_OK


def _cmd_retry(args) -> int:
    from ..store.private import private_files
    from .retry import retry_run, selector

    from ..store.stats import TRANSIENT

    # said in the summary and recorded in retries.json (and the report) as the reasons retried
    what = ["all reasons"] if args.all else (args.reason or ["transient: " + ", ".join(TRANSIENT)])
    with private_files():  # what the retry writes (and its tasks) is the user's alone
        res = retry_run(Path(args.run_dir), selector(args.all, args.reason or []), what, dry_run=args.dry_run,
                        args=args.argv, here=args.here)
    if res.get("resumed_commit"):
        print("finished an interrupted retry first")
    if not res["retried"]:
        print(f"{res['run_dir']}: no failed image to retry ({', '.join(what)})")
        return EXIT_OK
    if res.get("dry_run"):
        print(f"{res['run_dir']}: {res['retried']} image(s) would be retried:")
        for i, cs in res["candidates"].items():
            for _, name, r in cs[:20]:
                print(terminal_text(f"  {name}: {r} (shard {i})"))
            if len(cs) > 20:
                print(f"  ... and {len(cs) - 20} more in shard {i}")
        return EXIT_OK
    print(f"{res['run_dir']}: retried {res['retried']} image(s): {res['recovered']} now feature rows, "
          f"{res['still_failing']} still failing"
          + "".join(f"\n  still failing: {v:>6} {k}" for k, v in (res.get("still_failing_by_reason") or {}).items()))
    return EXIT_OK


def _cmd_fetch(args) -> int:
    from ..store.digest import file_hash
    from ..engine.fetch import fetch_model, models_cache
    from .inspect import compose_config

    names = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not names:
        raise ConfigError("name a model preset: caffe-runner fetch NAME (e.g. open_nsfw)")
    presets = config_groups().get("model", [])
    for name in names:
        if name not in presets:
            raise ConfigError(f"no model preset {name!r}{did_you_mean(name, presets, cutoff=0.6)}: "
                              f"the presets are {', '.join(presets)}")
        model = compose_config([f"model={name}"] + overrides).model
        if not model.get("files"):
            print(f"{name}: nothing to fetch ({model.source or 'its files come with an installed package'})")
            continue
        for key, path in fetch_model(model, progress=not args.quiet).items():
            print(f"{name} {key}: {path} (sha256 {file_hash(path)})")
        if model.get("license"):
            print(f"{name} license: {model.license}")
    print(f"model cache: {models_cache()} (set CAFFE_MODELS to move it)")
    return EXIT_OK


def _cmd_status(args) -> int:
    from ..run.status import format_status, run_status
    from ..run.sweep import format_sweep_status, is_sweep_dir, sweep_status

    if is_sweep_dir(Path(args.run_dir)):
        rows = sweep_status(Path(args.run_dir))
        print(json.dumps(rows, indent=1, default=str) if args.json else format_sweep_status(Path(args.run_dir), rows))
        states = {r["state"] for r in rows}
        return EXIT_OK if states <= {"done", "merged"} else EXIT_FAILED if "failed" in states else EXIT_INCOMPLETE
    if args.watch:
        return _watch_status(args)
    st = run_status(Path(args.run_dir), use_sacct=not args.no_sacct)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(format_status(st))
    return _status_code(st)


def _status_code(st) -> int:
    if st.get("too_many_failures"):  # complete, but the launch exited 1 for it: so does status
        return EXIT_FAILED
    return EXIT_OK if st["state"] in ("done", "merged") else (EXIT_FAILED if st["counts"].get("failed") else EXIT_INCOMPLETE)


def _watch_status(args) -> int:
    """status --watch: redraw in place every --interval seconds until the run ends (or Ctrl-C).
    On a terminal the screen is cleared and redrawn; elsewhere (a log) each view is printed once."""
    import shutil as _sh
    import time as _time

    from ..run.plan import load_run_dir
    from ..run.status import format_status, run_status

    load_run_dir(args.run_dir)  # not a run: one line, exit 2
    tty = sys.stdout.isatty()
    interval = max(0.2, float(args.interval))
    if tty:
        sys.stdout.write("\x1b[2J")  # once: start on a clear screen
    try:
        while True:
            st = run_status(Path(args.run_dir), use_sacct=not args.no_sacct)
            text = format_status(st)
            # the end: merged, or nothing running and no launch holding the run (a local launch
            # merges after its last shard; a Slurm run's merge job runs on its own)
            ended = st["state"] == "merged" or (not st.get("alive") and not _launch_held(Path(args.run_dir))
                                                and not _slurm_queued(Path(args.run_dir)))
            stamp = (f"(the run is {st['state']}: nothing is running, nothing more to watch)" if ended else
                     f"(refreshed {_time.strftime('%H:%M:%S')} every {interval:g} s; Ctrl-C stops watching)")
            if tty:
                rows = _sh.get_terminal_size((100, 40)).lines
                lines = text.splitlines()
                if len(lines) > rows - 2:
                    lines = lines[:rows - 3] + [f"  ... {len(lines) - rows + 3} more lines"]
                # home, each line over the old one (erasing its rest), then erase below: the
                # screen is redrawn in place and the terminal's history is left alone
                sys.stdout.write("\x1b[H" + "".join(f"{ln}\x1b[K\n" for ln in lines + [stamp]) + "\x1b[J")
            else:
                sys.stdout.write(text + "\n" + stamp + "\n")
            sys.stdout.flush()
            if ended:
                return _status_code(st)
            _time.sleep(interval)
    except KeyboardInterrupt:
        print()
        return _status_code(run_status(Path(args.run_dir), use_sacct=not args.no_sacct))


def _slurm_queued(run_dir: Path) -> bool:
    """The run's Slurm array or merge job is still in the queue (pending tasks start later).
    False when squeue cannot say: the watch then ends on what the run's files say."""
    from ..jobs.inflight import in_flight

    try:
        return bool(in_flight(run_dir))
    except ConfigError:
        return False


def _launch_held(run_dir: Path) -> bool:
    """A launch holds the run (its lock names a process): shards may start any moment."""
    from ..store.rundir import launch_holder

    return launch_holder(run_dir) is not None


def _cmd_verify(args) -> int:
    from ..run.sweep import is_sweep_dir, sweep_points
    from ..results.verify import verify

    if is_sweep_dir(Path(args.run_dir)):  # every point of the sweep, each as its own run
        points = sweep_points(Path(args.run_dir))
        bad = 0
        for name, point in points:
            if not (point / "run.json").exists():
                print(f"FAIL: {name}: not started")
                bad += 1
                continue
            problems = verify(point, [], content=args.content)
            bad += bool(problems)
            print(_shown(f"{'FAIL' if problems else 'OK'}: {name}" + "".join(f"\n  {terminal_text(p)}" for p in problems)))
        if bad:
            return _error(f"verify: {bad} of {len(points)} sweep point(s) with problems in {args.run_dir}", EXIT_FAILED)
        print(f"OK: {args.run_dir}: every point of the sweep has every manifest entry exactly once")
        return EXIT_OK
    notes = []
    problems = verify(Path(args.run_dir), notes, content=args.content)
    for n in notes:
        print(terminal_text(f"note: {n}"))
    if problems:
        for p in problems:
            print(terminal_text(f"FAIL: {p}"))
        return _error(f"verify: {len(problems)} problem(s) in {args.run_dir}", EXIT_FAILED)
    print(f"OK: {args.run_dir}: every manifest entry appears exactly once"
          + (", every shard's content matches its checksums" if args.content else ""))
    return EXIT_OK


def _cmd_compare(args) -> int:
    from .compare import compare, format_table

    print(format_table(compare(Path(args.sweep_dir), max_gb=args.max_gb)))
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from .inspect import InspectedBlobError, inspect_model

    try:
        print(inspect_model(args.overrides))
    except InspectedBlobError as e:  # an unknown blob: the blobs to choose from, then the error line
        print(e.listing, flush=True)
        raise
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in our one-line form (and exit code 2): the subcommand's own
    usage line, then the error (not the whole command's usage block as well)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise ConfigError(f"{self.prog}: {message}")


def _subcommand(argv) -> int:
    p = _Parser(prog="caffe-runner", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def command(name, description, epilog, run_dir=True):
        c = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, description=description,
                           epilog=epilog)
        if run_dir:
            c.add_argument("run_dir", help="a run's output.dir")
        return c

    mg = command("merge", "Merge the complete shard files of RUN_DIR into RUN_DIR/features.h5 (and stats.json).",
                 "exit codes: 0 merged, 1 shards missing (rerun the extraction), 2 not a run directory")
    mg.add_argument("--copy", action="store_true", help="features.h5 a self-contained copy (every feature written "
                    "again), not a view over shards/")
    s = command("status", "Per-shard state of RUN_DIR, failed images, totals and ETA, read from the run directory "
                "(works without Slurm accounting). A sweep's folder (-m): each point's run and its state.",
                "exit codes: 0 done, 1 a shard failed, 2 not a run directory, 3 not finished yet")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-sacct", action="store_true", help="do not ask Slurm accounting")
    s.add_argument("--watch", action="store_true", help="refresh in place until the run ends (Ctrl-C stops)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (2)")
    v = command("verify", "Check that every manifest entry appears exactly once (a feature row or a recorded "
                "failure), shard files are complete and of this run, and the merged view agrees. A sweep's folder "
                "(-m): every point.",
                "exit codes: 0 OK, 1 problems found (listed as FAIL: lines), 2 not a run directory")
    v.add_argument("--content", action="store_true",
                   help="also read every shard whole and check it against the checksums recorded at its commit")
    x = command("export", "A self-contained copy of the run's features (features.h5 is a view over shards/ up to "
                "output.view_max_shards shards).",
                "exit codes: 0 written, 1 shards missing, 2 not a run directory or bad arguments")
    x.add_argument("out", help="OUT.h5 (--format h5) or a new folder (--format npy, embeddings)")
    x.add_argument("--format", choices=("h5", "npy", "embeddings"), default="h5",
                   help="h5: the features.h5 layout, features copied; npy: one 2-D matrix per blob "
                        "(rows flattened) + index.npy, labels.npy (labelled inputs), names.txt, failures.tsv; "
                        "embeddings: one blob as "
                        "img_emb/img_emb_NNNN.npy (float32) + metadata/metadata_NNNN.parquet (image_path, label, "
                        "row, index), the layout clip-retrieval and autofaiss read")
    x.add_argument("--blob", help="embeddings: the blob to export (required when the run has several)")
    x.add_argument("--part-rows", type=int, help="embeddings: rows per part (default: 512 MB of float32 per part)")
    r = command("report", "One self-contained HTML page about RUN_DIR (no network needed to view it): a timeline "
                "of task attempts, images/s over time, per-shard rates with the slowest named, failures by "
                "reason, per-shard figures, model/blobs/config and the commands that made the run. Works on a "
                "run in progress (it shows it as such).",
                "exit codes: 0 written, 2 not a run directory or the target is not writable")
    r.add_argument("-o", "--out", help="where to write it (default RUN_DIR/report.html)")
    rt = command("retry", "Extract again the images RUN_DIR recorded as failed for a reason that can pass (read "
                 "error, file not found, permission denied) and fold the successes into the run: they become "
                 "feature rows in the shard files and features.h5; retries.json and stats.json record it. A "
                 "retry stopped at any moment resumes when run again (or leaves the run as it was).",
                 "exit codes: 0 done (or nothing to retry), 2 not a run directory, the run is still running or "
                 "not finished, or its folder is not writable")
    rt.add_argument("--reason", action="append", help="retry failures whose reason starts with this text "
                    "(repeatable), e.g. --reason 'truncated JPEG'")
    rt.add_argument("--all", action="store_true", help="retry every failed image, whatever the reason")
    rt.add_argument("--dry-run", action="store_true", help="list what would be retried, change nothing")
    rt.add_argument("--here", action="store_true", help="extract in this process even for a Slurm run (by "
                    "default a Slurm run's retry is one array task per shard, waited for)")
    fe = command("fetch", "Download a model preset's files into the model cache ($CAFFE_MODELS), checksum-verified, "
                 "resuming a partial download.",
                 "example: caffe-runner fetch open_nsfw\n"
                 "exit codes: 0 fetched (or nothing to fetch), 1 download failed, 2 unknown preset", run_dir=False)
    fe.add_argument("items", nargs="*", metavar="NAME", help="preset name(s), e.g. open_nsfw; key=value overrides")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    i = command("inspect", "A model's blobs with shapes, its preprocessing and the bytes per image of the chosen "
                "blobs (to size the disk before a run).",
                "example: caffe-runner inspect model=res10_ssd output.blobs=[fc7] output.pooling=avg\n"
                "         caffe-runner inspect model.prototxt=deploy.prototxt model.weights=w.caffemodel   "
                "(every blob, to choose from)\n"
                "exit codes: 0 OK, 2 configuration error (unknown model, blob or key; an unknown blob after the "
                "listing of every blob)", run_dir=False)
    i.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=res10_ssd output.pooling=avg")
    cm = command("compare", "Linear CKA (Kornblith et al., 2019) between every pair of a sweep's points (each blob "
                 "of each point), on the images they share, streaming over rows: a table here, and compare.json and "
                 "compare.svg (a heatmap) in the sweep folder.",
                 "example: caffe-runner compare runs/sweep\n"
                 "exit codes: 0 written, 2 not a sweep folder, a point not finished, points on different inputs, "
                 "or features too wide for --max-gb", run_dir=False)
    cm.add_argument("sweep_dir", help="a sweep's output.dir (the folder holding sweep.json)")
    cm.add_argument("--max-gb", type=float, default=4.0, help="memory for the cross-moments, d_i x d_j float64 per "
                    "pair (4); wider features: compare pooled ones (output.pooling=avg)")
    args = p.parse_args(argv)
    args.argv = list(argv[1:])  # as typed, for the run's record of commands
    handler = {"merge": _cmd_merge, "status": _cmd_status, "verify": _cmd_verify, "inspect": _cmd_inspect,
               "export": _cmd_export, "fetch": _cmd_fetch, "report": _cmd_report, "retry": _cmd_retry,
               "compare": _cmd_compare}[args.cmd]
    setup_cli_logging(logging.WARNING)
    return handler(args)


def run(argv: List[str]) -> int:
    """The whole command line, returning the exit code (main() exits with it)."""
    if not argv:
        print(USAGE, file=sys.stderr)
        print("\n`caffe-runner --help` explains the keys; README.md and docs/ have examples.", file=sys.stderr)
        return EXIT_USAGE
    try:
        if argv[0] == "help":  # `caffe-runner help [COMMAND]`, as `--help`
            return _subcommand(argv[1:2] + ["--help"]) if argv[1:2] and argv[1] in SUBCOMMANDS \
                else _extract_main(["--help"])
        if argv[0] == "version":
            return _extract_main(["--version"])
        if argv[0] in SUBCOMMANDS:
            return _subcommand(argv)
        return _extract_main(argv)
    except UsageError as e:
        return _error(str(e), EXIT_USAGE, usage=True)
    except (ConfigError, RunBusyError) as e:  # busy: a refused run directory, nothing was started
        return _error(str(e), EXIT_USAGE)
    except (FailureShareError, RunnerError) as e:
        return _error(str(e), EXIT_FAILED)
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        msg = str(e) if str(e) else (f"{what}: completed shards and flushed batches are kept; "
                                     "rerun the same command to resume")
        print(f"\ncaffe-runner: {msg}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `cat` gives when its reader (`head`) has gone


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> None:
    import signal

    # SIGTERM stops a run as Ctrl-C does (workers stopped, work kept) and says so in one line;
    # the Python API leaves the caller's handlers alone
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = run(sys.argv[1:] if argv is None else list(argv))
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:
        # the reader of our output (`| head -3`) has what it wanted: stop quietly; stdout goes to
        # /dev/null so the interpreter's own flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):  # `2>&1 | head` closes stderr's pipe too
            os.dup2(devnull, stream.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
