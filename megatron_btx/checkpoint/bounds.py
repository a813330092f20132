"""Sizes a checkpoint claims, bounded by what its files hold, before anything is allocated.

A torch_dist checkpoint describes itself twice: its `.metadata` lists every chunk of every
tensor (offsets and sizes in the global tensor, and the bytes of the data file that hold it), and
our manifest records the model's hyper-parameters, from which the readers build the model (on the
meta device, then real tensors of those shapes). Both are files anyone can edit, so before
either is acted on:

- :func:`check_layout` (every `.metadata` read): each chunk lies inside its tensor's global
  shape, no two chunks of a tensor overlap (two overlapping chunks used to pass a volume count
  as "complete" while the rows nobody wrote were exported as heap bytes), each chunk's elements
  fit in the bytes its data file holds for it, and those bytes lie inside a regular data file
  inside the checkpoint folder;
- :func:`check_model_fits` (every manifest whose model is built): the parameters the manifest's
  sizes imply, counted from below (the weights every layer must have), fit in the bytes the
  checkpoint's tensor data holds: a manifest claiming a billion experts, or an intermediate size
  of 10^10, is refused at once instead of being built until memory runs out.

Together with :func:`megatron_btx.checkpoint.safe_pickle.load_dcp_metadata` (nothing allocated
while the metadata is unpickled beyond its own size) and the safetensors header checks
(:func:`megatron_btx.checkpoint.hf.check_header`), every size read from a checkpoint is
bounded by its files.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any

import torch

from megatron_btx.errors import BTXError


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def data_file_sizes(metadata: Any, folder: Path, where: str) -> dict[str, int]:
    """{data file name: size} of every file the metadata's chunks point into; each must be a
    regular file whose real location is inside `folder` (:func:`megatron_btx.inputs.inside`)."""
    from megatron_btx.inputs import inside

    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = info.relative_path
        if name in sizes:
            continue
        path = folder / name
        real = inside(folder, path, "checkpoint data file")
        try:
            st = os.stat(real)
        except OSError as e:
            raise BTXError(
                f"{path}: a data file {where} lists is missing ({e.strerror}); the checkpoint "
                f"is incomplete"
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise BTXError(f"{path}: checkpoint data file is not a regular file; refusing it")
        sizes[name] = st.st_size
    return sizes


def check_layout(metadata: Any, folder: Path, where: str) -> None:
    """The chunks of a DCP `.metadata` (see the module docstring), or one BTXError naming the
    tensor and what is wrong. Gaps are allowed (a model with MoE in some layers leaves the
    dense layers' rows of a layer-stacked expert tensor unwritten, as megatron-core itself
    does); a reader checks that what it reads is covered."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    storage = metadata.storage_data
    files = data_file_sizes(metadata, folder, where)
    for index, info in storage.items():
        end = info.offset + info.length
        if end > files[info.relative_path]:
            raise BTXError(
                f"{folder / info.relative_path}: {getattr(index, 'fqn', index)!r} ends at byte "
                f"{end} of a {files[info.relative_path]}-byte file; the checkpoint is truncated"
            )
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            continue
        if not isinstance(entry.chunks, list):
            raise BTXError(f"{where}: tensor {key!r} has no list of chunks; corrupt")
        itemsize = _itemsize(entry.properties.dtype)
        boxes = []
        for chunk in entry.chunks:
            offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
            if not (_shape(offsets, len(entry.size)) and _shape(sizes, len(entry.size))):
                raise BTXError(f"{where}: tensor {key!r} has a malformed chunk; corrupt")
            if any(o + s > g for o, s, g in zip(offsets, sizes, entry.size)):
                raise BTXError(
                    f"{where}: tensor {key!r}: chunk at {tuple(offsets)} of {tuple(sizes)} lies "
                    f"outside its shape {tuple(entry.size)}; the checkpoint is corrupt"
                )
            info = storage.get(MetadataIndex(key, offsets))
            if info is None:
                raise BTXError(
                    f"{where}: tensor {key!r}: the chunk at {tuple(offsets)} has no data; the "
                    f"checkpoint is corrupt"
                )
            need = math.prod(sizes) * itemsize
            if need > info.length:
                raise BTXError(
                    f"{where}: tensor {key!r}: the chunk at {tuple(offsets)} is {tuple(sizes)} "
                    f"({need} bytes) but its data is {info.length} bytes; the checkpoint is corrupt"
                )
            boxes.append((tuple(offsets), tuple(sizes)))
        clash = first_overlap(boxes)
        if clash is not None:
            (o1, s1), (o2, s2) = clash
            raise BTXError(
                f"{where}: tensor {key!r}: chunks at {o1} of {s1} and at {o2} of {s2} overlap; "
                f"the checkpoint is corrupt (its elements would be read twice and some never)"
            )


