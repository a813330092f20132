"""Type and range checks of a model's hyper-parameters (LlamaArgs), wherever they come from: an
HF config.json, a checkpoint's manifest or a training config.

A value of the wrong type or out of range used to travel on: `rms_norm_eps: "abc"` was imported
and exported as is, zero heads divided by zero, a negative hidden size failed deep in
megatron-core with a traceback. Each is now one BTXError naming the field and what it must be.
"""

from __future__ import annotations

import math
from typing import Any

from megatron_btx.errors import BTXError

#: integer fields and their smallest allowed value (None: the field may be null)
POSITIVE_INTS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim")
OPTIONAL_TOKEN_IDS = ("bos_token_id", "eos_token_id")
#: the longest context a model may declare: positions are int32 in attention kernels and in
#: every HF runtime (the longest released context, 10M tokens, is far below)
MAX_POSITIONS = 2**31 - 1
#: llama3 rope scaling: the keys the rotary frequencies are computed from
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(field: str, value: Any, what: str) -> BTXError:
    return BTXError(f"model field {field}={value!r} {what}")


def check_llama_fields(args: Any) -> None:
    """Every field of `args` (a LlamaArgs, before its derived fields are filled in) has the
    right type and range; else one BTXError naming the field."""
    for field in POSITIVE_INTS:
        value = getattr(args, field)
        if not is_int(value) or value < 1:
            raise _bad(field, value, "must be an integer >= 1")
    for field in OPTIONAL_POSITIVE_INTS:
        value = getattr(args, field)
        if value is not None and (not is_int(value) or value < 1):
            raise _bad(field, value, "must be an integer >= 1 (or null)")
    for field in OPTIONAL_TOKEN_IDS:
        value = getattr(args, field)
        if value is not None and (not is_int(value) or value < 0):
            raise _bad(field, value, "must be a token id >= 0 (or null)")
        if value is not None and value >= args.vocab_size:
            raise _bad(
                field, value, f"is not a token of the vocabulary (vocab_size {args.vocab_size})"
            )
    if args.max_position_embeddings > MAX_POSITIONS:
        raise _bad(
            "max_position_embeddings",
            args.max_position_embeddings,
            f"must be at most {MAX_POSITIONS} (positions are 32-bit integers)",
        )
    head_dim = args.head_dim
    if head_dim is None and args.hidden_size % args.num_attention_heads == 0:
        head_dim = args.hidden_size // args.num_attention_heads  # what LlamaArgs derives
    if head_dim is not None and head_dim % 2:
        raise _bad(
            "head_dim" if args.head_dim is not None else "hidden_size / num_attention_heads",
            head_dim,
            "must be even (rotary embeddings rotate pairs of dimensions)",
        )
    if not is_int(args.num_local_experts) or args.num_local_experts < 0:
        raise _bad("num_local_experts", args.num_local_experts, "must be an integer >= 0")
    if not is_int(args.num_experts_per_tok) or (
        args.num_local_experts > 0 and args.num_experts_per_tok < 1
    ):
        raise _bad("num_experts_per_tok", args.num_experts_per_tok, "must be an integer >= 1")
    if not is_finite_number(args.rms_norm_eps) or not 0 < args.rms_norm_eps < 1:
        raise _bad("rms_norm_eps", args.rms_norm_eps, "must be a number in (0, 1), e.g. 1e-5")
    if not is_finite_number(args.rope_theta) or args.rope_theta <= 0:
        raise _bad("rope_theta", args.rope_theta, "must be a finite number > 0")
    if not is_finite_number(args.router_aux_loss_coef) or args.router_aux_loss_coef < 0:
        raise _bad("router_aux_loss_coef", args.router_aux_loss_coef, "must be a number >= 0")
    if not isinstance(args.tie_word_embeddings, bool):
        raise _bad("tie_word_embeddings", args.tie_word_embeddings, "must be true or false")
    if not isinstance(args.extra, dict):
        raise _bad("extra", args.extra, "must be a mapping")
    check_rope_scaling(args.rope_scaling)


def check_rope_scaling(scaling: Any) -> None:
    """rope_scaling is null or a mapping; a llama3 one has every number its frequencies use."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise _bad("rope_scaling", scaling, "must be a mapping (or null)")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        return  # the default (dropped) or a type LlamaArgs refuses with its own message
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if key == "factor" and value is None:
            raise _bad("rope_scaling.factor", value, "is required for rope_type llama3")
        if value is not None and (not is_finite_number(value) or value <= 0):
            raise _bad(f"rope_scaling.{key}", value, "must be a finite number > 0")
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    if high <= low:
        raise _bad("rope_scaling.high_freq_factor", high, f"must exceed low_freq_factor ({low})")


def check_token_id_list(value: Any, field: str, source: str) -> None:
    """An HF config's list of token ids (e.g. several EOS ids) is a non-empty list of ids."""
    if not (isinstance(value, list) and value and all(is_int(v) and v >= 0 for v in value)):
        raise BTXError(f"{source}: {field}={value!r} must be a token id or a list of token ids")
