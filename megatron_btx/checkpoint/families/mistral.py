"""HF Mistral: Llama's tensors; the config carries `sliding_window` (null, or at least the
context: the only windows that have an exact form here)."""

from __future__ import annotations

from megatron_btx.checkpoint.families.base import Family, register
from megatron_btx.checkpoint.families.llama import (
    LlamaAdapter,
    no_biases,
    window_at_least_the_context,
)


class MistralAdapter(LlamaAdapter):
    family = "mistral"


@register
class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    adapter = MistralAdapter
    attention = "mistral"
    default_special_ids = (1, 2)

    def check(self, cfg, source):
        no_biases(cfg, source)

    def sliding_window(self, cfg, source):
        return window_at_least_the_context(cfg, source)

    def config_fields(self, args, variant, routing):
        return {"sliding_window": args.sliding_window}
