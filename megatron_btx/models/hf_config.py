"""HF config.json <-> LlamaArgs and MoEVariant, for every HF family we read and write.

Dense families (the seed a BTX run branches from) differ only in their attention: Llama and
Mistral have none of the extras, Qwen2 / Qwen2.5 add q/k/v biases, Qwen3 normalises each query and
key head (QK-norm). MoE families are read and written with the same attention:

=============  ===================  =======================================================
HF model_type  attention family     MoE shape
=============  ===================  =======================================================
mixtral        mistral              every layer MoE, one expert size, renormalised top-k
qwen2_moe      qwen2 (qkv bias)     shared expert with a sigmoid gate, dense layers
                                    (``mlp_only_layers``), expert size apart from the dense
                                    FFN, top-k renormalised or not (``norm_topk_prob``)
qwen3_moe      qwen3 (QK-norm)      qwen2_moe without a shared expert
=============  ===================  =======================================================

What has no exact megatron-core form is refused with a one-line error naming the key: sliding
windows shorter than the context, RoPE types other than default / llama3, biases other than
Qwen2's q/k/v biases, activations other than SiLU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError
from megatron_btx.inputs import read_json
from megatron_btx.models.arg_checks import check_token_id_list
from megatron_btx.models.llama import LlamaArgs, MoEVariant

#: dense families by HF model_type
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: MoE families by HF model_type -> the dense family their attention is
MOE_FAMILIES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
#: HF defaults of the keys a saved config.json may lack (transformers 5.24 values)
_QWEN_MOE_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


@dataclasses.dataclass(frozen=True)
class HFRouting:
    """How an HF MoE routes: top-k of softmax(W x) over all experts, renormalised over the k
    chosen (Mixtral, Qwen with ``norm_topk_prob: true``) or not."""

    top_k: int
    norm_topk_prob: bool


@dataclasses.dataclass(frozen=True)
class HFModel:
    """What an HF config.json describes: the hyper-parameters and the MoE shape."""

    args: LlamaArgs
    variant: MoEVariant
    #: the config's own model_type (mixtral, qwen2_moe, ... for MoE; the dense family otherwise)
    model_type: str


# ---- reading ----------------------------------------------------------------------------------
def parse(cfg: dict[str, Any], source: str = "config.json") -> HFModel:
    """An HF config.json -> HFModel; unsupported settings are one-line errors naming the key."""
    arch = cfg.get("model_type")
    supported = (*DENSE_FAMILIES, *MOE_FAMILIES)
    if arch not in supported:
        raise BTXError(
            f"{source}: model_type is {arch!r}, not a Llama-architecture family (supported: "
            f"{', '.join(supported)})"
        )
    family = MOE_FAMILIES.get(arch, arch)
    _check_attention(cfg, arch, family, source)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise BTXError(f"{source}: hidden_act {act!r} is not supported (these families use silu)")
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    fields = {
        k: cfg[k]
        for k in (
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
        if cfg.get(k) is not None
    }
    # special tokens: None is a value (Qwen's configs); a missing key is the family's default
    llama_like = family in ("llama", "mistral")
    fields["bos_token_id"] = cfg.get("bos_token_id", 1 if llama_like else None)
    fields["eos_token_id"] = cfg.get("eos_token_id", 2 if llama_like else None)
    if isinstance(fields.get("eos_token_id"), list):
        check_token_id_list(fields["eos_token_id"], "eos_token_id", source)
        fields["eos_token_id"] = fields["eos_token_id"][0]
    fields.update(
        model_type=family,
        qkv_bias=_qkv_bias(cfg, arch),
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window(cfg, family, source),
    )
    variant = MoEVariant()
    if arch in MOE_FAMILIES:
        variant = _moe_fields(cfg, arch, fields, source)
    else:
        fields.update(num_local_experts=0, intermediate_size=cfg.get("intermediate_size"))
    fields = {
        k: v for k, v in fields.items() if v is not None or k in ("bos_token_id", "eos_token_id")
    }
    try:
        args = LlamaArgs(rope_theta=float(theta), rope_scaling=scaling, **fields)
    except (TypeError, ValueError, BTXError) as e:  # ValueError: rope_theta "abc"
        raise BTXError(f"{source}: {e}") from e
    return HFModel(args, variant, arch)


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


def _check_attention(cfg: dict[str, Any], arch: str, family: str, source: str) -> None:
    if family in ("llama", "mistral") and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise BTXError(
            f"{source}: attention_bias/mlp_bias are not supported ({arch} has no biases; "
            f"megatron-core adds biases to every linear layer or to q/k/v only)"
        )
    if family == "qwen3" and cfg.get("attention_bias"):
        raise BTXError(
            f"{source}: attention_bias true (an o_proj bias) is not supported; megatron-core "
            f"biases every linear layer or q/k/v only"
        )


def _qkv_bias(cfg: dict[str, Any], arch: str) -> bool:
    """Qwen2 always has q/k/v biases; Qwen2-MoE has them unless `qkv_bias: false` (5.x)."""
    if arch == "qwen2":
        return True
    if arch == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    return False


def _sliding_window(cfg: dict[str, Any], family: str, source: str) -> int | None:
    """A window that never masks anything (null, or at least the context) is kept; a shorter
    one has no exact form here (megatron-core's local attention has no window)."""
    if family in ("qwen2", "qwen3"):
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
        return None
    window = cfg.get("sliding_window")
    max_pos = cfg.get("max_position_embeddings", 2048)
    if window is not None and window < max_pos:
        raise BTXError(
            f"{source}: sliding_window {window} is shorter than max_position_embeddings "
            f"{max_pos}; sliding-window attention is not supported (only null)"
        )
    return window


def _moe_fields(cfg: dict[str, Any], arch: str, fields: dict[str, Any], source: str) -> MoEVariant:
    """The MoE fields of `fields` from an MoE config; returns the MoE shape beyond Mixtral's."""
    # transformers 5 maps num_experts <-> num_local_experts and saves either, by family
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if arch == "mixtral":
        fields.update(
            num_local_experts=8 if experts is None else experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            intermediate_size=cfg.get("intermediate_size"),
            norm_topk_prob=True,
        )
        return MoEVariant()
    get = {**_QWEN_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}.get
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
    shared = int(get("shared_expert_intermediate_size", 0) or 0) if arch == "qwen2_moe" else 0
    partial = not all(freq)
    return MoEVariant(
        shared_expert_intermediate_size=shared or None,
        layer_freq=freq if partial else None,
        dense_ffn_hidden_size=int(get("intermediate_size")) if partial else None,
        shared_expert_gate=bool(shared),
    )


# ---- which HF family a model is written as --------------------------------------------------
def export_routing(args: LlamaArgs, router: str | None) -> HFRouting:
    """The HF routing equal to what the megatron model computes with `router` (a finetuned
    checkpoint's manifest ``training.router``; None for a merge output or an import)."""
    k, experts = args.num_experts_per_tok, args.num_local_experts
    if router in (None, "megatron top-k"):
        return HFRouting(k, args.norm_topk_prob)
    if router in ("topk", "top_k"):
        return HFRouting(k, True)  # SoftMax(TopK(Wx)): the top-k probabilities renormalised
    if router == "switch":
        return HFRouting(1, False)  # softmax(Wx) of the chosen expert, not renormalised
    if router == "soft":
        return HFRouting(experts, False)  # every expert weighted by softmax(Wx)
    if router == "sample_top1":
        raise BTXError(
            "router sample_top1 has no exact HF form: it routes its first MoE layer softly (every "
            "expert) and the others to the argmax with weight 1, and an HF config has one top-k "
            "for all layers; finetune with router topk, switch or soft to export"
        )
    raise BTXError(f"router {router!r} is unknown; cannot choose an HF form for it")


def export_family(args: LlamaArgs, variant: MoEVariant, routing: HFRouting | None) -> str:
    """The HF model_type a model is written as: its own family when dense; for an MoE, Mixtral
    when it has Mixtral's shape (Llama / Mistral attention, every layer MoE with one expert
    size, no shared expert, renormalised top-k: the form every runtime reads), Qwen2-MoE for
    everything else with Llama, Mistral or Qwen2 attention, Qwen3-MoE for Qwen3 attention."""
    if not args.is_moe:
        return args.model_type
    routing = routing or export_routing(args, None)
    if args.model_type == "qwen3":
        if variant.shared_expert_intermediate_size:
            raise BTXError(
                "a shared expert has no HF form with Qwen3 attention: Qwen3-MoE has no shared "
                "expert and Qwen2-MoE no QK-norm; merge without --seed-as-shared-expert to export"
            )
        return "qwen3_moe"
    if args.model_type in ("llama", "mistral") and variant.is_plain and routing.norm_topk_prob:
        return "mixtral"
    return "qwen2_moe"


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
    config: dict[str, Any] = {
        "model_type": family,
        "architectures": [ARCHITECTURES[family]],
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
    config.update(_family_fields(args, variant, routing, family))
    config.update(args.extra)
    return config


def _family_fields(
    args: LlamaArgs, variant: MoEVariant, routing: HFRouting, family: str
) -> dict[str, Any]:
    no_window = {"use_sliding_window": False, "sliding_window": None}
    if family == "llama":
        return {"attention_bias": False, "mlp_bias": False}
    if family == "mistral":
        return {"sliding_window": args.sliding_window}
    if family in ("qwen2", "qwen3"):
        extra = {"attention_bias": False} if family == "qwen3" else {}
        return {**no_window, "max_window_layers": args.num_hidden_layers, **extra}
    moe = {
        "num_experts_per_tok": routing.top_k,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "output_router_logits": False,
    }
    if family == "mixtral":
        if not routing.norm_topk_prob:
            raise BTXError("Mixtral always renormalises its top-k; this model does not")
        window = {"sliding_window": args.sliding_window}
        return {**moe, "num_local_experts": args.num_local_experts, **window}
    dense_layers = [i for i in range(args.num_hidden_layers) if not variant.is_moe_layer(i)]
    qwen = {
        **moe,
        **no_window,
        "num_experts": args.num_local_experts,  # 4.x's name; 5.x maps it to num_local_experts
        "norm_topk_prob": routing.norm_topk_prob,
        "moe_intermediate_size": args.intermediate_size,
        # the dense layers' FFN (unused when every layer is MoE)
        "intermediate_size": variant.dense_ffn_hidden_size or args.intermediate_size,
        "mlp_only_layers": dense_layers,
        "decoder_sparse_step": 1,
        "max_window_layers": args.num_hidden_layers,
    }
    if family == "qwen3_moe":
        return {**qwen, "attention_bias": False}
    # Qwen2-MoE: q/k/v biases always written (zeros for a seed without them), since
    # transformers 4.x and other runtimes build its q/k/v with biases whatever the config says
    return {
        **qwen,
        "qkv_bias": True,
        "shared_expert_intermediate_size": variant.shared_expert_intermediate_size or 0,
    }
