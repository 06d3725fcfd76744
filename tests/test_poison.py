"""No poison shard, bounded input (issue 37): a shard whose process died twice is decoded image by
image in child processes, the image that kills its process recorded as a failure naming the
signal; a listed path that is not a regular file under decode.max_file_mb (/dev/zero, a named
pipe, a folder, a big file) is a failure with its reason, never a hang or a read without end;
input.follow_symlinks=false holds when the file is opened.

Real decoders on the real sample photos, real child processes killed by a real SIGSEGV (the
fault switch CAFFE_RUNNER_FAULT_CRASH_ON makes the decoder kill its own process on one file).
The timeouts here are a safety net (a hang fails the test instead of holding the suite), never
what a test asserts."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from runner.engine.decode import FAULT_CRASH_ON, MB, Decoder, Geometry, not_regular
from runner.task.isolate import (POISON_AFTER_DEATHS, IsolatedDecoder, attempt_open, death_reason, died_attempts,
                            oom_kills)

pytestmark = pytest.mark.unit

SAFETY_S = 60


def _dec(**kw):
    return Decoder(Geometry((48, 64)), **kw)


def _in_time(fn, *args):
    """fn(*args) in a thread, given SAFETY_S: a hang fails here instead of holding the suite."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(SAFETY_S)
    assert out, f"{fn.__name__}{args} did not return within {SAFETY_S} s (a hang)"
    return out[0]


# ---- which attempts died --------------------------------------------------------------

def _ev(*names, **fields):
    return [dict({"event": n}, **fields.get(n, {})) for n in names]


@pytest.mark.parametrize("events,died", [
    ([], 0),
    (_ev("started", "progress", "finished"), 0),
    (_ev("started", "progress"), 1),  # killed without a word (the caller holds the lock: not alive)
    (_ev("started", "started", "resumed", "finished"), 2),  # two attempts ended by the next one's start
    (_ev("started", "failed"), 0),  # a Python error: it ended in words
    ([{"event": "started"}, {"event": "failed", "died": "killed by SIGSEGV"}], 1),  # the launcher saw it die
    (_ev("started", "requeued", "resumed", "lost"), 0),
    (_ev("started", "stopped", "started", "stopped"), 0),  # the local launcher stopped it (another's death)
    ([{"event": "started"}, {"event": "failed", "died": "killed by SIGSEGV"}, {"event": "resumed"},
      {"event": "progress"}], 2),
])
def test_attempts_that_died_are_counted_from_the_event_log(events, died):
    assert died_attempts(events) == died


def test_an_open_attempt_is_one_without_an_end_line():
    assert attempt_open(_ev("started", "progress"))
    assert not attempt_open(_ev("started", "finished"))
    assert not attempt_open(_ev("started", "stopped"))
    assert not attempt_open([])


def test_the_reason_names_the_signal_and_out_of_memory():
    assert death_reason(-signal.SIGSEGV, False).startswith("crashed the decoder: its process was killed by SIGSEGV")
    oom = death_reason(-signal.SIGKILL, True)
    assert "SIGKILL" in oom and "out of memory" in oom
    assert "out of memory" not in death_reason(-signal.SIGKILL, False)  # a kill -9: not said to be memory
    assert "SIGBUS" in death_reason(128 + signal.SIGBUS, False)


def test_oom_kills_is_a_count_or_none():
    n = oom_kills()
    assert n is None or n >= 0


# ---- decoding image by image in child processes ------------------------------------------

def test_the_image_that_kills_the_decoder_is_a_failure_naming_the_signal_and_the_others_decode_alike(
        photos, monkeypatch):
    paths = sorted(os.fsencode(p) for p in photos.rglob("*.jpg"))
    poison = paths[2]
    monkeypatch.setenv(FAULT_CRASH_ON, os.path.basename(os.fsdecode(poison)))
    normal = _dec()
    iso = IsolatedDecoder(_dec())
    try:
        got = [iso.load(p) for p in paths]
    finally:
        iso.close()
    img, why = got[2]
    assert img is None and why.startswith("crashed the decoder: its process was killed by SIGSEGV"), why
    assert iso.deaths == 1
    monkeypatch.delenv(FAULT_CRASH_ON)
    for p, (img, why) in zip(paths, got):
        if p == poison:
            continue
        ref, ref_why = _dec().load(p)
        assert why is None and ref_why is None
        np.testing.assert_array_equal(img, ref)  # the same pixels as the decoder in this process
    assert normal.crash_on is not None  # the switch is read when the decoder is made


