"""SentencePiece wrapper: code must survive encode/decode byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_btx.data.spm_tokenizer import train_sentencepiece
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError

CODE = '''class Stack:
    """A stack.\tTabs too."""

    def __init__(self):
        self.items = []   # trailing spaces follow<TRAILING>


\tdef push(self, x):
\t\tif x is None:
\t\t\traise ValueError("no None")  # unicode: λ → ∀ 🙂
        self.items.append(x)
'''.replace("<TRAILING>", "   ")  # kept out of the source so editors do not strip it


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    corpus = [CODE.replace("Stack", f"Stack{i}") for i in range(50)] + [
        "The quick brown fox jumps over the lazy dog.\n" * 3
    ]
    return train_sentencepiece(corpus, tmp_path_factory.mktemp("tok") / "spm", vocab_size=400)


def test_indented_code_round_trips(tok: Tokenizer) -> None:
    for text in (
        CODE,
        "\n\n  x\n",
        "    leading spaces",
        "tab\tand\r\nCRLF\n",
        "\x00bytes\x7f",
        "",
    ):
        assert tok.decode(tok.encode(text)) == text


def test_newline_and_tab_are_single_pieces(tok: Tokenizer) -> None:
    assert [tok.id_to_piece(i) for i in tok.encode("\n")] == ["\n"]
    assert [tok.id_to_piece(i) for i in tok.encode("\t")] == ["\t"]


def test_special_ids_and_provenance(tok: Tokenizer, tmp_path: Path) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.eos_id not in tok.encode(CODE)
    assert len(tok.sha256) == 64 and tok.vocab_size <= 400
    again = load_tokenizer(tok.path)
    assert again.sha256 == tok.sha256 and again.encode(CODE) == tok.encode(CODE)
    assert tok.encode_batch([CODE, "x"], num_threads=2) == [tok.encode(CODE), tok.encode("x")]


def test_train_from_files_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text(CODE * 5)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "hello world\\nsecond line"}\nnot json\n')
    a = train_sentencepiece([src, jsonl], tmp_path / "one", vocab_size=320)
    b = train_sentencepiece([str(src), str(jsonl)], tmp_path / "two", vocab_size=320)
    assert a.sha256 == b.sha256
    assert (tmp_path / "one.vocab").is_file()


def test_errors_are_btx_errors(tmp_path: Path) -> None:
    with pytest.raises(BTXError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(BTXError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(BTXError, match="too small"):
        train_sentencepiece(["x"], tmp_path / "t", vocab_size=100)
    with pytest.raises(BTXError, match="no text"):
        train_sentencepiece(["", "   "], tmp_path / "t", vocab_size=400)
