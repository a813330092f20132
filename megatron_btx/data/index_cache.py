"""megatron-core's dataset index cache, checked before megatron-core loads it.

megatron-core's GPT and blended datasets cache their sample order as ``.npy`` files
(``*document_index.npy``, ``*sample_index.npy``, ``*shuffle_index.npy``, the blend's
``*dataset_index.npy`` and ``*dataset_sample_index.npy``) and load them with
``numpy.load(allow_pickle=True)``: a file there that is not a real ``.npy`` is unpickled, and
the default cache lies inside the run directory, so resuming a copied or shared run ran
whatever a planted file said.

:func:`guarded` wraps every dataset build that uses a cache folder:

- before megatron-core looks at the folder, every ``.npy`` in it must be a plain numpy array
  file (the NPY magic and header, a dtype without Python objects, exactly the bytes its shape
  needs): numpy then reads it as an array and never unpickles anything, whatever
  ``allow_pickle`` says (:func:`check_npy`);
- each file must also match the sha256 recorded for it in ``btx_index_cache.json`` when this
  project wrote it (a changed index would silently change the data order, or point past the
  data and fail in the middle of training);
- after the build, rank 0 records the sha256 of the files megatron-core wrote.

A refused file is one line naming it; the fix is to remove it (megatron-core rebuilds it). A
file written by an older megatron_btx, with no record, is checked as an array file and recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

from megatron_btx.errors import BTXError

RECORD = "btx_index_cache.json"
NPY_MAGIC = b"\x93NUMPY"


def check_npy(path: Path) -> None:
    """`path` is a plain numpy array file: numpy loads it without unpickling (see the module
    docstring); else one BTXError naming it."""
    import numpy as np

    from megatron_btx.inputs import open_regular

    def refuse(what: str) -> BTXError:
        return BTXError(
            f"{path}: {what}; refusing to load it (megatron-core would unpickle it). Remove "
            f"the file: megatron-core rebuilds its dataset index"
        )

    with os.fdopen(open_regular(path, "dataset index cache file"), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise refuse("not a numpy array file")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"version {version}")
        except (ValueError, OSError, SyntaxError) as e:
            raise refuse(f"a malformed numpy header ({e})") from e
        if dtype.hasobject:
            raise refuse("an array of Python objects")
        if f.tell() + math.prod(shape) * dtype.itemsize != size:
            raise refuse(f"a header for {shape} {dtype} that does not match its {size} bytes")


def _read_record(folder: Path) -> dict[str, str]:
    from megatron_btx.inputs import read_json

    path = folder / RECORD
    if not path.exists():
        return {}
    record = read_json(path, "index cache record", limit=16 * 1024 * 1024)
    if not isinstance(record, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in record.items()
    ):
        raise BTXError(f"{path}: not a map of file names to sha256; remove it and the cache")
    return record


def check_cache(folder: str | os.PathLike[str]) -> None:
    """Every index file in the cache `folder` is a plain array file and matches its record."""
    from megatron_btx.inputs import sha256_file

    folder = Path(folder)
    if not folder.is_dir():
        return
    record = _read_record(folder)
    for path in sorted(folder.glob("*.npy")):
        check_npy(path)
        digest = record.get(path.name)
        if digest is not None and sha256_file(path) != digest:
            raise BTXError(
                f"{path}: changed since megatron_btx wrote it (sha256 differs from {RECORD}); "
                f"refusing to use it. Remove it: megatron-core rebuilds its dataset index"
            )


def record_cache(folder: str | os.PathLike[str]) -> None:
    """Record the sha256 of the index files in `folder` that have none yet (under a lock on
    the record: runs sharing one cache folder record their own files)."""
    from megatron_btx.inputs import sha256_file
    from megatron_btx.rundir import atomic_write_text

    folder = Path(folder)
    if not folder.is_dir():
        return
    fd = os.open(folder / f".{RECORD}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = _read_record(folder)
        new = {p.name: p for p in sorted(folder.glob("*.npy")) if p.name not in record}
        if new:
            for name, path in new.items():
                check_npy(path)
                record[name] = sha256_file(path)
            atomic_write_text(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))
    finally:
        os.close(fd)


@contextlib.contextmanager
def guarded(folder: str | os.PathLike[str] | None) -> Iterator[None]:
    """Check the cache `folder` before a dataset build, record what it wrote after (rank 0)."""
    if folder is None:
        yield
        return
    check_cache(folder)
    yield
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        record_cache(folder)
