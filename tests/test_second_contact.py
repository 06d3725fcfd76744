"""Issue 20 ("second contact"): one line for every mistake, checked in-process on the pure
functions that make the decision and the message (the fast layer: no pycaffe, no cluster)."""
from __future__ import annotations

import pytest

from conftest import input_conf, placeholder_images
from runner.errors import ConfigError
from runner.engine.model import LayerInfo, NetSpec


def check_fixed_shape(*a):
    from runner.engine.model import check_fixed_shape

    return check_fixed_shape(*a)


def unknown_blob_message(*a):
    from runner.engine.model import unknown_blob_message

    return unknown_blob_message(*a)


def variable_shape_blobs(*a):
    from runner.engine.model import variable_shape_blobs

    return variable_shape_blobs(*a)

pytestmark = pytest.mark.unit


def _layers(*rows):
    return tuple(LayerInfo(n, t, tuple(b), tuple(tp)) for n, t, b, tp in rows)


# a detector like res10: a backbone, heads, and a DetectionOutput whose shape changes per image
SSD = _layers(("data_bn", "BatchNorm", ["data"], ["data_bn"]),
              ("conv1_h", "Convolution", ["data_bn"], ["conv1_h"]),
              ("conv1_bn_h", "BatchNorm", ["conv1_h"], ["conv1_h"]),
              ("fc7", "Convolution", ["conv1_h"], ["fc7"]),
              ("mbox_loc", "Concat", ["fc7"], ["mbox_loc"]),
              ("mbox_conf_flatten", "Flatten", ["fc7"], ["mbox_conf_flatten"]),
              ("mbox_priorbox", "Concat", ["fc7"], ["mbox_priorbox"]),
              ("detection_out", "DetectionOutput", ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"],
               ["detection_out"]),
              ("after", "Reshape", ["detection_out"], ["after"]),
              *[(f"extra{i}", "ReLU", ["fc7"], [f"extra_blob{i}"]) for i in range(12)])


def _spec(layers=SSD):
    return NetSpec(None, layers, "data", (1, 3, 300, 300))


# ---- item 7: variable-shaped blobs are refused at plan time ---------------------------------

def test_detection_output_and_what_follows_it_vary_per_image():
    var = variable_shape_blobs(SSD)
    assert set(var) == {"detection_out", "after"}
    assert var["after"].name == "detection_out"


def test_a_variable_blob_is_refused_naming_the_fixed_ones_it_comes_from():
    with pytest.raises(ConfigError) as e:
        check_fixed_shape(["fc7", "detection_out"], _spec())
    msg = str(e.value)
    assert "'detection_out' changes shape from image to image" in msg and "DetectionOutput" in msg
    assert "mbox_loc, mbox_conf_flatten, mbox_priorbox" in msg and "\n" not in msg
    check_fixed_shape(["fc7", "mbox_loc"], _spec())  # fixed ones pass


# ---- item 8: a layer name, the input, or a typo: a short line with the closest blob -------

def test_a_layer_name_is_answered_with_the_blobs_it_writes():
    msg = unknown_blob_message("conv1_bn_h", SSD, "data")
    assert "'conv1_bn_h' is a layer, not a blob; it writes conv1_h" in msg and "output.blobs=[conv1_h]" in msg
    assert len(msg) < 200


def test_a_near_miss_is_answered_with_the_closest_blob_not_the_whole_list():
    msg = unknown_blob_message("conv1", SSD, "data")
    assert "did you mean conv1_h" in msg and "extra_blob7" not in msg and len(msg) < 200, msg
    with pytest.raises(ConfigError, match="did you mean conv1_h"):
        _spec().producer("conv1")


def test_the_input_blob_is_not_a_feature():
    msg = unknown_blob_message("data", SSD, "data")
    assert "'data' is the net's input" in msg and "not in the net" not in msg and len(msg) < 200


def test_a_small_net_lists_its_blobs():
    small = SSD[:4]
    msg = unknown_blob_message("nope", small, "data")
    assert msg.endswith("its blobs are: data_bn, conv1_h, fc7")


# ---- items 3 and 9: list files ---------------------------------------------------------------

