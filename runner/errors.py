"""Errors that say what is wrong and what to do."""
import difflib
import errno
import re


def shell_quote(path) -> str:
    """A path as a command to paste should hold it: quoted when a shell would split or expand it."""
    import shlex

    return shlex.quote(str(path))


# what a terminal acts on rather than shows: C0 controls (ESC starts colour, cursor and title
# sequences; CR and BS overwrite what was shown), DEL, C1 controls (CSI 0x9b), and the Unicode
# bidirectional overrides and isolates (a name shown reversed)
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text) -> str:
    """Text from outside (a file name, a failure reason, a path) as it may reach a terminal or a
    log: each control character written out (\\n, \\t, \\x1b, \\u202e), everything else unchanged
    (pure). The name itself is kept as it is in the files (names, names_raw)."""
    text = str(text)
    if not _CONTROLS.search(text):
        return text

    def one(m):
        c = m.group(0)
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return _CONTROLS.sub(one, text)


def did_you_mean(word: str, choices, n: int = 1, cutoff: float = 0.5) -> str:
    """' (did you mean X?)' for the closest of choices, or '' when none is close."""
    m = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(m)}?)" if m else ""


class RunnerError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(RunnerError):
    """Bad configuration or input, detected before any work starts."""


class ShardBusyError(RunnerError):
    """Another process holds the shard (a requeue race): this one stops."""


class ShardLostError(ShardBusyError):
    """Another attempt at the shard committed it first, or took it over (a lock that did not
    exclude it: node-local flock): this attempt discarded its own file. `other` names it."""

    def __init__(self, message: str, other: str):
        self.other = other
        super().__init__(message)


class ShardFailedError(RunnerError):
    """One or more shards failed; completed shards are kept."""


class UsageError(ConfigError):
    """The command line itself is incomplete (no output.dir, no arguments): usage is shown."""


class RunBusyError(RunnerError):
    """Another caffe-runner process is extracting into (or merging) the same run directory;
    `holder` names it as its lock file does."""

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a batch system's time limit, a service stop): stops like Ctrl-C, says so."""


class FailureShareError(RunnerError):
    """More images failed than run.max_failure_fraction allows (the run itself completed)."""


# why a folder cannot be written, in the user's words (errno names, not numbers)
_UNWRITABLE = {
    errno.EROFS: "it is on a read-only file system",
    errno.EPERM: "operation not permitted: an immutable folder (lsattr; chattr -i) or a special file system",
    errno.EACCES: "permission denied",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "it cannot be created there",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def unwritable(what: str, path, e: OSError, fix: str) -> "ConfigError":
    """One line for a folder or file that cannot be written: what, where, why, and the fix."""
    why = _UNWRITABLE.get(e.errno, e.strerror or type(e).__name__)
    return ConfigError(f"{what} {path} cannot be written ({why}): {fix}")
