"""A seed's HF tokenizer (``tokenizer.json``) for the data path, through the ``tokenizers`` library.

Llama-3.x, Qwen2.5 and Qwen3 ship byte-level BPE in ``tokenizer.json``. The vocabulary and the
text pipeline (normaliser, pre-tokeniser, merges, added tokens) are all in that one file, so it is
what gets hashed (the sha256 that datasets, checkpoints and the merge compare) and what encodes.
Documents are encoded without the post-processor's special tokens (Llama-3's tokenizer.json
prepends ``<|begin_of_text|>``); the data path appends EOS itself, as for SentencePiece.

Which file gives BOS, EOS and pad (each id on its own, first file that names it wins):

1. ``config.json`` (``bos_token_id``/``eos_token_id``/``pad_token_id``): the model's own record of
   the ids it was trained with, integers that need no lookup. For an instruct seed it still names
   the end-of-text token first (Llama-3.1-Instruct: ``[128001, 128008, 128009]``), while
   ``tokenizer_config.json`` names the chat turn end (``<|eot_id|>``); a document separator for
   continued pre-training must be the former. A list gives its first entry.
2. ``generation_config.json`` (same keys): present in most seeds, the ids generation stops at.
3. ``tokenizer_config.json`` then ``special_tokens_map.json`` (``bos_token``/``eos_token``/
   ``pad_token`` as strings, or ``{"content": ...}``): what transformers' ``AutoTokenizer`` uses,
   looked up in the vocabulary.

A source that disagrees with the chosen id gives a warning naming both. A pad id equal to EOS or
BOS (Qwen's pad is ``<|endoftext|>``) is dropped (-1): megatron-core masks the loss wherever the
label is the pad id, which would hide every document end.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btx.data.tokenizer_base import Tokenizer, file_sha256
from megatron_btx.errors import BTXError
from megatron_btx.inputs import inside, read_json

#: The files of an HF tokenizer folder that travel with it (into a prepared data folder and a
#: checkpoint's tokenizer/). config.json is kept for the special ids it defines.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)
#: Files with integer ``<name>_token_id`` keys, then files with token strings ``<name>_token``.
ID_SOURCES = ("config.json", "generation_config.json")
TOKEN_SOURCES = ("tokenizer_config.json", "special_tokens_map.json")
SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


class TokenizerWarning(UserWarning):
    """The seed's files disagree about a special id; the message names the files and ids."""


@dataclass(frozen=True)
class SpecialIds:
    """BOS/EOS/pad/unk ids (-1 where there is none) and the file each came from."""

    bos: int
    eos: int
    pad: int
    unk: int
    sources: dict[str, str] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any]:
    if not (path.is_file() or path.is_symlink()):
        return {}
    data = read_json(inside(path.parent, path, "tokenizer file"), "tokenizer file")
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": str}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _candidates(folder: Path, backend: Any, name: str) -> list[tuple[str, int]]:
    """(file, id) for every file of the folder that names special token ``name``, in order."""
    found: list[tuple[str, int]] = []
    for source in ID_SOURCES:
        value = _read_json(folder / source).get(f"{name}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            found.append((source, value))
    for source in TOKEN_SOURCES:
        token = _token_content(_read_json(folder / source).get(f"{name}_token"))
        if token is None:
            continue
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise BTXError(
                f"{folder / source}: {name}_token {token!r} is not in tokenizer.json's "
                "vocabulary; the files come from different seeds, copy them from one"
            )
        found.append((source, int(token_id)))
    return found


def resolve_special_ids(folder: Path, backend: Any, vocab_size: int) -> SpecialIds:
    """The special ids of an HF tokenizer folder, by the precedence in the module docstring."""
    ids: dict[str, int] = {}
    sources: dict[str, str] = {}
    for name in SPECIAL_NAMES:
        found = _candidates(folder, backend, name)
        if not found:
            ids[name] = -1
            continue
        source, token_id = found[0]
        if not 0 <= token_id < vocab_size:
            raise BTXError(
                f"{folder / source}: {name}_token_id {token_id} is outside tokenizer.json's "
                f"vocabulary of {vocab_size}; fix the file or use the seed's own copy"
            )
        others = [f"{s} says {i}" for s, i in found[1:] if i != token_id]
        if others and name in ("bos", "eos"):
            warnings.warn(
                f"{folder}: {name.upper()} id {token_id} ({backend.id_to_token(token_id)!r}) from "
                f"{source}, but {', '.join(others)}; {source} wins (see megatron_btx.data."
                "hf_tokenizer)",
                TokenizerWarning,
                stacklevel=3,
            )
        ids[name], sources[name] = token_id, source
    if ids["eos"] < 0:
        raise BTXError(
            f"{folder}: no EOS in config.json (eos_token_id), generation_config.json or "
            f'tokenizer_config.json (eos_token); add "eos_token_id": ID to {folder}/config.json'
        )
    if ids["pad"] >= 0 and ids["pad"] in (ids["eos"], ids["bos"]):
        ids["pad"] = -1  # megatron-core masks the loss where labels == pad
        sources.pop("pad", None)
    return SpecialIds(ids["bos"], ids["eos"], ids["pad"], ids["unk"], sources)


class HFTokenizer(Tokenizer):
    """An HF ``tokenizer.json`` folder; ``path`` is the folder (a ``tokenizer.json`` path is also
    accepted and means its folder)."""

    kind = "hf"

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer as BackendTokenizer

        given = Path(model_path)
        folder = given.parent if given.name == "tokenizer.json" else given
        self.path = str(folder)
        json_path = folder / "tokenizer.json"
        if not json_path.is_file():
            raise BTXError(
                f"tokenizer {given} does not exist or has no tokenizer.json; pass an HF seed's "
                "folder (tokenizer.json + config.json) or a SentencePiece tokenizer.model"
            )
        real = inside(folder, json_path, "tokenizer file")  # not a link out of the folder
        try:
            self._backend = BackendTokenizer.from_file(str(real))
        except Exception as exc:  # the Rust side raises a plain Exception on bad files
            raise BTXError(
                f"{json_path} is not a valid tokenizer.json ({exc}); restore the seed's copy"
            ) from None
        self.sha256 = file_sha256(json_path)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        # Added tokens may sit above the base vocabulary: the id range is what sizes embeddings.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special = resolve_special_ids(folder, self._backend, self._vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self.special.eos

    @property
    def bos_id(self) -> int:
        return self.special.bos

    @property
    def pad_id(self) -> int:
        return self.special.pad

    @property
    def unk_id(self) -> int:
        return self.special.unk

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts; with more than one thread on the ``tokenizers`` Rayon pool.

        The pool is sized once per process (``RAYON_NUM_THREADS``, set here from the first
        ``num_threads`` unless the environment already sets it); ``num_threads=1`` encodes in
        this thread."""
        if num_threads == 1:
            return [self.encode(text) for text in texts]
        if num_threads:
            os.environ.setdefault("RAYON_NUM_THREADS", str(int(num_threads)))
        batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [list(enc.ids) for enc in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=True))

    def id_to_piece(self, token_id: int) -> str:
        return str(self._backend.id_to_token(int(token_id)) or "")

    def files(self) -> dict[str, Path]:
        folder = Path(self.path)
        names = [
            n for n in HF_TOKENIZER_FILES if (folder / n).is_file() or (folder / n).is_symlink()
        ]
        for name in names:  # a link out of the folder is never copied into an output
            inside(folder, folder / name, "tokenizer file")
        return {name: folder / name for name in names}
