"""The model proven loadable before any work: Caffe builds the net from model.prototxt and
copies model.weights into it, in a child process.

Why a child: Caffe does not raise on a bad model, it aborts the process (glog FATAL: a
prototxt that does not match its weights, a damaged or truncated .caffemodel, a layer type
this build lacks). In the launcher that would kill the command; in a worker it would leave a
run waiting for a shard that never reports. The child dies instead, and its last stderr line
(runner/store/lastwords.py) becomes the one-line error. It is bounded in time and runs in CPU mode
(a GPU build loads the same way there).

It also proves the shapes: the child cuts the net after the run's last blob (as the run does),
reshapes it to the exact batch a task will feed (batch_size x channels x H x W after resizing
and cropping: run_geometry) and runs one forward. A net whose layers do not take that input
(AlexNet's fc6 at 300x300: "Input size incompatible with inner product parameters") is refused
at plan time with Caffe's line and the fix, instead of aborting every shard of the run.

The plan runs the check (exit 2, nothing created); each task runs it again first, because the
files may have changed since: there it is cheap, since a pair that loaded is remembered by both
files' sha256 (and the Caffe build) in the cache folder's model-checks.json (cache_path), and a
file's sha256 by its stat (size, mtime, ctime, inode), so a 500 MB model is neither hashed nor
loaded twice. The cache is a convenience: when it cannot be read or written the check runs.

The plan's files are the files that run: the plan records the sha256 of the prototxt, the
weights and the mean file, and each task compares the files it is about to load with them
before every shard (check_planned_files), a task keeping its net included. Through the same
cache (and this process's memory of it) that costs a stat per file while they are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import log
from ..errors import ConfigError
from ..store.lastwords import caffe_last_words
from ..store.digest import file_hash
from .fold import net_from_text
from .model import chosen_blobs, input_hw, parse_prototxt, set_caffe_cpu_mode, truncated_prototxt
from ..schema import CAFFE_LOADED

CACHE_NAME = "model-checks.json"
CACHE_VERSION = 1
MAX_ENTRIES = 256  # files and pairs remembered (the oldest are dropped)
DEFAULT_TIMEOUT_S = 300.0
OK = "caffe-runner-model-loads"
NO_WEIGHTS = "caffe-runner-no-layer-weighted"  # the child's word: the file weighs none of the net's layers
LOADED = "caffe-runner-weights-load"  # the child's word: the pair loaded; the shape check comes next
PAIR_CHECK = "weights-cover-1"  # in the pair key: pairs proven before this check are checked again


class ModelLoadError(ConfigError):
    """Caffe cannot load model.weights into model.prototxt (its own line says why)."""


def cache_path() -> Path:
    """In the project's one cache folder: $CAFFE_RUNNER_CACHE (as make setup), else
    $XDG_CACHE_HOME/caffe-runner, else ~/.cache/caffe-runner."""
    if os.environ.get("CAFFE_RUNNER_CACHE"):
        return Path(os.environ["CAFFE_RUNNER_CACHE"]) / CACHE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "caffe-runner" / CACHE_NAME


def _read_cache(path: Path) -> Dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
            return data
    except (OSError, ValueError):
        pass
    return {"version": CACHE_VERSION, "files": {}, "pairs": {}}


def _write_cache(path: Path, data: Dict) -> None:
    """Atomic (a reader sees the old or the new file); concurrent writers may drop each other's
    new entries, which costs one more check, never a wrong answer."""
    for k in ("files", "pairs"):
        items = sorted(data[k].items(), key=lambda kv: kv[1].get("t", 0))
        data[k] = dict(items[-MAX_ENTRIES:])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home, a full disk: the check still ran
        log.debug("model check cache %s not written: %s", path, e)
        try:
            tmp.unlink()
        except OSError:
            pass


def _stat_key(st: os.stat_result) -> list:
    # ctime: a file rewritten in place with its old size and mtime restored still changes it
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


# this process's own copy of the cache's file entries: a task verifying its files before each
# shard stats them and reads nothing (not even the cache file) while they are unchanged
_SEEN: Dict[str, Dict] = {}


def file_sha256(path: str, cache: Optional[Dict] = None) -> str:
    """sha256 of a file, taken from `cache` (the loaded cache file) or this process's memory
    when its stat is unchanged; a fresh hash is recorded in both."""
    real = os.path.realpath(path)
    key = _stat_key(os.stat(real))
    files = cache["files"] if cache is not None else {}
    for hit in (_SEEN.get(real), files.get(real)):
        if hit and hit.get("stat") == key:
            files[real] = _SEEN[real] = hit
            return hit["sha256"]
    sha = file_hash(real)
    files[real] = _SEEN[real] = {"stat": key, "sha256": sha, "t": time.time()}
    return sha


def _seen_sha256(path: str) -> Optional[str]:
    """The sha256 this process took of the file, if its stat has not changed since (else None)."""
    real = os.path.realpath(path)
    hit = _SEEN.get(real)
    return hit["sha256"] if hit and hit.get("stat") == _stat_key(os.stat(real)) else None


def files_sha256(paths: Dict[str, str]) -> Dict[str, str]:
    """{name: sha256} of {name: path} (stat-cached: a file is hashed once per change, per node
    through the cache file and per process through memory; the cache file is read and written
    only when this process has not seen a file with its current stat)."""
    known = {k: _seen_sha256(p) for k, p in paths.items()}
    if all(known.values()):
        return known
    path = cache_path()
    cache = _read_cache(path)
    shas = {k: file_sha256(p, cache) for k, p in paths.items()}
    _write_cache(path, cache)
    return shas


def model_sha256(prototxt: str, weights: str, mean_file: Optional[str] = None) -> Dict[str, str]:
    """The model files' sha256 (stat-cached; what the plan records): prototxt, weights and,
    when given, the mean file."""
    paths = {"prototxt": prototxt, "weights": weights}
    if mean_file:
        paths["mean_file"] = mean_file
    return files_sha256(paths)


class ModelFileChangedError(ConfigError):
    """A model file differs from the one the run's plan hashed (or is gone)."""


