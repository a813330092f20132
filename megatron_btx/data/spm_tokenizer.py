"""The SentencePiece tokenizer: the one ``btx prepare-data`` trains on a sample of all domains,
or an existing ``.model`` file.

The training settings keep text byte-exact (code must round-trip with its newlines and
indentation): identity normalisation, no whitespace collapsing, no dummy prefix, newline and tab
as their own pieces, and byte fallback so no character ever becomes ``<unk>``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from megatron_btx.data.tokenizer_base import Tokenizer, file_sha256
from megatron_btx.errors import BTXError

logger = logging.getLogger(__name__)

# Fixed special ids, Llama-compatible (unk=0, bos=1, eos=2) plus a distinct pad so megatron-core's
# loss masking of pad tokens never hides a real end-of-document token.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# The settings that make newlines and indentation survive; exported so callers can record them.
ROUND_TRIP_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "user_defined_symbols": ["\n", "\t"],
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
}


class SentencePieceTokenizer(Tokenizer):
    """A loaded SentencePiece model (the tokenizer ``btx prepare-data`` trains)."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.path = str(model_path)
        if os.path.isdir(self.path):
            self.path = os.path.join(self.path, "tokenizer.model")
        if not os.path.isfile(self.path):
            raise BTXError(
                f"tokenizer model {self.path} does not exist; pass the tokenizer.model written by "
                "`btx prepare-data` (or train one with --train-tokenizer --vocab-size N), or an "
                "HF tokenizer folder with a tokenizer.json"
            )
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError on corrupt files
            raise BTXError(
                f"tokenizer model {self.path} is not a valid SentencePiece model ({exc}); "
                "re-create it with `btx prepare-data --train-tokenizer`"
            ) from exc
        self.sha256 = file_sha256(self.path)

    # -- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad_id(self) -> int:
        """The pad id, or -1 when the model was trained without one."""
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts in one call on ``num_threads`` C++ threads (default: all cores)."""
        kwargs: dict[str, Any] = {"out_type": int}
        if num_threads:
            kwargs["num_threads"] = int(num_threads)
        return [list(ids) for ids in self._sp.Encode(list(texts), **kwargs)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._sp.DecodeIds([int(i) for i in ids]))

    def id_to_piece(self, token_id: int) -> str:
        return str(self._sp.IdToPiece(int(token_id)))

    def files(self) -> dict[str, Path]:
        return {"tokenizer.model": Path(self.path)}


def _iter_documents(source: str | os.PathLike[str]) -> Iterator[str]:
    """Documents of one training input: a JSONL file (``text`` field) or a whole text file."""
    path = Path(source)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    continue  # preprocess reports bad lines with file:line; here we only sample
                text = record.get("text") if isinstance(record, dict) else None
                if isinstance(text, str):
                    yield text
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _sample_sentences(
    documents: Iterable[str], max_sentences: int, max_sentence_chars: int, seed: int
) -> list[str]:
    """Reservoir-sample lines so training sees the whole input evenly at bounded cost.

    SentencePiece trains on "sentences"; we use non-empty lines, so newlines themselves are never
    seen inside a sentence (they are a user-defined piece and need no statistics).
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for doc in documents:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            if len(line) > max_sentence_chars:
                line = line[:max_sentence_chars]
            seen += 1
            if len(reservoir) < max_sentences:
                reservoir.append(line)
            else:
                j = rng.randrange(seen)
                if j < max_sentences:
                    reservoir[j] = line
    return reservoir


def _as_documents(source: Iterable[str] | Sequence[str | os.PathLike[str]]) -> Iterable[str]:
    """A list of existing file paths is read as files; anything else is taken as documents."""
    if isinstance(source, (str, bytes)):
        raise BTXError(
            "train_sentencepiece needs a list of files or an iterable of documents, not a single "
            "string; wrap a path in a list"
        )
    if (
        isinstance(source, (list, tuple))
        and source
        and all(
            isinstance(x, os.PathLike)
            or (isinstance(x, str) and len(x) < 4096 and os.path.isfile(x))
            for x in source
        )
    ):
        return (doc for path in source for doc in _iter_documents(path))
    return source  # type: ignore[return-value]


def train_sentencepiece(
    text_files_or_iterator: Iterable[str] | Sequence[str | os.PathLike[str]],
    out_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    max_sentences: int = 300_000,
    max_sentence_chars: int = 4000,
    seed: int = 1234,
    num_threads: int | None = None,
    character_coverage: float = 0.9995,
    extra_options: dict[str, Any] | None = None,
) -> SentencePieceTokenizer:
    """Train a BPE SentencePiece model that round-trips code, and return it loaded.

    ``text_files_or_iterator`` is either a list of paths (``.jsonl`` with a ``text`` field, or any
    other file read as one document) or an iterable of document strings. At most
    ``max_sentences`` lines are sampled, which keeps training to seconds on a laptop. Writes
    ``<out_prefix>.model`` and ``<out_prefix>.vocab`` atomically (temporary name, then rename).
    """
    if vocab_size < 300:
        raise BTXError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 pieces plus "
            "special tokens; use --vocab-size 512 or more (8000 for the small run)"
        )
    documents = _as_documents(text_files_or_iterator)
    started = time.time()
    sentences = _sample_sentences(documents, max_sentences, max_sentence_chars, seed)
    if not sentences:
        raise BTXError(
            f"no text to train the tokenizer {out_prefix}.model on: the inputs are empty; "
            "check the --input paths"
        )
    out_prefix = str(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    options: dict[str, Any] = dict(ROUND_TRIP_SETTINGS)
    options.update(
        vocab_size=vocab_size,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_chars * 4,  # in bytes
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        # We already sampled; let SentencePiece use every line it is given, in order.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # Keep training quiet; we log our own one-line summary.
        minloglevel=2,
        # On small corpora BPE may not reach vocab_size; a soft limit avoids a hard failure.
        hard_vocab_limit=False,
    )
    if extra_options:
        options.update(extra_options)

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)  # deterministic models for the same input
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out_prefix))) as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        model_buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=iter(sentences), model_writer=model_buf, **options
            )
        except RuntimeError as exc:
            raise BTXError(
                f"SentencePiece training for {out_prefix}.model failed: {exc}. If it says the "
                "vocabulary size is too high, lower --vocab-size or give more text"
            ) from exc
        with open(tmp_prefix + ".model", "wb") as handle:
            handle.write(model_buf.getvalue())
        sp = spm.SentencePieceProcessor()
        sp.Load(tmp_prefix + ".model")
        with open(tmp_prefix + ".vocab", "w", encoding="utf-8") as handle:
            handle.writelines(
                f"{sp.IdToPiece(i)}\t{sp.GetScore(i)}\n" for i in range(sp.GetPieceSize())
            )
        os.replace(tmp_prefix + ".vocab", out_prefix + ".vocab")
        os.replace(tmp_prefix + ".model", out_prefix + ".model")
    tok = SentencePieceTokenizer(out_prefix + ".model")
    logger.info(
        "trained SentencePiece %s: vocab %d from %d sampled lines in %.1fs",
        out_prefix + ".model",
        tok.vocab_size,
        len(sentences),
        time.time() - started,
    )
    return tok
