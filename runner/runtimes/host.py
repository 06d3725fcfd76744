"""container.runtime=none: the task runs on the host, its command as it is."""
from __future__ import annotations

from typing import List, Optional

from .base import ContainerSpec, Runtime, Wrapped


class Host(Runtime):
    name = "none"

    def image_path(self, image: str) -> Optional[str]:
        return None

    def wrap(self, spec: ContainerSpec, inner: List[str]) -> Wrapped:
        return Wrapped(list(inner), [])

    def interpreter(self, spec: ContainerSpec, python: str) -> str:
        return python  # the host's own Python
