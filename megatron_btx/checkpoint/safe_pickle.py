"""Reading the pickled parts of a checkpoint without running code from it.

A torch_dist checkpoint's `.metadata` is a pickle, and unpickling is calling whatever the file
names: torch's own `FileSystemReader.read_metadata` uses plain `pickle.load`, so a `.metadata`
planted in a downloaded or shared checkpoint runs its payload in every command that opens it.
:func:`load_dcp_metadata` reads it with an unpickler that resolves only the classes a DCP
metadata file is made of (torch.distributed.checkpoint's metadata and save-plan dataclasses,
`torch.Size`, dtypes, layouts, memory formats and plain containers) and refuses every other
name with one line; the result is then checked for what the readers trust it for (data files
inside the folder, non-negative offsets). Nothing it names is allocated beyond what the file
holds: before the unpickler runs, :func:`prescan` walks the opcodes (every length inside the
file, memo indices in sequence: a 36-byte file asking for a 2 GB memo table or frame is
refused), and the constructors it may call (`bytearray`, `list`, `torch.Size`, ...) build at
most as many elements, in all, as the file has bytes (`bytearray(2_000_000_000)` in a 36-byte
file is refused before it allocates). :func:`torch_load` is `torch.load` with
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


#: constructors a metadata file may call that build something as large as their argument
#: says (a count, or an iterable): they are called through :meth:`RestrictedUnpickler._guard`
SIZED = frozenset(
    {"bytes", "bytearray", "list", "tuple", "set", "frozenset", "dict", "str", "OrderedDict"}
)
#: the largest `.metadata` we read: a checkpoint's index of chunks, megabytes for the largest
#: models; a file this size is not one
MAX_METADATA_BYTES = 1 << 30


def _size_of(value: Any) -> int:
    """How many elements a constructor makes of `value`: an int is a count, a sized value its
    length (a range too long to measure is "infinitely" long); anything else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return abs(value)
    if isinstance(value, range):
        step = abs(value.step)
        return max(0, (abs(value.stop - value.start) + step - 1) // step)
    try:
        return len(value)
    except (TypeError, OverflowError):
        return 0


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only the names in :data:`ALLOWED` (and torch's dtypes,
    layouts, memory formats and `torch.Size`); any other name is refused before it is looked
    up, so a payload (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) never runs. The
    constructors of :data:`SIZED` and `torch.Size` together build at most `budget` elements
    (the file's size: a genuine pickle spells out every element it holds)."""

    def __init__(self, file: IO[bytes], where: str, budget: int | None = None):
        super().__init__(file)
        self.where = where
        self.budget = budget

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            value = _torch_value(name)
            if value is not None:
                return self._guard(value, name) if value is torch.Size else value
        elif name in ALLOWED.get(module, ()):
            value = super().find_class(module, name)
            return self._guard(value, name) if name in SIZED else value
        raise BTXError(
            f"{self.where}: refers to {module}.{name}, which a checkpoint's metadata never "
            f"holds; refusing to load it (the file may have been tampered with)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise BTXError(f"{self.where}: holds a persistent reference; not a DCP metadata file")

    def _guard(self, constructor: Any, name: str) -> Any:
        """`constructor`, counting what each call builds against the budget."""
        if self.budget is None:
            return constructor

        def call(*args: Any, **kwargs: Any) -> Any:
            size = sum(_size_of(a) for a in (*args, *kwargs.values()))
            if size > self.budget:
                raise BTXError(
                    f"{self.where}: asks {name}() to build {size} elements, more than the file's "
                    f"{self.file_size} bytes hold; refusing to load it (the file may have been "
                    f"tampered with)"
                )
            self.budget -= size
            return constructor(*args, **kwargs)

        return call

    @property
    def file_size(self) -> int:
        return getattr(self, "_file_size", 0)


def prescan(data: IO[bytes], size: int, where: str) -> None:
    """Walk a pickle's opcodes without running them (pickletools) and refuse one whose lengths
    or indices would make the unpickler allocate what the file does not hold: a string, bytes
    or frame longer than the rest of the file, a memo index out of sequence (CPython sizes its
    memo table by the largest index: one opcode asked for 1.5 GB), an opcode pickletools does
    not know. Reads through `data` (positioned at the start) and leaves it at its end."""
    import pickletools

    memo = 0
    try:
        for op, arg, pos in pickletools.genops(_Bounded(data, size)):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (
                isinstance(arg, int) and 0 <= arg <= memo
            ):
                raise ValueError(f"memo index {arg} out of sequence at byte {pos}")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo += 1
            elif op.name == "FRAME" and (not isinstance(arg, int) or arg > size - (pos or 0)):
                raise ValueError(f"frame of {arg} bytes at byte {pos}, past the end")
            elif op.name in ("EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "INST", "OBJ"):
                raise ValueError(f"{op.name} at byte {pos}")
    except ValueError as e:
        raise BTXError(f"{where}: not a checkpoint's metadata ({e}); refusing to load it") from e


class _Bounded:
    """A read-only view of a file that never hands out (or allocates for) more than `size`
    bytes in all, whatever length a read asks for."""

    def __init__(self, f: IO[bytes], size: int):
        self.f, self.left, self.size = f, size, size

    def tell(self) -> int:
        return self.size - self.left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        limit = self.left if limit is None or limit < 0 else min(limit, self.left)
        data = self.f.readline(limit)
        self.left -= len(data)
        return data


def load_dcp_metadata(path: str | os.PathLike[str]) -> Any:
    """The DCP `Metadata` of a `.metadata` file, unpickled with :class:`RestrictedUnpickler`
    and checked by :func:`check_dcp_metadata`. Every failure is one BTXError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from megatron_btx.inputs import inside, open_regular

    path = Path(path)
    real = inside(path.parent, path, "checkpoint metadata")
    try:
        with os.fdopen(open_regular(real, "checkpoint metadata"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise BTXError(
                    f"{path}: {size} bytes, more than a checkpoint's metadata can be "
                    f"({MAX_METADATA_BYTES}); refusing to load it"
                )
            prescan(f, size, str(path))
            f.seek(0)
            unpickler = RestrictedUnpickler(_Bounded(f, size), str(path), budget=size)
            unpickler._file_size = size
            metadata = unpickler.load()
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
    check_dcp_metadata(metadata, str(path), path.parent)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def check_dcp_metadata(metadata: Any, where: str, folder: Path | None = None) -> None:
    """What the readers trust a metadata for: every chunk's data lies in a plain file inside
    the checkpoint folder (no `..`, no absolute path, no subfolder) at a non-negative offset
    and length, and every tensor entry has a dtype and a shape of non-negative ints. With the
    checkpoint's `folder`, also what :func:`megatron_btx.checkpoint.bounds.check_layout`
    checks: chunks inside their tensors and disjoint, and each in its data file."""
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
        if not _int_tuple(entry.size):
            raise BTXError(f"{where}: tensor {key!r} has shape {_short(entry.size)}; corrupt")
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

    if folder is not None:
        from megatron_btx.checkpoint.bounds import check_layout

        check_layout(metadata, Path(folder), where)


#: the most dimensions a tensor in a checkpoint has (megatron-core's stack axes included)
MAX_DIMS = 16


def _int_tuple(value: Any) -> bool:
    """A shape: a torch.Size, tuple or list of at most MAX_DIMS non-negative ints."""
    return (
        isinstance(value, (tuple, list))
        and len(value) <= MAX_DIMS
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    )


def _short(value: Any) -> str:
    return repr(value)[:80]


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
