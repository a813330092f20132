"""Document-level bootstrap intervals (megatron_btx.eval.stats) against hand-worked expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_btx.errors import BTXError
from megatron_btx.eval.stats import (
    DocumentBootstrap,
    DocumentLosses,
    best_model,
    by_segment_domain,
    compare,
    group_weights,
    resample_counts,
    summarize,
)


def _docs(per_doc_losses: list[list[float]]) -> DocumentLosses:
    """Scores of documents 0..n-1 from explicit per-token losses."""
    losses = np.concatenate([np.asarray(d, dtype=np.float64) for d in per_doc_losses])
    ids = np.concatenate([np.full(len(d), i) for i, d in enumerate(per_doc_losses)])
    return DocumentLosses.from_tokens(losses, ids)


def test_token_weighted_domain_mean_matches_hand_computation() -> None:
    # doc 0: 2 tokens (1 + 3 = 4 nats); doc 1: 6 tokens of 0.5 (3 nats); doc 2: 1 token of 2.
    scores = _docs([[1.0, 3.0], [0.5] * 6, [2.0]])
    assert scores.token_counts.tolist() == [2, 6, 1]
    assert scores.loss_sums.tolist() == [4.0, 3.0, 2.0]
    assert scores.mean_loss == pytest.approx(9.0 / 9.0)  # not the mean of doc means (7/6)
    table = summarize({"m": {"d": scores}}, bootstrap=DocumentBootstrap({"d": scores.doc_ids}))
    cell = table["models"]["m"]["domains"]["d"]
    assert cell["loss"]["estimate"] == pytest.approx(1.0)
    assert cell["perplexity"]["estimate"] == pytest.approx(math.e)
    assert (cell["documents"], cell["tokens"]) == (3, 9)


def test_tokens_of_a_document_need_not_be_contiguous() -> None:
    scores = DocumentLosses.from_tokens(np.array([1.0, 2.0, 3.0, 4.0]), np.array([7, 3, 7, 3]))
    assert scores.doc_ids.tolist() == [3, 7]
    assert scores.loss_sums.tolist() == [6.0, 4.0] and scores.token_counts.tolist() == [2, 2]
    logp = DocumentLosses.from_logprobs(np.array([-1.0, -2.0]), np.array([0, 0]))
    assert logp.loss_sums.tolist() == [3.0]


def test_identical_documents_give_a_zero_width_interval() -> None:
    # Documents of different lengths whose every token costs 1.7 nats: any resample has mean 1.7.
    scores = _docs([[1.7] * n for n in (3, 10, 1, 25, 7)])
    table = summarize({"m": {"d": scores}})
    loss = table["models"]["m"]["domains"]["d"]["loss"]
    for value in loss.values():
        assert value == pytest.approx(1.7, abs=1e-12)
    ppl = table["models"]["m"]["mean"]["perplexity"]
    assert ppl["low"] == pytest.approx(math.exp(1.7)) and ppl["high"] == pytest.approx(
        math.exp(1.7)
    )


def test_two_documents_bootstrap_distribution_enumerated_by_hand() -> None:
    # Doc A: 10 tokens, 10 nats (mean 1); doc B: 20 tokens, 60 nats (mean 3). Resampling two
    # documents gives AA (p 1/4, mean 1), AB or BA (p 1/2, mean 70/30), BB (p 1/4, mean 3).
    scores = _docs([[1.0] * 10, [3.0] * 20])
    boot = DocumentBootstrap({"d": scores.doc_ids}, replicates=20_000, seed=3)
    reps = boot.domain_replicates("d", scores)
    values = {1.0: 0.25, 70.0 / 30.0: 0.5, 3.0: 0.25}
    for value, probability in values.items():
        share = float(np.mean(np.isclose(reps, value)))
        assert abs(share - probability) < 0.015  # 4.5 binomial standard errors at n = 20,000
    assert np.all(np.isclose(reps[:, None], list(values)).any(axis=1))
    # The 2.5% and 97.5% quantiles fall inside the AA and BB atoms: the interval is [1, 3].
    cell = summarize({"m": {"d": scores}}, bootstrap=boot)["models"]["m"]["domains"]["d"]
    assert cell["loss"] == {"estimate": pytest.approx(70.0 / 30.0), "low": 1.0, "high": 3.0}


def test_resample_counts_are_draws_with_replacement() -> None:
    counts = resample_counts(5, 4000, np.random.default_rng(0))
    assert counts.shape == (4000, 5) and np.all(counts.sum(axis=1) == 5)
    # Each document's count is Binomial(5, 1/5): mean 1, variance 4/5.
    assert counts.mean() == pytest.approx(1.0, abs=0.03)
    assert counts.var() == pytest.approx(0.8, abs=0.05)


def test_headline_mean_is_mean_of_domain_losses_and_geometric_mean_of_perplexities() -> None:
    # Domain x has 1 document of 100 tokens (mean 1), domain y 1 of 2 tokens (mean 3): the
    # headline weighs domains equally, (1 + 3) / 2 = 2, not the token-weighted 1.04.
    scores = {"x": _docs([[1.0] * 100]), "y": _docs([[3.0, 3.0]])}
    mean = summarize({"m": scores})["models"]["m"]["mean"]
    assert mean["loss"]["estimate"] == pytest.approx(2.0)
    geometric = math.sqrt(math.exp(1.0) * math.exp(3.0))
    assert mean["perplexity"]["estimate"] == pytest.approx(geometric)
    assert mean["perplexity"]["low"] == pytest.approx(geometric)  # one document each: no spread


def test_interval_covers_the_true_mean_95_percent_of_the_time() -> None:
    """Simulated domains from a known distribution: 60 documents, lengths uniform on 20..400
    tokens, each document's mean loss drawn from Normal(2.5, 0.4) independently of its length,
    token losses Normal(doc mean, 1). The token-weighted population mean is 2.5."""
    rng = np.random.default_rng(12345)
    trials, covered = 1000, 0
    for trial in range(trials):
        lengths = rng.integers(20, 401, size=60)
        doc_means = rng.normal(2.5, 0.4, size=60)
        losses = rng.normal(np.repeat(doc_means, lengths), 1.0)
        scores = DocumentLosses.from_tokens(losses, np.repeat(np.arange(60), lengths))
        boot = DocumentBootstrap({"d": scores.doc_ids}, replicates=1000, seed=trial)
        interval = boot.interval(scores.mean_loss, boot.domain_replicates("d", scores))
        covered += interval.low <= 2.5 <= interval.high
    # Binomial standard error of the coverage at 1000 trials is 0.7%; the percentile interval
    # with 60 documents runs slightly short of nominal (0.936 with this seed).
    assert 0.925 <= covered / trials <= 0.97


def test_paired_difference_of_a_model_with_itself_is_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    scores = {
        d: DocumentLosses.from_tokens(rng.gamma(2.0, 1.0, 500), np.sort(rng.integers(0, 40, 500)))
        for d in ("code", "math", "general")
    }
    result = compare({"a": scores, "b": scores}, "a", "b", {"experts": ["code", "math"]})
    for diff in [*result["domains"].values(), *result["groups"].values(), result["mean"]]:
        assert diff["loss"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
        assert diff["perplexity"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
        assert not diff["a_better"] and not diff["b_better"]


def test_constant_shift_is_recovered_exactly_and_holds() -> None:
    # Model b costs 0.1 nats more on every token: every replicate's difference is exactly -0.1.
    rng = np.random.default_rng(1)
    docs = np.sort(rng.integers(0, 30, 800))
    losses = rng.gamma(2.0, 1.0, 800)
    models = {
        "a": {"d": DocumentLosses.from_tokens(losses, docs)},
        "b": {"d": DocumentLosses.from_tokens(losses + 0.1, docs)},
    }
    diff = compare(models, "a", "b")["mean"]
    assert diff["loss"]["low"] == pytest.approx(-0.1) and diff["loss"]["high"] == pytest.approx(
        -0.1
    )
    assert diff["a_better"] and not diff["b_better"]
    assert diff["perplexity"]["high"] < 0


def test_pairing_cancels_shared_document_difficulty() -> None:
    """Two models that agree on which documents are hard: the paired interval of their
    difference is far narrower than the width of either model's own interval."""
    rng = np.random.default_rng(2)
    n_docs, per_doc = 50, 100
    difficulty = np.repeat(rng.normal(3.0, 1.0, n_docs), per_doc)  # shared by both models
    docs = np.repeat(np.arange(n_docs), per_doc)
    a = DocumentLosses.from_tokens(difficulty + rng.normal(0, 0.05, difficulty.size), docs)
    b = DocumentLosses.from_tokens(difficulty + 0.05 + rng.normal(0, 0.05, difficulty.size), docs)
    models = {"a": {"d": a}, "b": {"d": b}}
    boot = DocumentBootstrap.for_models(models, seed=4)
    own = summarize(models, bootstrap=boot)["models"]["a"]["domains"]["d"]["loss"]
    diff = compare(models, "a", "b", bootstrap=boot)["mean"]["loss"]
    assert own["high"] - own["low"] > 0.4  # difficulty spread: sd 1 over sqrt(50) documents
    assert diff["high"] - diff["low"] < 0.02
    assert diff["high"] < 0  # a is better by 0.05 nats, and the paired interval shows it


