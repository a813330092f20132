"""Bootstrap confidence intervals for the evaluation table, resampled over documents (numpy only).

Why documents and not tokens: the held-out set is a sample of *documents* (:mod:`..data.splits`
hashes document keys), and the tokens of one document are strongly correlated (a document a
model finds hard is hard throughout). Resampling tokens would treat 64k correlated tokens as 64k
independent draws and give intervals several times too narrow.

What is estimated
- **Per domain**: the token-weighted mean loss, sum of token losses / number of scored tokens,
  which is what perplexity = exp(mean loss) is. A replicate draws the domain's D documents with
  replacement (D draws) and recomputes that ratio, so long documents weigh more, as in the point
  estimate.
- **Headline mean**: the unweighted mean of the per-domain losses, i.e. the log of the geometric
  mean of per-domain perplexities: every domain counts the same whatever its token count. In a
  replicate every domain is resampled, independently of the others.
- **Groups**: the same mean over a subset of domains (expert domains, general, mixed documents),
  and the mean over groups, in which every group weighs the same (:func:`group_weights`).
- **Paired differences**: model A minus model B computed on the *same* resampled documents in
  every replicate, so the variation that both models share (hard documents are hard for both)
  cancels. "A is better than B" holds only when the whole interval is below 0.

Interval method: the **percentile** interval (the (1-c)/2 and (1+c)/2 quantiles of the replicate
statistics). It respects monotone transformations, so the perplexity interval is exactly exp of
the loss interval and the geometric-mean perplexity's is exp of the mean loss's: the loss and
perplexity columns can never disagree about a claim. BCa would add a bias and skewness correction
(second-order accurate) but needs a jackknife per statistic and per paired difference; the
ratio estimators here are smooth and close to symmetric at tens of documents, and
tests/test_eval_stats.py measures the percentile interval's coverage of a known mean at about
the nominal 95%.

Replicates are drawn as a count matrix (how often each document is drawn in each replicate), one
per domain, seeded by the seed and the domain's name: a domain's draws do not depend on which
other domains or models are evaluated, and 10,000 replicates over a few hundred documents are a
few matrix-vector products (milliseconds).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_btx.errors import BTXError

DomainWeights = Sequence[str] | Mapping[str, float]
DEFAULT_REPLICATES = 10_000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class DocumentLosses:
    """One model's scores on one domain, summed per held-out document (ids sorted, unique)."""

    doc_ids: np.ndarray  # int64 [D]
    loss_sums: np.ndarray  # float64 [D], nats
    token_counts: np.ndarray  # int64 [D], scored tokens of each document

    @classmethod
    def from_tokens(cls, token_losses: np.ndarray, doc_of_token: np.ndarray) -> DocumentLosses:
        """Per-document sums of per-token losses (``-log p``); ``doc_of_token`` as in EvalSet."""
        losses = np.asarray(token_losses, dtype=np.float64).ravel()
        docs = np.asarray(doc_of_token).ravel()
        if losses.shape != docs.shape:
            raise BTXError(
                f"{losses.size} token losses but {docs.size} document ids: give one document id "
                "per scored token (EvalSet.doc_of_target)"
            )
        if losses.size == 0:
            raise BTXError("no scored tokens: cannot compute a loss or its interval")
        if not np.all(np.isfinite(losses)):
            raise BTXError("token losses contain NaN or infinity; check the model's outputs")
        if not np.issubdtype(docs.dtype, np.integer):
            raise BTXError(f"document ids must be integers, not {docs.dtype}")
        ids, inverse = np.unique(docs, return_inverse=True)
        sums = np.bincount(inverse, weights=losses, minlength=ids.size)
        counts = np.bincount(inverse, minlength=ids.size)
        return cls(ids.astype(np.int64), sums, counts.astype(np.int64))

    @classmethod
    def from_logprobs(cls, logprobs: np.ndarray, doc_of_token: np.ndarray) -> DocumentLosses:
        """The same from per-token log-probabilities (``scoring.token_logprobs``)."""
        return cls.from_tokens(-np.asarray(logprobs, dtype=np.float64), doc_of_token)

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean loss of the domain (log perplexity)."""
        return float(self.loss_sums.sum() / self.token_counts.sum())


def by_segment_domain(
    token_losses: np.ndarray,
    doc_of_token: np.ndarray,
    domain_of_token: np.ndarray,
    domain_names: Sequence[str],
) -> dict[str, DocumentLosses]:
    """Scores of mixed documents split by the domain each token's segment came from
    (``data.mixed.token_domains``): per segment domain, the tokens of that domain summed per
    mixed document, so each can be bootstrapped over mixed documents like a domain."""
    losses = np.asarray(token_losses, dtype=np.float64).ravel()
    docs = np.asarray(doc_of_token).ravel()
    labels = np.asarray(domain_of_token).ravel()
    if labels.shape != losses.shape:
        raise BTXError(f"{labels.size} segment labels for {losses.size} scored tokens")
    return {
        name: DocumentLosses.from_tokens(losses[labels == i], docs[labels == i])
        for i, name in enumerate(domain_names)
        if np.any(labels == i)
    }


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    estimate: float
    low: float
    high: float

    def exp(self) -> Interval:
        """The interval of exp(statistic): percentile intervals map through monotone functions."""
        return Interval(math.exp(self.estimate), math.exp(self.low), math.exp(self.high))

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    def format(self, digits: int = 2) -> str:
        """``34.23 [33.10, 35.40]`` for a table cell."""
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _domain_seed(seed: int, domain: str) -> list[int]:
    """Seed material for one domain's draws: stable across runs, machines and Python's hash salt."""
    digest = hashlib.sha256(domain.encode("utf-8")).digest()
    return [int(seed), int.from_bytes(digest[:8], "big")]


def resample_counts(n_documents: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """[replicates, n_documents] float64: how often each document is drawn in each replicate
    (n_documents draws with replacement per replicate, so every row sums to n_documents)."""
    draws = rng.integers(0, n_documents, size=(replicates, n_documents))
    flat = draws + (np.arange(replicates, dtype=np.int64) * n_documents)[:, None]
    counts = np.bincount(flat.ravel(), minlength=replicates * n_documents)
    return counts.reshape(replicates, n_documents).astype(np.float64)


class DocumentBootstrap:
    """Resampled documents per domain, shared by every model so that comparisons are paired.

    ``documents`` maps each domain to the ids of its held-out documents (those of any model's
    :class:`DocumentLosses`); every model scored later must cover exactly those documents.
    """

    def __init__(
        self,
        documents: Mapping[str, np.ndarray],
        replicates: int = DEFAULT_REPLICATES,
        seed: int = 0,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> None:
        if replicates < 1:
            raise BTXError(f"bootstrap replicates must be at least 1, not {replicates}")
        if not 0.0 < confidence < 1.0:
            raise BTXError(f"confidence must be between 0 and 1 (e.g. 0.95), not {confidence}")
        self.replicates, self.seed, self.confidence = int(replicates), int(seed), confidence
        self._memo: dict[tuple[str, int], tuple[DocumentLosses, np.ndarray]] = {}
        self.doc_ids = {d: np.asarray(ids, dtype=np.int64) for d, ids in documents.items()}
        empty = [d for d, ids in self.doc_ids.items() if ids.size == 0]
        if empty:
            raise BTXError(f"domain(s) {', '.join(empty)} have no held-out documents to resample")
        self.counts = {
            d: resample_counts(
                ids.size, self.replicates, np.random.default_rng(_domain_seed(self.seed, d))
            )
            for d, ids in self.doc_ids.items()
        }

    @classmethod
    def for_models(
        cls, models: Mapping[str, Mapping[str, DocumentLosses]], **kwargs: Any
    ) -> DocumentBootstrap:
        """A bootstrap over the documents the models were scored on (all must agree)."""
        if not models:
            raise BTXError("no models to bootstrap")
        first = next(iter(models.values()))
        return cls({d: s.doc_ids for d, s in first.items()}, **kwargs)

    def _check(self, domain: str, scores: DocumentLosses) -> None:
        if domain not in self.doc_ids:
            raise BTXError(f"domain {domain!r} was not part of this bootstrap")
        if not np.array_equal(scores.doc_ids, self.doc_ids[domain]):
            raise BTXError(
                f"domain {domain!r}: the model was scored on other documents than the bootstrap "
                "(every model must be scored on the same held-out documents to be compared)"
            )

    def domain_replicates(self, domain: str, scores: DocumentLosses) -> np.ndarray:
        """[replicates] token-weighted mean loss of the domain in each replicate (memoised per
        scores object: a table and its comparisons ask for the same domain many times)."""
        cached = self._memo.get((domain, id(scores)))
        if cached is not None and cached[0] is scores:
            return cached[1]
        self._check(domain, scores)
        counts = self.counts[domain]
        reps = (counts @ scores.loss_sums) / (counts @ scores.token_counts.astype(np.float64))
        self._memo[(domain, id(scores))] = (scores, reps)
        return reps

    def mean_replicates(
        self, scores: Mapping[str, DocumentLosses], domains: DomainWeights | None = None
    ) -> np.ndarray:
        """[replicates] mean of the domain losses over ``domains`` (default all, equal weights;
        or a domain -> weight mapping such as :func:`group_weights`)."""
        weights = _as_weights(scores, domains)
        return sum(w * self.domain_replicates(d, scores[d]) for d, w in weights.items())

    def interval(self, estimate: float, replicates: np.ndarray) -> Interval:
        """Percentile interval of ``replicates`` around the full-sample ``estimate``."""
        tail = (1.0 - self.confidence) / 2.0
        low, high = np.quantile(replicates, [tail, 1.0 - tail])
        return Interval(float(estimate), float(low), float(high))


def group_weights(groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Domain weights of the mean over groups: each non-empty group weighs the same, shared
    equally by its domains (a domain in two groups gets both shares)."""
    kept = [members for members in groups.values() if members]
    weights: dict[str, float] = {}
    for members in kept:
        for domain in members:
            weights[domain] = weights.get(domain, 0.0) + 1.0 / (len(kept) * len(members))
    return weights


