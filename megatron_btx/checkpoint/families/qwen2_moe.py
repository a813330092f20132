"""HF Qwen2-MoE: q/k/v biases, a router (`mlp.gate`), experts of `moe_intermediate_size`, a gated
shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`) and dense layers
(`mlp_only_layers`) of `intermediate_size`; top-k renormalised or not (`norm_topk_prob`). The
most general MoE family here: whatever Mixtral cannot write with Llama, Mistral or Qwen2
attention is written as Qwen2-MoE."""

from __future__ import annotations

from typing import Any

from megatron_btx.checkpoint.families.base import register
from megatron_btx.checkpoint.families.moe import MoEAdapter, MoEFamily, moe_config_fields
from megatron_btx.checkpoint.families.qwen2 import no_window_fields
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import MoEVariant

#: HF defaults of the keys a saved config.json may lack (transformers 5.24 values)
QWEN_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    HF_QKV_BIAS = True
    HAS_SHARED_EXPERT = True


def qwen_moe_fields(
    cfg: dict[str, Any], fields: dict[str, Any], source: str, shared_slot: bool
) -> MoEVariant:
    """Qwen-MoE's shape: which layers are MoE (``mlp_only_layers``, ``decoder_sparse_step``),
    the experts' size apart from the dense FFN's, the top-k's renormalisation, and (Qwen2-MoE)
    the gated shared expert."""
    arch = cfg.get("model_type")
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    get = {**QWEN_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}.get
    layers = int(cfg["num_hidden_layers"])
    experts = int(experts or 0)
    step = int(get("decoder_sparse_step"))
    dense_only = {int(x) for x in get("mlp_only_layers")}
    freq = tuple(
        int(i not in dense_only and experts > 0 and (i + 1) % step == 0) for i in range(layers)
    )
    if not any(freq):
        raise BTXError(
            f"{source}: no layer is MoE (num_experts, mlp_only_layers, decoder_sparse_step); "
            f"a model without MoE layers is not a {arch}"
        )
    top_k, norm = int(get("num_experts_per_tok", 2)), bool(get("norm_topk_prob"))
    if top_k == 1 and norm:
        raise BTXError(
            f"{source}: num_experts_per_tok 1 with norm_topk_prob true weighs every token's "
            f"expert by exactly 1; megatron-core has no such router (set norm_topk_prob false)"
        )
    fields.update(
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        intermediate_size=get("moe_intermediate_size"),
        norm_topk_prob=norm,
    )
    shared = int(get("shared_expert_intermediate_size", 0) or 0) if shared_slot else 0
    partial = not all(freq)
    return MoEVariant(
        shared_expert_intermediate_size=shared or None,
        layer_freq=freq if partial else None,
        dense_ffn_hidden_size=int(get("intermediate_size")) if partial else None,
        shared_expert_gate=bool(shared),
    )


def qwen_moe_config_fields(args, variant, routing) -> dict[str, Any]:
    dense_layers = [i for i in range(args.num_hidden_layers) if not variant.is_moe_layer(i)]
    return {
        **moe_config_fields(args, routing),
        **no_window_fields(args.num_hidden_layers),
        "num_experts": args.num_local_experts,  # 4.x's name; 5.x maps it to num_local_experts
        "norm_topk_prob": routing.norm_topk_prob,
        "moe_intermediate_size": args.intermediate_size,
        # the dense layers' FFN (unused when every layer is MoE)
        "intermediate_size": variant.dense_ffn_hidden_size or args.intermediate_size,
        "mlp_only_layers": dense_layers,
        "decoder_sparse_step": 1,
    }


@register
class Qwen2Moe(MoEFamily):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    adapter = Qwen2MoeAdapter
    attention = "qwen2"
    export_rank = 2  # the most general: tried last

    def qkv_bias(self, cfg):
        return bool(cfg.get("qkv_bias", True))  # unless `qkv_bias: false` (transformers 5.x)

    def moe_fields(self, cfg, fields, source):
        return qwen_moe_fields(cfg, fields, source, shared_slot=True)

    def why_not(self, args, variant, routing):
        if args.model_type not in ("llama", "mistral", "qwen2"):
            return f"Qwen2-MoE has no {args.model_type} attention (QK-norm)"
        return None

    def config_fields(self, args, variant, routing):
        # q/k/v biases always written (zeros for a seed without them), since transformers 4.x
        # and other runtimes build its q/k/v with biases whatever the config says
        return {
            **qwen_moe_config_fields(args, variant, routing),
            "qkv_bias": True,
            "shared_expert_intermediate_size": variant.shared_expert_intermediate_size or 0,
        }
