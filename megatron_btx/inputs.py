"""Opening the files of a folder someone else wrote (a downloaded checkpoint, a copied run, an HF
snapshot) without following it anywhere else, and reading small files without hanging or
filling memory.

One rule for every checkpoint, dataset and run folder we read from: **a file read from a folder
must lie inside it**. A symbolic link is followed only when its target, with every link on the
way resolved, is inside the folder too: a `tokenizer.json` or a weight shard linked to
`~/.ssh/id_rsa` is refused with one line, never read, hashed or copied into an output. The one
exception is the Hugging Face hub's cache layout, whose snapshot folders
(``models--ORG--NAME/snapshots/REV/``) hold links into the repository's own ``blobs/`` folder:
those links are followed, and only into that folder.

A file must also be a regular file: a FIFO blocks a reader forever and ``/dev/zero`` never ends,
so both are refused before they are read (:func:`open_regular`). :func:`read_small` reads a text
or JSON file of bounded size.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
from pathlib import Path

from megatron_btx.errors import BTXError

#: the largest small file (a config.json, a manifest, a plan, a tokenizer's JSON) we read whole
SMALL_FILE_LIMIT = 64 * 1024 * 1024


def allowed_roots(folder: str | os.PathLike[str]) -> list[Path]:
    """The real folders the files of `folder` may lie in: the folder itself and, for a snapshot
    of the Hugging Face hub's cache, its repository's ``blobs`` folder."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside(folder: str | os.PathLike[str], path: str | os.PathLike[str], what: str = "") -> Path:
    """`path` (a file of `folder`, e.g. ``folder / name``) when its real location, every
    symbolic link resolved, lies inside `folder` (see :func:`allowed_roots`); else one BTXError
    naming it and where it points."""
    folder, path = Path(folder), Path(path)
    real = Path(os.path.realpath(path))
    if not any(_within(real, root) for root in allowed_roots(folder)):
        label = f"{what} " if what else ""
        raise BTXError(
            f"{path}: {label}is a symbolic link to {real}, outside {folder}; a file read from a "
            f"checkpoint or data folder must lie inside it (copy the file in instead of linking it)"
        )
    return real


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """A read-only descriptor of `path`, which must be a regular file: a FIFO (which would block
    the open), a device such as /dev/zero (which never ends) or a folder is one BTXError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise BTXError(f"{path}: {what} not found") from e
        raise BTXError(f"{path}: {what} cannot be opened ({e.strerror})") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device"
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a folder"
                if stat.S_ISDIR(mode)
                else "not a regular file"
            )
            raise BTXError(f"{path}: {what} is {kind}, not a regular file; refusing to read it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(
    path: str | os.PathLike[str], what: str = "file", limit: int = SMALL_FILE_LIMIT
) -> bytes:
    """The bytes of a small regular file (at most `limit`), or one BTXError naming it."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise BTXError(
                f"{path}: {what} is {size} bytes, more than the {limit} such a file can be; "
                f"refusing to read it"
            )
        chunks, left = [], size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise BTXError(f"{path}: {what} cannot be read ({e.strerror})") from e
    finally:
        os.close(fd)


def read_text(
    path: str | os.PathLike[str], what: str = "file", limit: int = SMALL_FILE_LIMIT
) -> str:
    """:func:`read_small` decoded as UTF-8 (an undecodable file is one BTXError)."""
    raw = read_small(path, what, limit)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BTXError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from e


def read_json(path: str | os.PathLike[str], what: str = "file", limit: int = SMALL_FILE_LIMIT):
    """A small JSON file, parsed; a FIFO, a device, a huge, undecodable, too deeply nested or
    invalid file is one BTXError naming it."""
    import json

    raw = read_small(path, what, limit)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UTF-8 and JSON errors are ValueErrors
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BTXError(f"{path}: {what} is not valid JSON ({first})") from e


def sha256_file(path: str | Path, window: int = 64 * 1024 * 1024) -> str:
    """sha256 of a file, hashed straight from the page cache through a sliding memory map: no
    copy into a buffer, and at most one window (64 MiB) mapped at a time, so resident memory does
    not grow with the file (a whole-file map would count every page read in RSS)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            for off in range(0, size, window):  # a multiple of the allocation granularity
                n = min(window, size - off)
                with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=off) as m:
                    with memoryview(m) as v:
                        h.update(v)
        except OSError:  # a file system without mmap: plain reads into one buffer
            h = hashlib.sha256()
            f.seek(0)
            buf = bytearray(1024 * 1024)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
    return h.hexdigest()
