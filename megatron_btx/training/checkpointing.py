"""Training checkpoints: model, optimizer, scheduler, data position, RNG states and step.

Layout of a run directory::

    RUN/checkpoints/iter_0000500/   megatron-core torch_dist files + btx_manifest.json +
                                    tokenizer/ + hf_config.json + config.yaml
    RUN/checkpoints/latest          text file: "iter_0000500"

A checkpoint is written under ``.iter_NNNNNNN.tmp`` and renamed into place when every rank has
finished (:func:`megatron_btx.checkpoint.megatron_io.atomic_folder`); ``latest`` is replaced
atomically only after that, and old checkpoints are pruned last. A kill at any moment therefore
leaves ``latest`` naming a complete checkpoint. On start, stale ``.tmp`` folders are removed.

What is saved (one ``dist_checkpointing.save``):

- ``model``: the sharded model state (layout-free: loads at any TP/PP/EP);
- ``optimizer``: megatron's ``optimizer.sharded_state_dict`` (regular optimizer: per-parameter
  sharded tensors; distributed optimizer: the ``fully_reshardable`` format);
- ``rng_state``: one ShardedObject per global rank (python, numpy, torch, CUDA and megatron's
  tensor-parallel RNG tracker), restored only when the layout is unchanged;
- ``train_state`` (common): step, consumed samples, scheduler state, layout.

The manifest (``btx_manifest.json``) records the model args, dtype and layout, so later stages
(merge, evaluation) read a training checkpoint exactly like a converted one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_btx.checkpoint import integrity, manifest
from megatron_btx.checkpoint.megatron_io import (
    atomic_folder,
    check_model_keys,
    sharded_state_dict,
    unwrap,
)
from megatron_btx.errors import BTXError
from megatron_btx.rundir import checkpoint_path, prune, write_latest

log = logging.getLogger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# RNG state (all plain tensors/ints, so megatron's weights_only loads accept it)
# ---------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python_version": py[0],
        "python_state": list(py[1]),
        "python_gauss": py[2],
        "numpy_key": np_state[0],
        "numpy_state": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate((state["python_version"], tuple(state["python_state"]), state["python_gauss"]))
    np.random.set_state(
        (
            state["numpy_key"],
            state["numpy_state"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict[str, Any] | None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ShardedObject("rng_state", state, (world,), (_rank(),), replica_id=0)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------
def prime_optimizer_state(optimizer: Any) -> None:
    """Give every parameter of a distributed optimizer an Adam state with a step count.

    megatron-core 0.16's DistributedOptimizer.state_dict(), without Apex or Transformer Engine
    (torch's AdamW: every CPU run), reads the step from the per-parameter state and asserts
    there is exactly one value; before the first step (a checkpoint at step 0, or building the
    state dict to load into) there is none. Zero moments with step 0 are what AdamW starts
    from anyway, so this changes nothing but lets the state dict be built."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer is None:
            continue
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                param_state = inner.state[p]
                if "step" not in param_state:
                    param_state["exp_avg"] = torch.zeros_like(p.data)
                    param_state["exp_avg_sq"] = torch.zeros_like(p.data)
                    param_state["step"] = torch.tensor(0.0, dtype=torch.float32)


def _tolerate_missing_step(optimizer: Any) -> None:
    """Let megatron-core 0.16's fully-reshardable distributed-optimizer load work with torch's
    AdamW (no Apex/TE: every CPU run).

    Its ``load_state_dict`` first gives every parameter's AdamW state a ``step`` (from the
    param groups), then copies *every* key of that state from the checkpoint's per-parameter
    tensors, which hold only param/exp_avg/exp_avg_sq: a KeyError on ``step``. The step is
    already right, so the copy of a missing key is made a copy onto itself (instance-level,
    only on the optimizers loaded here)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(
            opt, DistributedOptimizer
        ) or "_set_main_param_and_optimizer_states" in vars(opt):
            continue
        orig = opt._set_main_param_and_optimizer_states

        def patched(model_param, tensors, _opt=opt, _orig=orig):
            gi, go = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[gi]["params"][go]
            state = _opt.optimizer.state.get(main_param, {})
            extra = {k: v for k, v in state.items() if k not in tensors}
            return _orig(model_param, {**tensors, **extra} if extra else tensors)

        opt._set_main_param_and_optimizer_states = patched


def _unshare_steps(optimizer: Any) -> None:
    """Give every parameter its own AdamW ``step`` tensor after a distributed-optimizer load.

    megatron-core 0.16's DistributedOptimizer.load_state_dict (without Apex/TE) stores *one*
    step tensor object in every parameter's state, and torch's AdamW increments each
    parameter's step in place: the shared counter then advances once per parameter per
    iteration and the bias correction of every later step is wrong (the loss after a resume
    drifts from the uninterrupted run's by ~1e-3 within two steps)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer is None:
            continue
        for st in opt.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


OPTIM_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


def save(
    *,
    run_dir: Path,
    step: int,
    model: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    train_state: dict[str, Any],
    record: manifest.Manifest,
    tokenizer: str | None,
    files: dict[str, str],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune old ones. All ranks.
    `record`: its manifest (step, consumed samples and file hashes are filled in here);
    `files`: more small files written beside it (name -> text)."""
    from megatron_btx.checkpoint.megatron_io import save_model

    folder = checkpoint_path(run_dir, step)
    with atomic_folder(folder, overwrite=True) as tmp:
        model_sd = sharded_state_dict(model)
        prime_optimizer_state(optimizer)
        extra = {
            "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIM_METADATA),
            "rng_state": _rng_sharded_object(get_rng_state()),
            "train_state": {**train_state, "scheduler": scheduler.state_dict()},
        }
        # save_model builds the same model sharded state dict again (same keys) and writes
        # everything in one synchronous dist_checkpointing.save.
        save_model(model, tmp, extra_state=extra)
        hashes = integrity.gather_rank_hashes(tmp)  # each rank hashes its own data files
        if _rank() == 0:
            if tokenizer:  # a tokenizer.model, or an HF folder's tokenizer.json + configs
                from megatron_btx.data.tokenizer import copy_tokenizer_files

                copy_tokenizer_files(tokenizer, tmp / "tokenizer")
            for name, text in files.items():
                (tmp / name).write_text(text)
            record = dataclasses.replace(
                record,
                step=step,
                consumed_samples=train_state["consumed_samples"],
                files=integrity.hash_tree(tmp, known=hashes),
            )
            manifest.write(tmp, record)
    if _rank() == 0:
        write_latest(run_dir, folder.name)
        prune(run_dir, keep_last)
    _barrier()
    return folder


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------
def layout_of(m: dict[str, Any]) -> dict[str, Any]:
    return dict(m.get("layout") or {})


def load(
    folder: Path,
    model: list[torch.nn.Module],
    optimizer: Any | None,
    current_layout: dict[str, Any],
    load_rng: bool = True,
) -> dict[str, Any]:
    """Load a training checkpoint into `model` (and `optimizer`); return its train_state
    (empty for a checkpoint without one, e.g. a converted model) plus ``optimizer_loaded``.

    The optimizer state is loaded when the layout (TP, PP, EP, expert-TP, VPP, DP, distributed
    optimizer) is unchanged, or when it changed but megatron-core can reshard it (model-layout
    changes with the regular optimizer, and the distributed optimizer's fully reshardable
    format); a change it cannot follow drops the optimizer state with a warning. RNG states are
    per rank and restored only at an unchanged layout."""
    from megatron_btx.checkpoint import safe_dcp

    m = manifest.read(folder)
    saved = layout_of(m)
    same = saved == current_layout
    state = sharded_state_dict(model)
    check_model_keys(folder, state)
    has_train_state = bool(m.get("training"))
    load_optimizer = optimizer is not None and has_train_state
    if load_optimizer and not same:
        reason = _optimizer_layout_problem(saved, current_layout)
        if reason:
            _warn_rank0(
                f"{folder}: optimizer state dropped: {reason}; the model weights, scheduler, "
                f"step and data position are restored, Adam moments restart from zero"
            )
            load_optimizer = False
        else:
            _warn_rank0(
                f"{folder}: saved at layout {saved}, now {current_layout}; resharding model and "
                f"optimizer state"
            )
    if load_optimizer:
        prime_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=True, metadata=OPTIM_METADATA
        )
    rng = load_rng and has_train_state and same
    if rng:
        state["rng_state"] = _rng_sharded_object(None)
    if has_train_state and not same and load_rng:
        _warn_rank0(f"{folder}: layout changed, RNG states are re-seeded rather than restored")
    loaded = safe_dcp.load(state, folder)
    models = model
    for i, mod in enumerate(models):
        key = "model" if len(models) == 1 else f"model{i}"
        missing, _ = unwrap(mod).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise BTXError(f"{folder}: checkpoint lacks {missing[0]!r} ({len(missing)} missing)")
    if load_optimizer:
        _tolerate_missing_step(optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_steps(optimizer)
    if rng:
        set_rng_state(loaded["rng_state"])
    state = dict(loaded.get("train_state") or {}) if has_train_state else {}
    state["optimizer_loaded"] = load_optimizer
    return state


def _optimizer_layout_problem(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why megatron-core cannot carry optimizer state from layout `saved` to `now`, or None."""
    if not saved:
        return "the checkpoint records no layout"
    if saved.get("distributed_optimizer") != now.get("distributed_optimizer"):
        return (
            "the checkpoint was written with distributed_optimizer="
            f"{saved.get('distributed_optimizer')} and this run uses "
            f"{now.get('distributed_optimizer')}"
        )
    if (saved.get("ep", 1) > 1) != (now.get("ep", 1) > 1) and saved.get("moe"):
        # megatron-core keeps expert parameters in a separate optimizer only when EP > 1
        # (at EP = 1 they are ordinary data-parallel parameters), so the optimizer's
        # structure, and with it the state dict's, differs between EP = 1 and EP > 1.
        return (
            f"expert parallelism changed from EP={saved.get('ep')} to EP={now.get('ep')}, "
            f"which regroups the expert parameters in megatron's optimizer"
        )
    return None


def _warn_rank0(msg: str) -> None:
    if _rank() == 0:
        log.warning(msg)


def verified(folder: str | Path, load, enabled: bool, rank: int, device: Any):
    """`load()` of the checkpoint `folder` while its files are re-hashed against its manifest
    on a second thread, each process of the job hashing its share of them
    (:class:`~megatron_btx.checkpoint.integrity.BackgroundCheck`); a changed file fails the
    job on every rank before it trains. Not `enabled` (train.verify_hashes: false,
    --no-verify-hashes): the load alone."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    check = integrity.BackgroundCheck(
        folder, enabled, (rank, world), "--no-verify-hashes (train.verify_hashes: false)"
    )
    error: BaseException | None = None
    result = None
    try:
        result = load()
        check.result()
    except BTXError as e:
        error = e
    finally:
        check.close()
    failed = torch.tensor([1 if error is not None else 0], device=device)
    if world > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()):
        raise BTXError(f"{folder}: another process found it changed (see rank 0's error)")
    return result