def _as_weights(
    scores: Mapping[str, DocumentLosses], domains: DomainWeights | None
) -> dict[str, float]:
    """Normalised domain weights: a list of domains means equal weights."""
    spec = list(scores) if domains is None else domains
    weights = dict(spec) if isinstance(spec, Mapping) else dict.fromkeys(spec, 1.0)
    missing = [d for d in weights if d not in scores]
    total = sum(weights.values())
    if not weights or missing or total <= 0:
        raise BTXError(f"no scores for domain(s) {missing or list(weights)}; evaluate them first")
    return {d: w / total for d, w in weights.items()}


def _mean_estimate(scores: Mapping[str, DocumentLosses], domains: DomainWeights | None) -> float:
    weights = _as_weights(scores, domains)
    return float(sum(w * scores[d].mean_loss for d, w in weights.items()))


def _loss_and_perplexity(interval: Interval) -> dict[str, dict[str, float]]:
    return {"loss": interval.to_dict(), "perplexity": interval.exp().to_dict()}


def summarize(
    models: Mapping[str, Mapping[str, DocumentLosses]],
    groups: Mapping[str, Sequence[str]] | None = None,
    bootstrap: DocumentBootstrap | None = None,
) -> dict[str, Any]:
    """Intervals for every model: each domain, the headline mean and each group's mean.

    Returns ``{"method": ..., "models": {name: {"domains": {d: {"loss", "perplexity",
    "documents", "tokens"}}, "mean": {"loss", "perplexity"}, "groups": {g: {...}},
    "mean_of_groups": {...}}}}``, every interval a ``{"estimate", "low", "high"}`` dict; the
    mean's perplexity is the geometric mean of the per-domain perplexities, ``mean_of_groups``
    the mean of the group means (each group weighs the same; present when groups are given).
    """
    boot = bootstrap or DocumentBootstrap.for_models(models)
    out: dict[str, Any] = {"method": method(boot), "models": {}}
    for name, scores in models.items():
        domains = list(scores)
        per_domain = {}
        for d in domains:
            interval = boot.interval(scores[d].mean_loss, boot.domain_replicates(d, scores[d]))
            per_domain[d] = {
                **_loss_and_perplexity(interval),
                "documents": int(scores[d].doc_ids.size),
                "tokens": int(scores[d].token_counts.sum()),
            }
        entry: dict[str, Any] = {"domains": per_domain}
        mean = boot.interval(_mean_estimate(scores, domains), boot.mean_replicates(scores))
        entry["mean"] = _loss_and_perplexity(mean)
        present = {g: m for g, m in (groups or {}).items() if m and all(d in scores for d in m)}
        entry["groups"] = {}
        for group, members in present.items():
            interval = boot.interval(
                _mean_estimate(scores, members), boot.mean_replicates(scores, members)
            )
            entry["groups"][group] = _loss_and_perplexity(interval)
        if present:
            weights = group_weights(present)
            interval = boot.interval(
                _mean_estimate(scores, weights), boot.mean_replicates(scores, weights)
            )
            entry["mean_of_groups"] = _loss_and_perplexity(interval)
        out["models"][name] = entry
    return out