# the plan's model files: its key -> the config key a user writes
PLANNED_FILES = {"prototxt": "model.prototxt", "weights": "model.weights", "mean_file": "model.preprocess.mean_file"}


def describe_changed_file(key: str, path: str, planned: str, now: Optional[str]) -> str:
    """The one line for a model file that is not the one the plan hashed (pure)."""
    what = (f"is gone since this run was planned (sha256 {planned[:12]}...)" if now is None else
            f"changed since this run was planned (sha256 {planned[:12]}... then, {now[:12]}... now)")
    return (f"{PLANNED_FILES[key]} {path} {what}: this task computes nothing with it (fix: put the planned file "
            "back, or plan the run again with the new one: rerun with output.overwrite=true, or with a new "
            "output.dir)")


def check_planned_files(planned: Dict[str, Tuple[str, str]]) -> None:
    """Raise ModelFileChangedError, naming the file, unless every file of {key: (path, the
    plan's sha256)} still has that sha256. Stat-cached (files_sha256): cheap before each shard."""
    paths = {k: p for k, (p, sha) in planned.items() if p and sha}
    gone = [k for k, p in paths.items() if not os.path.isfile(p)]
    if gone:
        k = gone[0]
        raise ModelFileChangedError(describe_changed_file(k, paths[k], planned[k][1], None))
    now = files_sha256(paths)
    for k, p in paths.items():
        if now[k] != planned[k][1]:
            raise ModelFileChangedError(describe_changed_file(k, p, planned[k][1], now[k]))


