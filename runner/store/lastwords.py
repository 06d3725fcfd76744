"""What a dead process said and how it died, as one phrase for the user (pure functions).

Caffe reports a fatal error through glog and then aborts: the process leaves no Python
traceback, only a line on its stderr such as

    F1205 15:20:01.123456  4242 net.cpp:822] Cannot copy param 0 weights from layer 'conv1'; shape mismatch. ...
    *** Check failure stack trace: ***

(`CHECK(...)` failures read `Check failed: <condition> <message>`). That line, not a generic
"worker died", is the error the user must see. The local launcher reads it from each worker's
stderr file; under Slurm the same text is the task's submitit log (RUN/logs/*_log.err).
"""
from __future__ import annotations

import re
import signal
from typing import Optional

# glog's prefix: severity letter, [yyyy]mmdd, time, thread id, file:line]
# (the source location "net.cpp:822] " is left out: the message is what the user acts on)
_GLOG_FATAL = re.compile(r"^F(?:\d{4})?\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] (.*)$")
_CHECK_FAILED = re.compile(r"Check failed: .*")
_MAX_CHARS = 600  # one line in a terminal's scrollback, not a page


def caffe_last_words(text: str) -> Optional[str]:
    """Caffe's fatal line in a process's stderr ("Cannot copy param 0 ..."), the
    last one when there are several; None when Caffe did not abort. Without glog's prefix (a
    log that lost it), the last line holding "Check failed:" is taken."""
    fatal = check = None
    for raw in text.splitlines():
        line = raw.strip()
        m = _GLOG_FATAL.match(line)
        if m:
            fatal = m.group(1)
            continue
        m = _CHECK_FAILED.search(line)
        if m:
            check = m.group(0)
    found = fatal or check
    if found is None:
        return None
    found = found.strip()
    return found if len(found) <= _MAX_CHARS else found[:_MAX_CHARS - 3] + "..."


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
