"""Seed families beside Llama: Qwen2 / Qwen2.5 (q/k/v biases, tied embeddings), Qwen3 (QK-norm,
its own head_dim) and Mistral, with Llama's guarantees: HF -> torch_dist -> HF is byte-identical
(fp32 and bf16), megatron-core's logits equal transformers' to 1e-5 in fp32 at TP1 and at
TP2 x PP2, and what has no exact form is a one-line error naming the key.

The expectation is always transformers' own model (made here, from its config class), never our
code: the logits come from `AutoModelForCausalLM`, the round trip compares the files transformers
wrote with ours."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import DIST, run_script
from families_common import (
    Runtime,
    V,
    assert_bytes_equal,
    hf_logits,
    hf_tensors,
    make_hf,
    megatron_logits,
    megatron_model,
)

from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_btx.convert.cli import hf_to_megatron_main
from megatron_btx.errors import BTXError

SEED_FAMILIES = ["qwen2", "qwen3", "mistral"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", SEED_FAMILIES)
def test_round_trip_is_byte_identical(tmp_path, family, dtype):
    """Sharded HF input (index + several files), converted with a TP2 x PP2 layout recorded, and
    exported back: every tensor has the same name, dtype, shape and bytes; config.json keeps
    the family and its fields."""
    from transformers import AutoModelForCausalLM

    make_hf(family, tmp_path / "one", seed=3, dtype=dtype)
    hf = tmp_path / "hf"
    AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=dtype).save_pretrained(
        hf, max_shard_size="100KB"
    )
    assert (hf / "model.safetensors.index.json").exists()
    m = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    assert m["model"]["model_type"] == family and m["sources"][0]["model_type"] == family
    assert m["model"]["qkv_bias"] == (family == "qwen2")
    assert m["model"]["qk_norm"] == (family == "qwen3")
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=150_000)
    assert_bytes_equal(hf_tensors(hf), hf_tensors(tmp_path / "back"))
    want = json.loads((hf / "config.json").read_text())
    got = json.loads((tmp_path / "back" / "config.json").read_text())
    assert got["model_type"] == family and got["architectures"] == want["architectures"]
    for key in ("tie_word_embeddings", "num_key_value_heads", "rms_norm_eps", "bos_token_id"):
        assert got[key] == want[key], key
    assert got["head_dim"] == want.get("head_dim", 16)  # Qwen2's config has none: hidden / heads
    assert got["rope_parameters"]["rope_theta"] == want["rope_parameters"]["rope_theta"]


@pytest.mark.parametrize("family", SEED_FAMILIES)
def test_single_process_logits_equal_transformers(tmp_path, ids, family):
    """fp32, one process: megatron-core's logits of the converted model equal transformers'."""
    make_hf(family, tmp_path / "hf", seed=5)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    ref = hf_logits(tmp_path / "hf", ids)
    with Runtime():
        ours = megatron_logits(megatron_model(tmp_path / "mg"), ids)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL)
    assert ref.abs().max() > 0.1  # not a degenerate model


def test_the_extras_matter(tmp_path, ids):
    """The q/k/v biases and QK-norm weights change transformers' logits far beyond the tolerance,
    so the equalities above would catch them dropped or misplaced."""
    from transformers import AutoModelForCausalLM

    for family, part in (("qwen2", "self_attn.k_proj.bias"), ("qwen3", "self_attn.q_norm")):
        make_hf(family, tmp_path / family, seed=5)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        with torch.no_grad():
            ref = model(ids).logits
            for name, param in model.named_parameters():
                if part in name:
                    param.copy_(param.flip(0))  # the same values in other rows / heads
            moved = model(ids).logits
        assert (moved - ref).abs().max() > 100 * RTOL, family


@pytest.mark.dist
@pytest.mark.parametrize("family", SEED_FAMILIES)
def test_tp2_pp2_logits_equal_transformers(tmp_path, batch_file, family):
    """TP2 x PP2 under torchrun (gloo): the q/k/v bias split over TP ranks by key-value group,
    QK-norm on each rank's heads, the tied output layer on the last stage (Qwen2)."""
    make_hf(family, tmp_path / "hf", seed=7)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    out = tmp_path / "tp2pp2.json"
    args = ["--ckpt", tmp_path / "mg", "--batch", batch_file, "--out", out, "--tp", 2, "--pp", 2]
    result = run_script(DIST / "equiv.py", [str(a) for a in args], nproc=4)
    assert result.returncode == 0, result.stderr[-4000:]
    ours = torch.load(str(out) + ".logits.pt", weights_only=True)
    ref = hf_logits(tmp_path / "hf", torch.load(batch_file, weights_only=True)[:, :-1])
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL)
    assert 4.0 < json.loads(out.read_text())["loss"] < 8.0


