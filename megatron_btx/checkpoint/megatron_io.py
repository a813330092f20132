"""megatron-core distributed checkpoints (`torch_dist`): atomic save and layout-free load.

A checkpoint folder holds megatron-core's files, our manifest and the tokenizer. It is written
under a temporary name and renamed into place only when complete, so a crash mid-write never
leaves a partial checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_btx import rundir
from megatron_btx.checkpoint import manifest, swap
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, MoEVariant
from megatron_btx.rundir import MCORE_METADATA, is_checkpoint


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def followed(save: str | Path) -> Path:
    """The output folder `save` names: itself, or, when it is a symbolic link (an output kept
    on another disk through a link is common on clusters), the folder the link points to, which
    is then written and replaced in its place; the link stays as it is. A link to nothing (or a
    loop of links) is one BTXError."""
    save = Path(save)
    if not save.is_symlink():
        return save
    try:
        return save.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise BTXError(
            f"--save {save}: is a symbolic link to {os.readlink(save)}, which does not exist; "
            f"create that folder or remove the link"
        ) from e


def check_target(save: str | Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Refuse an output folder we must not write or replace: the current directory or one above
    it (`--save .`), a source folder, one inside a source or one holding a source, a file, and
    (without `overwrite`) any non-empty folder; with `overwrite`, only an empty folder or one of
    our checkpoints (it has a manifest) is replaced, never a folder of other files. A symbolic
    link is followed (:func:`followed`): the checks apply to the folder it points to."""
    save = followed(save)
    target = save.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise BTXError(
            f"--save {save}: is the current directory or a folder above it; name a new folder "
            f"for the output"
        )
    for source in sources:
        src = Path(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            relation = (
                "is" if target == src else "lies inside" if src in target.parents else "holds"
            )
            raise BTXError(
                f"--save {save}: {relation} the source {source}; write the output to a folder "
                f"of its own"
            )
    if not (save.exists() or save.is_symlink()):
        return save
    if not save.is_dir():
        raise BTXError(f"--save {save}: is a file, not a folder; choose a folder for the output")
    try:
        entries = [p.name for p in save.iterdir()]
    except OSError as e:
        raise BTXError(f"--save {save}: cannot be read ({e.strerror})") from e
    if entries and not overwrite:
        raise BTXError(
            f"{save}: already exists and is not empty; pass --overwrite to replace it, or "
            f"choose another --save folder"
        )
    if entries and manifest.MANIFEST not in entries:
        raise BTXError(
            f"{save}: holds files that are not a megatron_btx checkpoint (no "
            f"{manifest.MANIFEST}); --overwrite only replaces our own outputs: remove it "
            f"yourself or choose another --save folder"
        )
    return save


@contextlib.contextmanager
def atomic_folder(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success put it in place of `final`.

    Rank 0 holds the output's lock (``.NAME.lock`` beside it) throughout, so two commands never
    write one output; under it, a replacement an earlier command left half done is finished or
    undone first (:func:`~megatron_btx.checkpoint.swap.recover`), and `final` is checked
    (:func:`check_target`). On an exception the temporary folder is removed and `final` is
    untouched. The commit swaps the folders in one step where the file system can
    (:func:`~megatron_btx.checkpoint.swap.replace_folder`), so no moment leaves no output.
    Collective-safe: every rank gets the same path; rank 0 locks, creates, commits, cleans up.
    A symbolic link at `final` is followed (:func:`followed`): its folder is replaced, the link
    kept."""
    final = followed(final)
    lock = contextlib.ExitStack()
    if _rank() == 0:
        lock.enter_context(rundir.enclosing_locks(final))  # not inside a run another command holds
        lock.enter_context(rundir.locked(final, "output folder", rundir.lock_path_beside(final)))
    with lock:
        if _rank() == 0:
            swap.recover(final)
        check_target(final, overwrite)
        tmp = swap.temporary_name(final)
        if _rank() == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left over from a crash: never trusted
            tmp.mkdir()
        _barrier()
        try:
            yield tmp
            _barrier()
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if _rank() == 0:
            _commit(tmp, final)
        _barrier()


def _commit(tmp: Path, final: Path) -> None:
    """Put `tmp` in place of `final`; when that fails, remove `tmp`, put back the old output if
    the replacement was half done, and say which output could not be written."""
    try:
        swap.replace_folder(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            swap.recover(final)
        raise BTXError(
            f"{final}: the finished output could not be put in place ({e.strerror or e}); "
            f"nothing was written there"
        ) from e


def save_model(
    model: torch.nn.Module | list[torch.nn.Module],
    folder: str | Path,
    extra_state: dict[str, Any] | None = None,
) -> None:
    """Save the model's sharded state dict (plus `extra_state`, replicated) into an existing
    folder with megatron-core's torch_dist format. Call on every rank."""
    from megatron.core import dist_checkpointing

    state = sharded_state_dict(model)
    if extra_state:
        state.update(extra_state)
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    # megatron-core's file writer reports results through a queue that it creates, on first
    # use, in a spawned multiprocessing Manager process kept for the life of the process. That
    # process re-imports the caller's __main__ (failing in unguarded scripts) and holds the
    # parent's output pipes open, so `btx ... | tail` and subprocess-based tests hang until it is
    # gone. Saves here are synchronous: the result is put and taken in this very process, so an
    # in-process queue does the same job without the extra process.
    saved_queue = fa._results_queue
    fa._results_queue = queue.Queue()
    try:
        dist_checkpointing.save(state, str(folder), async_sharded_save=False)
    except BaseException as e:
        if _disk_full(folder):  # torch's writer reports a full disk as "unexpected pos ..."
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from e
        raise
    finally:
        fa._results_queue = saved_queue


def _disk_full(folder: str | Path) -> bool:
    """Whether the file system of `folder` has (almost) no space left: less than 16 MiB free
    right after a write into it failed means the write failed for want of space."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 16 * 1024 * 1024


def sharded_state_dict(model: torch.nn.Module | list[torch.nn.Module]) -> dict[str, Any]:
    """The model's sharded state dict; with virtual pipeline stages, one entry per chunk."""
    models = model if isinstance(model, list) else [model]
    if len(models) == 1:
        return {"model": unwrap(models[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(m).sharded_state_dict() for i, m in enumerate(models)}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def load_model(
    model: torch.nn.Module | list[torch.nn.Module], folder: str | Path, strict: bool = True
) -> None:
    """Load a torch_dist checkpoint into `model` at whatever layout `model` was built with
    (through :mod:`megatron_btx.checkpoint.safe_dcp`: nothing in the folder runs as code)."""
    from megatron_btx.checkpoint import safe_dcp

    folder = Path(folder)
    if not is_checkpoint(folder):
        raise BTXError(
            f"{folder}: not a megatron-core distributed checkpoint (no {MCORE_METADATA}); "
            f"convert HF checkpoints with tools/convert_hf_to_megatron.py first"
        )
    models = model if isinstance(model, list) else [model]
    state = sharded_state_dict(models)
    check_model_keys(folder, state)
    loaded = safe_dcp.load(state, folder)
    for i, m in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        missing, unexpected = unwrap(m).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and missing:
            raise BTXError(f"{folder}: checkpoint lacks {missing[0]!r} ({len(missing)} missing)")


def check_model_keys(folder: str | Path, model_state: dict[str, Any]) -> None:
    """The checkpoint holds exactly the model's tensors (over all ranks), else one line naming
    the first missing or unexpected key: a model built without a merge variant's shared expert,
    or with it for a checkpoint that has none, must not load silently or fail deep in
    megatron-core. Keys of optimizer state are not model tensors and are left out."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_btx.checkpoint.dcp_stream import read_metadata

    wanted = {
        v.key
        for v in nested_values(model_state)
        if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }
    if dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, wanted)
        wanted = set().union(*every)
    saved = {
        key
        for key, md in read_metadata(folder).state_dict_metadata.items()
        if hasattr(md, "size") and not key.startswith("optimizer")
    }
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if missing:
        raise BTXError(
            f"{folder}: checkpoint lacks {missing[0]!r} ({len(missing)} missing); it was written "
            f"for another model (check its btx_manifest.json 'model' and 'moe' entries)"
        )
    if unexpected:
        raise BTXError(
            f"{folder}: checkpoint has {unexpected[0]!r}, which the model lacks ({len(unexpected)} "
            f"unexpected); it was written for another model (check its btx_manifest.json 'model' "
            f"and 'moe' entries)"
        )


def read_variant(folder: str | Path) -> MoEVariant:
    """The merge variant a checkpoint's manifest records (plain for dense and Mixtral shapes)."""
    return MoEVariant.from_manifest(manifest.read(folder).get("moe"))


def read_args(folder: str | Path, metadata: Any = None) -> LlamaArgs:
    """The model hyper-parameters recorded in a checkpoint's manifest, checked against the
    checkpoint's own tensor index (`metadata`: its DCP metadata, read when not given) before
    anything builds a model of them (:func:`check_sizes`)."""
    from megatron_btx.checkpoint.bounds import check_model_fits
    from megatron_btx.checkpoint.dcp_stream import read_metadata

    args = _manifest_args(folder)
    metadata = metadata if metadata is not None else read_metadata(folder)
    variant = read_variant(folder)
    check_sizes(args, folder, metadata, variant)
    check_model_fits(args, variant, folder, metadata)
    return args


def check_sizes(
    args: LlamaArgs, folder: str | Path, metadata: Any, variant: MoEVariant | None = None
) -> None:
    """The sizes a manifest claims are those of the tensors the checkpoint holds: the
    embedding is padded vocabulary x hidden, and there is one attention weight of the heads'
    shapes per layer (stacked along a first axis of length layers, or one key per layer where
    layers differ). A manifest edited to claim 100,000 layers (or a vocabulary of billions)
    then fails here at once, instead of after minutes and gigabytes spent building a model of
    that size (even on the meta device)."""
    index = metadata.state_dict_metadata
    h, layers = args.hidden_size, args.num_hidden_layers
    found = {"embedding.word_embeddings.weight": _shape(index, "embedding.word_embeddings.weight")}
    want = {"embedding.word_embeddings.weight": (args.padded_vocab_size, h)}
    # the attention projections (attention experts stacked on an expert axis: its length is
    # the manifest's attention_experts)
    for name, shape in (variant or MoEVariant()).attention_weights(args):
        stacked = f"decoder.layers.self_attention.{name}.weight"
        if stacked in index:
            found[stacked], want[stacked] = _shape(index, stacked), (layers, *shape)
            continue
        per_layer = re.compile(
            rf"decoder\.layers\.(\d+)\.self_attention\.{re.escape(name)}\.weight"
        )
        shapes = {
            int(m.group(1)): _shape(index, key)
            for key in index
            if (m := per_layer.fullmatch(key)) is not None
        }
        key = f"decoder.layers.<i>.self_attention.{name}.weight"
        found[key] = (len(shapes), *next(iter(set(shapes.values())), ()))
        if len(set(shapes.values())) > 1 or sorted(shapes) != list(range(len(shapes))):
            found[key] = None  # layers missing or of different shapes
        want[key] = (layers, *shape)
    for key, shape in want.items():
        if found[key] != shape:
            raise BTXError(
                f"{folder}: {manifest.MANIFEST} implies {key} of shape {shape}, the checkpoint "
                f"holds {found[key] if found[key] is not None else 'none'}; the manifest does "
                f"not describe this checkpoint"
            )


def _shape(index: dict[str, Any], key: str) -> tuple[int, ...] | None:
    entry = index.get(key)
    return tuple(entry.size) if entry is not None and hasattr(entry, "size") else None


def _manifest_args(folder: str | Path) -> LlamaArgs:
    m = manifest.read(folder)
    model = m.get("model")
    if not isinstance(model, dict):
        raise BTXError(f"{folder}/{manifest.MANIFEST}: no 'model' entry; the manifest is corrupt")
    try:
        return LlamaArgs.from_dict(model)
    except (BTXError, ValueError, TypeError) as e:
        raise BTXError(f"{folder}/{manifest.MANIFEST}: invalid 'model' entry ({e})") from e
