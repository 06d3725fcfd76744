"""The model-load proof's pure parts and its cache, without pycaffe: Caffe's last words picked
from stderr, the one line per kind of failure, the stat-keyed sha256 cache, the simulated
backend's gate (tests hold a run with it), and ShardWriter.set_done."""
from __future__ import annotations

import json
import os

import pytest

from runner.store.lastwords import caffe_last_words
from runner.engine.simulated import gate_allows
from runner.engine.modelcheck import (_pair_key, _read_cache, cache_path, describe_load_failure, ensure_loadable,
                               file_sha256, model_sha256)

pytestmark = pytest.mark.unit

MISMATCH = ("F1205 15:03:54.123456  4242 net.cpp:822] Cannot copy param 0 weights from layer 'conv1_h'; shape "
            "mismatch.  Source param shape is 16 3 3 3 (432); target param shape is 32 3 3 3 (864). To learn this "
            "layer's parameters from scratch rather than copying from a saved net, rename the layer.")
PARSE = ("F1205 15:03:54.999999 77 upgrade_proto.cpp:97] Check failed: ReadProtoFromBinaryFile(param_file, param) "
         "Failed to parse NetParameter file: /m/model.weights")


@pytest.mark.parametrize("text, want", [
    ("", None),
    ("I1205 15:03:54.1 1 net.cpp:1] Creating layer data\nW1205 15:03:54.2 1 x.cpp:2] careful\n", None),
    ("[libprotobuf ERROR google/protobuf/wire_format_lite.cc:577] parse error\n" + PARSE + "\n*** Check failure "
     "stack trace: ***\n    @     0x7f01 google::LogMessage::Fail()\nAborted (core dumped)\n",
     "Check failed: ReadProtoFromBinaryFile(param_file, param) Failed to parse NetParameter file: /m/model.weights"),
    ("I1205 15:03:54.1 1 net.cpp:1] Creating layer conv1_h\n" + MISMATCH + "\n*** Check failure stack trace: ***\n",
     MISMATCH.split("] ", 1)[1]),
    # no glog prefix (a build logging elsewhere): the Check failed line itself
    ("something\nCheck failed: shape == other (1 vs. 2)\n", "Check failed: shape == other (1 vs. 2)"),
    # the FATAL line wins over an earlier Check failed line of another message
    ("Check failed: a\n" + MISMATCH, MISMATCH.split("] ", 1)[1]),
    # newer glog writes the year too
    ("WARNING: Logging before InitGoogleLogging() is written to STDERR\nF20261205 15:09:54.039999 29251 "
     "net.cpp:822] Cannot copy param 0 weights\n*** Check failure stack trace: ***\n", "Cannot copy param 0 weights"),
])
def test_caffe_last_words(text, want):
    assert caffe_last_words(text) == want


def test_each_kind_of_load_failure_names_the_files_and_the_fix():
    words = MISMATCH.split("] ", 1)[1]
    line = describe_load_failure("/m/deploy.prototxt", "/m/model.weights", words, -6)
    assert line.startswith("model.prototxt and model.weights do not match: Cannot copy param 0 weights from layer "
                           "'conv1_h'; shape mismatch")
    assert "(fix: give the deploy prototxt that was trained with these weights" in line
    line = describe_load_failure("/m/deploy.prototxt", "/m/model.weights", caffe_last_words(PARSE), -6)
    assert line.startswith("model.weights /m/model.weights is not a Caffe model this Caffe can read: Check failed: "
                           "ReadProtoFromBinaryFile") and "fetch it again" in line
    line = describe_load_failure("/m/p", "/m/w", "Check failed: registry.count(type) == 1 (0 vs. 1) Unknown layer "
                                 "type: Foo (known types: ...)", -6)
    assert "needs a layer this Caffe does not have" in line and "Unknown layer type: Foo" in line
    line = describe_load_failure("/m/p", "/m/w", None, -9)
    assert "SIGKILL" in line and "without a message" in line and "memory" in line
    assert "\n" not in line


def test_sha_cache_is_keyed_by_stat_and_survives_an_unwritable_folder(tmp_path, monkeypatch):
    f = tmp_path / "w.caffemodel"
    f.write_bytes(b"a" * 1000)
    cache = {"files": {}, "pairs": {}}
    sha = file_sha256(str(f), cache)
    # the cache answers while the stat is unchanged (a planted wrong value proves no rehash)...
    cache["files"][str(f)]["sha256"] = "planted"
    assert file_sha256(str(f), cache) == "planted"
    # ... and not after the file changed, even with the same size and mtime put back
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(str(f), cache) not in ("planted", sha)
    # the cache folder cannot be written: the shas are still right
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "caffe-runner").write_text("a file where the folder should be")
    monkeypatch.delenv("CAFFE_RUNNER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(ro))
    assert model_sha256(str(f), str(f))["weights"] == file_sha256(str(f))


def test_a_proven_pair_is_not_loaded_again(tmp_path, monkeypatch):
    """A pair the cache says loaded is not given to Caffe again: here 1,000 random bytes, which
    Caffe would refuse (or could not even be asked, without pycaffe), pass on the cache's word."""
    import runner.engine.modelcheck as mc

    monkeypatch.setenv("CAFFE_RUNNER_CACHE", str(tmp_path / "cache"))
    proto, weights = tmp_path / "p.prototxt", tmp_path / "w.caffemodel"
    proto.write_text("name: 'x'")
    weights.write_bytes(os.urandom(1000))
    shas = {"prototxt": file_sha256(str(proto)), "weights": file_sha256(str(weights))}
    cache_path().parent.mkdir(parents=True)
    cache_path().write_text(json.dumps({"version": 1, "files": {}, "pairs": {
        _pair_key(shas, mc.caffe_build_id()): {"t": 0}}}))
    assert ensure_loadable(str(proto), str(weights)) == shas
    # the files' sha256 are remembered by their stat on the way
    assert sorted(_read_cache(cache_path())["files"]) == sorted([str(proto), str(weights)])
    # a damaged cache file is ignored, not trusted
    cache_path().write_text("{not json")
    assert _read_cache(cache_path())["pairs"] == {}


@pytest.mark.parametrize("text, batch, want", [
    (None, 0, False), ("", 0, False), ("0", 0, False), ("2", 1, True), ("2", 2, False), ("open", 99, True),
    ("open\n", 0, True), ("2\n", 0, True), ("x", 0, False),
])
def test_simulated_gate(text, batch, want):
    assert gate_allows(text, batch) is want


def test_set_done_records_how_far_a_rewritten_shard_reaches(tmp_path):
    import h5py
    import numpy as np

    from runner.results.write import ShardWriter

    w = ShardWriter(tmp_path / "s.h5", {"emb": (2,)}, "float32", {"start": 0, "stop": 5}, "fp", 4)
    w.write_batch(0, [3, 1], [b"a", b"b"], {"emb": np.ones((2, 2), np.float32)}, [(0, b"c", "gone")])
    assert w.next == 0
    w.set_done(5)
    with pytest.raises(ValueError):
        w.set_done(-1)
    w.finish()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert (int(f.attrs["next"]), int(f.attrs["rows"]), int(f.attrs["n_failures"])) == (5, 2, 1)
