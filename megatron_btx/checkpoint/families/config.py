"""HF config.json <-> LlamaArgs and MoEVariant: the keys every family shares (sizes, RoPE,
special tokens, activation), and the family's own through its registry entry
(:class:`~megatron_btx.checkpoint.families.base.Family`).

What has no exact megatron-core form is refused with a one-line error naming the key: sliding
windows shorter than the context, RoPE types other than default / llama3, biases other than
Qwen2's q/k/v biases, activations other than SiLU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_btx.checkpoint.families.base import HFModel, get, moe_families
from megatron_btx.errors import BTXError
from megatron_btx.inputs import read_json
from megatron_btx.models.arg_checks import check_token_id_list
from megatron_btx.models.llama import LlamaArgs, MoEVariant
from megatron_btx.models.router_settings import hf_routing
from megatron_btx.models.router_types import HFRouting

#: config.json keys read as they are into LlamaArgs (when present)
_PLAIN_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "router_aux_loss_coef",
)


# ---- reading ----------------------------------------------------------------------------------
def parse(cfg: dict[str, Any], source: str = "config.json") -> HFModel:
    """An HF config.json -> HFModel; unsupported settings are one-line errors naming the key."""
    family = get(cfg.get("model_type"), source)
    attention = get(family.attention, source)
    family.check(cfg, source)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise BTXError(f"{source}: hidden_act {act!r} is not supported (these families use silu)")
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    fields = {k: cfg[k] for k in _PLAIN_KEYS if cfg.get(k) is not None}
    # special tokens: None is a value (Qwen's configs); a missing key is the family's default
    bos, eos = attention.default_special_ids
    fields["bos_token_id"] = cfg.get("bos_token_id", bos)
    fields["eos_token_id"] = cfg.get("eos_token_id", eos)
    if isinstance(fields.get("eos_token_id"), list):
        check_token_id_list(fields["eos_token_id"], "eos_token_id", source)
        fields["eos_token_id"] = fields["eos_token_id"][0]
    fields.update(
        model_type=attention.model_type,
        qkv_bias=family.qkv_bias(cfg),
        qk_norm=attention.qk_norm,
        sliding_window=family.sliding_window(cfg, source),
    )
    variant = MoEVariant()
    if family.is_moe:
        variant = family.moe_fields(cfg, fields, source)
    else:
        fields.update(num_local_experts=0, intermediate_size=cfg.get("intermediate_size"))
    fields = {
        k: v for k, v in fields.items() if v is not None or k in ("bos_token_id", "eos_token_id")
    }
    try:
        args = LlamaArgs(rope_theta=float(theta), rope_scaling=scaling, **fields)
    except (TypeError, ValueError, BTXError) as e:  # ValueError: rope_theta "abc"
        raise BTXError(f"{source}: {e}") from e
    return HFModel(args, variant, family.model_type)


def plain_args(cfg: dict[str, Any], source: str = "config.json") -> LlamaArgs:
    """The args of an HF config.json of any supported family, for a model built from those
    fields alone (a training config's ``model.hf_config``, the pipeline's seed). A config whose
    MoE shape goes beyond LlamaArgs (a shared expert, dense layers) is refused: its model would
    be built without them; convert it with `btx import-hf`, which records the shape in the
    checkpoint's manifest."""
    model = parse(cfg, source)
    if not model.variant.is_plain:
        raise BTXError(
            f"{source}: a {model.model_type} with a shared expert or dense layers is more "
            f"than these fields describe; convert it with `btx import-hf` and start from "
            f"the converted checkpoint (model.init_from)"
        )
    return model.args


def read_plain_args(path: str | Path) -> LlamaArgs:
    """:func:`plain_args` of a config.json file; every error is a BTXError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BTXError(f"{path}: config.json not found; an HF checkpoint folder needs one")
    cfg = read_json(path, "config.json")  # a regular file of bounded size, valid JSON
    if not isinstance(cfg, dict):
        raise BTXError(f"{path}: the top level is a {type(cfg).__name__}, not a JSON object")
    try:
        return plain_args(cfg, str(path))
    except (BTXError, ValueError, TypeError) as e:  # a bad field's value: name the file
        raise (e if str(path) in str(e) else BTXError(f"{path}: {e}")) from None


# ---- which HF family a model is written as --------------------------------------------------
def export_routing(args: LlamaArgs, router: str | dict | None) -> HFRouting:
    """The HF routing equal to what the megatron model computes with `router` (a finetuned
    checkpoint's manifest ``training.router``; None for a merge output or an import)."""
    return hf_routing(router, args.num_experts_per_tok, args.num_local_experts, args.norm_topk_prob)


def export_family(args: LlamaArgs, variant: MoEVariant, routing: HFRouting | None) -> str:
    """The HF model_type a model is written as: its own family when dense; for an MoE, the first
    MoE family (by ``export_rank``: Mixtral, the form every runtime reads, then Qwen3-MoE, then
    Qwen2-MoE, the most general) that writes it exactly; an error saying why none does."""
    if variant.attention_experts:
        raise BTXError(
            "attention experts (BAM) have no HF form: no transformers architecture mixes "
            "several attention blocks per layer; evaluate the megatron checkpoint instead"
        )
    if not args.is_moe:
        return args.model_type
    routing = routing or export_routing(args, None)
    reasons = {}
    for family in moe_families():
        why = family.why_not(args, variant, routing)
        if why is None:
            return family.model_type
        reasons[family.model_type] = why
    own = next((f for f in moe_families() if f.attention == args.model_type), None)
    if own is not None:
        raise BTXError(reasons[own.model_type])
    raise BTXError("no HF MoE family writes this model: " + "; ".join(reasons.values()))


# ---- writing ----------------------------------------------------------------------------------
def to_hf(
    args: LlamaArgs,
    variant: MoEVariant | None = None,
    routing: HFRouting | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """An HF config.json of `family` (default: :func:`export_family`) for this model."""
    variant = variant or MoEVariant()
    routing = routing or export_routing(args, None)
    family = family or export_family(args, variant, routing)
    rope: dict[str, Any] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.rope_scaling:
        rope = {"rope_theta": args.rope_theta, **args.rope_scaling}
    entry = get(family)
    config: dict[str, Any] = {
        "model_type": family,
        "architectures": [entry.architecture],
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "rope_parameters": rope,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "torch_dtype": "float32",
    }
    config.update(entry.config_fields(args, variant, routing))
    config.update(args.extra)
    return config
