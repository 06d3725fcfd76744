"""TEMPORARY (issue 19 part B): stands in for runner.inputs.node_read_paths, which part A
(branch issue-19) provides; deleted when that branch is merged."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List


def node_read_paths(input_conf) -> List[Path]:
    """The paths a task must be able to read for this input (absolute, not checked)."""
    def ab(p) -> Path:
        return Path(os.path.abspath(os.path.expanduser(str(p))))

    out: List[Path] = []
    if input_conf.get("dir"):
        out.append(ab(input_conf.dir))
    if input_conf.get("list"):
        out.append(ab(input_conf.list))
    if input_conf.get("root"):
        out.append(ab(input_conf.root))
    if input_conf.get("lmdb"):
        out.append(ab(input_conf.lmdb))
    if input_conf.get("tar"):
        spec = str(input_conf.tar)
        head = re.split(r"[*?\[{]", spec, maxsplit=1)[0]
        # a list file or one tar as it is; a pattern: the folder before its first pattern character
        out.append(ab(spec) if head == spec else ab(head if head.endswith("/") else os.path.dirname(head) or "."))
    return out