def paired_difference(
    bootstrap: DocumentBootstrap,
    scores_a: Mapping[str, DocumentLosses],
    scores_b: Mapping[str, DocumentLosses],
    domains: DomainWeights,
) -> dict[str, Any]:
    """Model A minus model B on the mean loss over ``domains``, paired replicate by replicate.

    Reports the difference in mean loss (nats per token; the log of the ratio of geometric-mean
    perplexities) and in geometric-mean perplexity, each with its interval; ``a_better`` /
    ``b_better`` hold only when the interval lies entirely below / above 0 (the two units agree
    replicate by replicate, since exp is increasing).
    """
    reps_a = bootstrap.mean_replicates(scores_a, domains)
    reps_b = bootstrap.mean_replicates(scores_b, domains)
    est_a, est_b = _mean_estimate(scores_a, domains), _mean_estimate(scores_b, domains)
    loss = bootstrap.interval(est_a - est_b, reps_a - reps_b)
    ppl = bootstrap.interval(math.exp(est_a) - math.exp(est_b), np.exp(reps_a) - np.exp(reps_b))
    return {
        "loss": loss.to_dict(),
        "perplexity": ppl.to_dict(),
        "a_better": loss.high < 0.0,
        "b_better": loss.low > 0.0,
    }


def compare(
    models: Mapping[str, Mapping[str, DocumentLosses]],
    model_a: str,
    model_b: str,
    groups: Mapping[str, Sequence[str]] | None = None,
    bootstrap: DocumentBootstrap | None = None,
) -> dict[str, Any]:
    """``model_a`` minus ``model_b`` per domain, per group and on the headline mean, paired."""
    for name in (model_a, model_b):
        if name not in models:
            raise BTXError(f"no scores for model {name!r}; evaluated: {', '.join(models)}")
    boot = bootstrap or DocumentBootstrap.for_models(models)
    scores_a, scores_b = models[model_a], models[model_b]
    shared = [d for d in scores_a if d in scores_b]
    present = {g: m for g, m in (groups or {}).items() if m and all(d in shared for d in m)}
    out = {
        "a": model_a,
        "b": model_b,
        "domains": {d: paired_difference(boot, scores_a, scores_b, [d]) for d in shared},
        "groups": {g: paired_difference(boot, scores_a, scores_b, m) for g, m in present.items()},
        "mean": paired_difference(boot, scores_a, scores_b, shared),
    }
    if present:
        weights = group_weights(present)
        out["mean_of_groups"] = paired_difference(boot, scores_a, scores_b, weights)
    return out


def best_model(
    models: Mapping[str, Mapping[str, DocumentLosses]],
    candidates: Sequence[str],
    domains: DomainWeights | None = None,
) -> str:
    """The candidate with the lowest point-estimate mean loss over ``domains`` (default all;
    or weights, e.g. :func:`group_weights`)."""
    present = [c for c in candidates if c in models]
    if not present:
        raise BTXError(f"none of {', '.join(candidates)} was evaluated")
    return min(present, key=lambda c: _mean_estimate(models[c], domains))


def method(bootstrap: DocumentBootstrap) -> dict[str, Any]:
    """How the intervals were made, for the results file and the table's caption."""
    return {
        "resampled_unit": "document",
        "interval": "percentile",
        "confidence": bootstrap.confidence,
        "replicates": bootstrap.replicates,
        "seed": bootstrap.seed,
        "domain_statistic": "token-weighted mean loss (perplexity = exp)",
        "mean_statistic": "mean of per-domain losses (= geometric mean of perplexities)",
        "mean_of_groups_statistic": "mean of group means (each group weighs the same)",
        "documents": {d: int(ids.size) for d, ids in bootstrap.doc_ids.items()},
    }
