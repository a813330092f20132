"""megatron-core's checkpoint loading with our readers: nothing in a checkpoint runs as code.

megatron-core's `dist_checkpointing.load` reads a torch_dist folder with unpicklers: torch's
`FileSystemReader.read_metadata` (`pickle.load` of `.metadata`), torch's
`DefaultLoadPlanner.load_bytes` (`torch.load(weights_only=False)` of every byte object in the
`.distcp` files, e.g. the RNG states of a training checkpoint), and `torch.load` of the common
state: `common.pt` (megatron-core <= 0.16) or the `common_state` byte object inside the torch_dist
files (0.17 and later, which write no `common.pt`). Every load in megatron_btx goes through
:func:`load` and :func:`load_common` here instead, with

- :class:`SafeFileSystemReader`, a StorageReader whose metadata comes from the restricted
  unpickler (:func:`~megatron_btx.checkpoint.safe_pickle.load_dcp_metadata`, cached);
- a load planner whose byte objects are read with ``weights_only=True``;
- the common state read with ``weights_only=True``, from either place.

:func:`load` is megatron-core's own load sequence (preprocess, integrity validation, DCP load,
factory merges) written with the helpers both API generations share, so it does not depend on
`dist_checkpointing.load`'s signature (0.17 dropped its ``common_strategy`` argument and the
`TorchCommonLoadStrategy` class; its sharded strategy's ``load`` grew an argument). Tensors,
optimizer state and objects load exactly as megatron-core loads them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

from megatron_btx.checkpoint.safe_pickle import load_dcp_metadata, torch_load
from megatron_btx.errors import BTXError
from megatron_btx.inputs import inside, read_json

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"


class SafeFileSystemReader(FileSystemReader):
    """torch's file-system StorageReader with `.metadata` read by the restricted unpickler
    (once: megatron-core asks for it again after the load)."""

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise BTXError(f"{self.path}: per-rank metadata files are not supported")
        if self._metadata is None:
            self._metadata = load_dcp_metadata(Path(self.path) / METADATA_FILE)
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def _planner_class():
    """megatron-core's load planner with byte objects read as weights only (a class made on
    first use: megatron-core is imported lazily)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(MCoreLoadPlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            check_coverage(plan, self.state_dict, getattr(self, "where", "checkpoint"))
            return plan

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            loaded = torch_load(value, f"checkpoint object {fqn!r}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafeLoadPlanner


def check_coverage(plan, state_dict: dict[str, Any], where: str) -> None:
    """Every tensor this rank loads is covered whole by the checkpoint's chunks: the reads DCP
    planned for it add up to its volume (the chunks are disjoint, checked when the metadata was
    read). A gap would leave the model's initial values in place, silently."""
    import math

    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.planner_helpers import _create_chunk_list

    read: dict[tuple[str, tuple[int, ...]], int] = {}
    for item in plan.items:
        if item.type != LoadItemType.BYTE_IO:
            key = (item.dest_index.fqn, tuple(item.dest_index.offset or ()))
            read[key] = read.get(key, 0) + math.prod(item.lengths)
    for fqn, value in state_dict.items():
        if not hasattr(value, "size") or not callable(value.size):
            continue
        for chunk in _create_chunk_list(value):
            want = math.prod(chunk.sizes)
            got = read.get((fqn, tuple(chunk.offsets)), 0)
            if got != want:
                raise BTXError(
                    f"{where}: tensor {fqn!r}: the stored chunks cover {got} of the {want} "
                    f"elements at {tuple(chunk.offsets)}; the checkpoint is incomplete"
                )


def _load_sharded(sharded_state_dict, checkpoint_dir) -> dict[str, Any]:
    """megatron-core's torch_dist load of sharded tensors and objects with our reader and
    planner: megatron keys -> DCP keys and torch ShardedTensors, DCP load, and back."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed import checkpoint as dcp

    tensors = [v for v in nested_values(sharded_state_dict) if isinstance(v, ShardedTensor)]
    strict_shapes = [t for t in tensors if not t.allow_shape_mismatch]
    loose_shapes = {t.key: t for t in tensors if t.allow_shape_mismatch}
    original = sharded_state_dict
    renamed, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
        sharded_state_dict
    )
    pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(renamed, True)
    reader = SafeFileSystemReader(checkpoint_dir)
    planner = _planner_class()(
        shapes_validation_sharded_tensors=strict_shapes,
        allow_shape_mismatch_sharded_tensors=loose_shapes,
    )
    planner.where = str(checkpoint_dir)
    dcp.load_state_dict(pyt_state_dict, reader, planner=planner)
    loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
    loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(
        loaded, flat_mapping, rename_mapping
    )
    mcore_torch._restore_dict_types(loaded, original)
    return loaded


def load(sharded_state_dict: dict[str, Any], folder: str | os.PathLike[str]) -> dict[str, Any]:
    """`sharded_state_dict` (megatron-core ShardedTensors, ShardedObjects, factories) loaded from
    the torch_dist checkpoint `folder`, as megatron-core's `dist_checkpointing.load` with its
    defaults (access integrity validated, unexpected keys assumed fine) loads it."""
    from megatron.core.dist_checkpointing import mapping, state_dict_utils, utils, validation
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint
    from megatron.core.dist_checkpointing.dict_utils import merge
    from torch.distributed.checkpoint.api import CheckpointException

    config = Path(folder) / "metadata.json"
    if config.is_file() or config.is_symlink():  # megatron-core parses it: a bounded file first
        read_json(inside(folder, config, "metadata.json"), "metadata.json", limit=1 << 20)
    if not check_is_distributed_checkpoint(str(folder)):
        raise BTXError(f"{folder}: not a torch_dist checkpoint (no metadata.json)")
    try:
        utils.force_all_tensors_to_non_fp8(sharded_state_dict)
        common = load_common(folder)
        sharded_state_dict, nonpersistent, factories = state_dict_utils.load_preprocess(
            sharded_state_dict
        )
        merge(common, nonpersistent)
        sharded_state_dict, _ = utils.extract_sharded_base(sharded_state_dict)
        local, global_ = validation.determine_global_metadata(sharded_state_dict)
        sharded_state_dict, _, _ = validation.validate_integrity_and_strict_load(
            sharded_state_dict,
            validation.StrictHandling.ASSUME_OK_UNEXPECTED,
            True,
            local,
            global_,
            None,
        )
        merge(common, _load_sharded(sharded_state_dict, folder))
        return mapping.apply_factory_merges(common, factories)
    except CheckpointException as e:  # DCP gathers each rank's error into one of these
        raise _one_error(folder, e) from e


def _one_error(folder: str | os.PathLike[str], error: BaseException) -> BTXError:
    """The first rank's error of a failed DCP load as one line: our own refusal as it is, any
    other (a key or shape the checkpoint lacks) named with the checkpoint."""
    failures = getattr(error, "failures", {}) or {}
    for failure in failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, BTXError):
            return cause
    cause = next(iter(failures.values()), (error,))
    cause = cause[0] if isinstance(cause, tuple) else cause
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
    return BTXError(f"{folder}: cannot be loaded into this model ({type(cause).__name__}: {first})")


#: where megatron-core >= 0.17 keeps the common state: one ShardedObject in the torch_dist files
COMMON_STATE_KEY = "common_state"


def load_common(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's common (replicated) state: train_state, ..., weights only. From
    `common.pt` where there is one (megatron-core <= 0.16, and the merge's writer), else from
    the `common_state` object megatron-core >= 0.17 saves among the torch_dist files."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_btx.inputs import open_regular

    path = Path(folder) / COMMON_FILE
    if path.is_file() or path.is_symlink():
        with os.fdopen(open_regular(inside(folder, path, COMMON_FILE), COMMON_FILE), "rb") as f:
            loaded = torch_load(f, str(path))
        where = str(path)
    else:
        obj = ShardedObject(COMMON_STATE_KEY, None, (1,), (0,))
        entries = SafeFileSystemReader(folder).read_metadata().state_dict_metadata
        if not isinstance(entries.get(obj.unique_key), BytesStorageMetadata):
            raise BTXError(
                f"{folder}: neither {COMMON_FILE} nor a {COMMON_STATE_KEY} object; not a "
                f"complete torch_dist checkpoint"
            )
        loaded = _load_sharded({COMMON_STATE_KEY: obj}, folder)[COMMON_STATE_KEY]
        where = f"{folder} ({COMMON_STATE_KEY})"
    if not isinstance(loaded, dict):
        raise BTXError(f"{where}: holds a {type(loaded).__name__}, not a state dict; corrupt")
    return loaded