# ---- what has no exact form: one line, exit 2, nothing written ---------------------------------
def _edited(tmp_path, family: str, **config) -> str:
    src = tmp_path / "src"
    make_hf(family, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    (src / "config.json").write_text(json.dumps(cfg))
    return str(src)


@pytest.mark.parametrize(
    "family,config,message",
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window true"),
        ("mistral", {"sliding_window": 64}, "sliding_window 64 is shorter than"),
        ("qwen3", {"attention_bias": True}, "attention_bias true"),
        ("llama", {"attention_bias": True}, "attention_bias/mlp_bias are not supported"),
        (
            "qwen2",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
            "rope_scaling type 'yarn' is not supported",
        ),
        ("qwen3", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            "qwen2",
            {"layer_types": ["full_attention"] * 3 + ["sliding_attention"]},
            "layer_types",
        ),
    ],
    ids=["qwen2-window", "mistral-window", "qwen3-o-bias", "llama-bias", "rope-yarn", "act", "lt"],
)
def test_unsupported_is_one_line_error(tmp_path, capsys, family, config, message):
    src = _edited(tmp_path, family, **config)
    capsys.readouterr()  # transformers' own progress output while making the model
    rc = hf_to_megatron_main(["--load", src, "--save", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0] and "config.json" in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_a_window_at_least_the_context_is_kept(tmp_path):
    """A Mistral whose window covers the whole context masks nothing: it converts, and the
    export writes the same window back (transformers then builds the same masks)."""
    src = _edited(tmp_path, "mistral", sliding_window=128)
    hf_to_megatron(src, tmp_path / "mg")
    megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["sliding_window"] == 128


def test_families_never_merge(tmp_path):
    """Sources of two families (same sizes) are refused before anything is written: the
    merge's architecture check includes the family fields."""
    from megatron_btx.merge import MergeSettings, merge

    a = make_hf("llama", tmp_path / "a")
    b = make_hf("mistral", tmp_path / "b")
    with pytest.raises(BTXError, match="architectures differ: model_type = 'llama' vs 'mistral'"):
        merge(MergeSettings(experts=[str(a), str(b)], save=str(tmp_path / "o"), progress=False))
    c = make_hf("qwen2", tmp_path / "c", tie_word_embeddings=False)
    d = shutil.copytree(c, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(BTXError, match="unexpected tensor .*bias"):
        merge(MergeSettings(experts=[str(c), str(d)], save=str(tmp_path / "o"), progress=False))
    assert not (tmp_path / "o").exists()


def test_manifest_records_family_for_training(tmp_path):
    """An imported Qwen3 records the family fields that rebuild it (no config.json needed)."""
    from megatron_btx.checkpoint.megatron_io import read_args

    make_hf("qwen3", tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    args = read_args(tmp_path / "mg")
    assert (args.model_type, args.qk_norm, args.qkv_bias, args.head_dim) == ("qwen3", 1, 0, 24)
    assert manifest.read(tmp_path / "mg")["moe"]["layer_freq"] is None
