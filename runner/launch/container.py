"""SHIM: split into runner/runtimes/ (runtimes), runner/runtimes/identity.py (the task-side
image label) and launch/local.py (the local in-container shard runner)."""
from ..runtimes import *  # noqa: F401,F403
from ..runtimes import TASK_ENV, bind_dirs, charliecloud_binds, check_container, container_command  # noqa: F401
from ..runtimes.identity import ENV_IMAGE, ENV_IMAGE_ID, ENV_RUNTIME, image_label, task_container  # noqa: F401
