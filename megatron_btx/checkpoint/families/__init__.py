"""The HF model families (one module each, its config.json and its tensor mapping:
:mod:`.base` says what an entry holds) and the choice of family for a model:

- dense: llama (:mod:`.llama`, the base every adapter extends), mistral, qwen2 (q/k/v biases),
  qwen3 (QK-norm);
- MoE: mixtral, qwen2_moe (shared expert, dense layers, separate expert size, top-k
  renormalised or not), qwen3_moe; each reads both the per-expert layout and transformers 5's
  fused 3-D expert tensors (:mod:`.moe`), and writes the per-expert one.
"""

from __future__ import annotations

from collections.abc import Iterable

from megatron_btx.checkpoint.families import (  # noqa: F401 - each module registers its family
    llama,
    mistral,
    mixtral,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from megatron_btx.checkpoint.families.base import Family, HFModel, get, names, register
from megatron_btx.checkpoint.families.config import (
    export_family,
    export_routing,
    parse,
    plain_args,
    read_plain_args,
    to_hf,
)
from megatron_btx.checkpoint.families.llama import LlamaAdapter
from megatron_btx.checkpoint.families.moe import is_fused_layout
from megatron_btx.models.llama import LlamaArgs, MoEVariant


def export_adapter(
    args: LlamaArgs, variant: MoEVariant | None = None, router: str | dict | None = None
) -> LlamaAdapter:
    """The adapter that writes this model as the HF family of :func:`export_family`: the one
    whose function is exactly the megatron model's with `variant` and routed by `router`; an
    error when none is."""
    variant = variant or MoEVariant()
    routing = export_routing(args, router) if args.is_moe else None
    family = export_family(args, variant, routing)
    return get(family).adapter(args, variant, routing)


def import_adapter(model: HFModel, keys: Iterable[str]) -> LlamaAdapter:
    """The adapter that reads an HF checkpoint of `model`'s family, in the expert layout its
    tensor names show (per expert, or transformers 5's fused 3-D tensors)."""
    family = get(model.model_type)
    if family.is_moe:
        return family.adapter(
            model.args,
            model.variant,
            None,
            hf_qkv_bias=model.args.qkv_bias,
            fused=is_fused_layout(keys),
        )
    return family.adapter(model.args, model.variant)


__all__ = [
    "Family",
    "HFModel",
    "LlamaAdapter",
    "export_adapter",
    "export_family",
    "export_routing",
    "get",
    "import_adapter",
    "names",
    "parse",
    "plain_args",
    "read_plain_args",
    "register",
    "to_hf",
]
