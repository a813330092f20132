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
    from megatron_btx.data.domains import prepare_domains
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


def _eval_set(domain: str, n_docs: int, tokens_per_doc: int):
    """An EvalSet of `n_docs` documents, one window row per document, every token scored."""
    from megatron_btx.eval.data import EvalSet

    shape = (n_docs, tokens_per_doc)
    docs = [np.zeros(tokens_per_doc + 1, dtype=np.int64) for _ in range(n_docs)]
    return EvalSet(
        domain,
        np.zeros((n_docs, tokens_per_doc + 1), dtype=np.int64),
        np.repeat(np.arange(n_docs)[:, None], tokens_per_doc, axis=1),
        np.ones(shape, dtype=bool),
        docs,
        np.zeros(n_docs, dtype=np.int64),
        np.arange(n_docs) * (tokens_per_doc + 1),
    )


def _specs(names) -> dict[str, dict]:
    """Each model's plan entry, as the planner writes them (megatron_btx.pipeline.models)."""
    specs = {}
    for name in names:
        spec = {"kind": "dense", "role": "rival", "part": None, "domain": None}
        if name == "seed":
            spec["part"] = "seed"
        elif name.startswith("expert_"):
            spec.update(role="reference", part="expert", domain=name[len("expert_") :])
        elif name == "btx":
            spec.update(kind="moe", role="btx")
        elif name == "sparse_upcycling":
            spec["kind"] = "moe"
        elif name.startswith("btm"):
            spec["kind"] = "btm"
        specs[name] = spec
    return specs


def _fake_result(own: float = 0.6, btx_shift: float = -0.3, noise: float = 0.05) -> dict:
    """A result through the real statistics: per-token log-probs of 40 documents per domain,
    each model's loss a per-domain level plus per-document noise shared by every model (hard
    documents are hard for all)."""
    from megatron_btx.eval import claims, intervals

    doms = ["code", "math"]
    level = {
        "seed": [2.3, 2.3],
        "expert_code": [1.8, 2.5],
        "expert_math": [2.5, 1.8],
        "dense": [2.1, 2.1],
        "btm_top1": [1.9, 1.9],
        "btm_top2": [1.95, 1.95],
        "sparse_upcycling": [2.0, 2.0],
    }
    level["btx"] = [1.9 + btx_shift, 1.9 + btx_shift]
    rng = np.random.default_rng(0)
    sets = {d: _eval_set(d, 40, 8) for d in doms}
    hardness = {d: rng.normal(0, 0.5, size=(40, 1)) for d in doms}
    hardness = {d: h - h.mean() for d, h in hardness.items()}  # the levels are the means
    per_model = {
        name: {
            d: -(lv + hardness[d] + rng.normal(0, noise, size=(40, 8)))
            for d, lv in zip(doms, levels)
        }
        for name, levels in level.items()
    }
    specs = _specs(per_model)
    found = intervals.compute(per_model, sets, {"experts": doms}, specs, replicates=2000)
    models = {}
    for name, by_domain in per_model.items():
        loss = {d: float(-lp.mean()) for d, lp in by_domain.items()}
        models[name] = {
            "perplexity": {d: float(np.exp(v)) for d, v in loss.items()},
            "loss": loss,
            "mean": float(np.exp(np.mean(list(loss.values())))),
            "active_params": 1000,
            "train_flops": 1e9,
            "train_tokens": 100,
            "train_seconds": 1.0,
            **specs[name],
        }
    rest = (1 - own) / 2
    load = {"code": [own, rest, rest], "math": [rest, own, rest]}
    routing = {"btx": {d: {"0": {"load": load[d]}, "1": {"load": load[d]}} for d in doms}}
    r = {
        "split": "test",
        "domains": doms,
        "tokens": {d: 320 for d in doms},
        "models": models,
        "missing": {},
        "btm": {},
        "experts": ["code", "math", "seed"],
        "routing": routing,
        "intervals": found,
    }
    r["claims"] = claims.check_claims(r, report.routing_matrix(r))
    return r