def test_groups_use_their_own_domains() -> None:
    scores = {"x": _docs([[1.0] * 5, [1.0] * 3]), "y": _docs([[4.0] * 2, [4.0] * 9])}
    table = summarize({"m": scores}, groups={"just_x": ["x"], "both": ["x", "y"], "none": []})
    groups = table["models"]["m"]["groups"]
    assert groups["just_x"]["loss"]["estimate"] == pytest.approx(1.0)
    assert groups["both"]["loss"]["estimate"] == pytest.approx(2.5)
    assert groups["both"]["perplexity"]["estimate"] == pytest.approx(math.exp(2.5))
    assert "none" not in groups


def test_seeded_and_deterministic_and_independent_of_other_domains() -> None:
    rng = np.random.default_rng(5)
    make = lambda: DocumentLosses.from_tokens(  # noqa: E731
        rng.gamma(2.0, 1.0, 300), np.sort(rng.integers(0, 25, 300))
    )
    x, y = make(), make()
    one = DocumentBootstrap({"x": x.doc_ids}, replicates=2000, seed=7)
    two = DocumentBootstrap({"y": y.doc_ids, "x": x.doc_ids}, replicates=2000, seed=7)
    other = DocumentBootstrap({"x": x.doc_ids}, replicates=2000, seed=8)
    reps = one.domain_replicates("x", x)
    assert np.array_equal(reps, two.domain_replicates("x", x))  # same seed, more domains
    assert not np.array_equal(reps, other.domain_replicates("x", x))


