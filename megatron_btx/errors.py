"""The one exception type for errors a user can cause, and the error contract of every command.

The CLI prints its message without a traceback and exits non-zero, so the message must name the
file or key at fault and say how to fix it. Every `btx` command reports an error the same way
(:func:`run_command`): one line ``error: ...`` on stderr and exit code 2, for a BTXError and for
the operating-system errors a user causes or can fix (a full disk, a quota, a permission, a
read-only file system); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

#: exit code of a command that failed on a user error
EXIT_ERROR = 2

#: operating-system errors that are the user's to fix, and what to say about them
USER_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space and run it again",
    errno.EDQUOT: "disk quota exceeded; free some space and run it again",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


class BTXError(Exception):
    """A user-facing error: bad input, bad config, mismatched checkpoints, corrupt files."""


def error_line(exc: BaseException) -> str | None:
    """The one-line report of a user error (``error: ...``), or None for anything else. An
    error torch's distributed checkpointing collected from the ranks (its `failures`: rank ->
    (exception, traceback)) is reported by the first user error among them."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            line = error_line(cause) if isinstance(cause, BaseException) else None
            if line is not None:
                return line
        return None
    if isinstance(exc, BTXError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS:
        where = exc.filename if exc.filename is not None else ""
        text = f"{where}: {USER_OS_ERRORS[exc.errno]}" if where else USER_OS_ERRORS[exc.errno]
    else:
        return None
    return "error: " + " ".join(text.split())


def run_command(main: Callable[..., Any], *args: Any, quiet: bool = False) -> int:
    """Run a command's body and apply the error contract: its return value as the exit code,
    or one line on stderr (unless `quiet`: e.g. the other ranks of a training job) and
    :data:`EXIT_ERROR` for a user error."""
    try:
        return int(main(*args) or 0)
    except BaseException as exc:  # noqa: BLE001 - anything but a user error is raised again
        line = error_line(exc)
        if line is None:
            raise
        if not quiet:
            from megatron_btx import progress

            progress.close_all()
            print(line, file=sys.stderr, flush=True)
        return EXIT_ERROR
