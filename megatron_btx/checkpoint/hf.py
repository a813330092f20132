"""HF safetensors checkpoints: a validating reader and a streaming, sharding writer.

The reader opens every shard up front (so a truncated or corrupt file fails before anything is
written) and hands out one tensor at a time with plain file reads: converting or merging a
model never holds the source in RAM. The writer plans every shard's header before the first
tensor arrives, so each tensor goes to disk as it is produced and nothing is buffered.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_btx.checkpoint.direct_io import DirectWriter
from megatron_btx.errors import BTXError
from megatron_btx.inputs import inside, open_regular, read_json

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
#: HF config.json names of the dtypes we write
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


#: bytes per element of every safetensors dtype (the header is validated against these; only
#: ST_DTYPES can be read)
ST_ITEMSIZE = dict(F64=8, F32=4, F16=2, BF16=2, I64=8, I32=4, I16=2, I8=1, U64=8, U32=4, U16=2)
ST_ITEMSIZE.update(U8=1, BOOL=1, F8_E4M3=1, F8_E5M2=1)
#: the safetensors library's own limit on the JSON header
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _read_header(path: Path) -> tuple[int, dict]:
    """Read and validate the whole header before anything is allocated from it (see
    :func:`check_header`), so a truncated, corrupt or hostile file is named, not mis-read.
    Returns (byte offset of the data, header)."""
    fd = open_regular(path, "safetensors file")  # not a FIFO or a device: they never end
    try:
        size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise BTXError(
            f"{path}: corrupt or truncated safetensors file ({e}); re-download or re-save it"
        ) from e
    check_header(path, header, size - 8 - n)
    return 8 + n, header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the header names {dup!r} twice")
    return dict(pairs)


def check_header(path: Path, header: Any, data_bytes: int) -> None:
    """Every tensor entry of a safetensors header is sound, or one BTXError naming the file and
    the tensor: a known dtype, a shape of non-negative ints, `data_offsets` [start, end] with
    start <= end and end - start = elements x dtype size, inside the file's `data_bytes`, and no
    two tensors' bytes overlapping (so elements x size summed is at most the file's size)."""

    def bad(key: str, what: str) -> BTXError:
        return BTXError(f"{path}: tensor {key!r} {what}; the file is corrupt or not safetensors")

    if not isinstance(header, dict):
        raise BTXError(f"{path}: the safetensors header is a {type(header).__name__}, not a map")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise BTXError(f"{path}: the safetensors header's __metadata__ is not a map")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(key, "has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
            raise bad(key, f"has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise bad(key, f"has shape {shape!r} (not a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
            raise bad(key, f"has data_offsets {offsets!r} (not two non-negative integers)")
        start, end = offsets
        if start > end:
            raise bad(key, f"starts at byte {start} after it ends ({end})")
        if end > data_bytes:
            raise bad(key, f"ends at data byte {end}, past the file's {data_bytes} data bytes")
        need = math.prod(shape) * ST_ITEMSIZE[dtype]
        if end - start != need:
            raise bad(key, f"is {dtype}{shape} ({need} bytes) but data_offsets span {end - start}")
        if end > start:  # an empty tensor holds no bytes to overlap
            spans.append((start, end, key))
    spans.sort()
    for (_, first_end, first), (second_start, _, second) in zip(spans, spans[1:]):
        if second_start < first_end:
            raise bad(second, f"overlaps the bytes of {first!r}")


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PreadSafetensors:
    """Tensors of safetensors files read with plain file reads, not memory maps: resident memory
    holds only the tensor asked for, never the pages of everything read so far (a memory-mapped
    reader's RSS grows to the size of the checkpoint)."""

    def __init__(self, files: Sequence[Path]):
        self._where: dict[str, tuple[Path, int, int, str, list[int]]] = {}
        for f in files:
            base, header = _read_header(Path(f))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if k in self._where:
                    raise BTXError(f"{f}: tensor {k!r} is also in {self._where[k][0]}")
                b, e = v["data_offsets"]
                self._where[k] = (Path(f), base + b, e - b, v["dtype"], list(v["shape"]))
        self._fds: dict[Path, int] = {}

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def shape(self, key: str) -> list[int]:
        return list(self._where[key][4])

    def dtype(self, key: str) -> str:
        return self._where[key][3]

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `key`, read into `out` when given (a contiguous tensor of its shape and
        dtype, e.g. a buffer reused layer after layer, or one half of a fused weight): reading
        into memory that is already mapped avoids the page faults of a fresh buffer, which cost
        as much as the copy itself on multi-GB checkpoints."""
        f, off, length, dt, shape = self._where[key]
        if dt not in ST_DTYPES:
            raise BTXError(f"{f}: tensor {key!r} has dtype {dt}; only F32/BF16/F16 are supported")
        if out is None:
            out = torch.empty(shape, dtype=ST_DTYPES[dt])
        elif (
            list(out.shape) != list(shape) or out.dtype != ST_DTYPES[dt] or not out.is_contiguous()
        ):
            raise ValueError(f"{key}: cannot read {dt}{shape} into {out.dtype}{list(out.shape)}")
        if not length:
            return out
        fd = self._fds.get(f)
        if fd is None:
            fd = self._fds[f] = os.open(f, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], off + got)
            if n <= 0:
                raise BTXError(
                    f"{f}: unexpected end of file reading {key!r}; the file is truncated"
                )
            got += n
        return out

    def close(self) -> None:
        fds = getattr(self, "_fds", {})  # absent when __init__ failed
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()

    def __del__(self) -> None:
        self.close()


class HFReader(PreadSafetensors):
    """Tensors of an HF checkpoint folder (sharded or not), validated up front (so a truncated or
    corrupt file fails before anything is written) and read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise BTXError(f"{self.folder}: not a folder; --load needs an HF checkpoint folder")
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        weight_map = None
        if index.is_file():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [SINGLE_NAME]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                bins = list(self.folder.glob("*.bin"))
                hint = " (found .bin files: re-save with safe_serialization=True)" if bins else ""
                raise BTXError(f"{self.folder}: no model.safetensors or {INDEX_NAME}{hint}")
        self.files = [self.folder / f for f in files]
        for f in self.files:
            if not (f.is_file() or f.is_symlink()):
                raise BTXError(f"{f}: listed in {INDEX_NAME} but missing; the download is partial")
            inside(self.folder, f, "weight file")  # a link out of the folder is refused
        super().__init__(self.files)
        if weight_map:
            missing = [k for k in weight_map if k not in self]
            if missing:
                raise BTXError(
                    f"{index}: tensor {missing[0]!r} (and {len(missing) - 1} more) listed in the "
                    f"index is missing from its shard"
                )

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if key not in self:
            raise BTXError(f"{self.folder}: tensor {key!r} is missing from the checkpoint")
        return super().get(key, out)

    def config_path(self) -> Path:
        return self.folder / "config.json"


def read_index(index: Path) -> dict[str, str]:
    """The weight map of a sharded checkpoint's index: tensor name -> shard file, every shard a
    relative path inside the index's folder (no absolute path, no `..`), so a hostile index
    cannot make us read (and export) a file from elsewhere."""
    document = read_json(inside(index.parent, index, INDEX_NAME), INDEX_NAME)
    try:
        weight_map = document["weight_map"]
    except (KeyError, TypeError) as e:
        raise BTXError(f"{index}: not a valid safetensors index (no weight_map)") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise BTXError(f"{index}: weight_map is not a map of tensor names to shard files")
    for name, shard in weight_map.items():
        parts = Path(shard).parts if isinstance(shard, str) else ()
        if not parts or Path(shard).is_absolute() or ".." in parts or "\0" in shard:
            raise BTXError(
                f"{index}: tensor {name!r} is mapped to {shard!r}, outside the checkpoint "
                f"folder; a shard must be a file beside the index"
            )
    return weight_map


def tokenizer_files(src: Path) -> list[str]:
    """The names of the tokenizer files in `src`; each must be a regular file inside `src` (a
    link to a file elsewhere is refused: it would be hashed and copied into outputs)."""
    names = []
    for name in TOKENIZER_FILES:
        path = src / name
        if path.is_file() or path.is_symlink():
            real = inside(src, path, "tokenizer file")
            if not real.is_file():
                raise BTXError(f"{path}: tokenizer file is not a regular file; refusing it")
            names.append(name)
    return names


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src` to `dst`; return their names."""
    copied = []
    for name in tokenizer_files(src):
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(src / name), dst / name)
        shutil.copystat(os.path.realpath(src / name), dst / name)
        copied.append(name)
    return copied


class StreamingSafetensorsWriter:
    """Safetensors shards whose headers are written before their data: every tensor's name, shape
    and dtype is known up front, so each tensor goes to disk as it arrives and nothing is held."""

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
        sha256: bool = True,
    ):
        self.folder = folder
        self.sha256 = sha256  # each shard's digest, computed as it is written
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dt in plan:
            nb = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
            if self.shards[-1] and size + nb > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dt))
            size += nb
        self.total = sum(
            math.prod(s) * torch.tensor([], dtype=d).element_size() for _, s, d in plan
        )
        self._order = [n for n, _, _ in plan]
        self._pos = 0
        self._shard = -1
        self._fh = None
        self._left: list[str] = []
        n = len(self.shards)
        self.names = (
            [SINGLE_NAME]
            if n == 1
            else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )

    def _open_next(self) -> None:
        self._shard += 1
        items = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, dt in items:
            nb = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
            header[name] = {
                "dtype": ST_NAMES[dt],
                "shape": list(shape),
                "data_offsets": [off, off + nb],
            }
            off += nb
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._fh = DirectWriter(
            self.folder / (self.names[self._shard] + ".tmp"), sha256=self.sha256
        )
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._left = [n for n, _, _ in items]

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            want = self._order[self._pos] if self._pos < len(self._order) else None
            raise RuntimeError(f"safetensors writer: got {name!r}, expected {want!r}")
        if not self._left:
            self._close_current()
            self._open_next()
        shard_items = self.shards[self._shard]
        _, shape, dt = shard_items[len(shard_items) - len(self._left)]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise RuntimeError(
                f"safetensors writer: {name} is {tuple(t.shape)} {t.dtype}, planned {shape} {dt}"
            )
        t = t.detach().contiguous().reshape(-1)
        if t.numel():
            self._fh.write(memoryview(t.view(torch.uint8).numpy()))
        self._left.pop(0)
        self._pos += 1

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.close()  # fsync'd in close(), once
            self._fh = None

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(
                f"safetensors writer closed after {self._pos} of {len(self._order)} tensors"
            )
        self._close_current()
        for nm in self.names:
            fd = os.open(self.folder / (nm + ".tmp"), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.folder / (nm + ".tmp"), self.folder / nm)
        if len(self.names) > 1:
            wm = {
                name: self.names[k] for k, items in enumerate(self.shards) for name, _, _ in items
            }
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wm.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_hf_config(folder: Path, config: dict, dtype: torch.dtype) -> None:
    """config.json of an exported model, naming the dtype its tensors were written in."""
    config = dict(config)
    config["torch_dtype"] = config["dtype"] = HF_DTYPE_NAMES[dtype]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
