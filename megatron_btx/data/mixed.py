"""Mixed held-out documents: paragraphs from different domains in one document.

Token-level routing (BTX) can follow a document that changes domain from paragraph to paragraph;
a document-level router (BTM's tf-idf choice of experts) picks once per document and cannot. The
paper evaluates on tasks no single expert owns; in the miniature, mixed documents are that test.

A mixed document alternates chunks of 100-400 tokens cut from the *held-out (test) documents* of
2-4 different domains, so nothing any model trained on ever appears in one (the test split is
decided by the same stable hash of document keys as everywhere else, :mod:`.splits`). A chunk is
a verbatim run of whole paragraphs of one document where possible (a paragraph longer than a
chunk is cut at lines, a line longer than a chunk at characters); each chunk is used at most
once. Chunks are joined by a blank line.

Outputs (:func:`prepare_mixed`): ``<out>/mixed_test_text_document.{bin,idx}`` (megatron-core
indexed dataset, one document per mixed document, EOS appended, read by the evaluation exactly
like a domain's test split) and ``<out>/mixed_test_segments.json``: for every mixed document its
segments, each with its domain, the key of the held-out document it came from, and its character
and token spans. Each segment is tokenised on its own (with the blank line that follows it), so
token spans are exact; the EOS token belongs to the last segment.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_btx.data.splits import parse_split, split_of
from megatron_btx.errors import BTXError

if TYPE_CHECKING:
    from megatron_btx.data.tokenizer_base import Tokenizer

MIXED_NAME = "mixed"
SEGMENTS_FORMAT = 1
SEPARATOR = "\n\n"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class Chunk:
    """A piece of one held-out document, 100-400 tokens' worth of whole paragraphs."""

    domain: str
    source: str  # key of the held-out document
    text: str


@dataclass
class MixedDocument:
    key: str
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def text(self) -> str:
        return SEPARATOR.join(c.text for c in self.chunks)

    @property
    def domains(self) -> list[str]:
        return [c.domain for c in self.chunks]


