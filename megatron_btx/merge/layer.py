"""The per-layer math of the merge, on tensors only: averages, experts, routers.

In every layer source i's SwiGLU FFN becomes MoE expert i unchanged (or C chunks of it, or
blended chunks); every other tensor is the fp32 (optionally weighted) average of the sources'
copies, except the attention a BAM merge keeps as attention experts (merge.attention); a new
router per layer. No reading or writing happens here: sources arrive through a
callback one at a time, so a layer's memory holds one source's layer plus the accumulators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from megatron_btx.checkpoint.mapping import (
    ATTENTION_AND_NORMS,
    FC1,
    FC2,
    SHARED_FC1,
    SHARED_FC2,
    expert_fc1,
    expert_fc2,
)
from megatron_btx.merge import attention
from megatron_btx.merge.plan import MergePlan
from megatron_btx.merge.upcycling import transform_expert
from megatron_btx.models.llama import LlamaArgs

if TYPE_CHECKING:
    from megatron_btx.checkpoint.sources import BufferPool

FFN = tuple[torch.Tensor, torch.Tensor]  # (fc1 = [gate; up], fc2 = down)


def chunk_ffn(fc1: torch.Tensor, fc2: torch.Tensor, chunk: int, chunks: int) -> FFN:
    """Chunk `chunk` of `chunks` of a SwiGLU FFN along its hidden dimension."""
    ffn = fc2.shape[1]
    size = ffn // chunks
    rows = slice(chunk * size, (chunk + 1) * size)
    gate, up = fc1[:ffn], fc1[ffn:]
    return torch.cat([gate[rows], up[rows]]), fc2[:, rows].contiguous()


def expert_tensors(plan: MergePlan, ffns: dict[int, FFN]) -> list[FFN]:
    """(fc1, fc2) of each routed expert, from the sources' FFNs."""
    chunks = plan.split_chunks
    if plan.blend:
        experts = []
        for chunk in range(chunks):
            parts = [chunk_ffn(*ffns[s], chunk, chunks) for s in plan.expert_sources]
            size = parts[0][1].shape[1]
            gate = torch.cat([fc1[:size] for fc1, _ in parts])
            up = torch.cat([fc1[size:] for fc1, _ in parts])
            experts.append((torch.cat([gate, up]), torch.cat([fc2 for _, fc2 in parts], dim=1)))
        return experts
    if chunks == 1:
        return [ffns[s] for s in plan.expert_sources]
    return [chunk_ffn(*ffns[s], c, chunks) for s in plan.expert_sources for c in range(chunks)]


def accumulate(
    acc: torch.Tensor | None,
    t: torch.Tensor,
    weight: float,
    pool: BufferPool | None = None,
    name: str = "",
) -> torch.Tensor:
    """acc + weight * fp32(t), in place; a new accumulator (from `pool` when given) when acc is
    None. Same bits as `acc += t.float() * weight` (bf16/fp16 -> fp32 is exact)."""
    if acc is None:
        if pool is None:
            x = t.to(torch.float32)
            x = x.clone() if x is t else x
        else:
            x = pool.get("acc." + name, t.shape, torch.float32).copy_(t)
        return x.mul_(weight) if weight != 1.0 else x
    if pool is None or t.dtype == torch.float32:
        x = t.to(torch.float32)
    else:
        x = pool.get("cast." + name, t.shape, torch.float32).copy_(t)
    if weight == 1.0:
        return acc.add_(x)
    return acc.add_(x * weight if x is t else x.mul_(weight))


class Averager:
    """Weighted fp32 average of the same tensors across sources, accumulated one at a time."""

    def __init__(self, weights: Sequence[float], pool: BufferPool | None = None):
        self.weights = list(weights)
        self.total = float(sum(weights))
        self.acc: dict[str, torch.Tensor] = {}
        self.pool = pool

    def add(self, source: int, name: str, t: torch.Tensor) -> None:
        weight = self.weights[source]
        if weight:
            self.acc[name] = accumulate(self.acc.get(name), t, weight, self.pool, name)

    def result(self, name: str) -> torch.Tensor:
        acc = self.acc.pop(name)
        return acc.div_(self.total) if self.total != 1.0 else acc


def merge_layer(
    plan: MergePlan,
    read_source_layer: Callable[[int], dict[str, torch.Tensor]],
    layer: int,
    sources: Sequence[int],
    pool: BufferPool | None = None,
    args: LlamaArgs | None = None,
) -> dict[str, torch.Tensor]:
    """Layer `layer` of the merged model by short megatron name (fp32 averages, experts in the
    sources' dtype; the routers are not included). `read_source_layer(s)` reads source s's
    layer. With `pool`, the averages live in its buffers (valid until the next layer's merge).
    `args` (the sources' LlamaArgs) is needed to split the QKV rows for shared-KV attention."""
    avg = Averager(plan.weights, pool)
    ffns: dict[int, FFN] = {}
    own_attention: dict[int, dict[str, torch.Tensor]] = {}
    moe = plan.is_moe_layer(layer)
    averaged_ffn = not moe and plan.dense_ffn == "average"
    seed = plan.n_sources - 1
    keep_ffn = set(plan.expert_sources) | ({plan.shared_source} - {None}) if moe else set()
    if not moe and plan.dense_ffn == "seed":
        keep_ffn = {seed}
    averaged_names = list(ATTENTION_AND_NORMS)
    for source in sources:
        tensors = read_source_layer(source)
        # every tensor outside the FFN, with the family's extras (q/k/v biases, QK-norm): each
        # averaged, or kept by the source's attention expert
        averaged, own = attention.source_parts(plan.attention, tensors, args)
        averaged_names = list(averaged)
        if averaged_ffn:
            averaged.update({FC1: tensors[FC1], FC2: tensors[FC2]})
        for name, tensor in averaged.items():
            avg.add(source, name, tensor)
        if source in plan.attention_sources:
            own_attention[source] = own
        if source in keep_ffn:
            ffns[source] = (tensors[FC1], tensors[FC2])
        del tensors, averaged, own
    merged = {name: avg.result(name) for name in averaged_names}
    merged.update(attention.expert_tensors(plan.attention_sources, own_attention))
    if not moe:
        if averaged_ffn:
            merged[FC1], merged[FC2] = avg.result(FC1), avg.result(FC2)
        else:
            merged[FC1], merged[FC2] = ffns[seed]
        return merged
    for expert, (fc1, fc2) in enumerate(expert_tensors(plan, ffns)):
        # Drop-Upcycling and granular upcycling's scale, when the plan asks
        fc1, fc2 = transform_expert(plan, layer, expert, fc1, fc2)
        merged[expert_fc1(expert)] = fc1
        merged[expert_fc2(expert)] = fc2
    if plan.shared_source is not None:
        merged[SHARED_FC1], merged[SHARED_FC2] = ffns[plan.shared_source]
    return merged
