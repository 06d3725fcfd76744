"""Command line: the front door.

  caffe-runner input.dir=IMAGES output.dir=RUN [key=value ...]   extract
  caffe-runner -m key=a,b ... output.dir=SWEEP                   sweep: one run dir per combination
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

from . import __version__, log
from .config import compose, compose_base, conf_dir, config_groups, expand_sweep, override_dirname, sweep_dirname
from .errors import (ConfigError, FailureShareError, RunBusyError, RunnerError, ShardFailedError, UsageError,
                     did_you_mean)

SUBCOMMANDS = ("status", "verify", "merge", "inspect", "export", "fetch")

# exit codes (also in the README and in --help)
EXIT_OK = 0
EXIT_FAILED = 1        # the run (or a check) failed: shards failed, too many failed images, verify found problems
EXIT_USAGE = 2         # the command line or the config is wrong; nothing was started
EXIT_INCOMPLETE = 3    # status: the run is not finished yet
EXIT_INTERRUPTED = 130  # Ctrl-C: what was done is kept, the same command resumes

EXIT_CODES_TEXT = """exit codes:
  0    success
  1    the run failed (shards failed, too many failed images) or a check failed
  2    usage or configuration error: nothing was started
  3    status: the run is not finished yet
  130  interrupted (Ctrl-C): completed work is kept, the same command resumes"""

USAGE = """usage: caffe-runner input.dir=IMAGES output.dir=RUN [key=value ...]   extract features
       caffe-runner -m key=a,b [key=x,y ...] output.dir=SWEEP          sweep (every combination)
       caffe-runner status|verify|merge RUN                           inspect a run directory
       caffe-runner export RUN OUT.h5 [--format npy]                  a self-contained copy
       caffe-runner inspect [model=NAME output.blobs=[...] ...]       blobs, shapes, bytes per image
       caffe-runner fetch NAME                                        download a model preset's files
       caffe-runner --help | --version | --cfg job [key=value ...]"""

# the keys shown on the --help page, in this order (text comes from the schema's comments)
_HELP_KEYS = [
    ("input.dir", "InputConf.dir"), ("input.list", "InputConf.list"), ("output.dir", "OutputConf.dir"),
    ("output.blobs", "OutputConf.blobs"), ("output.pooling", "OutputConf.pooling"),
    ("output.l2_normalize", "OutputConf.l2_normalize"), ("output.dtype", "OutputConf.dtype"),
    ("output.overwrite", "OutputConf.overwrite"), ("num_shards", "RunConf.num_shards"),
    ("batch_size", "RunConf.batch_size"), ("device", "RunConf.device"), ("backend", "RunConf.backend"),
    ("decode.workers", "DecodeConf.workers"), ("run.max_failure_fraction", "RunOptsConf.max_failure_fraction"),
    ("launcher.workers", "LocalLauncherConf.workers"), ("launcher.partition", "SlurmLauncherConf.partition"),
    ("launcher.timeout_min", "SlurmLauncherConf.timeout_min"), ("launcher.gpus_per_task", "SlurmLauncherConf.gpus_per_task"), ("launcher.setup", "SlurmLauncherConf.setup"),
    ("launcher.wait", "SlurmLauncherConf.wait"), ("container.runtime", "ContainerConf.runtime"),
]


def _short(text: str, width: int = 78) -> str:
    first = text.split(". ")[0].split("; ")[0].rstrip(".")
    return first if len(first) <= width else first[:width - 3].rsplit(" ", 1)[0] + "..."


def help_page() -> str:
    """--help: the keys' lines come from the schema's field comments (schema.field_docs)."""
    from omegaconf import OmegaConf

    from .schema import field_docs

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
             "required:",
             "  input.dir=DIR | input.list=FILE   the images: a folder (recursive) or a file of paths",
             "  output.dir=DIR                    the run directory (rerunning the same command resumes)", "",
             "common keys (default):"]
    for key, doc in _HELP_KEYS:
        if key in ("input.dir", "input.list", "output.dir"):
            continue
        text = docs.get(doc, "")
        if choices(key) and choices(key) not in text:  # an Enum: its values, from the schema too
            text = f"{choices(key)}{': ' + text if text else ''}"
        text = _short(text, 90)
        d = default(key)
        lines.append(f"  {key + ' (' + d + ')':<36} {text}")
    groups = config_groups()
    lines += ["", "config groups (key=option):"]
    for g, opts in groups.items():
        d = default(f"{g}.name") if g in ("model", "launcher") else ""
        lines.append(f"  {g:<10} {', '.join(opts)}" + (f"   (default {d})" if d else ""))
    lines += ["  (launcher.* keys marked 'slurm' apply with launcher=slurm)", "",
              "subcommands (each has --help):",
              "  status RUN     per-shard state, failures, ETA",
              "  verify RUN     check every image appears exactly once; non-zero exit if not",
              "  merge RUN      merge complete shards into RUN/features.h5",
              "  export RUN OUT a self-contained copy of the features (h5, or npy files)",
              "  inspect [key=value ...]   a model's blobs, shapes and output bytes per image",
              "  fetch NAME     download a model preset's files (checksum-verified) into $CAFFE_MODELS", "",
              "other options:",
              "  -m, --multirun     run every combination of comma-separated values, one run dir each",
              "  --cfg job          print the resolved config and exit (add overrides to see their effect)",
              "  --version          print the version", "",
              EXIT_CODES_TEXT, "",
              "docs: README.md (" + _readme_path() + "); all keys: caffe-runner --cfg job"]
    return "\n".join(lines)


def _readme_path() -> str:
    p = Path(__file__).resolve().parent.parent / "README.md"
    return str(p) if p.exists() else "https://pypi.org/project/caffe-runner/"


def _error(msg: str, code: int = EXIT_USAGE, usage: bool = False) -> int:
    if usage:
        print(USAGE, file=sys.stderr)
    print(f"caffe-runner: error: {msg}", file=sys.stderr)
    return code


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
    flags = {"multirun": False, "cfg": None}
    overrides: List[str] = []
    known = ["-m", "--multirun", "--cfg", "-c", "--resolve", "-h", "--help", "--version"]
    it = iter(argv)
    for a in it:
        if a in ("-m", "--multirun"):
            flags["multirun"] = True
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
                raise UsageError(f"unknown command {a!r}{did_you_mean(a, SUBCOMMANDS)}: the commands are "
                                 f"{', '.join(SUBCOMMANDS)}, or key=value overrides to extract")
            raise UsageError(f"{a!r} is not key=value: write e.g. input.dir={a}")
        else:
            overrides.append(a)
    return flags, overrides


def print_summary(summary) -> None:
    from .stats import format_summary

    print(format_summary(summary), flush=True)


def _extract_one(overrides: List[str], cfg=None) -> int:
    """One run: compose, launch, summarise. Raises RunnerError / KeyboardInterrupt."""
    from .launch import launch
    from .stats import check_failure_share

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


def _sweep(overrides: List[str]) -> int:
    """Every combination (Hydra's sweep syntax: key=a,b), one run directory each under
    output.dir; a failed point does not stop the others; the failed ones are listed at the end."""

    points = expand_sweep(overrides)
    root = None
    cfgs = []
    for n, point in enumerate(points):  # every point composes before any runs: typos stop the sweep
        cfg = compose(point)
        root = root or cfg.output.dir
        name = sweep_dirname(n, override_dirname(point))
        where = os.path.join(root, name).replace("\\", "\\\\").replace("'", "\\'")
        # quoted: a point's name holds '=', ',' and brackets, which the override grammar parses
        point = [o for o in point if not o.startswith("output.dir=")] + [f"output.dir='{where}'"]
        cfgs.append((name, point))
    print(f"sweep: {len(points)} point(s) under {root}", flush=True)
    failed = []
    for n, (name, point) in enumerate(cfgs):
        print(f"[{n + 1}/{len(cfgs)}] {name}", flush=True)
        try:
            _extract_one(point)
        except RunnerError as e:
            failed.append((name, str(e)))
            _error(f"sweep point {name}: {e}", EXIT_FAILED)
    if failed:
        lines = "\n".join(f"  {name}" for name, _ in failed)  # each one's error was printed when it failed
        print(f"caffe-runner: error: {len(failed)} of {len(cfgs)} sweep points failed (the others are done):\n{lines}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"sweep: all {len(cfgs)} point(s) done under {root}")
    return EXIT_OK


def _extract_main(argv: List[str]) -> int:
    from omegaconf import OmegaConf


    flags, overrides = _parse_flags(argv)
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
    if flags["multirun"]:
        return _sweep(overrides)
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
    from .merge import merge_run
    from .plan import load_run_dir
    from .stats import write_stats

    run = load_run_dir(args.run_dir)
    try:
        out = merge_run(run)
    except ShardFailedError as e:
        return _error(f"merge: {e}", EXIT_FAILED)
    write_stats(run)
    print(out)
    return EXIT_OK


def _cmd_export(args) -> int:
    from .merge import export_run
    from .plan import load_run_dir

    print(export_run(load_run_dir(args.run_dir), Path(args.out), args.format))
    return 0


def _cmd_fetch(args) -> int:
    from .fetch import fetch_model, file_hash, models_cache
    from .inspect import compose_config

    names = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not names:
        raise ConfigError("name a model preset: caffe-runner fetch NAME (e.g. open_nsfw)")
    presets = sorted(p.stem for p in Path(conf_dir(), "model").glob("*.yaml"))
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
    from .status import format_status, run_status

    st = run_status(Path(args.run_dir), use_sacct=not args.no_sacct)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(format_status(st))
    return EXIT_OK if st["state"] in ("done", "merged") else (EXIT_FAILED if st["counts"].get("failed") else EXIT_INCOMPLETE)


def _cmd_verify(args) -> int:
    from .verify import verify

    notes = []
    problems = verify(Path(args.run_dir), notes)
    for n in notes:
        print(f"note: {n}")
    if problems:
        for p in problems:
            print(f"FAIL: {p}")
        return _error(f"verify: {len(problems)} problem(s) in {args.run_dir}", EXIT_FAILED)
    print(f"OK: {args.run_dir}: every manifest entry appears exactly once")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from .inspect import inspect_model

    print(inspect_model(args.overrides))
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in our one-line form (and exit code 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: {message}")


def _subcommand(argv) -> int:
    p = _Parser(prog="caffe-runner", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def command(name, description, epilog, run_dir=True):
        c = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, description=description,
                           epilog=epilog)
        if run_dir:
            c.add_argument("run_dir", help="a run's output.dir")
        return c

    command("merge", "Merge the complete shard files of RUN_DIR into RUN_DIR/features.h5 (and stats.json).",
            "exit codes: 0 merged, 1 shards missing (rerun the extraction), 2 not a run directory")
    s = command("status", "Per-shard state of RUN_DIR, failed images, totals and ETA, read from the run directory "
                "(works without Slurm accounting).",
                "exit codes: 0 done, 1 a shard failed, 2 not a run directory, 3 not finished yet")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-sacct", action="store_true", help="do not ask Slurm accounting")
    command("verify", "Check that every manifest entry appears exactly once (a feature row or a recorded failure), "
            "shard files are complete and of this run, and the merged view agrees.",
            "exit codes: 0 OK, 1 problems found (listed as FAIL: lines), 2 not a run directory")
    x = command("export", "A self-contained copy of the run's features (features.h5 is a view over shards/ up to "
                "output.view_max_shards shards).",
                "exit codes: 0 written, 1 shards missing, 2 not a run directory or bad arguments")
    x.add_argument("out", help="OUT.h5 (--format h5) or a folder (--format npy)")
    x.add_argument("--format", choices=("h5", "npy"), default="h5",
                   help="h5: the features.h5 layout, features copied; npy: one 2-D matrix per blob "
                        "(rows flattened) + index.npy, names.txt, failures.tsv")
    fe = command("fetch", "Download a model preset's files into the model cache ($CAFFE_MODELS), checksum-verified, "
                 "resuming a partial download.",
                 "example: caffe-runner fetch open_nsfw\n"
                 "exit codes: 0 fetched (or nothing to fetch), 1 download failed, 2 unknown preset", run_dir=False)
    fe.add_argument("items", nargs="+", metavar="NAME", help="preset name(s), e.g. open_nsfw; key=value overrides")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    i = command("inspect", "A model's blobs with shapes, its preprocessing and the bytes per image of the chosen "
                "blobs (to size the disk before a run).",
                "example: caffe-runner inspect model=res10_ssd output.blobs=[fc7] output.pooling=avg\n"
                "exit codes: 0 OK, 2 configuration error (unknown model, blob or key)", run_dir=False)
    i.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=res10_ssd output.pooling=avg")
    args = p.parse_args(argv)
    handler = {"merge": _cmd_merge, "status": _cmd_status, "verify": _cmd_verify, "inspect": _cmd_inspect,
               "export": _cmd_export, "fetch": _cmd_fetch}[args.cmd]
    setup_cli_logging(logging.WARNING)
    return handler(args)


def run(argv: List[str]) -> int:
    """The whole command line, returning the exit code (main() exits with it)."""
    if not argv:
        print(USAGE, file=sys.stderr)
        print("\n`caffe-runner --help` explains the keys; the README has examples.", file=sys.stderr)
        return EXIT_USAGE
    try:
        if argv[0] in SUBCOMMANDS:
            return _subcommand(argv)
        return _extract_main(argv)
    except UsageError as e:
        return _error(str(e), EXIT_USAGE, usage=True)
    except ConfigError as e:
        return _error(str(e), EXIT_USAGE)
    except (FailureShareError, RunBusyError, RunnerError) as e:
        return _error(str(e), EXIT_FAILED)
    except KeyboardInterrupt as e:
        msg = str(e) if str(e) else ("interrupted: completed shards and flushed batches are kept; "
                                     "rerun the same command to resume")
        print(f"\ncaffe-runner: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Optional[List[str]] = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else list(argv)))
