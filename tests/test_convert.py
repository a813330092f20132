"""HF <-> megatron converters: byte-exact round trips, Mixtral export loaded by transformers,
clear one-line errors for bad input, and nothing half-written after a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_hf_llama
from safetensors.torch import load_file

from megatron_btx.checkpoint import convert, manifest
from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_btx.checkpoint.hf import HFReader
from megatron_btx.convert.cli import hf_to_megatron_main


def tensors(folder) -> dict[str, torch.Tensor]:
    r = HFReader(folder)
    return {k: r.get(k) for k in r.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_byte_identical(tmp_path, dtype):
    # sharded input (several safetensors files + index) to exercise the index path too
    hf = tmp_path / "hf"
    make_hf_llama(tmp_path / "tmp_hf", seed=3, dtype=dtype)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "tmp_hf", dtype=dtype).save_pretrained(
        hf, max_shard_size="100KB"
    )
    assert (hf / "model.safetensors.index.json").exists()
    m = hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2)
    assert m["dtype"] == ("bf16" if dtype == torch.bfloat16 else "fp32")
    assert m["layout"] == {"tp": 2, "pp": 2, "ep": 1}
    assert m["model"]["vocab_size"] == 300 and m["padded_vocab_size"] == 384
    assert set(m["sources"][0]["sha256"]) == {p.name for p in hf.glob("*.safetensors")}
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=150_000)
    a, b = tensors(hf), tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2


def test_random_megatron_moe_exports_to_mixtral(tmp_path):
    """A MoE born in megatron (random init, not from HF) exported to HF loads in transformers'
    MixtralForCausalLM with the same logits (fp32; 1e-5 as in the equivalence tests)."""
    from transformers import MixtralForCausalLM

    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import atomic_folder, save_model
    from megatron_btx.models.llama import LlamaArgs, build_model

    args = LlamaArgs(
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=250,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    runtime.init(device="cpu", seed=5)
    try:
        model = build_model(args, spec="local").eval()
        with torch.no_grad():
            ours = model(ids, torch.arange(24).unsqueeze(0).expand(2, -1), None)[..., :250]
        with atomic_folder(tmp_path / "moe") as tmp:
            save_model(model, tmp)
            manifest.write(
                tmp,
                manifest.Manifest(kind="megatron_torch_dist", model=args.to_dict(), dtype="fp32"),
            )
    finally:
        runtime.teardown()
    megatron_to_hf(tmp_path / "moe", tmp_path / "hf")
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 0.05  # random init, not a zero model


# ---- bad input ---------------------------------------------------------------------------------
def run_main(capsys, *argv) -> tuple[int, str]:
    rc = hf_to_megatron_main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_missing_safetensors(tmp_path, capsys, hf_llama):
    src = tmp_path / "src"
    shutil.copytree(hf_llama, src)
    (src / "model.safetensors").unlink()
    rc, err = run_main(capsys, "--load", str(src), "--save", str(tmp_path / "out"))
    assert rc == 2 and err.startswith("error: ") and str(src) in err and "safetensors" in err
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, capsys, hf_llama):
    src = tmp_path / "src"
    shutil.copytree(hf_llama, src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, err = run_main(capsys, "--load", str(src), "--save", str(tmp_path / "out"))
    assert rc == 2 and "truncated" in err and str(f) in err
    assert not (tmp_path / "out").exists()


def test_not_llama_config(tmp_path, capsys, hf_llama):
    src = tmp_path / "src"
    shutil.copytree(hf_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    rc, err = run_main(capsys, "--load", str(src), "--save", str(tmp_path / "out"))
    assert rc == 2 and "gpt2" in err and "config.json" in err and "Llama" in err


def test_tp_must_divide_heads(tmp_path, capsys, hf_llama):
    rc, err = run_main(capsys, "--load", str(hf_llama), "--save", str(tmp_path / "o"), "--tp", "3")
    assert rc == 2 and "TP=3" in err and "num_attention_heads=4" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, capsys, hf_llama, mg_llama):
    out = tmp_path / "out"
    shutil.copytree(mg_llama, out)
    before = manifest.read(out)["created"]
    rc, err = run_main(capsys, "--load", str(hf_llama), "--save", str(out))
    assert rc == 2 and "--overwrite" in err and str(out) in err
    assert manifest.read(out)["created"] == before
    assert run_main(capsys, "--load", str(hf_llama), "--save", str(out), "--overwrite")[0] == 0


def test_crash_mid_write_leaves_nothing(tmp_path, hf_llama, mg_llama, monkeypatch):
    """A failure after megatron-core has written part of the files leaves neither a partial
    checkpoint under the final name nor temporary debris; an existing checkpoint survives."""

    real = convert.stream_to_torch_dist

    def write_half_then_crash(tensors, args, dtype, folder, source, variant=None):
        def half():
            for i, item in enumerate(tensors):
                if i == 10:
                    raise KeyboardInterrupt  # what Ctrl-C or a kill-triggered exception looks like
                yield item

        return real(half(), args, dtype, folder, source, variant)

    monkeypatch.setattr(convert, "stream_to_torch_dist", write_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        hf_to_megatron(hf_llama, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # the layers already written were removed too
    old = tmp_path / "old"
    shutil.copytree(mg_llama, old)
    with pytest.raises(KeyboardInterrupt):
        hf_to_megatron(hf_llama, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "metadata.json").exists() and manifest.read(old)["model"]["vocab_size"] == 300


def test_converter_cli_as_a_tool(tmp_path, hf_llama):
    """tools/convert_hf_to_megatron.py runs as a plain process (no torchrun, no GPU)."""
    import subprocess
    import sys

    from conftest import ROOT, run_env

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_hf_to_megatron.py"),
            "--load",
            str(hf_llama),
            "--save",
            str(tmp_path / "mg"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert manifest.read(tmp_path / "mg")["dtype"] == "bf16"
    back = tmp_path / "back"
    megatron_to_hf(tmp_path / "mg", back, dtype="fp32")
    a, b = load_file(hf_llama / "model.safetensors"), load_file(back / "model.safetensors")
    for k in a:  # fp32 -> bf16 -> fp32 equals a plain bf16 rounding of the source
        assert torch.equal(a[k].to(torch.bfloat16).float(), b[k]), k
