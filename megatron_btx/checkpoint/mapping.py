"""Tensor names and layouts: HF Llama / Mixtral <-> megatron-core GPTModel (local spec, TP=1).

megatron-core's distributed checkpoints are layout-independent (global tensors, resharded on
load), so the mapping only needs the unsharded TP=1, PP=1 model; megatron-core does the rest.

Layouts that differ:
- attention: HF has q, k, v; megatron has one `linear_qkv` whose rows are grouped per key-value
  head: for each group g, its heads' q rows, then g's k rows, then g's v rows.
- SwiGLU: HF has gate and up (Mixtral: w1 and w3); megatron's `linear_fc1` is [gate; up].
- vocabulary: megatron's embedding and output rows are padded to `padded_vocab_size`; the pad rows
  are zero and are dropped on export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs

#: HF tensors that carry no weights (old checkpoints store RoPE's inverse frequencies).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def qkv_to_mcore(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: LlamaArgs, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF q, k, v -> megatron's fused QKV (per KV group: its query heads, then k, then v);
    into `out` (shape [(heads + 2 * kv_heads) * head_dim, hidden]) when given."""
    g, d = a.num_key_value_heads, a.head_dim
    hpg = a.num_attention_heads // g
    q = q.reshape(g, hpg * d, -1)
    k = k.reshape(g, d, -1)
    v = v.reshape(g, d, -1)
    if out is None:
        return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])
    torch.cat([q, k, v], dim=1, out=out.view(g, (hpg + 2) * d, -1))
    return out


def qkv_from_mcore(qkv: torch.Tensor, a: LlamaArgs) -> tuple[torch.Tensor, ...]:
    g, d = a.num_key_value_heads, a.head_dim
    hpg = a.num_attention_heads // g
    x = qkv.reshape(g, (hpg + 2) * d, -1)
    q, k, v = torch.split(x, [hpg * d, d, d], dim=1)
    h = x.shape[-1]
    return q.reshape(-1, h).clone(), k.reshape(-1, h).clone(), v.reshape(-1, h).clone()


def pad_vocab(t: torch.Tensor, a: LlamaArgs) -> torch.Tensor:
    if t.shape[0] != a.vocab_size:
        raise BTXError(
            f"embedding has {t.shape[0]} rows but config.json says vocab_size={a.vocab_size}"
        )
    pad = a.padded_vocab_size - a.vocab_size
    return torch.cat([t, t.new_zeros((pad, t.shape[1]))]) if pad else t


def hf_layer_names(a: LlamaArgs, i: int) -> dict[str, str]:
    """HF names of layer i's tensors, by role."""
    p = f"model.layers.{i}."
    n = {
        "ln1": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "ln2": p + "post_attention_layernorm.weight",
    }
    if a.is_moe:
        n["router"] = p + "block_sparse_moe.gate.weight"
        for e in range(a.num_local_experts):
            for w in ("w1", "w2", "w3"):
                n[f"e{e}.{w}"] = p + f"block_sparse_moe.experts.{e}.{w}.weight"
    else:
        n.update(
            gate=p + "mlp.gate_proj.weight",
            up=p + "mlp.up_proj.weight",
            down=p + "mlp.down_proj.weight",
        )
    return n


def hf_names(a: LlamaArgs) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not a.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(a.num_hidden_layers):
        names.extend(hf_layer_names(a, i).values())
    return names


def hf_to_mcore(
    get: Callable[[str], torch.Tensor], a: LlamaArgs
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for the whole model, reading HF tensors through `get`."""
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"), a)
    for i in range(a.num_hidden_layers):
        n = hf_layer_names(a, i)
        m = f"decoder.layers.{i}."
        yield m + "input_layernorm.weight", get(n["ln1"])
        yield (
            m + "self_attention.linear_qkv.weight",
            qkv_to_mcore(get(n["q"]), get(n["k"]), get(n["v"]), a),
        )
        yield m + "self_attention.linear_proj.weight", get(n["o"])
        yield m + "pre_mlp_layernorm.weight", get(n["ln2"])
        if a.is_moe:
            yield m + "mlp.router.weight", get(n["router"])
            for e in range(a.num_local_experts):
                x = m + f"mlp.experts.local_experts.{e}."
                yield x + "linear_fc1.weight", torch.cat([get(n[f"e{e}.w1"]), get(n[f"e{e}.w3"])])
                yield x + "linear_fc2.weight", get(n[f"e{e}.w2"])
        else:
            yield m + "mlp.linear_fc1.weight", torch.cat([get(n["gate"]), get(n["up"])])
            yield m + "mlp.linear_fc2.weight", get(n["down"])
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not a.tie_word_embeddings:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), a)


def mcore_to_hf(
    get: Callable[[str], torch.Tensor], a: LlamaArgs
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the whole model, reading megatron tensors through `get`."""
    V = a.vocab_size
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:V].clone()
    for i in range(a.num_hidden_layers):
        n = hf_layer_names(a, i)
        m = f"decoder.layers.{i}."
        yield n["ln1"], get(m + "input_layernorm.weight")
        q, k, v = qkv_from_mcore(get(m + "self_attention.linear_qkv.weight"), a)
        yield n["q"], q
        yield n["k"], k
        yield n["v"], v
        yield n["o"], get(m + "self_attention.linear_proj.weight")
        yield n["ln2"], get(m + "pre_mlp_layernorm.weight")
        f = a.intermediate_size
        if a.is_moe:
            yield n["router"], get(m + "mlp.router.weight")
            for e in range(a.num_local_experts):
                x = m + f"mlp.experts.local_experts.{e}."
                gate, up = torch.split(get(x + "linear_fc1.weight"), [f, f])
                yield n[f"e{e}.w1"], gate.clone()
                yield n[f"e{e}.w3"], up.clone()
                yield n[f"e{e}.w2"], get(x + "linear_fc2.weight")
        else:
            gate, up = torch.split(get(m + "mlp.linear_fc1.weight"), [f, f])
            yield n["gate"], gate.clone()
            yield n["up"], up.clone()
            yield n["down"], get(m + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not a.tie_word_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:V].clone()


def check_hf_keys(keys: list[str], a: LlamaArgs, source: str) -> None:
    """Every tensor the config implies is present, and nothing unexplained is left over."""
    have = set(keys)
    want = hf_names(a)
    missing = [k for k in want if k not in have]
    if missing:
        raise BTXError(
            f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); the "
            f"checkpoint does not match its config.json (layers={a.num_hidden_layers})"
        )
    extra = sorted(have - set(want))
    extra = [k for k in extra if not k.endswith(IGNORED_HF_SUFFIXES)]
    if a.tie_word_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]
    if extra:
        raise BTXError(
            f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} in all); the checkpoint has "
            f"more layers or modules than its config.json describes"
        )
