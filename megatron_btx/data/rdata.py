"""Read character vectors out of an R package's lazy-load database (``data/Rdata.rdb`` + ``.rdx``).

Debian ships a few public-domain books only inside R data packages (``r-cran-janeaustenr``:
Jane Austen's six novels; ``r-cran-tokenizers``: Melville's *Moby Dick*). R stores such data as
a lazy-load database: ``Rdata.rdx`` is a gzip-compressed serialised R list that maps each object
name to ``(offset, length)`` in ``Rdata.rdb``, and each record there is a 4-byte big-endian
uncompressed size followed by the compressed, serialised object (zlib; or a type byte ``Z``,
``2``, ``X``, ``0`` then zlib, bzip2, xz or stored data in newer R versions).

This module decodes R's XDR serialisation format (versions 2 and 3) for the handful of types
those objects use: NULL, symbols, pairlists (attributes), strings, logical, integer and double
vectors and lists. It is a reader for untrusted bytes: every length is checked against what is
left of the buffer, decompression is bounded by the declared size, and nothing is evaluated.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError

# SEXP types (R Internals, "Serialization formats").
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP = 0, 1, 2, 9
_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 10, 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_NA_INTEGER = -(2**31)
_MAX_RECORD = 1 << 30  # 1 GiB: far above any data object these packages ship


class RList(list):
    """An R vector or list, with its attributes (``names``, ``class``, ...) kept beside it."""

    attributes: dict[str, Any]

    def __init__(self, values: list[Any], attributes: dict[str, Any] | None = None) -> None:
        super().__init__(values)
        self.attributes = attributes or {}


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data, self.pos, self.source, self.refs = data, 0, source, []

    def _take(self, size: int) -> bytes:
        if size < 0 or self.pos + size > len(self.data):
            raise BTXError(f"{self.source}: truncated R data at byte {self.pos} (wanted {size})")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def integer(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        size = self.integer()
        if size == -1:  # long vector: two more ints
            upper, lower = self.integer(), self.integer()
            size = (upper << 32) + (lower & 0xFFFFFFFF)
        if size < 0 or size > len(self.data) - self.pos:  # every element takes >= 1 byte
            raise BTXError(f"{self.source}: implausible R vector length {size} at {self.pos}")
        return size

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise BTXError(f"{self.source}: not R XDR-serialised data (no 'X\\n' header)")
        version = self.integer()
        self.integer()  # the R version that wrote it
        self.integer()  # the oldest R version that can read it
        if version == 3:
            self._take(self.length())  # native encoding name
        elif version != 2:
            raise BTXError(f"{self.source}: R serialisation version {version} is not supported")

    def item(self) -> Any:
        flags = self.integer()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
        if kind in (_NILVALUE_SXP, _NILSXP):
            return None
        if kind == _REFSXP:
            index = (flags >> 8) or self.integer()
            if not 1 <= index <= len(self.refs):
                raise BTXError(f"{self.source}: bad R reference {index} at {self.pos}")
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _LISTSXP:
            return self._pairlist(has_attr, has_tag)
        if kind == _CHARSXP:
            size = self.integer()
            return None if size == -1 else self._take(size).decode("utf-8", errors="replace")
        return self._vector(kind, has_attr)

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        """A pairlist as a dict tag -> value (how attributes are stored)."""
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else f"[{len(out)}]"
            out[str(tag)] = self.item()
            flags = self.integer()  # the CDR: another pairlist cell or the end
            kind, has_attr, has_tag = flags & 0xFF, bool(flags & 0x200), bool(flags & 0x400)
            if kind == _NILVALUE_SXP:
                return out
            if kind != _LISTSXP:
                raise BTXError(f"{self.source}: unsupported R pairlist tail type {kind}")

    def _vector(self, kind: int, has_attr: bool) -> RList:
        size = self.length()
        values: list[Any]
        if kind in (_LGLSXP, _INTSXP):
            raw = struct.unpack(f">{size}i", self._take(4 * size))
            values = [None if v == _NA_INTEGER else v for v in raw]
        elif kind == _REALSXP:
            values = list(struct.unpack(f">{size}d", self._take(8 * size)))
        elif kind in (_STRSXP, _VECSXP):
            values = [self.item() for _ in range(size)]
        else:
            raise BTXError(f"{self.source}: R type {kind} is not supported by this reader")
        attributes = self.item() if has_attr else None
        return RList(values, attributes if isinstance(attributes, dict) else None)


def unserialize(data: bytes, source: str = "R data") -> Any:
    """Decode one XDR-serialised R object (``saveRDS``/lazy-load format) into Python values."""
    reader = _Reader(data, source)
    reader.header()
    return reader.item()


def _decompress_record(record: bytes, source: str) -> bytes:
    if len(record) < 5:
        raise BTXError(f"{source}: lazy-load record of {len(record)} bytes is too short")
    size = struct.unpack(">I", record[:4])[0]
    if size > _MAX_RECORD:
        raise BTXError(f"{source}: lazy-load record declares {size} bytes, over the 1 GiB limit")
    body, kind = record[4:], record[4:5]
    if kind in (b"Z", b"2", b"X", b"0"):
        body = record[5:]
    try:
        if kind == b"0":
            out = body
        elif kind == b"2":
            out = bz2.BZ2Decompressor().decompress(body, max_length=size + 1)
        elif kind == b"X":
            out = lzma.LZMADecompressor().decompress(body, max_length=size + 1)
        else:
            out = zlib.decompressobj().decompress(body, size + 1)
    except (zlib.error, OSError, lzma.LZMAError) as exc:
        raise BTXError(f"{source}: cannot decompress lazy-load record ({exc})") from exc
    if len(out) != size:
        raise BTXError(f"{source}: record holds {len(out)} bytes, its header says {size}")
    return out


def read_lazyload(rdb: str | Path) -> dict[str, Any]:
    """Every object of an R lazy-load database (``X.rdb`` with ``X.rdx`` beside it) by name."""
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    try:
        index_bytes = gzip.decompress(rdx.read_bytes())
        data = rdb.read_bytes()
    except (OSError, EOFError) as exc:
        raise BTXError(f"cannot read the R lazy-load database {rdb} / {rdx}: {exc}") from exc
    index = unserialize(index_bytes, str(rdx))
    names = index.attributes.get("names") if isinstance(index, RList) else None
    if not names or "variables" not in names:
        raise BTXError(f"{rdx}: not an R lazy-load index (no 'variables' entry)")
    variables = index[names.index("variables")]
    var_names = variables.attributes.get("names") or []
    objects: dict[str, Any] = {}
    for name, span in zip(var_names, variables, strict=True):
        offset, length = int(span[0]), int(span[1])
        if offset < 0 or length < 0 or offset + length > len(data):
            raise BTXError(f"{rdb}: object {name!r} points outside the file")
        record = _decompress_record(data[offset : offset + length], f"{rdb}:{name}")
        objects[str(name)] = unserialize(record, f"{rdb}:{name}")
    return objects
