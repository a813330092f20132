"""Active parameters (the compute accounting): hand counts, and counts of the weights a token
actually passes through in a megatron-core model built for the same shape."""

from __future__ import annotations

import pytest

from megatron_btx.models.compute import active_params
from megatron_btx.models.llama import LlamaArgs, MoEVariant

# The small run's model: hidden 64, FFN 256, 4 layers, vocabulary 2048, 4 heads (no GQA), and
# its MoE of 5 experts (4 domains + the seed).
SMALL = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=2048,
)
# Hand count, per layer: attention q, k, v, o = 4 x 64 x 64 = 16,384; one SwiGLU FFN
# 3 x 64 x 256 = 49,152; the router 64 x 5 = 320. Output projection 2048 x 64 = 131,072.
ATTN, FFN, ROUTER, OUTPUT = 16_384, 49_152, 320, 131_072


def moe(**kw) -> LlamaArgs:
    return LlamaArgs(**{**SMALL, "num_local_experts": 5, "num_experts_per_tok": 2, **kw})


def test_hand_counts_of_the_small_run():
    dense = LlamaArgs(**SMALL)
    assert active_params(dense) == 4 * (ATTN + FFN) + OUTPUT == 393_216
    # tied embeddings: the output projection is still a matrix multiply
    tied = LlamaArgs(**SMALL, tie_word_embeddings=True)
    assert active_params(tied) == 393_216
    assert active_params(moe(), {"type": "topk"}) == 4 * (ATTN + 2 * FFN + ROUTER) + OUTPUT
    assert active_params(moe(), {"type": "topk"}) == 591_104
    assert active_params(moe(), {"type": "switch"}) == 394_496
    assert active_params(moe(), {"type": "soft"}) == 1_180_928
    # Sample Top-1: one expert per token, except its soft first layer (all five)
    first_soft = (ATTN + 5 * FFN + ROUTER) + 3 * (ATTN + FFN + ROUTER) + OUTPUT
    assert active_params(moe(), {"type": "sample_top1"}) == first_soft == 591_104


def test_variants_and_gqa_by_hand():
    # seed as shared expert: 4 routed experts (top-2) + an always-active FFN of the seed's size
    shared = MoEVariant(shared_expert_intermediate_size=256)
    args = moe(num_local_experts=4)
    router4 = 64 * 4
    assert active_params(args, {"type": "topk"}, shared) == 4 * (ATTN + 3 * FFN + router4) + OUTPUT
    # MoE in layers 1 and 3 only; the others dense with the seed's FFN
    partial = MoEVariant(layer_freq=(0, 1, 0, 1), dense_ffn_hidden_size=256)
    want = 2 * (ATTN + FFN) + 2 * (ATTN + 2 * FFN + ROUTER) + OUTPUT
    assert active_params(moe(), {"type": "topk"}, partial) == want
    # Sample Top-1's soft layer is the first MoE layer, not layer 0
    want = 2 * (ATTN + FFN) + (ATTN + 5 * FFN + ROUTER) + (ATTN + FFN + ROUTER) + OUTPUT
    assert active_params(moe(), {"type": "sample_top1"}, partial) == want
    # GQA: 8 query heads of 8, 2 key-value heads: q 64x64, k and v 16x64 each, o 64x64
    gqa = LlamaArgs(**{**SMALL, "num_attention_heads": 8, "num_key_value_heads": 2})
    assert active_params(gqa) == 4 * (64 * 64 + 2 * 16 * 64 + 64 * 64 + FFN) + OUTPUT


def _counted_from_modules(args: LlamaArgs, router: str, variant: MoEVariant | None) -> int:
    """The same count from a megatron-core model of that shape: the weights of every Linear a
    token passes through (attention; the dense MLP, or the router + k experts + shared expert),
    and the output layer (or the embedding table it shares)."""
    from megatron_btx import runtime
    from megatron_btx.models.llama import build_for_checkpoint

    with runtime.single_process():
        model = build_for_checkpoint(args, "fp32", variant, meta=True)
    total = 0
    first_moe = True
    for layer in model.decoder.layers:
        attention = layer.self_attention
        total += attention.linear_qkv.weight.numel() + attention.linear_proj.weight.numel()
        mlp = layer.mlp
        if not hasattr(mlp, "router"):
            total += mlp.linear_fc1.weight.numel() + mlp.linear_fc2.weight.numel()
            continue
        experts = list(mlp.experts.local_experts)
        one = experts[0].linear_fc1.weight.numel() + experts[0].linear_fc2.weight.numel()
        k = {"topk": args.num_experts_per_tok, "switch": 1, "soft": len(experts)}.get(router, 1)
        if router == "sample_top1" and first_moe:
            k = len(experts)
        first_moe = False
        total += mlp.router.weight.numel() + k * one
        if mlp.shared_experts is not None:
            shared = mlp.shared_experts
            total += shared.linear_fc1.weight.numel() + shared.linear_fc2.weight.numel()
    output = model.shared_embedding_or_output_weight()
    return total + args.vocab_size * output.shape[1]


@pytest.mark.parametrize(
    "router,variant",
    [
        ("topk", None),
        ("switch", None),
        ("soft", None),
        ("sample_top1", None),
        ("topk", MoEVariant(shared_expert_intermediate_size=256)),
        ("sample_top1", MoEVariant(layer_freq=(0, 1, 1, 0), dense_ffn_hidden_size=256)),
    ],
)
def test_counts_equal_the_model_weights_a_token_uses(router, variant):
    args = moe(num_key_value_heads=2, tie_word_embeddings=router == "soft")
    assert active_params(args, {"type": router}, variant) == _counted_from_modules(
        args, router, variant
    )
