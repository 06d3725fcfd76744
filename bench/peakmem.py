"""Peak memory of one process, measured in that process's own terms.

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is the wrong figure for a process started by
multiprocessing's spawn (fork + exec): Linux carries the parent's high-water mark across the
fork, so a 76 MB child of a 600 MB parent reads 600 MB. `VmHWM` in /proc/<pid>/status is the
peak of the process's current address space, which exec replaces: it is the child's own.
"""
from __future__ import annotations

from typing import Optional, Union


def status_field_kb(status_text: str, field: str) -> Optional[int]:
    """A `Name:   123 kB` line of /proc/<pid>/status, in kB (None when absent)."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    return None


def peak_rss_mb(pid: Union[int, str] = "self") -> float:
    """The process's own resident high-water mark (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        kb = status_field_kb(f.read(), "VmHWM")
    if kb is None:
        raise RuntimeError(f"/proc/{pid}/status has no VmHWM line (not Linux?)")
    return kb / 1024.0
