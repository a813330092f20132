"""The dense HF families beside Llama (which is :class:`~megatron_btx.checkpoint.mapping.
StateDictAdapter` itself): same tensor names, different attention extras and config."""

from __future__ import annotations

from megatron_btx.checkpoint.mapping import StateDictAdapter


class MistralAdapter(StateDictAdapter):
    """HF Mistral: Llama's tensors; the config carries `sliding_window` (null, or at least the
    context, the only windows that have an exact form here)."""

    family = "mistral"


class Qwen2Adapter(StateDictAdapter):
    """HF Qwen2 / Qwen2.5: Llama's tensors plus q/k/v biases (`self_attn.{q,k,v}_proj.bias`)."""

    family = "qwen2"
    HF_QKV_BIAS = True


class Qwen3Adapter(StateDictAdapter):
    """HF Qwen3: Llama's tensors plus QK-norm (`self_attn.{q,k}_norm.weight`, one RMSNorm
    weight of head_dim values shared by all query / key heads) and an explicit head_dim."""

    family = "qwen3"
    HF_QK_NORM = True
