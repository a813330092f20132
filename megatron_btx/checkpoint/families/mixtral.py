"""HF Mixtral: every layer's FFN is `num_local_experts` SwiGLU experts (w1 = gate, w3 = up,
w2 = down) and a router (`block_sparse_moe.gate`; transformers 5 renames `block_sparse_moe` to
`mlp` in its fused layout); Mistral's attention; top-k always renormalised."""

from __future__ import annotations

from megatron_btx.checkpoint.families.base import register
from megatron_btx.checkpoint.families.moe import MoEAdapter, MoEFamily, moe_config_fields
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import MoEVariant


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    ROUTER_NAME = "block_sparse_moe.gate.weight"
    EXPERT_PREFIX = "block_sparse_moe.experts."
    EXPERT_NAMES = ("w1", "w3", "w2")


@register
class Mixtral(MoEFamily):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    adapter = MixtralAdapter
    attention = "mistral"
    export_rank = 0  # the form every runtime reads: tried first

    def moe_fields(self, cfg, fields, source):
        # transformers 5 maps num_experts <-> num_local_experts and saves either
        experts = cfg.get("num_local_experts", cfg.get("num_experts"))
        fields.update(
            num_local_experts=8 if experts is None else experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            intermediate_size=cfg.get("intermediate_size"),
            norm_topk_prob=True,
        )
        return MoEVariant()

    def why_not(self, args, variant, routing):
        if args.model_type not in ("llama", "mistral"):
            return f"Mixtral has Llama's attention, this model {args.model_type}'s"
        if not variant.is_plain:
            return "Mixtral has no shared expert and no dense layers"
        if not routing.norm_topk_prob:
            return "Mixtral always renormalises its top-k; this model does not"
        return None

    def config_fields(self, args, variant, routing):
        if not routing.norm_topk_prob:
            raise BTXError("Mixtral always renormalises its top-k; this model does not")
        return {
            **moe_config_fields(args, routing),
            "num_local_experts": args.num_local_experts,
            "sliding_window": args.sliding_window,
        }
