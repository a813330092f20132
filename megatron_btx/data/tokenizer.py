"""Tokenizers: one shared vocabulary for every domain expert, loaded from whatever file a run
names.

Two kinds are supported behind one :class:`~megatron_btx.data.tokenizer_base.Tokenizer`
interface:

* a SentencePiece model that ``btx prepare-data`` trains on a sample of all domains, or an
  existing ``.model`` file (:mod:`.spm_tokenizer`);
* a seed's HF ``tokenizer.json`` (byte-level BPE for Llama-3.x, Qwen2.5, Qwen3), read with the
  ``tokenizers`` library, with BOS/EOS from the seed's config (:mod:`.hf_tokenizer`).

This module sits above both backends: :func:`load_tokenizer` picks one from what a path is.
"""

from __future__ import annotations

import os

from megatron_btx.data.hf_tokenizer import HFTokenizer
from megatron_btx.data.spm_tokenizer import SentencePieceTokenizer
from megatron_btx.data.tokenizer_base import Tokenizer


def load_tokenizer(model_path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``.model`` file or an HF tokenizer folder; raises BTXError naming the path if it
    is missing or corrupt.

    A SentencePiece ``.model`` file gives :class:`SentencePieceTokenizer`; a folder with a
    ``tokenizer.json`` (as HF seeds ship: Llama-3.x, Qwen2.5, Qwen3), or that file itself, gives
    :class:`HFTokenizer`. A folder that has a ``tokenizer.model`` uses it, as the merge's
    tokenizer check does.
    """
    if os.path.isdir(model_path):
        if not os.path.isfile(os.path.join(model_path, "tokenizer.model")):
            return HFTokenizer(model_path)
    elif os.path.basename(os.fspath(model_path)) == "tokenizer.json":
        return HFTokenizer(model_path)
    return SentencePieceTokenizer(model_path)


def copy_tokenizer_files(
    model_path: str | os.PathLike[str], folder: str | os.PathLike[str]
) -> list[str]:
    """Copy the tokenizer at ``model_path`` (a ``.model`` file or an HF folder) into ``folder``
    under the names a checkpoint's ``tokenizer/`` uses; return those names."""
    return load_tokenizer(model_path).copy_to(folder)
