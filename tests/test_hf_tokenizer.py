"""HF tokenizer folders (tokenizer.json) through prepare-data and training: the ids in the
indexed datasets are transformers' AutoTokenizer ids plus the EOS the seed's config.json names,
and the tokenizer files and hash travel into the data folder and checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from hf_tokenizers import make_hf_tokenizer
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_btx.checkpoint.sources import TokenizerInfo
from megatron_btx.data.cli import main
from megatron_btx.data.domains import prepare_domains
from megatron_btx.data.hf_tokenizer import HFTokenizer, TokenizerWarning
from megatron_btx.data.preprocess import iter_documents, split_prefix
from megatron_btx.data.splits import SPLITS, split_of
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.errors import BTXError

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

CODE = "def f{i}(x):\n\tif x > {i}:\n        return x * 12345   \n\n\n# λ → ∀ 🙂 done\r\n"
PROSE = (
    "Café and cafe\u0301 (decomposed) é, 日本語のテキスト {i}. Don't stop; it's <|endoftext|> fine."
)
DOMAINS = {
    "code": {f"code-{i}": CODE.format(i=i) for i in range(40)},
    "prose": {f"prose-{i}": PROSE.format(i=i) for i in range(40)},
}
SPLIT = {"valid": 0.2, "test": 0.2}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    return path


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def seed_tokenizer(request, tmp_path_factory) -> Path:
    corpus = [t for docs in DOMAINS.values() for t in docs.values()] * 3
    folder = tmp_path_factory.mktemp(request.param) / "seed"
    return make_hf_tokenizer(folder, corpus, request.param, vocab_size=400)


def _config_eos(folder: Path) -> int:
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    return eos[0] if isinstance(eos, list) else eos


def test_prepared_ids_equal_autotokenizer_plus_config_eos(seed_tokenizer, tmp_path, recwarn):
    """`btx prepare-data --tokenizer HF_DIR`: every document of every split is AutoTokenizer's
    ids (no special tokens added) followed by config.json's EOS; files and hash are recorded."""
    from transformers import AutoTokenizer

    inputs = {
        name: _write_jsonl(tmp_path / f"{name}.jsonl", docs) for name, docs in DOMAINS.items()
    }
    out = tmp_path / "prepared"
    argv = ["--output-dir", str(out), "--tokenizer", str(seed_tokenizer), "--workers", "2"]
    argv += [x for name, path in inputs.items() for x in ("--domain", f"{name}={path}")]
    assert main([*argv, "--split", "valid=0.2,test=0.2"]) == 0

    reference = AutoTokenizer.from_pretrained(seed_tokenizer)
    eos = _config_eos(seed_tokenizer)
    for name, docs in DOMAINS.items():
        expected = {s: [] for s in SPLITS}
        for key, text in docs.items():
            ids = reference(text, add_special_tokens=False)["input_ids"]
            expected[split_of(key, SPLIT)].append(ids + [eos])
        for s in SPLITS:
            ds = IndexedDataset(split_prefix(out / name, s))
            assert [ds[i].tolist() for i in range(len(ds))] == expected[s], (name, s)
        assert all(expected[s] for s in SPLITS)  # every split was exercised
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["tokenizer"]
    assert entry["path"] == "tokenizer" and entry["kind"] == "hf"
    assert entry["sha256"] == _sha256(seed_tokenizer / "tokenizer.json")
    assert entry["eos_id"] == eos and entry["special_id_sources"]["eos"] == "config.json"
    assert entry["vocab_size"] == len(reference)
    for copied in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / "tokenizer" / copied).read_bytes() == (seed_tokenizer / copied).read_bytes()
    if reference.eos_token_id != eos:  # llama3: tokenizer_config.json names <|eot_id|>
        assert any(issubclass(w.category, TokenizerWarning) for w in recwarn)


