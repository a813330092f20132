"""A model's flat sharded-state-dict template: every checkpoint key, global shape and chunk.

megatron-core names a checkpoint's tensors through the model's ``sharded_state_dict()``. Built on
the `meta` device (:func:`megatron_btx.models.llama.build_for_checkpoint` with ``meta=True``),
the model costs no memory and its sharded state dict is the exact layout of the checkpoint, so
the streaming writers fill it part by part (:func:`fill`) and the partial readers read a part of
any saved layout back (:func:`read_prefix`) without ever holding the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def flat_template(model: torch.nn.Module) -> dict[str, Any]:
    """{state-dict name: ShardedTensor / ShardedTensorFactory / ShardedObject} of a model."""
    return dict(model.sharded_state_dict())


def layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def entries_under(template: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The template entries of one part: a layer (``decoder.layers.i.``) or one global name."""
    if prefix.endswith("."):
        return {k: v for k, v in template.items() if k.startswith(prefix)}
    return {k: v for k, v in template.items() if k == prefix}


def tensor_entries(entries: dict[str, Any]) -> dict[str, Any]:
    """The entries that hold tensors (ShardedObjects, i.e. extra state, are left out)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in entries.items() if not isinstance(v, ShardedObject)}


def fill(
    entries: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor], what: str
) -> dict[str, Any]:
    """Template entries with their data replaced by `tensors` (by name without `prefix`), cast
    to the template's dtype; ShardedObjects (extra state) pass through. A missing tensor or a
    shape that differs from the model's is an error naming the key: it is ours, not the user's."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for key, entry in entries.items():
        if isinstance(entry, ShardedObject):
            out[key] = entry
            continue
        tensor = tensors.get(key[len(prefix) :])
        if tensor is None:
            raise RuntimeError(f"no tensor for {key} ({what})")
        if tuple(tensor.shape) != tuple(entry.data.shape):
            raise RuntimeError(
                f"{key}: shape {tuple(tensor.shape)} != model {tuple(entry.data.shape)} ({what})"
            )
        out[key] = dataclasses.replace(entry, data=tensor.to(entry.data.dtype).contiguous())
    return out


def partial_keys(template: dict[str, Any]) -> set[str]:
    """Checkpoint keys of stacked tensors (layer- or expert-stacked) that only some layers may
    fill, e.g. with MoE in some layers."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {
        v.key for v in template.values() if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }


def read_prefix(
    reader, template: dict[str, Any], prefix: str, dtypes: dict[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """One part of a checkpoint through a :class:`~megatron_btx.checkpoint.dcp_stream.PartialReader`:
    {name without `prefix` (the full name for a global): tensor}. Tensors come in the
    template's dtype, or in `dtypes[checkpoint key]` (e.g. the dtype they were saved in)."""
    part = {}
    for key, entry in tensor_entries(entries_under(template, prefix)).items():
        dtype = entry.data.dtype if dtypes is None else dtypes[entry.key]
        # the entry's dtype too: megatron-core checks that it is its data's (a checkpoint trained
        # in bf16 holds tensors of both dtypes)
        changes: dict[str, Any] = {"data": torch.empty(entry.data.shape, dtype=dtype)}
        if any(field.name == "dtype" for field in dataclasses.fields(entry)):
            changes["dtype"] = dtype  # a ShardedTensor; a factory has no dtype of its own
        part[key] = dataclasses.replace(entry, **changes)
    if not part:
        raise KeyError(prefix)
    loaded = reader.load(part)
    if not prefix.endswith("."):
        return loaded
    return {k[len(prefix) :]: t for k, t in loaded.items()}
