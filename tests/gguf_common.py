"""Small GGUF files written in the tests with the `gguf` package's writer and quantizers (random
weights, a byte-level BPE vocabulary), and transformers' own GGUF loader as their reference.

Weights are written in GGUF's layout as they are (random rows need no RoPE reordering to be a
valid file); transformers and our importer each turn them into HF's layout, so a wrong
reordering in either shows as different tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: a tiny Llama with GQA (4 heads, 2 KV heads) and a vocabulary that needs padding
SHAPE = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2, vocab=300)


def byte_vocab() -> tuple[list[str], list[str], list[int]]:
    """Tokens, merges and token types of a byte-level BPE: 3 control tokens, the 256 byte
    symbols, then tokens made by merges (41), 300 in all."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet]
    merges = []
    for pair in ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"):
        left, right = pair.split()
        merges.append(pair)
        tokens.append(left + right)
    words = ["Ġthe", "in", "er", "on", "re", "at"]
    while len(tokens) < SHAPE["vocab"]:  # more merges: "in"+"g", "e"+"d", ...
        left = words[len(tokens) % len(words)]
        right = alphabet[(len(tokens) * 7) % 52 + 33]
        if left + right not in tokens:
            merges.append(f"{left} {right}")
            tokens.append(left + right)
        else:
            tokens.append(f"<unused{len(tokens)}>")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def write_gguf(
    path: Path,
    arch: str = "llama",
    qtypes: dict[str, str] | None = None,
    seed: int = 0,
    tied: bool = False,
    meta: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    skip: tuple[str, ...] = (),
    pre: str = "gpt-2",
) -> Path:
    """A GGUF file of a random `arch` model (llama, qwen2, qwen3). `qtypes` maps a tensor-name
    suffix (e.g. "ffn_up.weight") to a ggml type name (default Q8_0 for matrices, F32 for the
    rest); `meta` adds or overrides metadata ({key: value}; None removes a key)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    s = SHAPE
    # Qwen3's head size is its own (key_length); transformers 5.24 reads Qwen3 GGUFs with
    # its default of 128 whatever the file says, so the tiny Qwen3 has 128 too
    head_dim = 128 if arch == "qwen3" else s["hidden"] // s["heads"]
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (s["vocab"], s["hidden"]), "output_norm.weight": (s["hidden"],)}
    if not tied:
        shapes["output.weight"] = (s["vocab"], s["hidden"])
    for i in range(s["layers"]):
        layer = {
            "attn_norm.weight": (s["hidden"],),
            "attn_q.weight": (s["heads"] * head_dim, s["hidden"]),
            "attn_k.weight": (s["kv_heads"] * head_dim, s["hidden"]),
            "attn_v.weight": (s["kv_heads"] * head_dim, s["hidden"]),
            "attn_output.weight": (s["hidden"], s["heads"] * head_dim),
            "ffn_norm.weight": (s["hidden"],),
            "ffn_gate.weight": (s["ffn"], s["hidden"]),
            "ffn_up.weight": (s["ffn"], s["hidden"]),
            "ffn_down.weight": (s["hidden"], s["ffn"]),
        }
        if arch == "qwen2":
            layer.update({f"attn_{r}.bias": layer[f"attn_{r}.weight"][:1] for r in "qkv"})
        if arch == "qwen3":
            layer.update({"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)})
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    writer = GGUFWriter(str(path), arch)
    values = {
        "general.name": f"tiny {arch}",
        f"{arch}.block_count": s["layers"],
        f"{arch}.context_length": 128,
        f"{arch}.embedding_length": s["hidden"],
        f"{arch}.feed_forward_length": s["ffn"],
        f"{arch}.attention.head_count": s["heads"],
        f"{arch}.attention.head_count_kv": s["kv_heads"],
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.dimension_count": head_dim,
        "general.file_type": 7,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
    }
    if arch == "qwen3":  # llama.cpp writes Qwen3's head size
        values[f"{arch}.attention.key_length"] = values[f"{arch}.attention.value_length"] = head_dim
    values.update(meta or {})
    tokens, merges, types = byte_vocab()
    for key, value in values.items():
        if value is None or key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, shape in shapes.items():
        if name in skip:
            continue
        data = rng.standard_normal(shape).astype(np.float32) * 0.3
        if "norm" in name:
            data += 1.0
        kind = "Q8_0" if len(shape) == 2 else "F32"
        for suffix, wanted in (qtypes or {}).items():
            if name.endswith(suffix):
                kind = wanted
        qtype = GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf(path: Path):
    """transformers' model of a GGUF file (its own reader, dequantizer and reordering), fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
