"""HF Qwen2 / Qwen2.5: Llama's tensors plus q/k/v biases (`self_attn.{q,k,v}_proj.bias`); no
sliding window (Qwen's `use_sliding_window` and `layer_types` must say full attention)."""

from __future__ import annotations

from typing import Any

from megatron_btx.checkpoint.families.base import Family, register
from megatron_btx.checkpoint.families.llama import LlamaAdapter
from megatron_btx.errors import BTXError


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    HF_QKV_BIAS = True


def full_attention_only(cfg: dict[str, Any], source: str) -> None:
    """Qwen's window keys: only full attention has an exact form here."""
    if cfg.get("use_sliding_window"):
        raise BTXError(
            f"{source}: use_sliding_window true is not supported (sliding-window attention "
            f"has no exact form here); set it to false only if the model was trained so"
        )
    kinds = set(cfg.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise BTXError(
            f"{source}: layer_types {sorted(kinds)} are not supported (only full_attention)"
        )


def no_window_fields(num_layers: int) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": num_layers}


@register
class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    adapter = Qwen2Adapter
    attention = "qwen2"

    def qkv_bias(self, cfg):
        return True  # Qwen2 always has q/k/v biases

    def sliding_window(self, cfg, source):
        full_attention_only(cfg, source)
        return None

    def config_fields(self, args, variant, routing):
        return no_window_fields(args.num_hidden_layers)