def caffe_build_id() -> str:
    """What tells one pycaffe build from another, without importing it (a pair proven with one
    build is not proven for another: its layer types may differ)."""
    try:
        spec = find_spec("caffe")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return ""
    d = Path(spec.origin).parent
    parts = []
    for so in sorted(d.glob("_caffe*.so")):
        st = so.stat()
        parts.append(f"{so}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts) or str(d)


def _pair_key(shas: Dict[str, str], build: str, geometry: Optional[Dict] = None) -> str:
    """The cache's key of a proven pair: both files, the Caffe build and, when the shapes were
    proven too, the batch shape and the blobs the net was cut after (another geometry is checked)."""
    key = f"{shas['prototxt']}:{shas['weights']}:{build}:{PAIR_CHECK}"
    if geometry:
        key += ":shape-1:" + json.dumps([list(geometry["shape"]), list(geometry["blobs"])])
    return hashlib.sha256(key.encode()).hexdigest()


def run_geometry(cfg, spec=None) -> Dict:
    """The exact input a task feeds the net (pure but for parsing the prototxt): shape
    [batch, channels, H, W] (10 crops per image with oversample), the blobs the net is cut after,
    and for the messages the net's own input size and model.input_size as given."""
    spec = spec or parse_prototxt(str(cfg.model.prototxt))
    h, w = input_hw(cfg.model, spec)
    own = spec.input_shape
    channels = int(own[1]) if own and len(own) == 4 else 3
    batch = int(cfg.batch_size) * (10 if cfg.model.preprocess.get("oversample") else 1)
    return {"shape": [batch, channels, h, w], "blobs": chosen_blobs(cfg),
            "net_hw": [int(own[2]), int(own[3])] if own and len(own) == 4 else None,
            "input_size": [int(x) for x in cfg.model.input_size] if cfg.model.input_size else None}


def describe_shape_failure(prototxt: str, geometry: Dict, said: Optional[str], returncode: int) -> str:
    """The one line for a net Caffe loaded but cannot run at the run's input (pure)."""
    shape = "x".join(map(str, geometry["shape"]))
    if said is None:
        said = f"the check process died ({'signal ' + str(-returncode) if returncode < 0 else 'exit code ' + str(returncode)}) without a message"
    h, w = geometry["shape"][2:]
    own = geometry.get("net_hw")
    if own and [h, w] != list(own):
        fix = (f"model.input_size=[{own[0]},{own[1]}], the net's own input size (model.input_size=[{h},{w}] "
               "does not fit its layers)")
    elif own:
        fix = ("the prototxt does not run at its own input size: check its layers (a deploy prototxt made for "
               "these weights), or set model.input_size=[H,W] to the size the net was trained at")
    else:
        fix = "set model.input_size=[H,W] to the size the net was trained at"
    return (f"model.prototxt {prototxt} does not take the run's input: Caffe, reshaping the net (cut after "
            f"{', '.join(geometry['blobs'])}) to the batch {shape} (batch_size x channels x H x W) and running "
            f"it once: {said} (fix: {fix})")


def describe_load_failure(prototxt: str, weights: str, said: Optional[str], returncode: int) -> str:
    """The one line for a pair Caffe could not load (pure): what is wrong, Caffe's words, the fix."""
    if said is None:
        how = (f"signal {signal.Signals(-returncode).name}" if returncode < 0 and -returncode in
               {s.value for s in signal.Signals} else f"exit code {returncode}")
        return (f"Caffe died loading model.weights {weights} into model.prototxt {prototxt} ({how}, without a "
                "message) (fix: check that this machine has the memory for the model and that "
                "`python -c 'import caffe'` works here)")
    if "Failed to parse NetParameter file" in said and os.path.basename(weights) in said:
        return (f"model.weights {weights} is not a Caffe model this Caffe can read: {said} (fix: give the "
                ".caffemodel file itself; a download cut short or an HTML page saved under that name is the usual "
                "cause: fetch it again)")
    if "Unknown layer type" in said:
        return (f"model.prototxt {prototxt} needs a layer this Caffe does not have: {said} (fix: use a Caffe build "
                "with that layer, or a deploy prototxt made for standard Caffe)")
    if any(s in said for s in ("Cannot copy param", "shape mismatch", "Incompatible number of blobs",
                               "Trying to copy blobs")):
        return (f"model.prototxt and model.weights do not match: {said} (fix: give the deploy prototxt that was "
                f"trained with these weights; prototxt {prototxt}, weights {weights})")
    return (f"Caffe cannot load model.weights {weights} into model.prototxt {prototxt}: {said} (fix: give a "
            "deploy prototxt and the .caffemodel trained with it)")


# the child imports this same runner, never a folder named `runner` in the user's working
# directory (`python -m` would put the working directory first on sys.path)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CHILD = ("import sys, runpy; sys.path[0] = sys.argv.pop(1); "
          "runpy.run_module('runner.engine.modelcheck', run_name='__main__', alter_sys=True)")


