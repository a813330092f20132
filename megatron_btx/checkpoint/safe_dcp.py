"""megatron-core's checkpoint loading with our readers: nothing in a checkpoint runs as code.

megatron-core's `dist_checkpointing.load` reads a torch_dist folder with three unpicklers:
torch's `FileSystemReader.read_metadata` (`pickle.load` of `.metadata`), torch's
`DefaultLoadPlanner.load_bytes` (`torch.load(weights_only=False)` of every byte object in the
`.distcp` files, e.g. the RNG states of a training checkpoint), and `torch.load` of `common.pt`
with the torch default. Every load in megatron_btx goes through :func:`load` and
:func:`load_common` here instead, which hand megatron-core

- :class:`SafeFileSystemReader`, a StorageReader whose metadata comes from the restricted
  unpickler (:func:`~megatron_btx.checkpoint.safe_pickle.load_dcp_metadata`, cached);
- :class:`SafeTorchDistLoadStrategy`, the torch_dist load strategy with that reader and a planner
  whose byte objects are read with ``weights_only=True``;
- :class:`SafeCommonLoadStrategy`, `common.pt` read with ``weights_only=True``.

The strategy's `load` is megatron-core's own sequence of its public helpers (state-dict keys to
DCP keys, DCP load, back), so tensors, optimizer state and objects load exactly as they would.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader

from megatron_btx.checkpoint.safe_pickle import load_dcp_metadata, torch_load
from megatron_btx.errors import BTXError

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
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            loaded = torch_load(value, f"checkpoint object {fqn!r}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return SafeLoadPlanner


def strategies():
    """(sharded, common) load strategies for megatron-core's `dist_checkpointing.load`."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        """The torch_dist load strategy reading through :class:`SafeFileSystemReader`."""

        def load(self, sharded_state_dict, checkpoint_dir):
            return _load_sharded(self, sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            if metadata is None:
                metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
            return super().load_tensors_metadata(checkpoint_dir, metadata)

        def load_sharded_metadata(self, checkpoint_dir):
            from megatron.core.dist_checkpointing.mapping import ShardedObject
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata

            metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
            found = {}
            for key, entry in metadata.state_dict_metadata.items():
                if isinstance(entry, BytesStorageMetadata):
                    obj = ShardedObject.empty_from_unique_key(key)
                    found[obj.unique_key] = obj
            found.update(self.load_tensors_metadata(checkpoint_dir, metadata))
            return found

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        """`common.pt` as weights only."""

        def load_common(self, checkpoint_dir):
            return load_common(checkpoint_dir)

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise BTXError(f"{checkpoint_dir}: objects outside the torch_dist files: not supported")

    return SafeTorchDistLoadStrategy(), SafeCommonLoadStrategy()


def _load_sharded(strategy, sharded_state_dict, checkpoint_dir) -> dict[str, Any]:
    """megatron-core's torch_dist load (TorchDistLoadShardedStrategy.load) with our reader and
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
    dcp.load_state_dict(pyt_state_dict, reader, planner=planner)
    strategy.cached_global_metadata = reader.read_metadata()
    loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
    loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(
        loaded, flat_mapping, rename_mapping
    )
    mcore_torch._restore_dict_types(loaded, original)
    return loaded


def load(sharded_state_dict: dict[str, Any], folder: str | os.PathLike[str]) -> dict[str, Any]:
    """megatron-core's `dist_checkpointing.load` of `folder` through our strategies."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    sharded, common = strategies()
    try:
        return dist_checkpointing.load(
            sharded_state_dict, str(folder), sharded_strategy=sharded, common_strategy=common
        )
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


def load_common(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's `common.pt` (the replicated state: train_state, ...), weights only."""
    path = Path(folder) / COMMON_FILE
    if not path.is_file():
        raise BTXError(f"{path}: missing; not a complete torch_dist checkpoint")
    loaded = torch_load(path, str(path))
    if not isinstance(loaded, dict):
        raise BTXError(f"{path}: holds a {type(loaded).__name__}, not a state dict; corrupt")
    return loaded
