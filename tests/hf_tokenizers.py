"""Byte-level BPE tokenizer folders as HF seeds ship them, trained with `tokenizers` in the test.

Two styles, each with the pipeline its transformers class expects, so `AutoTokenizer` (the
reference) reads the same tokenizer.json the project reads:
- "llama3": Llama-3's regex split + byte-level, a post-processor that prepends
  <|begin_of_text|>, `PreTrainedTokenizerFast`; an instruct-style config where config.json's EOS
  list starts with <|end_of_text|> while tokenizer_config.json says <|eot_id|>.
- "qwen2": NFC + Qwen's regex split + byte-level, `Qwen2Tokenizer` (which in transformers 5
  rebuilds this pipeline from the vocabulary); bos = eos = pad = <|endoftext|> as Qwen2.5 base.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))


def make_hf_tokenizer(folder: Path, texts: Iterable[str], style: str, vocab_size: int) -> Path:
    """Train a byte-level BPE on `texts` and write tokenizer.json plus the seed's config files."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIALS[style]}
    folder.mkdir(parents=True, exist_ok=True)
    if style == "llama3":
        bos, eos, eot = ids["<|begin_of_text|>"], ids["<|end_of_text|>"], ids["<|eot_id|>"]
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
        }
        config = {"model_type": "llama", "bos_token_id": bos, "eos_token_id": [eos, eot]}
    else:
        eos = ids["<|endoftext|>"]
        tokenizer_config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }
        config = {"model_type": "qwen2", "bos_token_id": eos, "eos_token_id": eos}
    tok.save(str(folder / "tokenizer.json"))
    _write(folder / "tokenizer_config.json", tokenizer_config)
    _write(folder / "config.json", config)
    _write(folder / "generation_config.json", {k: v for k, v in config.items() if "_id" in k})
    return folder
