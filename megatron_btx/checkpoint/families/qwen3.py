"""HF Qwen3: Llama's tensors plus QK-norm (`self_attn.{q,k}_norm.weight`, one RMSNorm weight of
head_dim values shared by all query / key heads) and an explicit head_dim."""

from __future__ import annotations

from megatron_btx.checkpoint.families.base import Family, register
from megatron_btx.checkpoint.families.llama import LlamaAdapter
from megatron_btx.checkpoint.families.qwen2 import full_attention_only, no_window_fields
from megatron_btx.errors import BTXError


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    HF_QK_NORM = True


@register
class Qwen3(Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    adapter = Qwen3Adapter
    attention = "qwen3"
    qk_norm = True

    def check(self, cfg, source):
        if cfg.get("attention_bias"):
            raise BTXError(
                f"{source}: attention_bias true (an o_proj bias) is not supported; megatron-core "
                f"biases every linear layer or q/k/v only"
            )

    def sliding_window(self, cfg, source):
        full_attention_only(cfg, source)
        return None

    def config_fields(self, args, variant, routing):
        return {**no_window_fields(args.num_hidden_layers), "attention_bias": False}
