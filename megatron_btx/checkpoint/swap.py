"""Putting a finished output folder in place of an old one without a moment of no output.

Replacing a folder with two renames (``NAME`` -> ``.NAME.old``, then ``.NAME.tmp`` -> ``NAME``)
leaves neither under ``NAME`` when the process dies between them. Linux's ``renameat2`` with
``RENAME_EXCHANGE`` swaps the two names in one step: ``NAME`` is the new folder and the temporary
name holds the old one, which is then removed. Where the file system or C library lacks it, the
two renames are used, and :func:`recover` (run under the output's lock before the next write)
puts ``.NAME.old`` back when a crash left it without ``NAME``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def temporary_name(final: Path) -> Path:
    """Where the new output is written before it is put in place."""
    return final.parent / f".{final.name}.tmp"


def old_name(final: Path) -> Path:
    """Where the old output waits during a two-rename replacement."""
    return final.parent / f".{final.name}.old"


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.argtypes += [ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2()


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically; False when this system cannot (the caller falls
    back), an OSError for any other failure."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(first), None, str(second))


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final` (replacing what is there), never leaving a
    moment with no `final` when the swap is atomic (see the module docstring)."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    if exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old output
        return
    old = old_name(final)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path) -> None:
    """Finish or undo a replacement a killed command left: ``.NAME.old`` without ``NAME`` is
    the previous output, put back; beside a ``NAME`` it is a leftover, removed. Call it holding
    the output's lock."""
    old = old_name(final)
    if not (old.exists() or old.is_symlink()):
        return
    if final.exists() or final.is_symlink():
        log.warning("removing %s left by an interrupted replacement of %s", old, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    log.warning("restoring %s from %s: its replacement was interrupted", final, old)
    os.replace(old, final)
