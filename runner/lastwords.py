"""Caffe's last words: the line a Caffe abort leaves on stderr (glog's FATAL line, or a
`Check failed` line), found in the text a dying process wrote, so that the user reads that
line instead of "a process died". And how a process ended, in words (describe_exit,
signal_hint): the local launcher's line for a worker that died."""
from __future__ import annotations

import re
import signal
from typing import Optional

# glog's prefix: severity letter, date (MMDD; newer glog: YYYYMMDD), time, thread id, file:line]
# (F1205 15:03:54.123456 4242 net.cpp:822] ...)
_GLOG = re.compile(r"^([IWEF])(?:\d{4}|\d{8}) \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]]*\] ?(.*)$")


def caffe_last_words(text: str) -> Optional[str]:
    """The message of the last glog FATAL line in `text` (prefix stripped), else the last line
    holding `Check failed`, else None."""
    fatal, check = None, None
    for line in (text or "").splitlines():
        m = _GLOG.match(line.strip())
        if m and m.group(1) == "F" and m.group(2).strip():
            fatal = m.group(2).strip()
        elif "Check failed" in line:
            check = (m.group(2) if m else line).strip()
    return fatal or check


def describe_exit(code: Optional[int]) -> str:
    """A process's end in words: multiprocessing's exitcode (-N: killed by signal N) or a
    shell's status (128+N: a process killed by signal N, as a container runtime reports it)."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if 128 < code <= 128 + 64 and _signal_name(code - 128, None):
        return f"exit code {code} ({_signal_name(code - 128)})"
    return f"exit code {code}"


def _signal_name(num: int, default: Optional[str] = "") -> Optional[str]:
    try:
        return signal.Signals(num).name
    except ValueError:
        return default if default is None else f"signal {num}"


def signal_hint(code: Optional[int]) -> Optional[str]:
    """The usual cause of a death by this signal, when there is one worth saying."""
    num = -code if code is not None and code < 0 else (code - 128 if code is not None and 128 < code <= 192 else 0)
    return {signal.SIGKILL: "kill -9, or the kernel's out-of-memory killer: see `dmesg`",
            signal.SIGSEGV: "a crash in native code (Caffe, BLAS, a decoder)",
            signal.SIGBUS: "a crash in native code, or a file mapped in memory that shrank",
            signal.SIGABRT: "an abort in native code"}.get(num)
