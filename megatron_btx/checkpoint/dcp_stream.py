"""Write and read megatron-core `torch_dist` checkpoints a piece at a time.

megatron-core's `dist_checkpointing.save` takes the whole sharded state dict at once, so saving a
model means holding the model. Its format is a torch.distributed.checkpoint (DCP) folder: data
files of `torch.save`d chunks, one pickled `.metadata` that lists every chunk of every global
tensor and where it lies, plus megatron's `metadata.json` and `common.pt`. Nothing in it requires
the chunks to be written in one call, so :class:`StreamingDCPWriter` takes megatron-core's own
sharded state dict (ShardedTensors, factories, ShardedObjects with data filled in) one part at a
time: megatron-core's `apply_factories` turns it into ShardedTensors, each becomes the DCP chunk
megatron-core would write for it (same key, global shape, offsets, sizes, dtype), written with
torch's own `_write_item` into a data file per part, and `finish` writes one `.metadata` for all
parts. Keys, shapes and chunk layout are the ones megatron-core writes itself for the same model,
so megatron-core loads the result at any TP/PP/EP.

:class:`PartialReader` is the reading side: only the chunks that overlap the asked-for tensors
(e.g. one layer of a checkpoint saved at TP=2) are read and assembled.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_btx.checkpoint.direct_io import DirectWriter, WriteBehind
from megatron_btx.checkpoint.safe_pickle import load_dcp_metadata, torch_load
from megatron_btx.errors import BTXError


@contextlib.contextmanager
def _no_zip_crc32():
    """torch.save without the zip records' CRC32 (torch's documented `set_crc32_options`).

    The CRC was the largest single cost of writing a checkpoint (a software CRC at ~1 GB/s, more
    than the write itself), and it protects nothing here: `torch.load`, and so DCP and
    megatron-core, never checks it (a flipped data byte loads silently with or without it).
    Integrity is the manifest's sha256 and `--verify`'s job."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch < 2.6: always computes it
        yield
        return
    old = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(old)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) on a storage of exactly its bytes, sharing memory, not copied.

    torch.save writes a view's whole storage (e.g. both halves of a SwiGLU fc1 for each half);
    a slice of the storage holds only this chunk's bytes, as megatron-core writes them."""
    nbytes = t.numel() * t.element_size()
    storage = t.untyped_storage()
    if storage.nbytes() == nbytes:
        return t
    start = t.storage_offset() * t.element_size()
    sub = storage[start : start + nbytes]
    if sub.data_ptr() != t.data_ptr():  # not a view on this torch: fall back to a copy
        return t.clone()
    return torch.empty(0, dtype=t.dtype).set_(sub, 0, t.shape, t.stride())


