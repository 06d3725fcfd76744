"""Caffe's last words: the line a Caffe abort leaves on stderr (glog's FATAL line, or a
`Check failed` line), found in the text a dying process wrote, so that the user reads that
line instead of "a process died"."""
from __future__ import annotations

import re
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
