"""HF safetensors checkpoints: a lazy, validating reader and a sharding writer.

The reader opens every shard up front (so a truncated or corrupt file fails before anything is
written) and hands out one tensor at a time from memory-mapped files: converting a model never
holds the source in RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_btx.errors import BTXError

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


def _read_header(path: Path) -> tuple[int, dict]:
    """Validate the header and the data length, so a truncated file is named, not mis-read.
    Returns (byte offset of the data, header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size} bytes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BTXError(
            f"{path}: corrupt or truncated safetensors file ({e}); re-download or re-save it"
        ) from e
    return 8 + n, header


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
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise BTXError(f"{index}: not a valid safetensors index ({e})") from e
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
            if not f.is_file():
                raise BTXError(f"{f}: listed in {INDEX_NAME} but missing; the download is partial")
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


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files that exist in `src` to `dst`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


class HFShardWriter:
    """Writes tensors into safetensors shards of bounded size, then the index.

    Tensors are added one at a time and a shard is flushed as soon as it is full, so peak memory
    is one shard, not the model."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._bytes + nbytes > self.max:
            self._flush()
        self._buf[name] = tensor.detach().contiguous()
        self._bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._buf, str(self.folder / f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._bytes = {}, 0

    def close(self) -> None:
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / "shard-00000.tmp", self.folder / SINGLE_NAME)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / fname)
            weight_map.update({k: fname for k in names})
        index = {
            "metadata": {"total_size": self._total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def iter_tensors(reader: HFReader) -> Iterator[tuple[str, torch.Tensor]]:
    for k in reader.keys():
        yield k, reader.get(k)
