"""A Python child process of ours, spoken to in pickled messages over its stdin and stdout.

Two parts of the runner keep work in child processes they start themselves: the local
launcher's workers (launch/workers.py) and the image-by-image decoder of a poison shard
(isolate.py). Both need what multiprocessing's spawn does not give through its public
interface: a child that runs only our own module, never the user's main module (spawn runs it
again in every child: a script without an `if __name__ == "__main__":` guard would start the
run again, and `<stdin>` or a notebook cannot be run again at all), and a death seen at once
and on its own (the child's pipe ends: EOF, then its exit code), without a lock or a queue
shared with other processes that a killed child could leave held. So the child is a plain
`subprocess.Popen([sys.executable, "-c", ...])` that imports one function of runner and runs
it, and the messages are length-prefixed pickles on two pipes, one child per pipe pair.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from typing import BinaryIO, Dict, Optional, Tuple

_HEADER = struct.Struct("<Q")
# the child imports this same runner, never a folder named `runner` in the user's working
# directory (sys.path[0] of `python -c` is the working directory); the parent's own sys.path
# follows its own (a notebook's `sys.path.insert(0, CAFFE_ROOT + "/python")` holds there too, as
# it did in spawn's children); then it runs one function
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "import sys, json, importlib; sys.path[0] = sys.argv.pop(1); "
         "sys.path += [p for p in json.loads(sys.argv.pop(1)) if p not in sys.path]; "
         "sys.exit(getattr(importlib.import_module(sys.argv[1]), sys.argv[2])())")


def start(module: str, function: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """A child running `module.function()` (its return value is the exit code), its stdin and
    stdout the message pipes. SIGINT is ignored from its first line: Ctrl-C reaches the whole
    process group, and the parent alone handles it (one line instead of a traceback per child)."""
    return subprocess.Popen([sys.executable, "-c", _BOOT, _ROOT, json.dumps(sys.path), module, function],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)


def pipes() -> Tuple[BinaryIO, BinaryIO]:
    """In a child: the message pipes (in, out). Its fd 1 then writes to stderr, so that a stray
    print, or a process the child starts, cannot corrupt the messages; its fd 0 reads
    /dev/null, so that such a process cannot read them either."""
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return inp, out


def dumps(obj) -> bytes:
    """One message, framed: what send() writes (made first, so that a value that cannot be
    pickled raises before anything is written)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send(f: BinaryIO, obj) -> None:
    f.write(dumps(obj))
    f.flush()


def recv_bytes(f: BinaryIO) -> bytes:
    """The next message, still pickled; EOFError when the other side is gone (or died in the
    middle of writing it)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    n = _HEADER.unpack(head)[0]
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return data


def recv(f: BinaryIO):
    """The next message, or EOFError when the other side is gone."""
    return pickle.loads(recv_bytes(f))
