"""Pure pieces of the launchers: sbatch parameters, scontrol parsing, container commands,
GPU resolution, sweep directory names, config composition."""

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from runner.run.config import sweep_dirname
from runner.schema import ContainerConf, InputConf, ModelConf, OutputConf, RunConf, SlurmLauncherConf
from runner.errors import ConfigError
from runner.engine.device import resolve_gpus
from runner.runtimes import bind_dirs, container_command, wrap_python
from runner.launch.slurm import executor_parameters, parse_scontrol_config

pytestmark = pytest.mark.unit


def _cfg(**container):
    cfg = OmegaConf.structured(RunConf(model=ModelConf(name="m", prototxt="/models/m/deploy.prototxt",
                                                       weights="/models/m/w.caffemodel"),
                                       launcher=SlurmLauncherConf(), input=InputConf(dir="/data/imgs"),
                                       output=OutputConf(dir="/scratch/run"), container=ContainerConf(**container)))
    return cfg


def test_executor_parameters_units_and_optional_keys():
    lc = OmegaConf.structured(SlurmLauncherConf(partition="gpu", mem_gb=7.5, timeout_min=90, gpus_per_task=2,
                                                setup=["module load cuda"], additional_parameters={"exclusive": True}))
    p = executor_parameters(lc)
    assert p["mem"] == "7680M" and p["time"] == 90 and p["gres"] == "gpu:2" and p["partition"] == "gpu"
    assert "account" not in p and "qos" not in p  # no site-specific defaults
    assert p["setup"] == ["module load cuda"] and p["additional_parameters"] == {"exclusive": True}
    assert "gres" not in executor_parameters(lc, gres=False)
    lc.gpus_per_task = 0
    assert "gres" not in executor_parameters(lc)


def test_parse_scontrol_config():
    text = "Configuration data as of 2026\nMaxArraySize            = 1001\nMaxJobCount = 10000\nSlurmctldHost = vm(127.0.0.1)\n"
    d = parse_scontrol_config(text)
    assert d["MaxArraySize"] == "1001" and d["SlurmctldHost"] == "vm(127.0.0.1)"


def test_container_commands():
    assert container_command(_cfg(), ["python"]) == ["python"]
    cmd = container_command(_cfg(runtime="apptainer", image="/images/cr.sif"), ["python"])
    assert cmd[:2] == ["sh", "-c"] and "--nv" not in cmd[2] and cmd[2].endswith(' /images/cr.sif python "$@"')
    assert "--bind /data/imgs:/data/imgs" in cmd[2] and "--bind /scratch/run:/scratch/run" in cmd[2]
    gpu = _cfg(runtime="apptainer", image="x.sif")
    gpu.device = "gpu"
    assert "--nv" in container_command(gpu, ["python"])[2]
    pod = container_command(_cfg(runtime="podman", image="localhost/caffe-runner:cpu"), ["python"])
    assert pod[:3] == ["podman", "run", "--rm"] and "--pull" in pod and pod[-1] == "localhost/caffe-runner:cpu"
    assert pod[pod.index("--entrypoint") + 1] == "python" and "SLURM_ARRAY_TASK_ID" in pod
    assert wrap_python(_cfg(runtime="podman", image="img"), "/venv/bin/python").startswith("podman run")
    with pytest.raises(ConfigError, match="container.image"):
        container_command(_cfg(runtime="docker"), ["python"])
    # an unknown runtime never gets this far: the schema refuses it, listing the allowed ones
    with pytest.raises(ValidationError, match=r"'lxc', expected one of \[none, apptainer"):
        _cfg(runtime="lxc", image="x")


def test_bind_dirs_drop_nested():
    cfg = _cfg()
    cfg.output.dir = "/data/imgs/out"
    assert bind_dirs(cfg) == ["/data/imgs", "/models/m"]


def test_resolve_gpus(monkeypatch):
    assert resolve_gpus([0, 2]) == ["0", "2"]
    assert resolve_gpus("1,3") == ["1", "3"]
    assert resolve_gpus(5) == ["5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert resolve_gpus("auto") == ["4", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        resolve_gpus("auto")


def test_sweep_dirnames_are_one_folder():
    name = sweep_dirname(3, "model.prototxt=/a/b.prototxt,model=caffenet,output.blobs=[fc6,fc7]")
    assert "/" not in name and name.startswith("3_") and "output.blobs=[fc6,fc7]" in name
    assert "model=caffenet" in name and "prototxt" not in name
    assert len(sweep_dirname(0, "x=" + "y" * 500)) <= 200


def test_slurm_node_check_covers_every_input_kind(tmp_path):
    """Tasks on other nodes read the input: the plan-time check asks the input kinds for their
    paths (input.tar and input.root were forgotten before), naming the field that was set."""
    from runner.launch.slurm import _check_paths_for_nodes

    cfg = _cfg()
    cfg.model.prototxt = cfg.model.weights = str(tmp_path)
    cfg.input.dir = None
    cfg.input.tar = "/nonexistent/web/part-{000000..000009}.tar"
    with pytest.raises(ConfigError, match=r"input.tar /nonexistent/web is not readable from here"):
        _check_paths_for_nodes(cfg)
    cfg.input.tar = None
    cfg.input.list, cfg.input.root = str(tmp_path / "x"), "/nonexistent-root"
    (tmp_path / "x").write_text("a.jpg\n")
    with pytest.raises(ConfigError, match=r"input.list /nonexistent-root is not readable from here"):
        _check_paths_for_nodes(cfg)
