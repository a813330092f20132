"""Reading the pickled parts of a checkpoint without running code from it.

A torch_dist checkpoint's `.metadata` is a pickle, and unpickling is calling whatever the file
names: torch's own `FileSystemReader.read_metadata` uses plain `pickle.load`, so a `.metadata`
planted in a downloaded or shared checkpoint runs its payload in every command that opens it.
:func:`load_dcp_metadata` reads it with an unpickler that resolves only the classes a DCP
metadata file is made of (torch.distributed.checkpoint's metadata and save-plan dataclasses,
`torch.Size`, dtypes, layouts, memory formats and plain containers) and refuses every other
name with one line; the result is then checked for what the readers trust it for (data files
inside the folder, non-negative offsets). :func:`torch_load` is `torch.load` with
``weights_only=True`` and errors that name the file, for `common.pt` and the byte objects
(RNG states) inside `.distcp` files.

Nothing here imports megatron-core: the readers that use it live in
:mod:`megatron_btx.checkpoint.safe_dcp`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import IO, Any

import torch

from megatron_btx.errors import BTXError

_DCP = "torch.distributed.checkpoint"
#: module -> the names in it a DCP `.metadata` may use (found by listing the globals of the
#: files torch's and megatron-core's savers and our StreamingDCPWriter write)
ALLOWED: dict[str, frozenset[str]] = {
    f"{_DCP}.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    f"{_DCP}.planner": frozenset(
        {
            "SavePlan",
            "LoadPlan",
            "WriteItem",
            "ReadItem",
            "TensorWriteData",
            "WriteItemType",
            "LoadItemType",
        }
    ),
    # torch pickles a layout as _get_layout("torch.strided"): a lookup in torch's layouts
    "torch.serialization": frozenset({"_get_layout"}),
    "collections": frozenset({"OrderedDict"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "Path"}),
    "builtins": frozenset(
        {"set", "frozenset", "list", "dict", "tuple", "bytes", "bytearray", "int", "float"}
        | {"str", "bool", "complex", "slice", "range"}
    ),
}


def _torch_value(name: str) -> Any:
    """`torch.<name>` when it is a plain value a metadata file may hold: `torch.Size`, a dtype,
    a layout or a memory format; else None."""
    value = getattr(torch, name, None)
    if value is torch.Size or isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the names in :data:`ALLOWED` (and torch's dtypes,
    layouts, memory formats and `torch.Size`); any other name is refused before it is looked
    up, so a payload (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) never runs."""

    def __init__(self, file: IO[bytes], where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            value = _torch_value(name)
            if value is not None:
                return value
        elif name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise BTXError(
            f"{self.where}: refers to {module}.{name}, which a checkpoint's metadata never "
            f"holds; refusing to load it (the file may have been tampered with)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise BTXError(f"{self.where}: holds a persistent reference; not a DCP metadata file")


def load_dcp_metadata(path: str | os.PathLike[str]) -> Any:
    """The DCP `Metadata` of a `.metadata` file, unpickled with :class:`RestrictedUnpickler`
    and checked by :func:`check_dcp_metadata`. Every failure is one BTXError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f, str(path)).load()
    except BTXError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise BTXError(f"{path}: cannot be read ({e}); the checkpoint is corrupt") from e
    except (AttributeError, KeyError, IndexError, RecursionError, MemoryError) as e:
        raise BTXError(f"{path}: malformed ({type(e).__name__}); the checkpoint is corrupt") from e
    if not isinstance(metadata, Metadata):
        raise BTXError(
            f"{path}: holds a {type(metadata).__name__}, not a checkpoint's metadata; the "
            f"checkpoint is corrupt"
        )
    check_dcp_metadata(metadata, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def check_dcp_metadata(metadata: Any, where: str) -> None:
    """What the readers trust a metadata for: every chunk's data lies in a plain file inside
    the checkpoint folder (no `..`, no absolute path, no subfolder) at a non-negative offset
    and length, and every tensor entry has a dtype and a shape of non-negative ints."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    entries = metadata.state_dict_metadata
    storage = metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise BTXError(f"{where}: malformed (no tensor index); the checkpoint is corrupt")
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry, TensorStorageMetadata) or not isinstance(
            getattr(entry.properties, "dtype", None), torch.dtype
        ):
            raise BTXError(f"{where}: entry {key!r} is malformed; the checkpoint is corrupt")
        if not all(isinstance(s, int) and s >= 0 for s in entry.size):
            raise BTXError(f"{where}: tensor {key!r} has shape {tuple(entry.size)}; corrupt")
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(name, str) or not _plain_file_name(name):
            raise BTXError(
                f"{where}: chunk {getattr(index, 'fqn', index)!r} points at {name!r}, outside "
                f"the checkpoint folder; refusing to read it"
            )
        if not (
            isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0
        ):
            raise BTXError(
                f"{where}: chunk {getattr(index, 'fqn', index)!r} has offset {offset!r} and "
                f"length {length!r}; the checkpoint is corrupt"
            )


def _plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def torch_load(source: str | os.PathLike[str] | IO[bytes] | bytes, where: str) -> Any:
    """`torch.load(..., weights_only=True)` on the CPU: tensors, containers and numbers only,
    never an arbitrary object; a refused or corrupt file is one BTXError naming `where`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BTXError(
            f"{where}: refused or unreadable ({first}); only tensors and plain values are "
            f"loaded from a checkpoint"
        ) from e
