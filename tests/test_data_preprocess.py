"""Raw text / JSONL -> megatron indexed datasets: exact ids, stable splits, bad-input handling."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_btx.data.cli import main
from megatron_btx.data.domains import prepare_domains
from megatron_btx.data.preprocess import (
    DataWarning,
    iter_documents,
    preprocess_files,
    split_prefix,
)
from megatron_btx.data.splits import SPLITS, parse_split, split_of
from megatron_btx.data.spm_tokenizer import train_sentencepiece
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError

DOCS = {
    f"doc-{i}": (
        f"def f{i}(x):\n    return x * {i}\n\n\n# comment {i}\n"
        if i % 2
        else f"Paragraph {i}.\n\tIndented λ line.\n"
    )
    for i in range(60)
}
SPLIT = {"test": 0.2, "valid": 0.2}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_sentencepiece(
        list(DOCS.values()) * 3, tmp_path_factory.mktemp("tok") / "spm", vocab_size=400
    )


def _write_jsonl(path: Path, docs: dict[str, str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()), encoding="utf-8"
    )
    return path


def _read_back(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_indexed_dataset_equals_tokenisation_plus_eos(tok: Tokenizer, tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    result = preprocess_files([src], tmp_path / "out" / "dom", tok, split=SPLIT, workers=2)
    expected: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    for key, text in DOCS.items():  # documents keep input order within each split
        expected[split_of(key, SPLIT)].append(tok.encode(text) + [tok.eos_id])
    for s in SPLITS:
        assert _read_back(split_prefix(tmp_path / "out" / "dom", s)) == expected[s]
        assert result["documents"][s] == len(expected[s]) > 0
        assert result["tokens"][s] == sum(map(len, expected[s]))
    assert not list((tmp_path / "out").glob("*.tmp*")), "temporary files must be renamed away"


def test_text_files_folder_and_separator(tok: Tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first doc\n\nwith a blank line\n")
    (folder / "sub" / "b.txt").write_text("second\n<|sep|>\nthird\n")
    (folder / "ignored.bin").write_bytes(b"\x00")
    docs = list(iter_documents([folder]))
    assert docs == [
        ("a.txt", "first doc\n\nwith a blank line\n"),
        ("sub/b.txt", "second\n<|sep|>\nthird\n"),
    ]
    docs = list(iter_documents([folder], txt_separator="<|sep|>"))
    assert docs == [
        ("a.txt#1", "first doc\n\nwith a blank line\n"),
        ("sub/b.txt#1", "second\n"),
        ("sub/b.txt#2", "third\n"),
    ]
    result = preprocess_files(
        [folder], tmp_path / "t", tok, split="test=0,valid=0", txt_separator="<|sep|>"
    )
    assert result["documents"] == {"train": 3, "valid": 0, "test": 0}
    assert _read_back(split_prefix(tmp_path / "t", "train")) == [
        tok.encode(t) + [tok.eos_id] for _, t in docs
    ]


def test_split_is_stable_and_never_splits_a_document(tok: Tokenizer, tmp_path: Path) -> None:
    # The documented rule, worked independently: u = first 8 bytes of sha256("split\0" + key)
    # as a big-endian fraction of 2**64; test takes u < 0.2, valid 0.2 <= u < 0.4, train the rest.
    def by_hand(key: str) -> str:
        u = int.from_bytes(hashlib.sha256(f"split\x00{key}".encode()).digest()[:8], "big") / 2**64
        return "test" if u < 0.2 else "valid" if u < 0.4 else "train"

    expected = {k: by_hand(k) for k in DOCS}
    assert {k: split_of(k, SPLIT) for k in DOCS} == expected
    assert {"train", "valid", "test"} == set(expected.values())  # 60 keys reach every split
    # Same keys in a different order and with extra documents: every key keeps its split.
    shuffled = dict(reversed(list(DOCS.items())))
    shuffled.update({f"extra-{i}": f"extra text {i}\n" for i in range(30)})
    runs = []
    for name, docs in (("a", DOCS), ("b", shuffled)):
        preprocess_files(
            [_write_jsonl(tmp_path / f"{name}.jsonl", docs)], tmp_path / name, tok, split=SPLIT
        )
        seen: dict[str, set[str]] = {}
        for s in SPLITS:
            for ids in _read_back(split_prefix(tmp_path / name, s)):
                seen.setdefault(tok.decode(ids), set()).add(s)
        assert all(len(v) == 1 for v in seen.values()), "a document appeared in two splits"
        runs.append({text: v.pop() for text, v in seen.items()})
    assert all(runs[1][text] == s for text, s in runs[0].items())
    # and every document was written to the split the rule gives its key
    assert {k: runs[0][text] for k, text in DOCS.items()} == expected
    # The fraction is roughly right on many keys (binomial, n=20000, sd ~0.3%).
    counts = {s: 0 for s in SPLITS}
    for i in range(20000):
        counts[split_of(f"k{i}")] += 1
    assert (
        abs(counts["test"] / 20000 - 0.02) < 0.005 and abs(counts["valid"] / 20000 - 0.02) < 0.005
    )


def test_bad_input_warns_with_file_and_line_and_keeps_good_lines(
    tok: Tokenizer, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"text": "good one"}\n'  # 1
        b"{not json\n"  # 2
        b'{"content": "no text field"}\n'  # 3
        b"\n"  # 4 blank: ignored silently
        b'{"text": "caf\xe9 latin-1"}\n'  # 5 invalid UTF-8 -> replaced, kept
        b'{"text": 42}\n'  # 6
        b'{"text": ""}\n'  # 7
        b'{"text": "good two"}\n'  # 8
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "latin.txt"
    binary.write_bytes(b"ok \xff\xfe end\n")
    with pytest.warns(DataWarning) as record:
        result = preprocess_files([bad, empty, binary], tmp_path / "o", tok, split="test=0,valid=0")
    messages = [str(w.message) for w in record]
    for needle in (
        f"{bad}:2: invalid JSON",
        f"{bad}:3: JSON object has no 'text'",
        f"{bad}:5: invalid UTF-8 at byte offset",
        f"{bad}:6: JSON object 'text' is int",
        f"{bad}:7: empty 'text'",
        f"{empty}: empty file",
        f"{binary}: invalid UTF-8 at byte offset 3",
    ):
        assert any(m.startswith(needle) for m in messages), (needle, messages)
    assert not any(":4:" in m for m in messages)
    kept = [tok.decode(ids) for ids in _read_back(split_prefix(tmp_path / "o", "train"))]
    assert kept == ["good one", "caf\ufffd latin-1", "good two", "ok \ufffd\ufffd end\n"]
    assert result["skipped"] == 5  # lines 2, 3, 6, 7 and the empty file


def test_no_documents_is_an_error(tok: Tokenizer, tmp_path: Path) -> None:
    only_bad = tmp_path / "x.jsonl"
    only_bad.write_text('nope\n{"id": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(BTXError, match="no documents found"):
            preprocess_files([only_bad], tmp_path / "o", tok)
    assert not list(tmp_path.glob("o_*")), "nothing half-written is left behind"
    with pytest.raises(BTXError, match="does not exist"):
        preprocess_files([tmp_path / "missing.txt"], tmp_path / "o", tok)


def test_parse_split() -> None:
    assert parse_split("test=0.02,valid=0.02") == {"test": 0.02, "valid": 0.02}
    assert parse_split("valid=0.1") == {"test": 0.0, "valid": 0.1}
    for bad in ("test=2", "foo=0.1", "test=0.5,valid=0.5", "train=0.5,test=0.1"):
        with pytest.raises(BTXError):
            parse_split(bad)


def test_cli_main(tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "c.jsonl", DOCS)
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "cli"),
                "--tokenizer",
                tok.path,
                "--split",
                "test=0.2,valid=0.2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert IndexedDataset.exists(split_prefix(tmp_path / "cli", "valid"))
    assert (
        main(
            [
                "--input",
                str(src),
                "--output-prefix",
                str(tmp_path / "cli2"),
                "--split",
                "test=0.2,valid=0.2",
                "--train-tokenizer",
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    assert load_tokenizer(tmp_path / "cli2_tokenizer.model").vocab_size <= 400
    assert (
        main(
            [
                "--input",
                str(tmp_path / "nope.jsonl"),
                "--output-prefix",
                str(tmp_path / "x"),
                "--tokenizer",
                tok.path,
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["--input", str(src), "--output-prefix", str(tmp_path / "x")]) == 2
    )  # no tokenizer choice


def test_prepare_domains_manifest_and_idempotence(tmp_path: Path) -> None:
    code = _write_jsonl(tmp_path / "code.jsonl", {k: v for k, v in DOCS.items() if "def" in v})
    prose = _write_jsonl(
        tmp_path / "prose.jsonl", {k: v for k, v in DOCS.items() if "def" not in v}
    )
    out = tmp_path / "prepared"
    manifest = prepare_domains({"code": [code], "prose": [prose]}, out, vocab_size=400, split=SPLIT)
    tok = load_tokenizer(out / "tokenizer.model")
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert set(manifest["domains"]) == {"code", "prose"}
    for name in ("code", "prose"):
        info = manifest["domains"][name]
        assert sum(info["documents"].values()) == 30
        for s in SPLITS:
            assert len(IndexedDataset(str(out / info["prefixes"][s]))) == info["documents"][s]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    mtime = (out / "code_train_text_document.bin").stat().st_mtime_ns
    assert (
        prepare_domains({"code": [code], "prose": [prose]}, out, vocab_size=400, split=SPLIT)
        == manifest
    )
    assert (out / "code_train_text_document.bin").stat().st_mtime_ns == mtime, (
        "second run must skip"
    )
    with pytest.raises(BTXError, match="domain name"):
        prepare_domains({"bad/name": [code]}, out)
