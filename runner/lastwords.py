"""Caffe's last words: the line glog writes just before Caffe aborts the process (a `F` fatal
line, a failed CHECK), found in a task's stderr so the shard's state can say why it died."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# glog: "F1205 15:05:02.123456 12345 net.cpp:123] Check failed: ..." (level, MMDD, time, thread, file:line)
_GLOG_FATAL = re.compile(r"^F\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+(?P<msg>\S+:\d+\].*)$")
TAIL_BYTES = 256 * 1024  # a task's log can be long; the last words are at its end


def caffe_last_words(text: str) -> Optional[str]:
    """The last glog fatal line ("net.cpp:123] Check failed: ...") or "Check failed" line in
    `text`, without glog's prefix; None when Caffe said nothing fatal (pure)."""
    found = None
    for line in text.splitlines():
        line = line.strip()
        m = _GLOG_FATAL.match(line)
        if m:
            found = m.group("msg").strip()
        elif "Check failed" in line:
            found = line
    return found


def last_words_of(log_path) -> Optional[str]:
    """caffe_last_words of a log file's tail; None when it cannot be read."""
    try:
        with open(Path(log_path), "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            return caffe_last_words(f.read().decode(errors="replace"))
    except (OSError, TypeError):
        return None