def test_best_model_and_errors() -> None:
    low, high = _docs([[1.0, 1.0]]), _docs([[2.0, 2.0]])
    models = {"seed": {"d": high}, "dense": {"d": low}, "btx": {"d": high}}
    assert best_model(models, ["seed", "dense", "missing"]) == "dense"
    with pytest.raises(BTXError, match="none of"):
        best_model(models, ["missing"])
    other_docs = DocumentLosses.from_tokens(np.array([1.0]), np.array([5]))
    with pytest.raises(BTXError, match="same held-out documents"):
        summarize({"a": {"d": low}, "b": {"d": other_docs}})
    with pytest.raises(BTXError, match="one document id per scored token"):
        DocumentLosses.from_tokens(np.ones(3), np.zeros(2, dtype=int))
    with pytest.raises(BTXError, match="NaN"):
        DocumentLosses.from_tokens(np.array([np.nan]), np.array([0]))
    with pytest.raises(BTXError, match="no scores for model"):
        compare(models, "btx", "nope")


def test_mixed_document_tokens_split_by_segment_domain() -> None:
    # Two mixed documents; labels 0 = code, 1 = prose; doc 7 has no prose token.
    losses = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    docs = np.array([4, 4, 4, 7, 7, 7])
    labels = np.array([0, 1, 1, 0, 0, 0])
    parts = by_segment_domain(losses, docs, labels, ["code", "prose", "legal"])
    assert set(parts) == {"code", "prose"}  # no legal segment anywhere
    assert parts["code"].doc_ids.tolist() == [4, 7]
    assert parts["code"].loss_sums.tolist() == [1.0, 15.0]
    assert parts["code"].token_counts.tolist() == [1, 3]
    assert parts["prose"].doc_ids.tolist() == [4] and parts["prose"].mean_loss == 2.5


def test_mean_of_groups_weighs_each_group_the_same() -> None:
    # experts = {x: 1, y: 3} (group mean 2), general = {z: 5}: mean of groups (2 + 5) / 2 = 3.5,
    # while the mean over domains is (1 + 3 + 5) / 3 = 3.
    assert group_weights({"experts": ["x", "y"], "general": ["z"], "empty": []}) == {
        "x": 0.25,
        "y": 0.25,
        "z": 0.5,
    }
    scores = {"x": _docs([[1.0] * 4]), "y": _docs([[3.0] * 2]), "z": _docs([[5.0] * 3])}
    shifted = {"x": _docs([[1.0] * 4]), "y": _docs([[3.0] * 2]), "z": _docs([[5.2] * 3])}
    groups = {"experts": ["x", "y"], "general": ["z"]}
    table = summarize({"m": scores, "n": shifted}, groups)["models"]["m"]
    assert table["mean"]["loss"]["estimate"] == pytest.approx(3.0)
    assert table["mean_of_groups"]["loss"]["estimate"] == pytest.approx(3.5)
    assert table["mean_of_groups"]["perplexity"]["estimate"] == pytest.approx(math.exp(3.5))
    # n is 0.2 nats worse on z only: -0.2 / 3 over domains, -0.2 / 2 over groups.
    diff = compare({"m": scores, "n": shifted}, "m", "n", groups)
    assert diff["mean"]["loss"]["estimate"] == pytest.approx(-0.2 / 3)
    assert diff["mean_of_groups"]["loss"]["estimate"] == pytest.approx(-0.1)
    assert diff["groups"]["experts"]["loss"]["estimate"] == pytest.approx(0.0)
    assert diff["mean_of_groups"]["a_better"]