def test_special_id_precedence(seed_tokenizer, tmp_path):
    """config.json, then generation_config.json, then tokenizer_config.json decide EOS/BOS; a pad
    equal to EOS is dropped (megatron-core would mask every document end)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    shutil.copytree(seed_tokenizer, folder)
    reference = AutoTokenizer.from_pretrained(seed_tokenizer)
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == _config_eos(seed_tokenizer)
    assert tok.pad_id == -1  # qwen2: pad_token = eos; llama3: no pad anywhere

    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = reference.convert_tokens_to_ids(reference.all_special_tokens[-1])
    (folder / "generation_config.json").write_text(json.dumps(generation))
    assert load_tokenizer(folder).eos_id == _config_eos(seed_tokenizer)  # config.json still wins
    (folder / "config.json").unlink()
    assert load_tokenizer(folder).eos_id == generation["eos_token_id"]
    (folder / "generation_config.json").unlink()
    assert load_tokenizer(folder).eos_id == reference.eos_token_id  # tokenizer_config.json
    assert load_tokenizer(folder).bos_id == (
        reference.bos_token_id if reference.bos_token_id is not None else -1
    )


def test_hf_tokenizer_errors(seed_tokenizer, tmp_path, capsys):
    """Missing or broken files are one-line BTXErrors naming the file; the CLI exits 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BTXError, match="has no tokenizer.json"):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    shutil.copytree(seed_tokenizer, broken)
    (broken / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(BTXError, match="not a valid tokenizer.json"):
        load_tokenizer(broken)
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    shutil.copy(seed_tokenizer / "tokenizer.json", no_eos / "tokenizer.json")
    with pytest.raises(BTXError, match="no EOS"):
        load_tokenizer(no_eos)
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(BTXError, match=r"'<\|nope\|>' is not in tokenizer.json"):
        load_tokenizer(no_eos)
    (no_eos / "tokenizer_config.json").unlink()
    (no_eos / "config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(BTXError, match="outside tokenizer.json's vocabulary"):
        load_tokenizer(no_eos)
    src = _write_jsonl(tmp_path / "a.jsonl", DOMAINS["code"])
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "x"), "--tokenizer", str(empty)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tokenizer.json" in err[0]
    assert not list(tmp_path.glob("x_*"))


def test_train_on_hf_tokenized_code_loses_loss(tmp_path, data):
    """`btx train` on code prepared with a byte-level BPE tokenizer.json: vocabulary and EOD come
    from it, validation loss falls, and the checkpoint carries the tokenizer files and hash."""
    from transformers import AutoTokenizer

    code = json.loads((data / "manifest.json").read_text())["domains"]["code"]["inputs"]
    texts = [text for _, text in iter_documents(code)]
    seed = make_hf_tokenizer(tmp_path / "seed", texts, "llama3", vocab_size=1024)
    prepared = tmp_path / "prepared"
    prepare_domains({"code": code}, prepared, tokenizer=seed, split={"valid": 0.05, "test": 0.02})
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        prepared,
        data={"seq_length": 64, "micro_batch_size": 8, "global_batch_size": 8},
        train={"steps": 60, "eval_interval": 60, "eval_iters": 4, "save_interval": 60},
    )
    tc.check(tc.run(cfg))
    evals = tc.records(tmp_path / "run", "eval")
    assert evals[0]["loss_code"] - evals[-1]["loss_code"] >= 1.0, evals
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000060"
    manifest = json.loads((ckpt / "btx_manifest.json").read_text())
    reference = AutoTokenizer.from_pretrained(seed)
    assert manifest["model"]["vocab_size"] == len(reference)
    # the model's own config names the tokenizer's ids (its HF export's config.json carries them)
    assert manifest["model"]["eos_token_id"] == _config_eos(seed)
    assert manifest["model"]["bos_token_id"] == reference.bos_token_id
    assert manifest["tokenizer"]["sha256"] == _sha256(seed / "tokenizer.json")
    assert manifest["tokenizer"]["eos_id"] == _config_eos(seed)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ckpt / "tokenizer" / name).read_bytes() == (seed / name).read_bytes()
    assert load_tokenizer(ckpt / "tokenizer").eos_id == _config_eos(seed)
    # the merge compares this hash across its sources
    assert TokenizerInfo.of(ckpt / "tokenizer").sha256 == _sha256(seed / "tokenizer.json")
