"""Sizes a training config asks for, bounded by the memory the run has, before anything is
built or allocated.

A config is free text: ``hidden_size: 1e9``, ``vocab_size: 1e12``, ``global_batch_size: 2e12``
or ``steps: 1e18`` used to fail minutes later with an allocator's traceback (or hang while
megatron-core built a sample index of 10^18 entries). Each is refused here, at once, with one
line: the count is worked from below (the weights every layer must have, the bytes per sample
megatron-core's index needs at least), so a run that could fit is never refused.

- weights: every parameter is held by at least one process, so the run needs at least
  ``parameters x bytes per parameter`` over all processes; it has the device memory of each
  (a GPU's, or for CPU processes the node's memory);
- one activation: a micro-batch's hidden states (micro batch x sequence x hidden) live in one
  process;
- the sample index: megatron-core builds the train split's sample index (at least 8 bytes a
  sample) and shuffle index (at least 4) in host memory.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_btx.errors import BTXError

GIB = 1024**3
#: bytes of megatron-core's index per training sample, at least (a pair of int32 sample
#: boundaries and a uint32 shuffle entry)
INDEX_BYTES_PER_SAMPLE = 12


def host_memory() -> int:
    """Bytes of memory of this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 1 << 62


def device_memory(on_gpu: bool) -> int:
    """Bytes of memory of one process's device: its GPU's, or the machine's for the CPU."""
    if on_gpu:
        import torch

        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        return int(torch.cuda.get_device_properties(index).total_memory)
    return host_memory()


def check_sizes(
    cfg: Any, args: Any, world_size: int, on_gpu: bool, itemsize: int, variant: Any = None
) -> None:
    """Refuse a config whose sizes cannot fit (see the module docstring): `args` the resolved
    LlamaArgs (and `variant` the MoE shape of the checkpoint it starts from), `itemsize` the
    bytes of one weight (2 for bf16, 4 for fp32)."""
    from megatron_btx.checkpoint.bounds import least_params

    world_size = max(1, world_size)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))))
    per_device = device_memory(on_gpu)
    # CPU processes of one node share its memory; each GPU has its own
    have = world_size * per_device if on_gpu else max(1, world_size // local) * per_device
    weights = least_params(args, variant) * itemsize
    if weights > have:
        raise BTXError(
            f"model: {args.num_hidden_layers} layers of hidden_size {args.hidden_size} "
            f"(intermediate_size {args.intermediate_size}, {args.num_local_experts} experts, "
            f"vocabulary {args.vocab_size}) need at least {weights / GIB:.3g} GiB for the weights "
            f"alone; the {world_size} process(es) of this run have {have / GIB:.3g} GiB"
        )
    d = cfg.data
    activation = d.micro_batch_size * d.seq_length * args.hidden_size * itemsize
    if activation > per_device:
        raise BTXError(
            f"data.micro_batch_size x data.seq_length x model.hidden_size = {d.micro_batch_size} "
            f"x {d.seq_length} x {args.hidden_size}: one micro-batch's hidden states need "
            f"{activation / GIB:.3g} GiB, a process has {per_device / GIB:.3g} GiB"
        )
    samples = max(cfg.train.steps, 1) * d.global_batch_size
    index = samples * INDEX_BYTES_PER_SAMPLE
    if index > host_memory():
        raise BTXError(
            f"train.steps x data.global_batch_size = {cfg.train.steps} x {d.global_batch_size} "
            f"= {samples} samples: megatron-core's sample index alone needs "
            f"{index / GIB:.3g} GiB of host memory, this machine has {host_memory() / GIB:.3g} GiB"
        )
