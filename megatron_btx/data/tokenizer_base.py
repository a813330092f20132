"""The tokenizer interface every backend implements, and the file hash that identifies one.

BTX merges experts that were trained separately, so they must all see the same token ids; the
tokenizer is fixed once and its sha256 travels with every dataset manifest and checkpoint so a
mismatch can be detected later. This module holds only what the backends share (the abstract
:class:`Tokenizer` and :func:`file_sha256`), so each backend imports it and nothing else of
the others; :mod:`megatron_btx.data.tokenizer` sits above them and loads whichever a path is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hash a file in chunks; used for provenance of tokenizer models and inputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer:
    """A loaded tokenizer with the handful of operations the data path needs.

    The backends are :class:`~megatron_btx.data.spm_tokenizer.SentencePieceTokenizer` and
    :class:`~megatron_btx.data.hf_tokenizer.HFTokenizer`;
    :func:`megatron_btx.data.tokenizer.load_tokenizer` picks one from what a path is.
    Every backend has ``path``, ``kind``, ``sha256`` (of the file that defines the vocabulary:
    what datasets, checkpoints and the merge compare), the special ids, and encode/decode.
    """

    kind = "abstract"
    path: str
    sha256: str

    # -- ids -------------------------------------------------------------------------------
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int  # -1 when there is none (or it would collide with EOS/BOS)
    unk_id: int  # -1 when there is none

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (callers decide document boundaries)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts, on ``num_threads`` native threads where the backend has them."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; special ids (bos/eos/pad) decode to nothing."""
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, Path]:
        """The files that make up this tokenizer, by the name they get in a copy."""
        raise NotImplementedError

    def copy_to(self, folder: str | os.PathLike[str]) -> list[str]:
        """Copy :meth:`files` into ``folder`` (a checkpoint's ``tokenizer/``); return the names."""
        dst = Path(folder)
        dst.mkdir(parents=True, exist_ok=True)
        for name, src in self.files().items():
            shutil.copy2(src, dst / name)
        return sorted(self.files())

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Native tokenizer handles are not picklable; worker processes reload from the path.
        return (type(self), (self.path,))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.sha256[:12]})"
        )
