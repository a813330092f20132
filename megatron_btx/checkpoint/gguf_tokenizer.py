"""An HF ``tokenizer.json`` from a GGUF file's vocabulary, built with the ``tokenizers`` library.

GGUF stores the tokenizer as metadata: ``tokenizer.ggml.model`` (``gpt2`` for byte-level BPE),
the tokens, their types, the merges, the special ids and ``tokenizer.ggml.pre``, the name of
the pre-tokenizer (the regular expressions that cut text into words before BPE). A byte-level
BPE tokenizer is exactly those parts, so it is rebuilt from them: the BPE model from tokens and
merges, the pre-tokenizer from its name (the expressions each name stands for are the ones the
model's own tokenizer uses; an unknown name is refused rather than guessed), control and
user-defined tokens as added tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError

#: ggml token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: GPT-2's word pattern (what tokenizers' ByteLevel applies with use_regex)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama 3's word pattern: case-insensitive contractions, numbers in groups of up to 3
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Qwen2's: Llama 3's with single digits
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str, source: str):
    """The pre-tokenizer llama.cpp's ``tokenizer.ggml.pre`` names."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):
        # every digit its own word, then GPT-2's pattern (StarCoder's tokenizer)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    patterns = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
    if pre in patterns:
        split = pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, bytes_only])
    known = "gpt-2, default, smollm, starcoder, refact, llama-bpe, qwen2"
    raise BTXError(
        f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this importer does not know "
        f"(supported: {known}); import the model's HF checkpoint instead"
    )


def _strings(meta: dict[str, Any], key: str, source: str) -> list[str]:
    value = meta.get(key)
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BTXError(f"{source}: metadata {key} is missing or not a list of strings")
    return value


def build_tokenizer(meta: dict[str, Any], source: str):
    """The ``tokenizers.Tokenizer`` of a GGUF file's metadata (byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise BTXError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2': SmolLM, "
            f"Llama 3, Qwen2) is rebuilt from a GGUF; import the model's HF checkpoint instead"
        )
    tokens = _strings(meta, "tokenizer.ggml.tokens", source)
    merges = _strings(meta, "tokenizer.ggml.merges", source)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise BTXError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicate keeps its first id, as llama.cpp does
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise BTXError(f"{source}: merge {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    tokenizer = Tokenizer(
        models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")), source)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)

    added = [
        AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (CONTROL, USER_DEFINED)
    ]
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer


def _post_processor(meta: dict[str, Any], tokens: list[str]):
    """Byte-level offsets, and BOS before each sequence when the GGUF says to add it."""
    from tokenizers import processors

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = _special(meta, tokens, "bos")
    if not meta.get("tokenizer.ggml.add_bos_token") or bos is None:
        return byte_level
    bos_id = meta["tokenizer.ggml.bos_token_id"]
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([byte_level, template])


def _special(meta: dict[str, Any], tokens: list[str], name: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{name}_token_id")
    if isinstance(index, int) and 0 <= index < len(tokens):
        return tokens[index]
    return None


def write_tokenizer(tokenizer, meta: dict[str, Any], folder: Path) -> list[str]:
    """`tokenizer` (:func:`build_tokenizer`'s) as tokenizer.json, and tokenizer_config.json
    (special tokens, chat template), into `folder`."""
    tokenizer.save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token = _special(meta, tokens, key)
        if token is not None:
            config[f"{name}_token"] = token
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
