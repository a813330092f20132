"""Two parallel layouts where megatron-core's defaults give wrong numbers, and what we set instead.

Interleaved pipeline at PP=2 (``p2p_overrides``). The interleaved schedule's steady state sends
an activation forward and a gradient backward in one exchange
(``send_forward_backward_recv_forward_backward``). With ``batch_p2p_comm`` (megatron-core's
default) ``p2p_communication._batched_p2p_ops`` posts the operations as send_prev, recv_prev,
send_next, recv_next with no tag. At PP=2 the previous and the next stage are the same rank, and
point-to-point messages between two ranks pair in posting order (gloo and NCCL alike), so this
rank's gradient lands in the peer's activation buffer and its activation in the gradient
buffer: same shapes, no error, wrong numbers (Megatron-LM issues 750 and 1450). The unbatched
``_p2p_ops`` orders the operations by the parity of the rank and uses a different process group
for each direction at PP=2, so every message reaches the buffer meant for it. Megatron-LM's own
trainer never meets this: it turns ``overlap_p2p_comm`` on, and with it ``batch_p2p_comm`` off,
whenever VPP is set.

Expert data parallel at EP=1 (``route_expert_grads``). megatron-core marks an expert weight as
expert-parallel (``allreduce = False``, which sends its gradient to the DDP buffers reduced over
the expert-data-parallel group and to the optimizer with the expert groups) only when
``expert_model_parallel_size > 1`` (``tensor_parallel.layers`` and ``moe.experts``). At EP=1 the
experts are treated as dense weights, reduced over the dense data-parallel group. That is the
same group only while expert-TP equals TP. With expert-TP < TP (whole experts beside a split
attention) each TP rank holds a full replica of every expert and computes its gradient from its
own sequence-parallel share of the tokens; the replicas form the expert-data-parallel group and
their gradients must be summed over it, which the dense reduction (over a group without them)
never does: each replica steps with a partial gradient and the replicas drift apart. With
expert-TP > TP the dense group would even sum different shards of an expert. megatron-core 0.17
and later mark the experts themselves whenever expert-TP differs from TP (``use_expert_pgs`` in
``tensor_parallel.layers``); ``route_expert_grads`` marks only the weights still unmarked, so it
changes nothing there (the mark is a flag, so marking twice could not double-count either).
"""

from __future__ import annotations

from typing import Any

import torch


def p2p_overrides(pp: int, vpp: int | None) -> dict[str, Any]:
    """TransformerConfig fields for the pipeline's point-to-point exchange: unbatched
    operations for the interleaved schedule at PP=2 (see the module docstring)."""
    if vpp and pp == 2:
        return {"batch_p2p_comm": False}
    return {}


def expert_grads_need_expert_dp(ep: int, etp: int, tp: int) -> bool:
    """Whether megatron-core, left alone, would reduce the expert gradients over the wrong group:
    at EP=1 it treats the experts as dense weights, right only while expert-TP equals TP."""
    return ep == 1 and etp != tp


def route_expert_grads(chunks: list[torch.nn.Module], ep: int, etp: int, tp: int) -> int:
    """Mark every expert weight of `chunks` expert-parallel (``allreduce = False``), as
    megatron-core itself does at EP > 1, where the layout needs it; call before wrapping the
    chunks in DDP and building the optimizer. Returns how many weights this marked: 0 where
    megatron-core had marked them all already (0.17 and later)."""
    if not expert_grads_need_expert_dp(ep, etp, tp):
        return 0
    from megatron.core.transformer.moe.moe_layer import MoELayer

    marked = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    if getattr(param, "allreduce", True):
                        param.allreduce = False
                        marked += 1
    return marked