def _shape(value: Any, ndim: int) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == ndim
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


Box = tuple[tuple[int, ...], tuple[int, ...]]


def first_overlap(boxes: list[Box]) -> tuple[Box, Box] | None:
    """Two boxes (offsets, sizes) that share an element, or None. A sweep along the axis with
    the most distinct starts: a box is compared only with the earlier ones that still extend
    past its start there (the chunks of a sharded tensor are a grid: few at a time)."""
    boxes = [b for b in boxes if all(s > 0 for s in b[1])]  # an empty chunk holds nothing
    if len(boxes) < 2:
        return None
    ndim = len(boxes[0][0])
    if ndim == 0:
        return boxes[0], boxes[1]  # two chunks of one scalar
    axis = max(range(ndim), key=lambda a: len({b[0][a] for b in boxes}))
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        active = [a for a in active if a[0][axis] + a[1][axis] > start]
        for other in active:
            if all(
                oa < ob + sb and ob < oa + sa
                for oa, sa, ob, sb in zip(other[0], other[1], box[0], box[1])
            ):
                return other, box
        active.append(box)
    return None


def stored_bytes(metadata: Any) -> int:
    """The bytes of tensor data a checkpoint's chunks hold (model and optimizer state)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    tensors = {
        k
        for k, v in metadata.state_dict_metadata.items()
        if not isinstance(v, BytesStorageMetadata)
    }
    return sum(info.length for index, info in metadata.storage_data.items() if index.fqn in tensors)


def least_params(args: Any, variant: Any = None) -> int:
    """A lower bound of the parameters a model of `args` (a LlamaArgs) and `variant` (its
    manifest's MoE shape) has: embedding, attention and every layer's FFN or experts. Python
    integers: any size, however absurd, is counted exactly."""
    h, L = args.hidden_size, args.num_hidden_layers
    heads, kv, d = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    attention = h * d * (2 * heads + 2 * kv)
    freq = getattr(variant, "layer_freq", None)
    moe_layers = (sum(1 for x in freq if x) if freq is not None else L) if args.is_moe else 0
    dense_ffn = getattr(variant, "dense_ffn_hidden_size", None) or args.intermediate_size
    shared = getattr(variant, "shared_expert_intermediate_size", None) or 0
    ffn = (
        moe_layers * (args.num_local_experts * args.intermediate_size + shared)
        + (L - moe_layers) * dense_ffn
    )
    embedding = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return embedding + L * attention + 3 * h * ffn


def check_model_fits(
    args: Any, variant: Any, folder: str | os.PathLike[str], metadata: Any
) -> None:
    """The model a manifest describes fits in the tensor data its checkpoint holds (see the
    module docstring), or one BTXError naming the manifest."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_btx.checkpoint.manifest import MANIFEST

    dtypes = [
        v.properties.dtype
        for v in metadata.state_dict_metadata.values()
        if not isinstance(v, BytesStorageMetadata)
    ]
    itemsize = min((_itemsize(dt) for dt in dtypes), default=1)
    need = least_params(args, variant) * itemsize
    held = stored_bytes(metadata)
    if need > held:
        raise BTXError(
            f"{Path(folder) / MANIFEST}: its model sizes (hidden_size {args.hidden_size}, "
            f"intermediate_size {args.intermediate_size}, {args.num_hidden_layers} layers, "
            f"{args.num_local_experts} experts, vocabulary {args.vocab_size}) need at least "
            f"{need} bytes of weights; the checkpoint holds {held}. The manifest does not "
            f"describe this checkpoint"
        )