def test_list_paths_that_do_not_resolve_stop_before_work_naming_input_root(tmp_path, monkeypatch):
    from runner.inputs import build_manifest

    names = [f"cls{i % 3}/img{i}.jpg" for i in range(20)]
    placeholder_images(tmp_path / "data", names)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val.txt").write_text("".join(f"{n} {i % 3}\n" for i, n in enumerate(names)))
    monkeypatch.chdir(tmp_path / "data")  # the user ran from the images' folder, as Caffe's tools allow
    with pytest.raises(ConfigError) as e:
        build_manifest(tmp_path / "run", input_conf(list=str(lists / "val.txt")))
    msg = str(e.value)
    assert f"20 of the first 20 listed paths do not exist under {lists}" in msg and "input.root is not set" in msg
    assert f"add input.root={tmp_path / 'data'}" in msg and "\n" not in msg, msg
    assert not (tmp_path / "run" / "manifest").exists()
    # input.root given, but wrong: named as input.root
    with pytest.raises(ConfigError, match=r"under .*/lists \(input.root\)"):
        build_manifest(tmp_path / "run", input_conf(list=str(lists / "val.txt"), root=str(lists)))
    m = build_manifest(tmp_path / "run", input_conf(list=str(lists / "val.txt"), root=str(tmp_path / "data")))
    assert m.count == 20 and m.labels


def test_a_few_missing_list_entries_are_failures_not_a_wrong_root(tmp_path):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path, [f"{i}.jpg" for i in range(8)])
    (tmp_path / "l.txt").write_text("".join(f"{i}.jpg\n" for i in range(10)))  # 2 of 10 missing
    assert build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt"))).count == 10


def test_names_ending_in_a_number_suggest_list_labels_no(tmp_path):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path, ["IMG 2019", "IMG 2020"])
    (tmp_path / "l.txt").write_text("IMG 2019\nIMG 2020\n")
    with pytest.raises(ConfigError, match="set input.list_labels=no"):
        build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt")))


def test_a_duplicated_list_path_names_the_lines(tmp_path):
    from runner.inputs import build_manifest

    placeholder_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "l.txt").write_text("a.jpg 1\nb.jpg 2\n# comment\nc.jpg 1\na.jpg 3\nb.jpg 2\n")
    with pytest.raises(ConfigError) as e:
        build_manifest(tmp_path / "run", input_conf(list=str(tmp_path / "l.txt")))
    msg = str(e.value)
    assert "names 2 image(s) more than once ('a.jpg' on lines 1 and 5; 'b.jpg' on lines 2 and 6)" in msg, msg
    # the fix it gives removes duplicates whose labels differ (the old awk '!seen[$0]++' kept a.jpg twice)
    awk = msg.split("(", 2)[2].split(" keeps")[0]
    import re
    import subprocess

    script = re.search(r"awk '(.*)'", awk).group(1)
    out = subprocess.run(["awk", script, str(tmp_path / "l.txt")], capture_output=True, text=True).stdout
    assert [ln.split()[0] for ln in out.splitlines() if not ln.startswith("#")] == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_run_that_extracts_nothing_fails():
    from omegaconf import OmegaConf

    from runner.errors import FailureShareError
    from runner.store.stats import check_failure_share

    cfg = OmegaConf.create({"run": {"max_failure_fraction": None}})
    stats = {"rows": 0, "failures": 20, "failures_by_reason": {"listed but not found": 20}, "run_dir": "/r"}
    with pytest.raises(FailureShareError, match="none of the 20 images could be extracted .20 listed but not found"):
        check_failure_share(cfg, stats)
    check_failure_share(cfg, dict(stats, rows=1))  # one row is a result


# ---- item 11: offline model preset, no Slurm cluster: one line each -----------------------

def test_offline_preset_is_one_line_naming_both_files_and_the_fix_once(tmp_path):
    """What an offline machine says for a caffenet whose two files are missing (a closed local
    port stands in for the unreachable host)."""
    import socket

    from omegaconf import OmegaConf

    from runner.engine.fetch import ensure_model_files

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    model = OmegaConf.create({
        "name": "caffenet", "prototxt": str(tmp_path / "deploy.prototxt"),
        "weights": str(tmp_path / "w.caffemodel"), "auto_fetch": True, "source": "the zoo",
        "files": {"weights": {"url": f"http://127.0.0.1:{port}/w.caffemodel", "hash": None},
                  "prototxt": {"url": f"http://127.0.0.1:{port}/deploy.prototxt", "hash": None}}})
    with pytest.raises(ConfigError) as e:
        ensure_model_files(model)
    msg = str(e.value)
    assert "deploy.prototxt and w.caffemodel not in" in msg and "(127.0.0.1: Connection refused)" in msg, msg
    assert msg.count("caffe-runner fetch") == 1 and "model.prototxt=... model.weights=..." in msg
    assert "\n" not in msg and len(msg) < 400 and "HTTPConnectionPool" not in msg


