"""Mixed held-out documents: provenance, no training text, alternation, exact token spans."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_btx.data.mixed import (
    build_mixed_documents,
    chunk_document,
    held_out_documents,
    load_segments,
    prepare_mixed,
    token_domains,
)
from megatron_btx.data.preprocess import split_prefix
from megatron_btx.data.splits import split_of
from megatron_btx.data.spm_tokenizer import train_sentencepiece
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError

SPLIT = {"test": 0.3, "valid": 0.1}
WORDS = {
    "alpha": "apple apricot avocado almond anise",
    "beta": "basil bay borage burnet bergamot",
    "gamma": "garlic ginger galangal guava grape",
}
TAG = re.compile(r"<(\w+):(\d+):(\d+)>")


def byte_encode(text: str) -> list[int]:
    """A byte-level tokenizer: one token per UTF-8 byte (token counts checkable by hand)."""
    return list(text.encode("utf-8"))


def _corpus(domain: str, n_docs: int = 30) -> dict[str, str]:
    """Documents of 6-12 paragraphs; every paragraph carries a unique <domain:doc:paragraph> tag."""
    rng = random.Random(domain)
    docs = {}
    for doc in range(n_docs):
        paragraphs = [
            f"<{domain}:{doc}:{p}> " + " ".join(rng.choices(WORDS[domain].split(), k=8))
            for p in range(rng.randint(6, 12))
        ]
        docs[f"{domain}-doc-{doc}"] = "\n\n".join(paragraphs) + "\n"
    return docs


def _write(tmp: Path) -> tuple[dict[str, list[Path]], dict[str, dict[str, str]]]:
    paths, texts = {}, {}
    for domain in WORDS:
        texts[domain] = _corpus(domain)
        path = tmp / f"{domain}.jsonl"
        path.write_text(
            "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts[domain].items())
        )
        paths[domain] = [path]
    return paths, texts


def test_chunks_are_verbatim_runs_of_paragraphs_within_the_token_range() -> None:
    text = "\n\n".join(f"para {i} " + "x" * (30 + 7 * i) for i in range(20)) + "\n"
    chunks = chunk_document("d", "k", text, byte_encode, random.Random(0), 100, 400)
    assert len(chunks) >= 5
    for chunk in chunks:
        assert chunk.text in text and 100 <= len(chunk.text.encode()) <= 400
        assert chunk.text.startswith("para ") and not chunk.text.endswith("\n")
    # Consecutive chunks do not overlap and keep document order.
    positions = [text.index(c.text) for c in chunks]
    assert positions == sorted(positions)
    assert all(p + len(c.text) <= q for p, c, q in zip(positions, chunks, positions[1:]))


def test_overlong_lines_are_sliced_and_every_chunk_respects_the_limit() -> None:
    text = "short intro line\n" + "y" * 3000 + "\nafter\n"
    chunks = chunk_document("d", "k", text, byte_encode, random.Random(1), 100, 400)
    assert chunks and all(100 <= len(c.text) <= 400 for c in chunks)
    assert sum(c.text.count("y") for c in chunks) >= 2000  # most of the long line is kept


def test_mixed_documents_hold_only_test_text_with_provenance(tmp_path: Path) -> None:
    paths, texts = _write(tmp_path)
    held_out = held_out_documents(paths, SPLIT)
    for domain, docs in held_out.items():
        expected = [k for k in texts[domain] if split_of(k, SPLIT) == "test"]
        assert [k for k, _ in docs] == expected and expected
    docs = build_mixed_documents(held_out, byte_encode, seed=0, target_tokens=6000)
    assert sum(len(d.text.encode()) for d in docs) >= 6000
    train_tags = {
        f"<{domain}:{k.rsplit('-', 1)[1]}:"
        for domain in texts
        for k in texts[domain]
        if split_of(k, SPLIT) != "test"
    }
    for doc in docs:
        for chunk in doc.chunks:
            assert split_of(chunk.source, SPLIT) == "test"
            assert chunk.text in texts[chunk.domain][chunk.source]  # provenance round-trips
            # Every tag in the chunk names the chunk's own domain and source document.
            for domain, doc_no, _ in TAG.findall(chunk.text):
                assert domain == chunk.domain and chunk.source == f"{domain}-doc-{doc_no}"
        assert not any(tag in doc.text for tag in train_tags)  # no training/valid text leaks


def test_documents_alternate_two_to_four_domains() -> None:
    held_out = {d: list(_corpus(d, 12).items()) for d in WORDS}
    docs = build_mixed_documents(held_out, byte_encode, seed=5, target_tokens=8000)
    assert len(docs) >= 3
    for doc in docs:
        assert 2 <= len(set(doc.domains)) <= 3  # only three domains exist here
        assert all(a != b for a, b in zip(doc.domains, doc.domains[1:]))
        assert all(100 <= len(c.text.encode()) <= 400 for c in doc.chunks)
    used = [(c.source, c.text) for doc in docs for c in doc.chunks]
    assert len(used) == len(set(used))  # each chunk at most once


def test_domains_per_document_and_segment_tokens_are_obeyed() -> None:
    held_out = {d: list(_corpus(d, 12).items()) for d in WORDS}
    pairs = build_mixed_documents(
        held_out, byte_encode, seed=1, target_tokens=4000, domains_per_document=(2, 2)
    )
    assert pairs and all(len(set(d.domains)) == 2 for d in pairs)
    triples = build_mixed_documents(
        held_out, byte_encode, seed=1, target_tokens=4000, domains_per_document=(3, 3)
    )
    assert triples and all(len(set(d.domains)) == 3 for d in triples)
    short = build_mixed_documents(
        held_out, byte_encode, seed=1, target_tokens=2000, segment_tokens=(50, 60)
    )
    assert short and all(50 <= len(c.text.encode()) <= 60 for d in short for c in d.chunks)
    # Segments per document as asked, but never fewer than its domains (three need three).
    for domains, segments, expected in (((2, 2), (2, 2), 2), ((3, 3), (2, 2), 3)):
        docs = build_mixed_documents(
            held_out,
            byte_encode,
            seed=1,
            target_tokens=2000,
            domains_per_document=domains,
            segments_per_document=segments,
        )
        assert docs and all(len(d.chunks) == expected for d in docs)
    with pytest.raises(BTXError, match="domains_per_document"):
        build_mixed_documents(held_out, byte_encode, domains_per_document=(1, 3))


def test_deterministic_given_seed() -> None:
    held_out = {d: list(_corpus(d, 12).items()) for d in WORDS}
    first = build_mixed_documents(held_out, byte_encode, seed=11, target_tokens=5000)
    again = build_mixed_documents(held_out, byte_encode, seed=11, target_tokens=5000)
    other = build_mixed_documents(held_out, byte_encode, seed=12, target_tokens=5000)
    assert [d.text for d in first] == [d.text for d in again]
    assert [d.text for d in first] != [d.text for d in other]


def test_one_domain_cannot_make_mixed_documents() -> None:
    held_out = {"alpha": list(_corpus("alpha", 5).items()), "beta": []}
    assert build_mixed_documents(held_out, byte_encode, target_tokens=1000) == []


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    texts = [t for d in WORDS for t in _corpus(d).values()]
    return train_sentencepiece(texts * 2, tmp_path_factory.mktemp("tok") / "spm", vocab_size=300)


def test_prepare_mixed_writes_exact_token_spans(tok: Tokenizer, tmp_path: Path) -> None:
    paths, texts = _write(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = prepare_mixed(paths, out, tok, SPLIT, seed=2, target_tokens=3000)
    meta = load_segments(out)
    dataset = IndexedDataset(split_prefix(out / "mixed", "test"))
    assert len(dataset) == result["documents"] == len(meta["documents"]) > 0
    total = 0
    for i, record in enumerate(meta["documents"]):
        ids = dataset[i].tolist()
        assert len(ids) == record["tokens"] and ids[-1] == tok.eos_id
        spans = [seg["tokens"] for seg in record["segments"]]
        assert spans[0][0] == 0 and spans[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no gaps
        for seg in record["segments"]:
            start, end = seg["tokens"]
            decoded = tok.decode(ids[start:end])  # EOS decodes to nothing
            assert decoded.rstrip("\n") in texts[seg["domain"]][seg["source"]]
            assert TAG.search(decoded).group(1) == seg["domain"]
        total += len(ids)
    assert result["tokens"] == total and sum(result["tokens_per_domain"].values()) == total
    labels = token_domains(meta, list(WORDS))
    assert labels.shape == (total,) and labels.min() >= 0
    first = meta["documents"][0]["segments"][0]
    assert np.all(labels[slice(*first["tokens"])] == list(WORDS).index(first["domain"]))


def test_prepare_mixed_refuses_a_domain_named_mixed(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(BTXError, match="named 'mixed'"):
        prepare_mixed({"mixed": [tmp_path]}, tmp_path, tok)
    with pytest.raises(BTXError, match="not found"):
        load_segments(tmp_path)
