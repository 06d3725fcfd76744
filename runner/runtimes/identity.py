"""The image a task runs in, as the task sees it (task side: shard attributes, heartbeats,
`status` and the merged file). The launcher sets these variables at submission; the image
itself sets CAFFE_RUNNER_CONTAINER. Nothing here imports a launcher or a runtime."""
from __future__ import annotations

import os
from typing import Dict

# Set at submission (and recorded by each shard): which runtime, which image, its identity.
ENV_RUNTIME, ENV_IMAGE, ENV_IMAGE_ID = "CAFFE_RUNNER_CONTAINER_RUNTIME", "CAFFE_RUNNER_IMAGE", "CAFFE_RUNNER_IMAGE_ID"


def task_container(environ=os.environ) -> Dict[str, str]:
    """Inside a task: where it runs (shard attrs, heartbeats). `container` is the image's own
    label (set by the image's environment, so present only inside it); the others were set by
    the launcher for this submission."""
    return {"container": environ.get("CAFFE_RUNNER_CONTAINER", ""),
            "container_runtime": environ.get(ENV_RUNTIME, ""),
            "container_image": environ.get(ENV_IMAGE, ""),
            "container_image_id": environ.get(ENV_IMAGE_ID, "")}


def image_label(attrs=None) -> str:
    """One string per image a shard ran in ("" on the host): `status` and the merged file
    compare them to flag a run whose shards came from different images."""
    tc = task_container() if attrs is None else {k: str(attrs.get(k, "")) for k in task_container({})}
    if not tc["container_runtime"]:
        return tc["container"]  # an image run by hand (podman run ...) still says so
    return f"{tc['container_runtime']}:{tc['container_image']}" + (
        f" ({tc['container_image_id']})" if tc["container_image_id"] else "")
