"""What model a training run trains: its architecture (from ``model.init_from``'s manifest, an
HF config.json or inline fields), its MoE variant, and the BTX router installed in it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megatron_btx.config import Config
from megatron_btx.errors import BTXError


def resolve_model_args(
    cfg: Config, tokenizer_vocab: int | None, special_ids: tuple[int, int] | None = None
):
    """The LlamaArgs of this run (init_from's manifest, an HF config.json, or inline fields).

    A model defined inline takes its vocabulary and ``special_ids`` (BOS, EOS; -1 for none) from
    the tokenizer, so its HF export names the tokenizer's ids (an HF tokenizer's are not 1/2)."""
    from megatron_btx.checkpoint.families import read_plain_args
    from megatron_btx.checkpoint.megatron_io import read_args
    from megatron_btx.models.llama import LlamaArgs

    mc = cfg.model
    inline = mc.inline_fields()
    if mc.init_from:
        folder = Path(mc.init_from)
        if not folder.is_dir():
            raise BTXError(f"model.init_from={mc.init_from}: no such checkpoint folder")
        args = read_args(folder)
        for k, v in inline.items():
            if getattr(args, k) != v:
                raise BTXError(
                    f"model.{k}={v!r} conflicts with model.init_from={mc.init_from} "
                    f"({k}={getattr(args, k)!r}); remove model.{k} or use another checkpoint"
                )
    elif mc.hf_config:
        path = Path(mc.hf_config)
        if path.is_dir():
            path = path / "config.json"
        args = read_plain_args(path)
        if inline:
            args = dataclasses.replace(args, **inline)
    else:
        fields = dict(inline)
        if "vocab_size" not in fields:
            if tokenizer_vocab is None:
                raise BTXError(
                    "model.vocab_size is not set and there is no tokenizer to take it from"
                )
            fields["vocab_size"] = tokenizer_vocab
        if special_ids is not None:
            fields.setdefault("bos_token_id", special_ids[0] if special_ids[0] >= 0 else None)
            fields.setdefault("eos_token_id", special_ids[1])
        try:
            args = LlamaArgs(**fields)
        except TypeError as e:
            raise BTXError(f"model: {e}") from e
    if tokenizer_vocab is not None and tokenizer_vocab > args.padded_vocab_size:
        raise BTXError(
            f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
            f"{args.vocab_size}; token ids would overflow the embedding"
        )
    return args


def model_variant(cfg: Config):
    """The merge variant (shared expert, MoE in some layers) of the checkpoint the run starts
    from, as its manifest records it; plain for every other model. The model is built from it,
    as the merge and the evaluator build it, and the run's checkpoints record it in turn."""
    from megatron_btx.checkpoint.megatron_io import read_variant
    from megatron_btx.models.llama import MoEVariant

    return read_variant(cfg.model.init_from) if cfg.model.init_from else MoEVariant()


def router_overrides(router_cfg: dict[str, Any] | None, num_experts: int) -> dict[str, Any]:
    """TransformerConfig overrides the configured BTX router asks for before the build."""
    if router_cfg is None:
        return {}
    from megatron_btx.models import routers

    return dict(routers.config_overrides(dict(router_cfg), num_experts=num_experts))


def install_router(chunks: list[torch.nn.Module], router_cfg: dict[str, Any] | None, tconf) -> str:
    """Install the BTX router of ``router_cfg`` in every MoE layer (after the build, before DDP
    and the optimizer). Without one, megatron-core's own top-k router routes."""
    from megatron_btx.models import routers
    from megatron_btx.models.router_settings import MEGATRON_ROUTER

    if router_cfg is None:
        return MEGATRON_ROUTER

    routers.install(chunks, dict(router_cfg), tconf)
    return str(router_cfg.get("type"))


# ---------------------------------------------------------------------------------------------
# Signals (Slurm preemption)
# ---------------------------------------------------------------------------------------------
