"""Apptainer (and Singularity's successor CLI): `apptainer exec` on a SIF file or a pulled URI."""
from __future__ import annotations

import shlex
from typing import List

from .base import ContainerSpec, Runtime, Wrapped, pairs


class Apptainer(Runtime):
    name = "apptainer"
    executable = "apptainer"
    # --bind takes a comma-separated list of SRC[:DST[:OPTS]]; --env a comma-separated list of NAME=VALUE
    bind_separators = ":,"

    def wrap(self, s: ContainerSpec, inner: List[str]) -> Wrapped:
        # `apptainer exec --cleanenv` passes no host variable except APPTAINERENV_<NAME> ones, so a
        # small sh copies each task variable that is set (on the node, at start) to that prefix.
        names = " ".join(s.env)
        copy = (f'for v in {names}; do eval "[ -z \\"\\${{$v+x}}\\" ] || export APPTAINERENV_$v=\\"\\${{$v}}\\""; done; ')
        cmd = ["apptainer", "exec", "--cleanenv"] + (["--nv"] if s.gpu else [])
        for b in pairs(s.binds):
            cmd += ["--bind", b]
        for k, v in s.set_env:
            cmd += ["--env", f"{k}={v}"]
        cmd += ["--pwd", s.workdir] + list(s.extra_args) + [s.image] + inner
        return Wrapped(["sh", "-c", copy + "exec " + shlex.join(cmd) + ' "$@"', "sh"], [])
