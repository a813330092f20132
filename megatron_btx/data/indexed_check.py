"""A prepared dataset's index checked against its data before megatron-core reads either.

megatron-core's ``IndexedDataset`` trusts ``<prefix>.idx`` (magic, dtype, counts, then every
sequence's length and byte offset into ``<prefix>.bin``): a corrupt or edited index made
training fail in the middle of a run (an assertion, a short read, a numpy error when a sample
reaches the bad entry). :func:`check_indexed` reads the index as the builder writes it and
refuses, with one line naming the file, any index whose counts do not match its size, whose
offsets are not the running sum of the lengths, whose data would end past the ``.bin`` file,
or whose document boundaries are not a rising sequence from 0 to the sequence count.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron_btx.errors import BTXError

HEADER = b"MMIDIDX\x00\x00"
#: megatron-core's DType codes and their item sizes
ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8


def check_indexed(prefix: str) -> int:
    """The number of documents of the indexed dataset at `prefix` (``.idx`` and ``.bin``), once
    its index is consistent with its data (see the module docstring); else one BTXError."""
    from megatron_btx.inputs import open_regular

    idx, binary = prefix + ".idx", prefix + ".bin"
    fd = open_regular(binary, "dataset file")
    bin_size = os.fstat(fd).st_size
    os.close(fd)
    fd = open_regular(idx, "dataset index")
    try:
        idx_size = os.fstat(fd).st_size
        head = os.pread(fd, _FIXED, 0)
    finally:
        os.close(fd)

    def bad(what: str) -> BTXError:
        return BTXError(
            f"{idx}: {what}; the dataset is corrupt, prepare it again (btx prepare-data)"
        )

    if len(head) < _FIXED or head[: len(HEADER)] != HEADER:
        raise bad("not a megatron-core dataset index (bad header)")
    version, code, n, docs = struct.unpack("<QBQQ", head[len(HEADER) :])
    if version != 1 or code not in ITEM_SIZES:
        raise bad(f"version {version}, dtype code {code}: not an index megatron-core writes")
    need = _FIXED + 12 * n + 8 * docs
    if not need <= idx_size <= need + n:  # (+ n: the sequence modes of a multimodal index)
        raise bad(
            f"{n} sequences and {docs} document bounds need {need} bytes, the file has {idx_size}"
        )
    if n == 0:
        return 0
    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(mm, np.int32, n, _FIXED).astype(np.int64)
    pointers = np.frombuffer(mm, np.int64, n, _FIXED + 4 * n)
    bounds = np.frombuffer(mm, np.int64, docs, _FIXED + 12 * n)
    if lengths.min() < 0:
        raise bad("a sequence has a negative length")
    ends = np.cumsum(lengths) * ITEM_SIZES[code]
    if pointers[0] != 0 or not np.array_equal(pointers[1:], ends[:-1]):
        raise bad("the sequence offsets are not the running sum of their lengths")
    if int(ends[-1]) != bin_size:
        raise bad(f"its sequences hold {int(ends[-1])} bytes, {binary} has {bin_size}")
    if docs < 1 or bounds[0] != 0 or bounds[-1] != n or np.any(np.diff(bounds) < 0):
        raise bad("the document bounds do not rise from 0 to the sequence count")
    return n