def _pieces(text: str, encode: Encode, max_tokens: int) -> list[tuple[int, int]]:
    """Character spans of ``text``'s paragraphs; an over-long paragraph gives its lines, and an
    over-long line slices of about half a chunk each."""
    spans: list[tuple[int, int]] = []
    breaks = [(m.start(), m.end()) for m in _PARAGRAPH_BREAK.finditer(text)]
    starts = [0, *(end for _, end in breaks)]
    ends = [*(start for start, _ in breaks), len(text)]
    for para_start, para_end in zip(starts, ends, strict=True):
        while para_start < para_end and text[para_start] == "\n":  # a document's leading and
            para_start += 1  # trailing newlines belong to no paragraph
        while para_end > para_start and text[para_end - 1] == "\n":
            para_end -= 1
        paragraph = text[para_start:para_end]
        if not paragraph.strip():
            continue
        if len(encode(paragraph)) <= max_tokens:
            spans.append((para_start, para_end))
            continue
        line_start = para_start
        for line in paragraph.split("\n"):
            line_end = line_start + len(line)
            tokens = len(encode(line)) if line.strip() else 0
            if 0 < tokens <= max_tokens:
                spans.append((line_start, line_end))
            elif tokens:
                width = max(1, len(line) * max_tokens // (2 * tokens))
                spans.extend(
                    (s, min(s + width, line_end)) for s in range(line_start, line_end, width)
                )
            line_start = line_end + 1
    return spans


def chunk_document(
    domain: str,
    key: str,
    text: str,
    encode: Encode,
    rng: random.Random,
    min_tokens: int = 100,
    max_tokens: int = 400,
) -> list[Chunk]:
    """Consecutive chunks of a document: runs of whole paragraphs (or lines) with their original
    separators, each of ``min_tokens`` to ``max_tokens`` tokens exactly (a target drawn uniformly
    in that range); a remainder too short for a chunk is dropped."""
    chunks: list[Chunk] = []
    start: int | None = None  # character start of the chunk being grown
    last_end, last_tokens = -1, 0  # the chunk so far: its end and tokens
    target = rng.randint(min_tokens, max_tokens)
    for piece_start, piece_end in _pieces(text, encode, max_tokens):
        if start is None:
            start = piece_start
        tokens = len(encode(text[start:piece_end]))
        if tokens > max_tokens:  # this piece does not fit: close the chunk so far, or drop it
            if last_tokens >= min_tokens:
                chunks.append(Chunk(domain, key, text[start:last_end]))
                target = rng.randint(min_tokens, max_tokens)
            start, tokens = piece_start, len(encode(text[piece_start:piece_end]))
            if tokens > max_tokens:  # a single slice over the limit: skip it
                start, last_end, last_tokens = None, -1, 0
                continue
        last_end, last_tokens = piece_end, tokens
        if tokens >= target:
            chunks.append(Chunk(domain, key, text[start:piece_end]))
            start, last_end, last_tokens = None, -1, 0
            target = rng.randint(min_tokens, max_tokens)
    return chunks


def _alternating(domains: list[str], n_segments: int, rng: random.Random) -> list[str]:
    """``n_segments`` domains cycling through ``domains`` in shuffled rounds, never the same
    domain twice in a row."""
    order: list[str] = []
    while len(order) < n_segments:
        round_ = domains[:]
        rng.shuffle(round_)
        if order and round_[0] == order[-1]:
            round_.append(round_.pop(0))
        order.extend(round_)
    return order[:n_segments]


def build_mixed_documents(
    held_out: Mapping[str, Sequence[tuple[str, str]]],
    encode: Encode,
    seed: int = 0,
    target_tokens: int = 65_536,
    domains_per_document: tuple[int, int] = (2, 4),
    segments_per_document: tuple[int, int] = (4, 8),
    segment_tokens: tuple[int, int] = (100, 400),
) -> list[MixedDocument]:
    """Mixed documents from ``held_out`` (domain -> [(key, text)] of held-out documents) until
    about ``target_tokens`` tokens, or until fewer than two domains have chunks left.

    Deterministic for a given seed and input: chunks are cut and shuffled with ``random.Random``
    seeded by ``seed``, domains are visited in sorted order.
    """
    low, high = domains_per_document
    if not 2 <= low <= high:
        raise BTXError(f"domains_per_document {domains_per_document}: need 2 <= min <= max")
    if not 1 <= segment_tokens[0] <= segment_tokens[1]:
        raise BTXError(f"segment_tokens {segment_tokens}: need 1 <= min <= max")
    rng = random.Random(seed)
    pools: dict[str, list[Chunk]] = {}
    for domain in sorted(held_out):
        pool = [
            chunk
            for key, text in held_out[domain]
            for chunk in chunk_document(domain, key, text, encode, rng, *segment_tokens)
        ]
        rng.shuffle(pool)
        if pool:
            pools[domain] = pool
    documents: list[MixedDocument] = []
    tokens = 0
    while tokens < target_tokens:
        available = sorted(d for d, pool in pools.items() if pool)
        if len(available) < 2:
            break
        chosen = rng.sample(
            available, rng.randint(min(low, len(available)), min(high, len(available)))
        )
        n_segments = rng.randint(
            max(len(chosen), segments_per_document[0]), max(len(chosen), segments_per_document[1])
        )
        doc = MixedDocument(f"{MIXED_NAME}/{len(documents):05d}")
        # The first round of the plan names every chosen domain once and each chosen pool has a
        # chunk, so a document always mixes at least two domains even when a pool runs dry.
        for domain in _alternating(chosen, n_segments, rng):
            if not pools[domain]:
                break
            doc.chunks.append(pools[domain].pop())
        documents.append(doc)
        tokens += sum(len(encode(c.text)) for c in doc.chunks)
    return documents


def held_out_documents(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    split: str | Mapping[str, float] | None = None,
    txt_separator: str | None = None,
    which: str = "test",
) -> dict[str, list[tuple[str, str]]]:
    """The ``which`` split's text documents of every domain, read as ``prepare-data`` reads them
    (same keys, same hash split), so a mixed document only ever holds held-out text."""
    from megatron_btx.data.preprocess import DataWarning, iter_documents

    fractions = parse_split(dict(split) if isinstance(split, Mapping) else split)
    out: dict[str, list[tuple[str, str]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # reported once, by preprocess_files
        for name, paths in domains.items():
            out[name] = [
                (key, text)
                for key, text in iter_documents(paths, txt_separator=txt_separator)
                if split_of(key, fractions) == which
            ]
    return out


def encode_segments(
    doc: MixedDocument, encode: Encode, eos_id: int
) -> tuple[list[int], list[dict[str, Any]]]:
    """Token ids of a mixed document (EOS appended) and its segments with exact spans."""
    ids: list[int] = []
    segments: list[dict[str, Any]] = []
    char = 0
    for i, chunk in enumerate(doc.chunks):
        last = i == len(doc.chunks) - 1
        piece = chunk.text if last else chunk.text + SEPARATOR
        start = len(ids)
        ids.extend(encode(piece))
        if last:
            ids.append(eos_id)
        segments.append(
            {
                "domain": chunk.domain,
                "source": chunk.source,
                "chars": [char, char + len(chunk.text)],
                "tokens": [start, len(ids)],
            }
        )
        char += len(piece)
    return ids, segments


def prepare_mixed(
    domains: Mapping[str, Sequence[str | os.PathLike[str]]],
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer,
    split: str | Mapping[str, float] | None = None,
    txt_separator: str | None = None,
    seed: int = 0,
    target_tokens: int = 65_536,
) -> dict[str, Any]:
    """Write ``<out>/mixed_test_text_document.{bin,idx}`` and ``<out>/mixed_test_segments.json``.

    ``tokenizer`` is the run's :class:`~megatron_btx.data.tokenizer_base.Tokenizer`. Returns the
    manifest entry: documents, tokens, tokens per domain, and the file names.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_btx.data.preprocess import split_prefix

    if MIXED_NAME in domains:
        raise BTXError(
            f"a domain is named {MIXED_NAME!r}, the name of the mixed held-out documents; rename it"
        )
    held_out = held_out_documents(domains, split, txt_separator)
    docs = build_mixed_documents(held_out, tokenizer.encode, seed, target_tokens)
    if not docs:
        raise BTXError(
            "no mixed documents: fewer than two domains have held-out (test) text; give more "
            "documents or raise the test fraction of --split"
        )
    prefix = split_prefix(Path(out_dir) / MIXED_NAME, "test")
    tag = f".tmp{os.getpid()}"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(prefix + tag + ".bin", dtype=dtype)
    records = []
    per_domain: dict[str, int] = {}
    try:
        for doc in docs:
            ids, segments = encode_segments(doc, tokenizer.encode, tokenizer.eos_id)
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            records.append({"key": doc.key, "tokens": len(ids), "segments": segments})
            for seg in segments:
                per_domain[seg["domain"]] = (
                    per_domain.get(seg["domain"], 0) + seg["tokens"][1] - seg["tokens"][0]
                )
        builder.finalize(prefix + tag + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(prefix + tag + ext).unlink(missing_ok=True)
        raise
    sidecar = Path(str(prefix).removesuffix("_text_document") + "_segments.json")
    meta = {
        "format": SEGMENTS_FORMAT,
        "seed": seed,
        "source_split": "test",
        "split": parse_split(dict(split) if isinstance(split, Mapping) else split),
        "tokenizer_sha256": tokenizer.sha256,
        "documents": records,
    }
    tmp = sidecar.with_name(sidecar.name + tag)
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    for ext in (".bin", ".idx"):
        os.replace(prefix + tag + ext, prefix + ext)
    os.replace(tmp, sidecar)
    return {
        "prefix": os.path.basename(prefix),
        "segments": sidecar.name,
        "documents": len(records),
        "tokens": sum(r["tokens"] for r in records),
        "tokens_per_domain": dict(sorted(per_domain.items())),
    }


def load_segments(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<data_dir>/mixed_test_segments.json`` (BTXError with the fix if absent)."""
    path = Path(data_dir) / f"{MIXED_NAME}_test_segments.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BTXError(f"{path} not found; prepare the data with mixed documents first") from None
    except json.JSONDecodeError as exc:
        raise BTXError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); prepare it again"
        ) from None
    if meta.get("format") != SEGMENTS_FORMAT:
        raise BTXError(f"{path}: format {meta.get('format')!r}, expected {SEGMENTS_FORMAT}")
    return meta


def token_domains(meta: Mapping[str, Any], domain_names: Sequence[str]) -> np.ndarray:
    """Index into ``domain_names`` of the segment domain of every token of the mixed dataset,
    documents concatenated in order (the layout ``eval.data.eval_set`` cuts windows from), so
    ``token_domains(...)[s + 1 : s + w]`` is to a window what ``doc_of_target`` is."""
    index = {name: i for i, name in enumerate(domain_names)}
    parts = []
    for doc in meta["documents"]:
        labels = np.full(int(doc["tokens"]), -1, dtype=np.int64)
        for seg in doc["segments"]:
            start, end = seg["tokens"]
            labels[start:end] = index[seg["domain"]]
        parts.append(labels)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
