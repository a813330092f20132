"""Compute accounting: the parameters a token passes through in a matrix multiply.

Training FLOPs are 6 x active parameters x tokens (forward 2, backward 4). The active parameters
of a model are those in a matrix multiply per token:

- attention: q, k, v and the output projection, in every layer; with attention experts (BAM,
  soft routing: every token passes through every expert) each expert's, plus the attention
  router (shared-KV experts: each expert's q and output projections, the shared k and v once);
- the feed-forward part, layer by layer: a dense layer's SwiGLU FFN; an MoE layer's router plus
  the experts a token is routed to (as many as the layer's router type says: top-k k; Switch and
  Sample Top-1 1; soft routing all of them; Sample Top-1 routes its first MoE layer softly, so
  all experts there) plus the shared expert when there is one;
- the output projection, whether or not it shares its weights with the input embedding (it is a
  matrix multiply either way).

Norm weights and the embedding lookup (a gather, not a multiply) are not counted.
"""

from __future__ import annotations

from typing import Any

from megatron_btx.models.llama import LlamaArgs, MoEVariant
from megatron_btx.models.router_settings import COMMON, type_name
from megatron_btx.models.router_types import get as router_type


def experts_per_token(
    args: LlamaArgs, router: dict[str, Any] | None = None, variant: MoEVariant | None = None
) -> list[int | None]:
    """Per layer: the routed experts a token passes through, or None for a dense layer."""
    variant = variant or MoEVariant()
    layers = args.num_hidden_layers
    if not args.is_moe:
        return [None] * layers
    kind = router_type(type_name(router or {}) or COMMON["type"])
    counts: list[int | None] = []
    moe_index = 0
    for layer in range(layers):
        if not variant.is_moe_layer(layer):
            counts.append(None)
            continue
        layer_kind = kind.for_layer(moe_index)
        counts.append(layer_kind.top_k(args.num_experts_per_tok, args.num_local_experts))
        moe_index += 1
    return counts


def active_params(
    args: LlamaArgs, router: dict[str, Any] | None = None, variant: MoEVariant | None = None
) -> int:
    """Parameters in a matrix multiply per token (see the module docstring)."""
    variant = variant or MoEVariant()
    hidden = args.hidden_size
    attention = attention_active_params(args, variant)
    dense_ffn = variant.dense_ffn_hidden_size or args.intermediate_size
    total = 0
    for routed in experts_per_token(args, router, variant):
        total += attention
        if routed is None:
            total += 3 * hidden * dense_ffn
            continue
        total += routed * 3 * hidden * args.intermediate_size + hidden * args.num_local_experts
        if variant.shared_expert_intermediate_size:
            total += 3 * hidden * variant.shared_expert_intermediate_size
    return total + args.vocab_size * hidden


def attention_active_params(args: LlamaArgs, variant: MoEVariant | None = None) -> int:
    """One layer's attention parameters a token passes through (see the module docstring)."""
    variant = variant or MoEVariant()
    hidden, dim = args.hidden_size, args.head_dim
    q = o = args.num_attention_heads * dim * hidden
    kv = 2 * args.num_key_value_heads * dim * hidden
    experts = variant.attention_experts
    if not experts:
        return q + kv + o
    router = hidden * experts
    if variant.attention_shared_kv:
        return experts * (q + o) + kv + router
    return experts * (q + kv + o) + router
