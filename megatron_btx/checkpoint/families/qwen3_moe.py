"""HF Qwen3-MoE: QK-norm, a router, experts and dense layers as Qwen2-MoE, no shared expert."""

from __future__ import annotations

from megatron_btx.checkpoint.families.base import register
from megatron_btx.checkpoint.families.moe import MoEAdapter, MoEFamily
from megatron_btx.checkpoint.families.qwen2_moe import qwen_moe_config_fields, qwen_moe_fields


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    HF_QK_NORM = True


@register
class Qwen3Moe(MoEFamily):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    adapter = Qwen3MoeAdapter
    attention = "qwen3"
    export_rank = 1

    def moe_fields(self, cfg, fields, source):
        return qwen_moe_fields(cfg, fields, source, shared_slot=False)

    def why_not(self, args, variant, routing):
        if args.model_type != "qwen3":
            return "Qwen3-MoE has QK-norm attention; this model has none"
        if variant.shared_expert_intermediate_size:
            return (
                "a shared expert has no HF form with Qwen3 attention: Qwen3-MoE has no shared "
                "expert and Qwen2-MoE no QK-norm; merge without --seed-as-shared-expert to export"
            )
        return None

    def config_fields(self, args, variant, routing):
        return {**qwen_moe_config_fields(args, variant, routing), "attention_bias": False}