def test_without_the_switch_the_decoder_never_crashes(photos, monkeypatch):
    monkeypatch.delenv(FAULT_CRASH_ON, raising=False)
    dec = _dec()
    assert dec.crash_on is None
    img, why = dec.load(os.fsencode(next(photos.rglob("*.jpg"))))
    assert why is None and img.shape == (48, 64, 3)


def test_failures_the_child_decides_are_the_decoders_own_reasons(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    iso = IsolatedDecoder(_dec())
    try:
        iso.missing_reason = "listed but not found"  # the reader sets it before the first image
        assert iso.load(os.fsencode(bad)) == _dec().load(os.fsencode(bad))
        assert iso.load(os.fsencode(tmp_path / "gone.jpg")) == (None, "listed but not found")
        assert iso.load_bytes(b"") == (None, "empty image (0 bytes)")
    finally:
        iso.close()
    assert iso.deaths == 0


def test_parallel_decode_threads_each_have_their_child(photos, monkeypatch):
    paths = sorted(os.fsencode(p) for p in photos.rglob("*.jpg"))
    monkeypatch.setenv(FAULT_CRASH_ON, os.path.basename(os.fsdecode(paths[0])))
    iso = IsolatedDecoder(_dec())
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(iso.load, paths * 2))
    finally:
        iso.close()
    deaths = [why for img, why in got if img is None]
    assert len(deaths) == 2 and all("SIGSEGV" in w for w in deaths)
    assert sum(img is not None for img, _ in got) == 2 * (len(paths) - 1)


# ---- bounded input: regular files under the byte cap -------------------------------------

def test_dev_zero_is_a_failure_not_a_read_without_end():
    img, why = _in_time(_dec().load, b"/dev/zero")
    assert img is None and why == "not a regular file: a character device"


def test_a_named_pipe_is_a_failure_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    img, why = _in_time(_dec().load, os.fsencode(fifo))
    assert img is None and why == "not a regular file: a named pipe (FIFO)"


