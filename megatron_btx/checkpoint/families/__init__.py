"""One StateDictAdapter per HF family (names, shapes and layouts; the config through
:mod:`megatron_btx.models.hf_config`), and the choice of family for a model:

- dense: llama (:class:`~megatron_btx.checkpoint.mapping.StateDictAdapter`), mistral, qwen2
  (q/k/v biases), qwen3 (QK-norm), in :mod:`.dense`;
- MoE: mixtral, qwen2_moe (shared expert, dense layers, separate expert size, top-k
  renormalised or not), qwen3_moe, in :mod:`.moe`, each reading both the per-expert layout and
  transformers 5's fused 3-D expert tensors, and writing the per-expert one.
"""

from __future__ import annotations

from collections.abc import Iterable

from megatron_btx.checkpoint.families.dense import MistralAdapter, Qwen2Adapter, Qwen3Adapter
from megatron_btx.checkpoint.families.moe import (
    MixtralAdapter,
    MoEAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    is_fused_layout,
)
from megatron_btx.checkpoint.mapping import StateDictAdapter
from megatron_btx.models.hf_config import HFModel, export_family, export_routing
from megatron_btx.models.llama import LlamaArgs, MoEVariant

ADAPTERS: dict[str, type[StateDictAdapter]] = {
    "llama": StateDictAdapter,
    "mistral": MistralAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
}


def export_adapter(
    args: LlamaArgs, variant: MoEVariant | None = None, router: str | None = None
) -> StateDictAdapter:
    """The adapter that writes this model as the HF family of
    :func:`~megatron_btx.models.hf_config.export_family`: the one whose function is exactly the
    megatron model's with `variant` and routed by `router`; an error when none is."""
    variant = variant or MoEVariant()
    routing = export_routing(args, router) if args.is_moe else None
    family = export_family(args, variant, routing)
    return ADAPTERS[family](args, variant, routing)


def import_adapter(model: HFModel, keys: Iterable[str]) -> StateDictAdapter:
    """The adapter that reads an HF checkpoint of `model`'s family, in the expert layout its
    tensor names show (per expert, or transformers 5's fused 3-D tensors)."""
    cls = ADAPTERS[model.model_type]
    if issubclass(cls, MoEAdapter):
        return cls(
            model.args,
            model.variant,
            None,
            hf_qkv_bias=model.args.qkv_bias,
            fused=is_fused_layout(keys),
        )
    return cls(model.args, model.variant)


__all__ = ["ADAPTERS", "export_adapter", "import_adapter"]
