"""HF MoE import (Mixtral, Qwen2-MoE, Qwen3-MoE) into torch_dist, from both expert layouts:
the per-expert one transformers 5.24's save_pretrained writes, and transformers 5's fused 3-D
`experts.gate_up_proj` / `experts.down_proj` (the module's own state dict, as tools that save it
directly write it).

The imported model gives transformers' logits (fp32, 1e-5) in one process and at EP2; the export
back is byte-identical to what transformers itself wrote (from either layout); the manifest
records the MoE shape (gated shared expert, dense layers) and `btx train` continues from it with
expert parallelism."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

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

RTOL = 1e-5
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def fused_copy(src: Path, dest: Path) -> Path:
    """The same model saved in transformers 5's fused layout: its modules' own state dict."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    dest.mkdir()
    shutil.copy(src / "config.json", dest / "config.json")
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_import_gives_transformers_logits_and_round_trips(tmp_path, ids, family, layout):
    hf = make_hf(family, tmp_path / "hf", seed=2)
    src = hf if layout == "per_expert" else fused_copy(hf, tmp_path / "fused")
    keys = hf_tensors(src).keys()
    assert any(k.endswith("experts.gate_up_proj") for k in keys) == (layout == "fused")
    m = hf_to_megatron(src, tmp_path / "mg", ep=2)
    assert m["sources"][0]["expert_layout"] == layout and m["layout"]["ep"] == 2
    ref = hf_logits(hf, ids)
    with Runtime():
        ours = megatron_logits(megatron_model(tmp_path / "mg"), ids)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL)
    assert ref.abs().max() > 0.1
    megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    # from either layout, the export is what transformers' own save_pretrained wrote
    assert_bytes_equal(hf_tensors(hf), hf_tensors(tmp_path / "back"))
    got = json.loads((tmp_path / "back" / "config.json").read_text())
    want = json.loads((hf / "config.json").read_text())
    assert got["model_type"] == family
    for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert got.get(key) == want.get(key), key
    experts = [c.get("num_experts", c.get("num_local_experts")) for c in (got, want)]
    assert experts[0] == experts[1] == 4
    assert got.get("mlp_only_layers", []) == want.get("mlp_only_layers", [])


def test_qwen2_moe_manifest_records_the_shape(tmp_path):
    """A Qwen1.5-MoE-shaped model: gated shared expert of its own size, a dense layer of the
    dense size, experts of moe_intermediate_size, top-k not renormalised."""
    make_hf("qwen2_moe", tmp_path / "hf")
    m = hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    assert m["moe"] == {
        "shared_expert_intermediate_size": 80,
        "layer_freq": [0, 1],
        "dense_ffn_hidden_size": 96,
        "shared_expert_gate": True,
    }
    model = m["model"]
    assert (model["model_type"], model["intermediate_size"], model["num_local_experts"]) == (
        "qwen2",
        32,
        4,
    )
    assert model["norm_topk_prob"] is False and model["qkv_bias"] is True


def test_norm_topk_prob_changes_the_function(tmp_path, ids):
    """norm_topk_prob is honoured, not assumed: the same weights with it flipped give other
    transformers logits, and the import follows (megatron's pre-softmax router or not)."""
    hf = make_hf("qwen3_moe", tmp_path / "a", seed=3)
    flipped = shutil.copytree(hf, tmp_path / "b")
    cfg = json.loads((flipped / "config.json").read_text())
    (flipped / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    refs = {p.name: hf_logits(p, ids) for p in (hf, flipped)}
    assert (refs["a"] - refs["b"]).abs().max() > 1e-3
    for path in (hf, flipped):
        hf_to_megatron(path, tmp_path / f"mg_{path.name}")
        with Runtime():
            ours = megatron_logits(megatron_model(tmp_path / f"mg_{path.name}"), ids)
        torch.testing.assert_close(ours, refs[path.name], rtol=RTOL, atol=RTOL)


@pytest.mark.dist
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_ep2_logits_equal_transformers(tmp_path, batch_file, family):
    """Imported at EP2, run under torchrun with the experts split over two ranks: transformers'
    logits (the shared expert and the dense layer replicated, the experts dispatched)."""
    make_hf(family, tmp_path / "hf", seed=8)
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", ep=2)
    out = tmp_path / "ep2.json"
    args = ["--ckpt", tmp_path / "mg", "--batch", batch_file, "--out", out, "--ep", 2]
    result = run_script(DIST / "equiv.py", [str(a) for a in args], nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    ours = torch.load(str(out) + ".logits.pt", weights_only=True)
    ref = hf_logits(tmp_path / "hf", torch.load(batch_file, weights_only=True)[:, :-1])
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL)


@pytest.mark.dist
def test_train_from_imported_qwen2_moe_at_ep2(tmp_path, data):
    """`btx train` (two processes, EP2) from an imported Qwen2-MoE: the model is built from the
    manifest's MoE shape (gated shared expert, dense layer), the weights are the import's (the
    start loss is the recognisable model's, far from ln 1024), it trains, and its checkpoint
    exports back to Qwen2-MoE with the shape kept."""
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    import train_common as tc
    from transformers import AutoModelForCausalLM

    hf = make_hf("qwen2_moe", tmp_path / "hf", vocab_size=1024)
    model = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():  # a recognisable function: strongly prefer token 7 everywhere
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 1.0
        model.model.norm.weight.fill_(50.0)
    model.save_pretrained(hf)
    hf_to_megatron(hf, tmp_path / "mg", ep=2)
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        model={"init_from": str(tmp_path / "mg")},
        train={"steps": 2, "eval_interval": 2},
    )
    tc.check(tc.run(cfg, ["--parallel.ep", "2"], nproc=2))
    evals = tc.records(tmp_path / "run", "eval")
    assert evals[0]["step"] == 0 and evals[0]["loss_code"] > 8.0, evals[0]
    train = tc.records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2] and all(r["grad_norm"] > 0 for r in train)
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    assert manifest.read(ckpt)["moe"]["shared_expert_gate"] is True
    megatron_to_hf(ckpt, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["mlp_only_layers"] == [0]
    assert cfg["norm_topk_prob"] is False  # megatron's own top-k router, as imported
