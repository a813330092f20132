"""Held-out evaluation windows and training-document samples, read from prepared datasets.

Evaluation data of a domain: its held-out split (``<domain>_test_text_document``; documents never
straddle splits), concatenated in document order and cut into non-overlapping windows of
``seq_length + 1`` tokens; ``tokens_per_domain / seq_length`` windows are taken evenly spaced over
the whole split (so every held-out document contributes, not just the first), each scored
independently on its last ``seq_length`` tokens. Every scored token remembers the document it
belongs to, which is what BTM's per-document expert choice and the bootstrap over documents need.

The first ``route_tokens`` tokens of every document (at most half of it) are its *routing
prefix*: BTM chooses its experts from them, as c-BTM routes on the context it has seen, and they
are never scored, for any model, so every model is scored on the same tokens and BTM never sees
the tokens it is scored on. They still serve as context for the tokens after them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron_btx.data.preprocess import split_prefix
from megatron_btx.errors import BTXError


@dataclass
class EvalSet:
    domain: str
    windows: np.ndarray  # [n, seq_length + 1] int64 token ids
    doc_of_target: np.ndarray  # [n, seq_length] document index of each predicted token
    scored: np.ndarray  # [n, seq_length] bool: the token is scored (not a routing prefix)
    docs: list[np.ndarray]  # token ids of each held-out document
    route_len: np.ndarray  # [documents] length of each document's routing prefix
    starts: np.ndarray  # [n] where each window starts in the concatenated documents

    @property
    def n_tokens(self) -> int:
        """Scored tokens."""
        return int(self.scored.sum())

    def routing_prefix(self, doc: int) -> np.ndarray:
        """The tokens of document `doc` that BTM routes on (never scored)."""
        return self.docs[doc][: int(self.route_len[doc])]

    def select(self, per_target: np.ndarray) -> np.ndarray:
        """The scored entries of a [n, seq_length] array, flat, in order."""
        return per_target[self.scored]

    @property
    def scored_docs(self) -> np.ndarray:
        """The document of each scored token (same order as :meth:`select`)."""
        return self.doc_of_target[self.scored]


def _dataset(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not os.path.isfile(prefix + ".idx"):
        raise BTXError(f"{prefix}.idx: no such dataset (prepare the data with btx prepare-data)")
    from megatron_btx.data.indexed_check import check_indexed

    check_indexed(prefix)  # the index matches its data before megatron-core reads it
    return IndexedDataset(prefix, mmap=True)


def documents(
    prefix: str, max_docs: int | None = None, max_tokens: int | None = None
) -> list[np.ndarray]:
    """The documents (sequences) of an indexed dataset, optionally a spread-out subset."""
    ds = _dataset(prefix)
    n = len(ds.sequence_lengths)
    idx = np.arange(n)
    if max_docs is not None and n > max_docs:
        idx = np.linspace(0, n - 1, max_docs).round().astype(int)
    out: list[np.ndarray] = []
    total = 0
    for i in idx:
        doc = np.asarray(ds[int(i)], dtype=np.int64)
        if max_tokens is not None and total + len(doc) > max_tokens:
            doc = doc[: max(0, max_tokens - total)]
        if len(doc):
            out.append(doc)
        total += len(doc)
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def eval_set(
    data_dir: str,
    domain: str,
    split: str,
    seq_length: int,
    tokens_per_domain: int,
    route_tokens: int = 0,
) -> EvalSet:
    prefix = split_prefix(os.path.join(data_dir, domain), split)
    docs = documents(prefix)
    if not docs:
        raise BTXError(f"{prefix}: the {split} split of {domain} is empty")
    flat = np.concatenate(docs)
    doc_id = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(docs)])
    route_len = np.array([min(route_tokens, len(d) // 2) for d in docs], dtype=np.int64)
    position = np.concatenate([np.arange(len(d)) for d in docs])
    in_prefix = position < route_len[doc_id]
    window = seq_length + 1
    n_avail = len(flat) // window
    if n_avail == 0:
        raise BTXError(
            f"{prefix}: {len(flat)} held-out tokens, fewer than one window of {window}; lower "
            f"data.seq_length or hold out more documents (data.split)"
        )
    n_want = max(1, tokens_per_domain // seq_length)
    pick = (
        np.arange(n_avail)
        if n_want >= n_avail
        else np.linspace(0, n_avail - 1, n_want).round().astype(int)
    )
    starts = pick * window
    windows = np.stack([flat[s : s + window] for s in starts])
    doc_of_target = np.stack([doc_id[s + 1 : s + window] for s in starts])
    scored = np.stack([~in_prefix[s + 1 : s + window] for s in starts])
    return EvalSet(domain, windows, doc_of_target, scored, docs, route_len, starts)
