"""The attention of a merge, on tensors only: averaged (BTX), or kept as attention experts (BAM,
models.attention_experts).

``average`` (BTX, the default): every source's attention is averaged like the norms.
``experts``: in every layer, source i's attention block (q/k/v and output projections, with
its q/k/v biases and QK-norm when the family has them) becomes attention expert i unchanged;
the sources are the experts in order, then the seed, so there are N (+ seed) attention experts.
``experts_shared_kv``: the key/value rows of the sources' fused QKV projection (and the key
norm) are averaged into one shared key/value projection; each source keeps its query rows, its
query norm and its output projection.

The input and pre-MLP norms are averaged in every case; each layer gets a new attention router,
made by the merge's router init (merge.router_inits: random or zero as the FFN routers, from a
random stream of their own, or the domain centroids).
"""

from __future__ import annotations

import torch

from megatron_btx.checkpoint.mapping import (
    K_NORM,
    LN1,
    LN2,
    PROJ,
    Q_NORM,
    QKV,
    QKV_BIAS,
    attention_and_norms,
)
from megatron_btx.models.llama import LlamaArgs

#: the merged layer's attention router, by short megatron name
ATTENTION_ROUTER = "self_attention.router.weight"
#: shared-KV: the shared key/value projection (rows per key-value head: its key, then its value)
LINEAR_KV = "self_attention.linear_kv.weight"
LINEAR_KV_BIAS = "self_attention.linear_kv.bias"
#: shared-KV: a source's query rows of its fused QKV (its expert's query projection)
LINEAR_Q = "self_attention.linear_q.weight"
LINEAR_Q_BIAS = "self_attention.linear_q.bias"
#: a source's own attention tensors, per kind of expert
_OWN = {
    "experts": (QKV, QKV_BIAS, Q_NORM, K_NORM, PROJ),
    "experts_shared_kv": (Q_NORM, PROJ),
}


def expert_name(expert: int, name: str) -> str:
    """A source's attention tensor `name` (``self_attention.X``) as attention expert `expert`'s
    (``self_attention.experts.E.X``)."""
    return f"self_attention.experts.{expert}.{name[len('self_attention.') :]}"


def split_qkv(t: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's fused QKV weight (or bias), rows grouped per key-value head (its query heads,
    its key, its value), -> (query rows [heads * d, ...] in head order, key/value rows
    [groups * 2d, ...] per head: its key, then its value)."""
    groups, dim = args.num_key_value_heads, args.head_dim
    per_group = args.num_attention_heads // groups
    grouped = t.reshape(groups, (per_group + 2) * dim, *t.shape[1:])
    q, kv = torch.split(grouped, [per_group * dim, 2 * dim], dim=1)
    return q.reshape(-1, *t.shape[1:]), kv.reshape(-1, *t.shape[1:])


def averaged_names(attention: str, args: LlamaArgs) -> tuple[str, ...]:
    """The merged layer's averaged tensors outside the FFN (fp32 accumulators, cast on write)."""
    if attention == "average":
        return attention_and_norms(args)
    if attention == "experts":
        return (LN1, LN2)
    shared = (LINEAR_KV,) + ((LINEAR_KV_BIAS,) if args.qkv_bias else ())
    return (LN1, LN2) + shared + ((K_NORM,) if args.qk_norm else ())


def source_parts(
    attention: str, tensors: dict[str, torch.Tensor], args: LlamaArgs | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One source's layer tensors outside the FFN split into (averaged, its own): by merged
    name, the tensors every source adds to the average; by the source's name, those its
    attention expert keeps."""
    names = [name for name in tensors if not name.startswith("mlp.")]
    if attention == "average":
        return {name: tensors[name] for name in names}, {}
    own_names = _OWN[attention]
    averaged = {name: tensors[name] for name in names if name not in own_names}
    own = {name: tensors[name] for name in names if name in own_names}
    if attention == "experts_shared_kv":
        if args is None:
            raise ValueError("experts_shared_kv needs the sources' LlamaArgs")
        for name, query, shared in (
            (QKV, LINEAR_Q, LINEAR_KV),
            (QKV_BIAS, LINEAR_Q_BIAS, LINEAR_KV_BIAS),
        ):
            if name in averaged:
                own[query], averaged[shared] = split_qkv(averaged.pop(name), args)
    return averaged, own


def expert_tensors(
    sources: list[int], own: dict[int, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every attention expert's tensors by merged name: expert e is source ``sources[e]``'s."""
    merged = {}
    for expert, source in enumerate(sources):
        for name, tensor in own[source].items():
            merged[expert_name(expert, name)] = tensor
    return merged
