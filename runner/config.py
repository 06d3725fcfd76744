"""The config schema's classes under their oldest name: Slurm jobs queued (or requeued) by a
version before the schema moved to schema.py carry their config pickled as
runner.config.<class>, and unpickle through this module (tests/test_units.py:
test_configs_pickled_*). Nothing imports it; the config's composition is runner/run/config.py.
"""
from .schema import (Backend, ChannelOrder, ContainerConf, ContainerRuntime, DecodeConf, Device,  # noqa: F401
                     DType, InputConf, Interpolation, LauncherConf, LocalLauncherConf,
                     ModelConf, ModelFileConf, OutputConf, Pooling, PreprocessConf,
                     PreprocessMode, Resize, RunConf, RunOptsConf, SlurmLauncherConf, StrEnum,
                     SweepConf)
