"""The provenance manifest every checkpoint we write carries (`btx_manifest.json`).

It is what makes checkpoints the interface between stages: a later stage reads the model config,
the layout it was written at and where it came from without loading a tensor.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any

import megatron_btx
from megatron_btx.errors import BTXError

MANIFEST = "btx_manifest.json"
FORMAT_VERSION = 1


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


def sha256_folder(folder: str | Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every regular file in `folder` matching `pattern` (not recursive)."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


def write(folder: str | Path, **fields: Any) -> dict[str, Any]:
    """Write the manifest: format version, tool version, date, and the given fields."""
    m = {
        "format_version": FORMAT_VERSION,
        "tool": "megatron_btx",
        "tool_version": megatron_btx.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **fields,
    }
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return m


def read(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BTXError(f"{folder}: no {MANIFEST}; not a checkpoint written by megatron_btx")
    m = json.loads(path.read_text())
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise BTXError(
            f"{path}: format version {m['format_version']} is newer than this megatron_btx "
            f"understands ({FORMAT_VERSION}); upgrade megatron_btx"
        )
    return m