def test_network_reason_is_the_root_cause_in_a_few_words():
    from runner.engine.fetch import network_reason

    nested = ("HTTPConnectionPool(host='dl.caffe.berkeleyvision.org', port=80): Max retries exceeded with url: "
              "/x.caffemodel (Caused by NameResolutionError(\"<urllib3.connection.HTTPConnection object at 0x7f>: "
              "Failed to resolve 'dl.caffe.berkeleyvision.org' ([Errno -2] Name or service not known)\"))")
    assert network_reason(Exception(nested)) == "Name or service not known"
    assert network_reason(Exception("Read timed out. (read timeout=60)")) == "timed out"


SCONTROL_NO_CLUSTER = """scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host
scontrol: error: fetch_config: DNS SRV lookup failed
scontrol: error: _establish_config_source: failed to fetch config
scontrol: fatal: Could not establish a configuration source
"""


def test_no_slurm_cluster_is_one_line():
    from runner.launch.slurm import no_controller_message

    msg = no_controller_message(SCONTROL_NO_CLUSTER)
    assert msg.startswith("launcher=slurm but no Slurm cluster answers from this machine "
                          "(scontrol: Could not establish a configuration source)")
    assert "\n" not in msg and "launcher=local" in msg and len(msg) < 300
    assert "Unable to contact slurm controller" in no_controller_message(
        "scontrol: error: Unable to contact slurm controller (connect failure)\n")


# ---- item 6: values Hydra's grammar rejects although they are ordinary paths or lists -------

def _compose(*overrides):
    from runner.run.config import compose

    return compose(list(overrides) + ["output.dir=/tmp/x"])


@pytest.mark.parametrize("path", ["~/imgs", "a#b", "a&b", "it's", "p(1)", "[x]", "{y}", "a,b", "sp ace",
                                  "back\\slash\\", "dir/shards-{000..099}.tar"])
def test_paths_are_quoted_for_hydra(path):
    import os

    cfg = _compose(f"input.dir={path}", f"input.root={path}", "model=res10_ssd", f"model.weights={path}")
    want = os.path.expanduser(path)
    assert cfg.input.dir == want and cfg.input.root == want and cfg.model.weights == want


def test_brace_range_in_input_tar():
    assert _compose("input.tar=dir/shards-{000..099}.tar").input.tar == "dir/shards-{000..099}.tar"


def test_a_single_value_where_a_list_is_expected():
    cfg = _compose("output.blobs=fc7", "input.extensions=heic", "launcher=slurm", "launcher.setup=module load caffe")
    assert list(cfg.output.blobs) == ["fc7"] and list(cfg.input.extensions) == ["heic"]
    assert list(cfg.launcher.setup) == ["module load caffe"]
    assert list(_compose("output.blobs=[fc7,conv6_2_h]").output.blobs) == ["fc7", "conv6_2_h"]


def test_double_dash_key_value():
    assert _compose("--input.dir=x", "--output.blobs=fc7").input.dir == "x"


def test_sweep_keeps_commas_in_paths_as_sweeps_and_quoted_ones_as_paths():
    from runner.run.config import expand_sweep
    from runner.run.overrides import normalize_overrides

    points = expand_sweep(normalize_overrides(["input.dir=a,b", "output.blobs=fc7"], multirun=True))
    assert [p[0] for p in points] == ["input.dir=a", "input.dir=b"]
    points = expand_sweep(normalize_overrides(["input.dir='a,b'", "model=res10_ssd,open_nsfw"], multirun=True))
    assert len(points) == 2 and _compose(*points[0]).input.dir == "a,b"


def test_what_still_cannot_be_read_says_how_to_write_it():
    with pytest.raises(ConfigError) as e:
        _compose("model.preprocess.mean=[1,2")
    assert "\"model.preprocess.mean=['a b',c]\"" in str(e.value) or "model.preprocess.mean=[a,b]" in str(e.value)
    from runner.run.config import expand_sweep
    from runner.run.overrides import normalize_overrides

    with pytest.raises(ConfigError) as e:
        expand_sweep(normalize_overrides(["input.dir=a,b'c"], multirun=True))
    assert "quote the path" in str(e.value) and "\"input.dir='a,b\\'c'\"" in str(e.value), str(e.value)