class StreamingDCPWriter:
    """A torch_dist checkpoint written part by part into `folder` (which must exist).

    Each part is one `.distcp` file. The files share one write-behind thread with
    `write_behind_mb` of staging buffers, so a part's bytes go to disk while the caller computes
    the next part; :meth:`finish` waits for them. Use it as a context manager (or call
    :meth:`close`) so that the thread also stops when the caller fails half way."""

    def __init__(self, folder: str | Path, write_behind_mb: int = 128, sha256: bool = True):
        self.folder = Path(folder)
        self.sha256 = sha256  # each data file's digest, computed as it is written
        chunk = 16 * 1024 * 1024
        self._behind = WriteBehind(chunk, depth=max(1, write_behind_mb * 1024 * 1024 // chunk - 1))
        self._tensor_md: dict[str, Any] = {}
        self._bytes_md: dict[str, Any] = {}
        self._storage: dict[Any, Any] = {}
        self._nfiles = 0
        self._files: list[Path] = []
        self.bytes_written = 0
        self._finished = False

    def write(self, sharded_state_dict: Mapping[str, Any]) -> int:
        """Write one part: a (flat or nested) dict of megatron ShardedTensor / ShardedTensorFactory
        / ShardedObject with data. Returns the bytes written.

        Each ShardedTensor becomes one DCP chunk exactly as megatron-core's save writes it: offsets
        = its global offset, sizes = its local shape behind `prepend_axis_num` ones (the stacked
        layer / expert axes); each ShardedObject one `torch.save([data])` blob under its unique
        key. (megatron-core's own conversion cannot be used per part: with one process it takes
        the other layers' chunks of a stacked tensor for local shards it was not given.)"""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import (
            ShardedObject,
            ShardedTensor,
            apply_factories,
            is_main_replica,
        )
        from torch.distributed.checkpoint.filesystem import (
            SerializationFormat,
            _StorageWriterTransforms,
            _write_item,
        )
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
            TensorStorageMetadata,
        )
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        if self._finished:
            raise RuntimeError("StreamingDCPWriter.write after finish")
        sd = dict(sharded_state_dict)
        apply_factories(sd)
        objects, tensors = [], []
        for v in nested_values(sd):
            if not is_main_replica(v.replica_id):
                continue
            if isinstance(v, ShardedObject):
                objects.append(v)
            elif isinstance(v, ShardedTensor):
                if v.flattened_range is not None:
                    raise BTXError(
                        f"{v.key}: flattened (optimizer-style) tensors are not supported"
                    )
                tensors.append(v)
            else:
                raise TypeError(f"cannot write {type(v).__name__} {getattr(v, 'key', '')}")
        name = f"__{self._nfiles}_0.distcp"
        self._nfiles += 1
        transforms = _StorageWriterTransforms()
        start = self.bytes_written
        stream = DirectWriter(self.folder / name, behind=self._behind, sha256=self.sha256)
        with stream, _no_zip_crc32():
            for obj in objects:  # bytes first, then tensors: megatron-core's order
                fqn = obj.unique_key
                if fqn in self._bytes_md:
                    raise BTXError(f"checkpoint object {fqn!r} written twice")
                self._bytes_md[fqn] = BytesStorageMetadata()
                buf = io.BytesIO()
                torch.save([obj.data], buf)
                item = WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
                res = _write_item(
                    transforms,
                    stream,
                    buf,
                    item,
                    name,
                    serialization_format=SerializationFormat.TORCH_SAVE,
                )
                self._storage[item.index] = res.storage_data
            for sh in tensors:
                fqn = sh.key
                sizes = torch.Size((1,) * sh.prepend_axis_num + tuple(sh.local_shape))
                offsets = torch.Size(sh.global_offset)
                data = sh.data.detach()
                if data.device.type != "cpu":
                    data = data.cpu()
                data = data.contiguous().reshape(sizes)
                data = _own_storage(data)
                gsize = torch.Size(sh.global_shape)
                md = self._tensor_md.get(fqn)
                if md is None:
                    md = self._tensor_md[fqn] = TensorStorageMetadata(
                        properties=TensorProperties.create_from_tensor(data), size=gsize, chunks=[]
                    )
                elif md.size != gsize or md.properties.dtype != data.dtype:
                    raise BTXError(
                        f"checkpoint tensor {fqn!r}: parts disagree on global shape/dtype "
                        f"({tuple(md.size)} {md.properties.dtype} vs {tuple(gsize)} {data.dtype})"
                    )
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
                item = WriteItem(
                    index=MetadataIndex(fqn, offsets, len(md.chunks)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=md.properties, size=gsize),
                )
                md.chunks.append(chunk)
                res = _write_item(
                    transforms,
                    stream,
                    data,
                    item,
                    name,
                    serialization_format=SerializationFormat.TORCH_SAVE,
                )
                self._storage[item.index] = res.storage_data
            self.bytes_written += stream.tell()
        self._files.append(self.folder / name)
        return self.bytes_written - start

    def check_complete(self, allow_partial: Iterable[str] = ()) -> None:
        """Every global tensor is covered exactly once by its chunks (keys in `allow_partial`,
        e.g. stacked layer tensors that only some layers have, may have gaps but no overlap)."""
        partial = set(allow_partial)
        for fqn, md in self._tensor_md.items():
            total = 0
            boxes = []
            for c in md.chunks:
                vol = 1
                for s in c.sizes:
                    vol *= int(s)
                total += vol
                boxes.append((tuple(c.offsets), tuple(c.sizes)))
            if len(set(boxes)) != len(boxes):
                raise BTXError(f"checkpoint tensor {fqn!r}: a chunk was written twice")
            for o, s in boxes:
                if any(oi + si > gi for oi, si, gi in zip(o, s, md.size)):
                    raise BTXError(f"checkpoint tensor {fqn!r}: chunk {o}+{s} outside {md.size}")
            want = 1
            for s in md.size:
                want *= int(s)
            if total > want or (total < want and fqn not in partial):
                raise BTXError(
                    f"checkpoint tensor {fqn!r}: chunks cover {total} of {want} elements"
                )

    def finish(self) -> None:
        """fsync the data files (once, at the end, so the kernel writes back while the merge
        computes), then write `.metadata`, megatron's `metadata.json` and an empty `common.pt`."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        self._behind.close()  # every part's bytes written, descriptors closed; raises errors
        for f in self._files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        md = Metadata(
            state_dict_metadata={**self._bytes_md, **self._tensor_md},
            planner_data=None,
            storage_data=dict(self._storage),
            storage_meta=StorageMeta(checkpoint_id=str(self.folder), save_id=str(uuid.uuid4())),
            version=CURRENT_DCP_VERSION,
        )
        tmp = self.folder / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(md, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / ".metadata")
        buf = io.BytesIO()
        torch.save({}, buf)
        (self.folder / "common.pt").write_bytes(buf.getvalue())
        save_config(CheckpointingConfig("torch_dist", 1), str(self.folder))
        self._finished = True

    def close(self) -> None:
        """Stop the write-behind thread without finishing (after a failure); idempotent."""
        with contextlib.suppress(BaseException):
            self._behind.close()

    def __enter__(self) -> StreamingDCPWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def keys(self) -> list[str]:
        return sorted(self._tensor_md)


def read_metadata(folder: str | Path):
    """The DCP `.metadata` of a torch_dist checkpoint (keys, global shapes, dtypes, chunks),
    read with the restricted unpickler (:mod:`megatron_btx.checkpoint.safe_pickle`): a
    tampered file is refused, never run."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise BTXError(
            f"{folder}: no .metadata; not a complete torch_dist checkpoint (an interrupted save?)"
        )
    return load_dcp_metadata(folder / ".metadata")