def test_a_folder_is_a_failure(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    assert _dec().load(os.fsencode(tmp_path / "d.jpg")) == (None, "is a directory")


def test_a_file_over_the_byte_cap_is_a_failure_naming_the_key(photos, tmp_path):
    p = os.fsencode(next(photos.rglob("*.jpg")))
    size = os.path.getsize(p)
    img, why = _dec(max_file_mb=(size - 1) / MB).load(p)
    assert img is None and why.startswith(f"too large: {size} bytes > decode.max_file_mb=")
    img, why = _dec(max_file_mb=size / MB).load(p)
    assert why is None  # at the cap: read
    assert "decode.max_file_mb" in _dec(max_file_mb=0.001).load_bytes(b"x" * 2000)[1]


def test_follow_symlinks_false_holds_when_the_file_is_opened(photos, tmp_path):
    """A symlink swapped in after the listing (here: made after the decoder) is not followed."""
    src = next(photos.rglob("*.jpg"))
    link = tmp_path / "swapped.jpg"
    link.symlink_to(src)
    img, why = _dec(follow_symlinks=False).load(os.fsencode(link))
    assert img is None and why.startswith("a symlink, not followed (input.follow_symlinks=false")
    assert _dec(follow_symlinks=True).load(os.fsencode(link))[1] is None
    assert _dec(follow_symlinks=False).load(os.fsencode(src))[1] is None  # a plain file: read


@pytest.mark.parametrize("mode,what", [(0o100644, None), (0o040755, "a directory"), (0o010644, "a named pipe (FIFO)"),
                                       (0o020666, "a character device"), (0o140755, "a socket")])
def test_not_regular_names_the_kind(mode, what):
    assert not_regular(mode) == what


def test_the_threshold_is_two_deaths():
    assert POISON_AFTER_DEATHS == 2


# ---- out of memory: a real OOM kill in a memory cgroup of its own --------------------------

OOM_SCRIPT = """
import os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))  # this process and the children it starts: under the cgroup's limit
from runner.engine.decode import Decoder, Geometry
from runner.task.isolate import IsolatedDecoder
iso = IsolatedDecoder(Decoder(Geometry((48, 64)), max_pixels=10 ** 9))
for path in sys.argv[2:]:
    img, why = iso.load(os.fsencode(path))
    print(repr(why if img is None else "ok"), flush=True)
iso.close()
"""


def _flat_png(path, w: int, h: int) -> None:
    """A grey PNG of w x h pixels written row by row (small on disk, w*h*3 bytes decoded)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * w
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) +
                     chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _memory_cgroup(limit_bytes: int):
    """A memory cgroup of this machine's hierarchy (v1 or v2) limited to limit_bytes, or a skip."""
    import uuid

    for base, limit in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        if not os.path.exists(os.path.join(base, limit)) and not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        cg = os.path.join(base, f"caffe-runner-oom-{uuid.uuid4().hex[:8]}")
        try:
            os.mkdir(cg)
        except OSError:
            continue
        try:
            with open(os.path.join(cg, limit), "w") as f:
                f.write(str(limit_bytes))
            return cg
        except OSError:
            os.rmdir(cg)
    pytest.skip("no memory cgroup can be made here (needs root and a writable cgroup file system)")


def test_an_image_the_oom_killer_ends_is_a_failure_saying_out_of_memory(photos, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    big = tmp_path / "huge.png"
    _flat_png(big, 12000, 12000)  # 432 MB decoded, over the cgroup's 200 MB
    cg = _memory_cgroup(200 << 20)
    try:
        p = subprocess.run([sys.executable, "-c", OOM_SCRIPT, cg, str(big), str(next(photos.rglob("*.jpg")))],
                           cwd=REPO, capture_output=True, text=True, timeout=SAFETY_S * 3)
    finally:
        os.rmdir(cg)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = p.stdout.splitlines()
    assert "killed by SIGKILL from the out-of-memory killer (out of memory" in first, p.stdout
    assert second == "'ok'"  # a fresh child decodes the next image


# ---- the new key ---------------------------------------------------------------------------

def test_max_file_mb_is_in_the_identity_only_when_set(tmp_path):
    """A run planned before the key existed keeps its fingerprint (the default adds nothing); a
    cap of its own is part of what decides the output, as decode.max_pixels is."""
    from omegaconf import OmegaConf

    from runner.run.plan import decode_identity
    from runner.schema import DecodeConf

    assert "max_file_mb" not in decode_identity(OmegaConf.structured(DecodeConf()))
    assert decode_identity(OmegaConf.structured(DecodeConf(max_file_mb=2)))["max_file_mb"] == 2.0


@pytest.mark.parametrize("value", [0, -1])
def test_a_cap_that_is_not_positive_is_refused_with_the_fix(value, tmp_path):
    from runner.run.config import compose
    from runner.errors import ConfigError
    from runner.run.plan import _check_ranges

    cfg = compose([f"output.dir={tmp_path}", f"decode.max_file_mb={value}"])
    with pytest.raises(ConfigError, match=r"decode\.max_file_mb=-?\d+(\.\d+)?: use a positive number of MB"):
        _check_ranges(cfg)


@pytest.mark.unit
def test_a_shard_taken_from_another_task_is_isolated_after_one_death():
    from runner.task.isolate import isolate_attempt

    assert not isolate_attempt(0, taken=True) and not isolate_attempt(0, taken=False)
    assert isolate_attempt(1, taken=True)  # at the tail no third task may be left after a second death
    assert not isolate_attempt(1, taken=False) and isolate_attempt(2, taken=False)