def _child_command(prototxt: str, weights: str, geometry: Optional[Dict] = None) -> list:
    cmd = [sys.executable, "-c", _CHILD, _ROOT, os.path.abspath(prototxt), os.path.abspath(weights)]
    return cmd + ([json.dumps({"shape": list(geometry["shape"]), "blobs": list(geometry["blobs"])})]
                  if geometry else [])


def load_in_child(prototxt: str, weights: str, timeout_s: float, geometry: Optional[Dict] = None) -> Tuple[bool, str]:
    """(loaded, the line for the user when not) from a child process that builds the net and,
    with `geometry` (run_geometry), runs it once at the run's batch shape."""
    env = dict(os.environ, GLOG_minloglevel="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    try:
        p = subprocess.run(_child_command(prototxt, weights, geometry), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        what = " and running it once at the run's batch shape" if geometry else ""
        return False, (f"loading model.weights {weights} into model.prototxt {prototxt}{what} took more than "
                       f"{timeout_s:g} s in a check process and was stopped: a file on a slow or hung file "
                       "system, or a batch too large for this machine? (fix: copy the model files to a faster "
                       "disk, or raise model.load_check_timeout_s)")
    if p.returncode == 0 and OK in p.stdout:
        return True, ""
    if geometry and LOADED in p.stdout and NO_WEIGHTS not in p.stdout:  # the pair loaded; the shapes did not fit
        said = caffe_last_words(p.stderr)
        if said is None and p.returncode > 0:
            tail = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
            said = tail[-1] if tail else None
        return False, describe_shape_failure(prototxt, geometry, said, p.returncode)
    if NO_WEIGHTS in p.stdout:
        layers = json.loads(p.stdout.split(NO_WEIGHTS, 1)[1].splitlines()[0])
        return False, (f"model.weights {weights} holds weights for none of the {len(layers)} layers with parameters "
                       f"in model.prototxt {prototxt} (e.g. {layers[0]!r}): they are another net's, and Caffe would "
                       "run this one untrained (fix: give the .caffemodel trained with this prototxt, or the "
                       "prototxt made for these weights)")
    said = caffe_last_words(p.stderr)
    if said is None and p.returncode > 0:
        # a Python error in the child (pycaffe not importable ...): its last line
        tail = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        said = tail[-1] if tail else None
    return False, describe_load_failure(prototxt, weights, said, p.returncode)


def ensure_loadable(prototxt: str, weights: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                    geometry: Optional[Dict] = None) -> Dict[str, str]:
    """Raise ModelLoadError (one line, Caffe's words) unless Caffe loads the pair (and, with
    `geometry`, runs it at that batch shape); a pair proven before (same sha256s, same Caffe
    build, same geometry) is not loaded again. Returns the two sha256s."""
    path = cache_path()
    cache = _read_cache(path)
    shas = {"prototxt": file_sha256(prototxt, cache), "weights": file_sha256(weights, cache)}
    key = _pair_key(shas, caffe_build_id(), geometry)
    if key in cache["pairs"]:
        _write_cache(path, cache)  # newly hashed files (a copy elsewhere) are remembered too
        return shas
    t0 = time.time()
    ok, line = load_in_child(prototxt, weights, float(timeout_s), geometry)
    if not ok:
        raise ModelLoadError(line)
    log.info("model files load in Caffe%s (checked in %.1f s; remembered in %s)",
             f" and run at {'x'.join(map(str, geometry['shape']))}" if geometry else "", time.time() - t0, path)
    cache["pairs"][key] = {"prototxt": shas["prototxt"], "weights": shas["weights"], "t": time.time()}
    _write_cache(path, cache)
    return shas


def check_model_loads(cfg, geometry: Optional[Dict] = None) -> None:
    """Plan- and task-time: prove cfg.model's pair loads in this environment's Caffe and runs at
    the run's batch shape (raises ModelLoadError). The other backends do not load the net with
    Caffe: nothing to prove."""
    if cfg.backend not in CAFFE_LOADED:
        return
    ensure_loadable(str(cfg.model.prototxt), str(cfg.model.weights),
                    float(cfg.model.get("load_check_timeout_s", DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S),
                    geometry or run_geometry(cfg))


def _run_at(caffe, prototxt: str, shape: List[int], blobs: List[str]) -> None:
    """The net cut after `blobs` (as a task cuts it), reshaped to `shape` and run once. Its
    weights are the fillers' (the shapes do not depend on them; the pair's load was proven)."""
    spec = parse_prototxt(prototxt)
    net = net_from_text(caffe, truncated_prototxt(spec, spec.end_layer(blobs)))
    net.blobs[net.inputs[0]].reshape(*shape)
    net.reshape()
    net.forward()


SHAPES = "caffe-runner-shapes"  # the shapes child's word, then its JSON


def shapes_in_child(prototxt: str, shape: List[int], end_index: int,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Tuple[Optional[Dict], str]:
    """Caffe's own shape inference for the net cut after layer end_index, reshaped to `shape`
    (N, C, H, W), in a child (a layer that does not take that input aborts the process):
    ({"blobs": {blob: per-image shape}, "params": {layer: its first parameter's shape}}, "") or
    (None, Caffe's line). No weights are read: shapes do not depend on them."""
    env = dict(os.environ, GLOG_minloglevel="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _CHILD, _ROOT, "--shapes", os.path.abspath(prototxt),
           json.dumps({"shape": list(shape), "end": int(end_index)})]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           errors="replace", env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"Caffe took more than {timeout_s:g} s to build the net (stopped)"
    if p.returncode == 0 and SHAPES in p.stdout:
        return json.loads(p.stdout.split(SHAPES, 1)[1].splitlines()[0]), ""
    said = caffe_last_words(p.stderr)
    if said is None:
        tail = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        said = tail[-1] if tail else f"the process ended with code {p.returncode}"
    return None, said


def _shapes_child(prototxt: str, geometry: Dict) -> None:
    import caffe

    set_caffe_cpu_mode(caffe)
    spec = parse_prototxt(prototxt)
    net = net_from_text(caffe, truncated_prototxt(spec, geometry["end"]))
    net.blobs[net.inputs[0]].reshape(*geometry["shape"])
    net.reshape()
    out = {"blobs": {name: list(b.data.shape[1:]) for name, b in net.blobs.items()},
           "params": {name: list(p[0].data.shape) for name, p in net.params.items()}}
    sys.stdout.write(SHAPES + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


def _child(argv) -> int:
    """The check itself: build the net in TEST phase, CPU mode, copying the weights in; with a
    geometry (JSON), then run it once at that batch shape."""
    if argv[0] == "--shapes":
        os.environ.setdefault("GLOG_minloglevel", "2")
        _shapes_child(argv[1], json.loads(argv[2]))
    prototxt, weights = argv[:2]
    geometry = json.loads(argv[2]) if len(argv) > 2 else None
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe

    set_caffe_cpu_mode(caffe)
    # Caffe copies weights by layer name and says nothing of a net layer the file lacks: a file
    # of another net loads "fine" and leaves every layer at its initial values. Built twice from
    # the same seed, a layer the file did not weigh holds the same values in both. The seed is
    # drawn afresh: a file saved from a net just initialised with a fixed seed is still weights.
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    caffe.set_random_seed(seed)
    blank = caffe.Net(prototxt, caffe.TEST)
    initial = {name: [b.data.copy() for b in blobs] for name, blobs in blank.params.items()}
    del blank
    caffe.set_random_seed(seed)
    net = caffe.Net(prototxt, caffe.TEST, weights=weights)
    unweighted = [name for name, blobs in net.params.items()
                  if all((b.data == a).all() for b, a in zip(blobs, initial[name]))]
    if initial and len(unweighted) == len(initial):
        sys.stdout.write(NO_WEIGHTS + json.dumps(unweighted) + "\n")
        sys.stdout.flush()
        os._exit(0)
    if geometry:
        sys.stdout.write(LOADED + "\n")
        sys.stdout.flush()
        del net, initial
        _run_at(caffe, prototxt, geometry["shape"], geometry["blobs"])  # Caffe aborts here when a shape does not fit
    sys.stdout.write(OK + "\n")
    sys.stdout.flush()
    os._exit(0)  # the net's memory is the OS's to free: a 500 MB model's teardown is time for nothing


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