class PartialReader:
    """Reads chosen ShardedTensors (e.g. one layer) from a torch_dist checkpoint saved at any
    layout: each requested region is assembled from the stored chunks that overlap it, exactly as
    DCP's resharding load does, reading only those chunks. (megatron-core's load strategy cannot
    be used for a part of a stacked tensor in one process: it expects all of this rank's chunks.)
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.md = read_metadata(self.folder)
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _read_blob(self, info) -> bytes:
        if getattr(info, "transform_descriptors", None):
            raise BTXError(
                f"{self.folder}: chunks written with stream transforms "
                f"{info.transform_descriptors} are not supported"
            )
        fd = self._fds.get(info.relative_path)
        if fd is None:
            path = self.folder / info.relative_path
            try:
                fd = self._fds[info.relative_path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BTXError(f"{path}: cannot open checkpoint data file ({e})") from e
        size = os.fstat(fd).st_size
        if info.offset + info.length > size:
            raise BTXError(
                f"{self.folder / info.relative_path}: truncated (a chunk ends at byte "
                f"{info.offset + info.length}, the file has {size})"
            )
        buf = bytearray(info.length)
        view = memoryview(buf)
        got = 0
        while got < info.length:
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if n <= 0:
                raise BTXError(
                    f"{self.folder / info.relative_path}: truncated (wanted "
                    f"{info.length} bytes at {info.offset})"
                )
            got += n
        return buf

    def read_region(
        self,
        key: str,
        offsets: Sequence[int],
        sizes: Sequence[int],
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The region [offsets, offsets+sizes) of global tensor `key`."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        tmd = self.md.state_dict_metadata.get(key)
        if tmd is None or not hasattr(tmd, "chunks"):
            raise BTXError(f"{self.folder}: tensor {key!r} is not in the checkpoint")
        if len(offsets) != len(tmd.size) or any(
            o + s > g for o, s, g in zip(offsets, sizes, tmd.size)
        ):
            raise BTXError(
                f"{self.folder}: tensor {key!r} has global shape {tuple(tmd.size)}; "
                f"region {tuple(offsets)}+{tuple(sizes)} is outside it"
            )
        out = torch.empty(tuple(sizes), dtype=dtype or tmd.properties.dtype)
        covered = 0
        for c in tmd.chunks:
            lo = [max(o, co) for o, co in zip(offsets, c.offsets)]
            hi = [min(o + s, co + cs) for o, s, co, cs in zip(offsets, sizes, c.offsets, c.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            info = self.md.storage_data.get(MetadataIndex(key, c.offsets))
            if info is None:
                raise BTXError(f"{self.folder}: tensor {key!r} has a chunk with no data; corrupt")
            blob = self._read_blob(info)
            t = torch_load(blob, f"{self.folder / info.relative_path} (tensor {key!r})")
            del blob
            if not isinstance(t, torch.Tensor) or t.numel() != math.prod(c.sizes):
                raise BTXError(
                    f"{self.folder / info.relative_path}: the chunk of {key!r} at "
                    f"{tuple(c.offsets)} is not a tensor of {tuple(c.sizes)}; corrupt"
                )
            if tuple(t.shape) != tuple(c.sizes):
                t = t.reshape(tuple(c.sizes))
            src = t[tuple(slice(l - co, h - co) for l, h, co in zip(lo, hi, c.offsets))]
            dst = out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))]
            dst.copy_(src)
            vol = 1
            for l, h in zip(lo, hi):
                vol *= h - l
            covered += vol
            del t, src
        want = 1
        for s in sizes:
            want *= int(s)
        if covered != want:
            raise BTXError(
                f"{self.folder}: tensor {key!r}: the stored chunks cover {covered} of "
                f"the {want} elements asked for; the checkpoint is incomplete"
            )
        return out

    def load(self, sharded_state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{state-dict name: tensor} for the given ShardedTensors / factories (their data gives
        the dtype; ShardedObjects are skipped)."""
        from megatron.core.dist_checkpointing.mapping import (
            ShardedObject,
            ShardedTensor,
            ShardedTensorFactory,
            apply_factories,
            apply_factory_merges,
        )

        sd = {k: v for k, v in sharded_state_dict.items() if not isinstance(v, ShardedObject)}
        factories = {k: v for k, v in sd.items() if isinstance(v, ShardedTensorFactory)}
        apply_factories(sd)

        def load_one(sh):
            if not isinstance(sh, ShardedTensor):
                return sh
            if sh.flattened_range is not None:
                raise BTXError(f"{sh.key}: flattened tensors are not supported")
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            t = self.read_region(sh.key, sh.global_offset, sizes, sh.data.dtype)
            return t.reshape(tuple(sh.local_shape))

        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

        dict_list_map_inplace(load_one, sd)
        return apply_factory_merges(sd, factories)
