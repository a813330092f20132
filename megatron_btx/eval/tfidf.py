"""tf-idf over token ids, for BTM's expert choice (numpy only).

BTM (Li et al. 2022; the BTX paper's baseline) picks, per input document, the experts whose
training data is most similar: cosine similarity between the document's tf-idf vector and each
expert's *centroid*, the mean tf-idf vector of that expert's training documents. Terms here are
the tokenizer's token ids (the shared SentencePiece vocabulary), so no second tokenisation is
needed and it works for any language or code. idf is fitted on the training documents of all
domains together (smooth idf, as scikit-learn: ``ln((1 + n) / (1 + df)) + 1``); tf is the
token count divided by the document length; vectors are L2-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TfIdf:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.idf: np.ndarray | None = None

    def _tf(self, doc: np.ndarray) -> np.ndarray:
        c = np.bincount(
            np.asarray(doc, dtype=np.int64) % self.vocab_size, minlength=self.vocab_size
        ).astype(np.float64)
        return c / max(c.sum(), 1.0)

    def fit(self, docs: Sequence[np.ndarray]) -> TfIdf:
        df = np.zeros(self.vocab_size, dtype=np.float64)
        for d in docs:
            df[np.unique(np.asarray(d, dtype=np.int64) % self.vocab_size)] += 1
        n = len(docs)
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        return self

    def transform(self, doc: np.ndarray) -> np.ndarray:
        assert self.idf is not None, "fit first"
        v = self._tf(doc) * self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def centroid(self, docs: Sequence[np.ndarray]) -> np.ndarray:
        return np.mean([self.transform(d) for d in docs], axis=0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def choose_experts(doc_vec: np.ndarray, centroids: np.ndarray, k: int) -> list[int]:
    """Indices of the k most similar centroids (ties broken by index)."""
    sims = np.array([cosine(doc_vec, c) for c in centroids])
    return [int(i) for i in np.argsort(-sims, kind="stable")[:k]]
