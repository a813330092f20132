"""megatron-core GPTModel names and the layout rules every HF family shares.

megatron-core's distributed checkpoints are layout-independent (global tensors, resharded on
load), so a family's adapter only maps the unsharded TP=1, PP=1 model; megatron-core does the
rest. The adapters (the shape torchtitan's state-dict adapters have: HF names per layer, the
shapes a config implies, the layout changes both ways) live with their families in
:mod:`megatron_btx.checkpoint.families`, Llama's included; this module holds megatron-core's side
of the names and the conversions between the two layouts.

Layouts that differ between HF and megatron-core:
- attention: HF has q, k, v; megatron has one `linear_qkv` whose rows are grouped per key-value
  head: for each group g, its heads' q rows, then g's k rows, then g's v rows.
- SwiGLU: HF has gate and up (Mixtral: w1 and w3); megatron's `linear_fc1` is [gate; up].
- vocabulary: megatron's embedding and output rows are padded to `padded_vocab_size`; the pad rows
  are zero and are dropped on export.
- q/k/v biases (Qwen2): megatron's one `linear_qkv.bias`, grouped per key-value head like the
  weight's rows.
- QK-norm (Qwen3): one RMSNorm weight of size head_dim for all query heads and one for all key
  heads, in both (megatron's `q_layernorm` / `k_layernorm`, applied per head before RoPE).
"""

from __future__ import annotations

import torch

from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs

# megatron-core (local spec, unsharded) names. Globals are full names; layer tensors are short
# names under `decoder.layers.{i}.`.
EMB = "embedding.word_embeddings.weight"
FINAL_LN = "decoder.final_layernorm.weight"
OUT = "output_layer.weight"
LN1 = "input_layernorm.weight"
QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
Q_NORM = "self_attention.q_layernorm.weight"
K_NORM = "self_attention.k_layernorm.weight"
PROJ = "self_attention.linear_proj.weight"
LN2 = "pre_mlp_layernorm.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
ROUTER = "mlp.router.weight"
SHARED_FC1 = "mlp.shared_experts.linear_fc1.weight"
SHARED_FC2 = "mlp.shared_experts.linear_fc2.weight"
SHARED_GATE = "mlp.shared_experts.gate_weight"
#: a dense Llama layer's tensors; all but the FFN are averaged by the merge
DENSE_LAYER = (LN1, QKV, PROJ, LN2, FC1, FC2)
ATTENTION_AND_NORMS = (LN1, QKV, PROJ, LN2)


def attention_and_norms(args: LlamaArgs) -> tuple[str, ...]:
    """A layer's tensors outside the FFN (what the merge averages), with the family's extras."""
    extras = (QKV_BIAS,) if args.qkv_bias else ()
    return ATTENTION_AND_NORMS + extras + ((Q_NORM, K_NORM) if args.qk_norm else ())


#: HF tensors that carry no weights (old checkpoints store RoPE's inverse frequencies).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expert_fc1(expert: int) -> str:
    return f"mlp.experts.local_experts.{expert}.linear_fc1.weight"


def expert_fc2(expert: int) -> str:
    return f"mlp.experts.local_experts.{expert}.linear_fc2.weight"


def qkv_to_mcore(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: LlamaArgs,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF q, k, v -> megatron's fused QKV (per KV group: its query heads, then k, then v);
    into `out` (shape [(heads + 2 * kv_heads) * head_dim, hidden]) when given."""
    groups, dim = args.num_key_value_heads, args.head_dim
    per_group = args.num_attention_heads // groups
    q = q.reshape(groups, per_group * dim, -1)
    k = k.reshape(groups, dim, -1)
    v = v.reshape(groups, dim, -1)
    if out is None:
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
    torch.cat([q, k, v], dim=1, out=out.view(groups, (per_group + 2) * dim, -1))
    return out


def qkv_from_mcore(qkv: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, ...]:
    groups, dim = args.num_key_value_heads, args.head_dim
    per_group = args.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * dim, -1)
    q, k, v = torch.split(grouped, [per_group * dim, dim, dim], dim=1)
    hidden = grouped.shape[-1]
    return tuple(x.reshape(-1, hidden).clone() for x in (q, k, v))


def qkv_bias_to_mcore(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LlamaArgs
) -> torch.Tensor:
    """HF q, k, v biases -> megatron's `linear_qkv.bias` (grouped as the weight's rows)."""
    return qkv_to_mcore(q[:, None], k[:, None], v[:, None], args).reshape(-1)


def qkv_bias_from_mcore(bias: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, ...]:
    return tuple(b.reshape(-1) for b in qkv_from_mcore(bias[:, None], args))


def pad_vocab(t: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    if t.shape[0] != args.vocab_size:
        raise BTXError(
            f"embedding has {t.shape[0]} rows but config.json says vocab_size={args.vocab_size}"
        )
    pad = args.padded_vocab_size - args.vocab_size
    return torch.cat([t, t.new_zeros((pad, t.shape[1]))]) if pad else t


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's fused [gate; up] -> (gate, up): row slices, contiguous views of `fc1` (no
    copy: the writers stream them out before the next layer is read)."""
    ffn = fc1.shape[0] // 2
    return fc1[:ffn], fc1[ffn:]
