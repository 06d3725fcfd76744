"""container.runtime=none: the task runs on the host, its command as it is."""
from __future__ import annotations

import shlex
from typing import List, Optional

from .base import ContainerSpec, Runtime, Wrapped


class Host(Runtime):
    name = "none"

    def image_path(self, image: str) -> Optional[str]:
        return None

    def wrap(self, spec: ContainerSpec, inner: List[str]) -> Wrapped:
        return Wrapped(list(inner), [])

    def interpreter(self, spec: ContainerSpec, python: str) -> str:
        # submitit puts this string into the sbatch script as it is (its own default is
        # shlex.quote(sys.executable)): a venv under a path with a space or `$(...)` must stay one word
        return shlex.quote(python)
