"""Weighted domain blends through megatron-core's BlendedMegatronDatasetBuilder."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from megatron_btx.data.blend import (
    MegatronTokenizerAdapter,
    build_blend_datasets,
    build_domain_datasets,
    domain_prefixes_from_manifest,
)
from megatron_btx.data.domains import prepare_domains
from megatron_btx.errors import BTXError

SEQ = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small domains whose tokens are easy to tell apart."""
    root = tmp_path_factory.mktemp("blend")
    texts = {
        "alpha": lambda i: f"alpha {i} " * 40 + "\n",
        "beta": lambda i: f"def beta_{i}():\n    return {i}\n" * 10,
        "gamma": lambda i: f"Gamma sentence number {i}, in prose.\n" * 12,
    }
    domains = {}
    for name, make in texts.items():
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"id": f"{name}-{i}", "text": make(i)}) + "\n" for i in range(120))
        )
        domains[name] = [path]
    out = root / "prepared"
    prepare_domains(domains, out, vocab_size=400, split={"test": 0.1, "valid": 0.1})
    return out


def test_blend_proportions_and_sample_length(prepared: Path, tmp_path: Path) -> None:
    prefixes = domain_prefixes_from_manifest(prepared)
    weights = {prefixes["alpha"]: 0.5, prefixes["beta"]: 0.3, prefixes["gamma"]: 0.2}
    train, valid, test = build_blend_datasets(
        weights,
        SEQ,
        1234,
        (1000, None, 0),
        prepared / "tokenizer.model",
        cache_dir=tmp_path / "cache",
    )
    assert test is None
    assert len(train) >= 1000 and len(valid) > 0
    sample = train[0]
    # seq_length + 1 tokens are drawn; tokens/labels are that window shifted by one.
    assert sample["tokens"].shape == (SEQ,) and sample["labels"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    # megatron's blending is deterministic greedy (each step picks the dataset furthest below its
    # target share), so over the first N samples each count is within ~1 of weight * N; 1% of
    # N = 1000 is a margin of 10 samples, far above that bound yet small enough to catch a
    # swapped or ignored weight.
    counts = collections.Counter(int(train[i]["dataset_id"]) for i in range(1000))
    for dataset_id, weight in enumerate(weights.values()):
        assert abs(counts[dataset_id] / 1000 - weight) < 0.01, counts
    # Samples of a domain really come from that domain's tokens.
    tok = MegatronTokenizerAdapter(prepared / "tokenizer.model")
    for i in range(50):
        s = train[i]
        text = tok.detokenize(s["tokens"].tolist())
        assert ("alpha", "beta", "Gamma")[int(s["dataset_id"])] in text
    assert not torch.distributed.is_initialized(), "the temporary process group must be removed"
    # Second build hits megatron's cache and gives the same order.
    again, _, _ = build_blend_datasets(
        weights,
        SEQ,
        1234,
        (1000, None, 0),
        prepared / "tokenizer.model",
        cache_dir=tmp_path / "cache",
    )
    assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(20))


def test_per_domain_validation_datasets(prepared: Path) -> None:
    prefixes = domain_prefixes_from_manifest(prepared)
    per_domain = build_domain_datasets(
        prefixes, SEQ, 1234, prepared / "tokenizer.model", cache_dir=None
    )
    assert set(per_domain) == {"alpha", "beta", "gamma"}
    for name, ds in per_domain.items():
        assert len(ds) > 0
        assert ds[0]["tokens"].shape == (SEQ,)
        text = MegatronTokenizerAdapter(prepared / "tokenizer.model").detokenize(
            ds[0]["tokens"].tolist()
        )
        assert {"alpha": "alpha", "beta": "beta", "gamma": "Gamma"}[name] in text


def test_adapter_and_errors(prepared: Path, tmp_path: Path) -> None:
    tok = MegatronTokenizerAdapter(prepared / "tokenizer.model")
    assert tok.eod == tok.eos == 2 and tok.pad == 3 and tok.vocab_size <= 400
    assert tok.detokenize(tok.tokenize("  x\n\ty")) == "  x\n\ty"
    assert json.dumps(tok.unique_identifiers)
    with pytest.raises(BTXError, match="not found"):
        build_blend_datasets({str(tmp_path / "nope"): 1.0}, SEQ, 1, (10, None, None), tok)
    with pytest.raises(BTXError, match="weight"):
        build_blend_datasets({str(prepared / "alpha"): 0.0}, SEQ, 1, (10, None, None), tok)