def test_claims_and_report(tmp_path):
    r = _fake_result()
    c = r["claims"]
    assert c["expert_best_on_own_domain"]["holds"]
    assert c["btx_lowest_mean"]["holds"]
    assert c["routing_to_own_expert"]["holds"]
    assert c["experts_forget_other_domains"]["holds"]
    # the paired BTX - dense difference is the planted -0.5 nats (noise averages out)
    versus = c["btx_lowest_mean"]["versus"]["dense"]
    assert versus["difference"] == pytest.approx(-0.5, abs=0.01)
    assert versus["low"] < versus["difference"] < versus["high"] < 0
    bad = _fake_result(own=0.2)
    assert not bad["claims"]["routing_to_own_expert"]["holds"]
    report.write_all(r, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| btx |" in md and "holds" in md and "BTX minus" in md
    assert json.loads((tmp_path / "results.json").read_text())["models"]["btx"]["mean"] == (
        pytest.approx(np.exp(1.6), rel=0.01)
    )
    pytest.importorskip("matplotlib")
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert (tmp_path / "routing_layer1.png").is_file()
    assert "layer 1:" in (tmp_path / "routing.md").read_text()


def test_a_claim_holds_only_when_its_interval_excludes_zero():
    # BTX 0.005 nats below BTM top-1 on average, with per-token noise of 0.5: lower in the
    # point estimate, but the interval straddles 0, so the claim does not hold
    r = _fake_result(btx_shift=-0.005, noise=0.5)
    versus = r["claims"]["btx_lowest_mean"]["versus"]["btm_top1"]
    assert versus["low"] < 0 < versus["high"]
    assert not r["claims"]["btx_lowest_mean"]["holds"]
    assert "DOES NOT HOLD" in report.claims_md(r["claims"])


def test_diagnostics_section_names_the_plot_only_when_one_was_drawn():
    """results.md points at diagnostics.png only when evaluate drew it (matplotlib present);
    without it, it says why there is none instead of naming a missing file."""
    diag = {"retention": {"code": 0.64, "math": None}}
    drawn = "\n".join(report.diagnostics_md({**diag, "plot": "diagnostics.png"}))
    assert "code 64%, math -" in drawn and "Plot: diagnostics.png." in drawn
    missing = "\n".join(report.diagnostics_md(diag))
    assert "diagnostics.png" not in missing and "matplotlib is not installed" in missing


def test_expert_claims_in_the_faithful_setup():
    """The paper's setup: a seed that knows only general text. Each expert is planted 0.5 nats
    below the seed and the other expert on its own domain, but 0.4 nats above the dense baseline
    (trained on the whole budget) there; both experts are below the seed on the other expert
    domain (the seed never saw it) and 0.6 nats above it on general text (forgetting). The
    specialisation claim is decided by the seed and the other expert only, and forgetting is
    measured on general text: both hold; without a general domain, forgetting is measured on the
    other expert domain, where it does not hold."""
    from megatron_btx.eval import claims, intervals

    doms = ["code", "math", "general"]
    level = {  # mean loss per domain (code, math, general)
        "seed": [4.0, 4.0, 2.0],
        "expert_code": [2.5, 3.5, 2.6],
        "expert_math": [3.5, 2.5, 2.6],
        "dense": [2.1, 2.1, 2.1],
    }
    rng = np.random.default_rng(1)
    sets = {d: _eval_set(d, 30, 8) for d in doms}
    hardness = {d: rng.normal(0, 0.3, size=(30, 1)) for d in doms}
    per_model = {
        name: {
            d: -(lv + hardness[d] - hardness[d].mean() + rng.normal(0, 0.05, size=(30, 8)))
            for d, lv in zip(doms, levels)
        }
        for name, levels in level.items()
    }

    def check(groups, domains):
        found = intervals.compute(
            {m: {d: v[d] for d in domains} for m, v in per_model.items()},
            {d: sets[d] for d in domains},
            groups,
            _specs(per_model),
            replicates=1000,
        )
        return claims.check_claims({"models": {}, "intervals": found}, None)

    faithful = check({"experts": ["code", "math"], "general": ["general"]}, doms)
    best = faithful["expert_best_on_own_domain"]
    assert best["holds"]
    code_vs = best["per_domain"]["code"]
    assert code_vs["dense"]["higher"] and code_vs["dense"]["difference"] == pytest.approx(
        0.4, abs=0.03
    )
    assert code_vs["seed"]["difference"] == pytest.approx(-1.5, abs=0.03)
    forget = faithful["experts_forget_other_domains"]
    assert forget["holds"] and forget["on"] == "general"
    assert set(forget["per_expert"]["code"]) == {"general"}
    assert forget["per_expert"]["code"]["general"]["difference"] == pytest.approx(0.6, abs=0.03)
    in_domain_only = check({"experts": ["code", "math"]}, ["code", "math"])
    forget = in_domain_only["experts_forget_other_domains"]
    assert not forget["holds"] and forget["on"] == "other_expert_domains"
    assert forget["per_expert"]["code"]["math"]["difference"] == pytest.approx(-0.5, abs=0.03)
