"""Evaluation pieces without models: tf-idf routing, the BTM ensemble, held-out windows, the
report's claims and heatmaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_btx.eval import report, scoring
from megatron_btx.eval.tfidf import TfIdf, choose_experts, cosine


def test_tfidf_picks_the_domain_with_the_same_vocabulary():
    rng = np.random.default_rng(0)
    vocab = 60
    domains = [np.arange(0, 25), np.arange(20, 45), np.arange(40, 60)]  # overlapping ranges
    train = {i: [rng.choice(d, 200) for _ in range(10)] for i, d in enumerate(domains)}
    tf = TfIdf(vocab).fit([x for docs in train.values() for x in docs])
    cents = np.stack([tf.centroid(train[i]) for i in range(3)])
    for i, d in enumerate(domains):
        doc = rng.choice(d, 150)
        assert choose_experts(tf.transform(doc), cents, 1) == [i]
        two = choose_experts(tf.transform(doc), cents, 2)
        assert two[0] == i and len(set(two)) == 2
    v = tf.transform(train[0][0])
    assert np.linalg.norm(v) == pytest.approx(1.0)
    assert cosine(v, v) == pytest.approx(1.0)
    # idf is the smooth idf ln((1 + n) / (1 + df)) + 1, df counted here by hand
    docs = [x for d in train.values() for x in d]
    for token in (0, 22, 44, 59):
        df = sum(token in set(doc.tolist()) for doc in docs)
        assert tf.idf[token] == pytest.approx(np.log((1 + len(docs)) / (1 + df)) + 1)
    # tokens two domains share (20-24) are in more documents: a lower idf than domain-only ones
    assert tf.idf[20:25].max() < tf.idf[0:20].min()


def test_ensemble_is_the_log_of_the_mean_probability():
    rng = np.random.default_rng(1)
    lps = [np.log(rng.uniform(0.01, 1, size=(2, 5))) for _ in range(3)]
    chosen = np.zeros((2, 5, 2), dtype=np.int64)
    chosen[..., 0], chosen[..., 1] = 2, 0
    out = scoring.ensemble_logprobs(lps, chosen)
    ref = np.log((np.exp(lps[2]) + np.exp(lps[0])) / 2)
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    one = scoring.ensemble_logprobs(lps, chosen[..., :1])
    np.testing.assert_allclose(one, lps[2])
    assert scoring.perplexity(np.full(10, -np.log(7.0))) == pytest.approx(7.0)


def test_eval_windows_cover_the_split_and_track_documents(tmp_path):
    from megatron_btx.data.preprocess import prepare_domains
    from megatron_btx.eval import data as edata

    for n, word in (("a", "apple"), ("b", "banana")):
        d = tmp_path / "text" / n
        d.mkdir(parents=True)
        for i in range(30):
            (d / f"{i}.txt").write_text(f"{word} {i} " * (40 + i))
    prepare_domains(
        {n: [str(tmp_path / "text" / n)] for n in ("a", "b")},
        tmp_path / "data",
        vocab_size=300,
        split="test=0.3,valid=0.1",
    )
    es = edata.eval_set(str(tmp_path / "data"), "a", "test", 16, 64)
    assert es.windows.shape == (4, 17) and es.doc_of_target.shape == (4, 16)
    flat = np.concatenate(es.docs)
    doc_of_token = np.concatenate([np.full(len(d), i) for i, d in enumerate(es.docs)])
    n_avail = len(flat) // 17
    assert n_avail >= 8
    # 4 windows evenly spaced over the n_avail possible ones: window j starts at
    # round(j * (n_avail - 1) / 3) * 17, so the first at 0 and the last in the split's last window
    starts = [round(j * (n_avail - 1) / 3) * 17 for j in range(4)]
    for window, start in zip(es.windows, starts):
        assert (window == flat[start : start + 17]).all()
    assert starts[-1] == (n_avail - 1) * 17
    for row, start in zip(es.doc_of_target, starts):
        assert (row == doc_of_token[start + 1 : start + 17]).all()
    assert es.scored.all() and es.n_tokens == 64  # no routing prefix asked for
    big = edata.eval_set(str(tmp_path / "data"), "a", "test", 16, 10**9)
    assert big.windows.shape[0] == n_avail

    # a routing prefix: the first 5 tokens of every document are never scored, and are what
    # BTM routes on
    routed = edata.eval_set(str(tmp_path / "data"), "a", "test", 16, 10**9, route_tokens=5)
    position = np.concatenate([np.arange(len(d)) for d in routed.docs])
    for scored, start in zip(routed.scored, range(0, 10**9, 17)):
        assert (scored == (position[start + 1 : start + 17] >= 5)).all()
    assert routed.n_tokens == int((position[: n_avail * 17].reshape(n_avail, 17)[:, 1:] >= 5).sum())
    assert (routed.routing_prefix(0) == routed.docs[0][:5]).all()
    per_target = np.arange(routed.scored.size, dtype=float).reshape(routed.scored.shape)
    assert routed.select(per_target).tolist() == per_target[routed.scored].tolist()


def _fake_result(own: float = 0.6) -> dict:
    doms = ["code", "math"]
    ppl = {
        "seed": [10, 10],
        "expert_code": [6, 12],
        "expert_math": [12, 6],
        "dense": [8, 8],
        "btm_top1": [6.5, 6.5],
        "btm_top2": [7, 7],
        "sparse_upcycling": [7.5, 7.5],
        "btx": [6, 6],
    }
    models = {
        k: {
            "perplexity": dict(zip(doms, v)),
            "mean": float(np.mean(v)),
            "active_params": 1000,
            "train_flops": 1e9,
            "train_tokens": 100,
            "train_seconds": 1.0,
            "kind": "dense",
        }
        for k, v in ppl.items()
    }
    rest = (1 - own) / 2
    load = {"code": [own, rest, rest], "math": [rest, own, rest]}
    routing = {"btx": {d: {"0": {"load": load[d]}, "1": {"load": load[d]}} for d in doms}}
    r = {
        "split": "test",
        "domains": doms,
        "tokens": {d: 64 for d in doms},
        "models": models,
        "missing": {},
        "btm": {},
        "experts": ["code", "math", "seed"],
        "routing": routing,
    }
    r["claims"] = report.check_claims(r)
    return r


def test_claims_and_report(tmp_path):
    r = _fake_result()
    c = r["claims"]
    assert c["expert_best_on_own_domain"]["holds"]
    assert c["btx_lowest_mean"]["holds"]
    assert c["routing_to_own_expert"]["holds"]
    assert c["experts_forget_other_domains"]["holds"]
    bad = _fake_result(own=0.2)
    assert not bad["claims"]["routing_to_own_expert"]["holds"]
    report.write_all(r, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| btx |" in md and "**6.00**" in md and "holds" in md
    assert json.loads((tmp_path / "results.json").read_text())["models"]["btx"]["mean"] == 6
    pytest.importorskip("matplotlib")
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert (tmp_path / "routing_layer1.png").is_file()
    assert "layer 1:" in (tmp_path / "routing.md").read_text()


def test_claims_report_failures_honestly():
    r = _fake_result()
    r["models"]["dense"]["perplexity"] = {"code": 5.0, "math": 5.0}
    r["models"]["dense"]["mean"] = 5.0
    c = report.check_claims(r)
    assert not c["expert_best_on_own_domain"]["holds"]
    assert not c["btx_lowest_mean"]["holds"]
    assert "DOES NOT HOLD" in report.claims_md(c)
