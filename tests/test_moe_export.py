"""HF MoE export of every merge variant and router, checked through transformers: the exported
model's logits (transformers' AutoModelForCausalLM, whatever family the export chose) equal the
megatron-core model's to 1e-5 in fp32.

- plain merge, split chunks, blend, Mistral seeds -> Mixtral (one expert size, renormalised top-k);
- seed as shared expert -> Qwen2-MoE, its ungated sum made exact by a zero gate (sigmoid 0 = 1/2)
  and a doubled down projection;
- MoE in some layers -> Qwen2-MoE `mlp_only_layers` (Qwen3-MoE for Qwen3 seeds);
- Switch -> `norm_topk_prob: false`, top-1; soft -> every expert, `norm_topk_prob: false`;
- Sample Top-1, and a shared expert with Qwen3 attention: refused, saying why.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from families_common import (
    Runtime,
    V,
    hf_logits,
    hf_tensors,
    make_hf,
    megatron_logits,
    megatron_model,
)

from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.convert import megatron_to_hf
from megatron_btx.convert.cli import megatron_to_hf_main
from megatron_btx.errors import BTXError

RTOL = 1e-5


def merge(experts, save, **settings):
    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge import merge as run_merge

    for key in ("seed", "export_hf"):
        if settings.get(key) is not None:
            settings[key] = str(settings[key])
    settings.setdefault("router_std", 1.0)  # routing far from uniform: the top-k choice matters
    return run_merge(
        MergeSettings(experts=[str(e) for e in experts], save=str(save), progress=False, **settings)
    )


def branches(root: Path, family: str, count: int = 3, dtype=torch.float32, **kw) -> list[Path]:
    """A seed and `count` branches that share its attention and norms, FFNs all different;
    the seed last."""
    seed = make_hf(family, root / f"{family}_seed", 0, dtype, **kw)
    return [
        make_hf(family, root / f"{family}_{i}", i + 1, dtype, base=seed, **kw) for i in range(count)
    ] + [seed]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> list[Path]:
    return branches(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))


def exported_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def assert_export_equals_megatron(ckpt: Path, hf: Path, ids, router: dict | None = None):
    ref = hf_logits(hf, ids)
    with Runtime():
        ours = megatron_logits(megatron_model(ckpt, router), ids, ref.shape[-1])
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=RTOL)
    assert ref.abs().max() > 0.1


# ---- merge variants (btx merge --export-hf) ---------------------------------------------------
@pytest.mark.parametrize(
    "name,settings,family,fields",
    [
        ("plain", {}, "mixtral", {"num_local_experts": 4, "intermediate_size": 96}),
        (
            "split",
            {"split_chunks": 2},
            "mixtral",
            {"num_local_experts": 8, "intermediate_size": 48},
        ),
        ("blend", {"blend": True}, "mixtral", {"num_local_experts": 4, "intermediate_size": 96}),
        (
            "partial",
            {"moe_layers": "1", "dense_ffn": "seed"},
            "qwen2_moe",
            {"mlp_only_layers": [0], "intermediate_size": 96, "moe_intermediate_size": 96},
        ),
        (
            "split_shared_partial",
            {"split_chunks": 2, "seed_as_shared_expert": True, "moe_layers": "0"},
            "qwen2_moe",
            {
                "mlp_only_layers": [1],
                "moe_intermediate_size": 48,
                "intermediate_size": 96,
                "shared_expert_intermediate_size": 96,
                "num_experts": 6,
                "num_experts_per_tok": 4,
                "norm_topk_prob": True,
            },
        ),
    ],
)
def test_llama_merge_variants_export(llama, ids, tmp_path, name, settings, family, fields):
    """Each variant exports to the family that has its shape; transformers loads it and gives
    the megatron model's logits. A split's experts have the chunk size: Mixtral when that is
    the only change (the form every runtime reads), Qwen2-MoE's moe_intermediate_size when a
    dense layer or a shared expert needs it too."""
    seed = settings.pop("seed_as_shared_expert", False)
    merge(
        llama[:3],
        tmp_path / "moe",
        seed=llama[3],
        export_hf=tmp_path / "hf",
        verify=True,
        seed_as_shared_expert=seed,
        **settings,
    )
    cfg = exported_config(tmp_path / "hf")
    assert cfg["model_type"] == family
    for key, value in fields.items():
        assert cfg[key] == value, key
    assert_export_equals_megatron(tmp_path / "moe", tmp_path / "hf", ids)
    # `btx export-hf` of the merged checkpoint writes the same files as the merge's stream
    megatron_to_hf(tmp_path / "moe", tmp_path / "again")
    for path in (tmp_path / "hf").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name


def test_shared_expert_sum_is_exact(llama, ids, tmp_path):
    """Seed as shared expert -> Qwen2-MoE: gate weight 0 (sigmoid 0 = 1/2 exactly) and the down
    projection doubled (an exponent shift). The exported logits equal megatron's; leaving out the
    doubling (HF's 1/2 * shared) moves them far beyond the tolerance, so the test can fail."""
    merge(llama[:3], tmp_path / "moe", seed=llama[3], seed_as_shared_expert=True)
    megatron_to_hf(tmp_path / "moe", tmp_path / "hf")
    cfg = exported_config(tmp_path / "hf")
    assert cfg["model_type"] == "qwen2_moe" and cfg["shared_expert_intermediate_size"] == 96
    assert cfg["qkv_bias"] is True and cfg["mlp_only_layers"] == []
    exported = hf_tensors(tmp_path / "hf")
    seed_down = hf_tensors(llama[3])["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(exported["model.layers.1.mlp.shared_expert.down_proj.weight"], 2 * seed_down)
    assert not exported["model.layers.1.mlp.shared_expert_gate.weight"].any()
    assert not exported["model.layers.1.self_attn.q_proj.bias"].any()  # Llama: zero biases
    assert_export_equals_megatron(tmp_path / "moe", tmp_path / "hf", ids)
    for layer in range(2):
        key = f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"
        exported[key] = exported[key] / 2
    undoubled = tmp_path / "undoubled"
    shutil.copytree(tmp_path / "hf", undoubled)
    from safetensors.torch import save_file

    for path in undoubled.glob("*.safetensors"):
        path.unlink()
    (undoubled / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(exported, str(undoubled / "model.safetensors"), metadata={"format": "pt"})
    with Runtime():
        ours = megatron_logits(megatron_model(tmp_path / "moe"), ids)
    assert (hf_logits(undoubled, ids) - ours).abs().max() > 1e-3


def test_shared_expert_doubling_is_exact_in_bf16(tmp_path):
    """bf16 sources: the exported down projection is exactly twice the seed's (halving it gives
    the seed's bits back), and transformers' gated shared expert in bf16 (its own modules) gives
    bit for bit the plain SwiGLU of the seed's weights: the x2 costs no precision."""
    from transformers import AutoModelForCausalLM

    srcs = branches(tmp_path, "llama", count=2, dtype=torch.bfloat16, num_hidden_layers=2)
    merge(
        srcs[:2],
        tmp_path / "moe",
        seed=srcs[2],
        seed_as_shared_expert=True,
        export_hf=tmp_path / "hf",
    )
    seed = hf_tensors(srcs[2])
    exported = hf_tensors(tmp_path / "hf")
    down = exported["model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert down.dtype == torch.bfloat16
    assert torch.equal(down / 2, seed["model.layers.0.mlp.down_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    block = model.model.layers[0].mlp
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        hf_shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        gate, up = (seed[f"model.layers.0.mlp.{p}_proj.weight"] for p in ("gate", "up"))
        plain = F.linear(
            F.silu(F.linear(x, gate)) * F.linear(x, up), seed["model.layers.0.mlp.down_proj.weight"]
        )
    assert torch.equal(hf_shared, plain)


@pytest.mark.parametrize("family,expected", [("qwen2", "qwen2_moe"), ("mistral", "mixtral")])
def test_other_seed_families_export(tmp_path, ids, family, expected):
    """Qwen2 seeds (q/k/v biases, averaged; tied embeddings, as Qwen2.5's small models) ->
    Qwen2-MoE with a shared expert; Mistral seeds -> Mixtral."""
    srcs = branches(tmp_path, family, count=2, num_hidden_layers=2)
    shared = family == "qwen2"
    merge(
        srcs[:2],
        tmp_path / "moe",
        seed=srcs[2],
        seed_as_shared_expert=shared,
        export_hf=tmp_path / "hf",
        verify=True,
    )
    cfg = exported_config(tmp_path / "hf")
    assert cfg["model_type"] == expected
    assert cfg["tie_word_embeddings"] == (family == "qwen2")
    assert_export_equals_megatron(tmp_path / "moe", tmp_path / "hf", ids)
    if shared:  # the biases are the fp32 mean of the branches' (all equal), not zeros
        bias = hf_tensors(tmp_path / "hf")["model.layers.0.self_attn.k_proj.bias"]
        want = hf_tensors(srcs[2])["model.layers.0.self_attn.k_proj.bias"]
        torch.testing.assert_close(bias, want, rtol=1e-6, atol=0)
        assert bias.abs().max() > 0.1


def test_qwen3_seeds_export_to_qwen3_moe(tmp_path, ids):
    """Qwen3 seeds -> Qwen3-MoE (QK-norm kept), MoE in some layers and split experts included;
    a shared expert has no HF form with QK-norm: refused before anything is written."""
    srcs = branches(tmp_path, "qwen3", count=2, num_hidden_layers=2)
    merge(
        srcs[:2],
        tmp_path / "moe",
        seed=srcs[2],
        moe_layers="1",
        split_chunks=2,
        export_hf=tmp_path / "hf",
        verify=True,
    )
    cfg = exported_config(tmp_path / "hf")
    assert cfg["model_type"] == "qwen3_moe" and cfg["mlp_only_layers"] == [0]
    assert cfg["moe_intermediate_size"] == 48 and cfg["head_dim"] == 24
    assert_export_equals_megatron(tmp_path / "moe", tmp_path / "hf", ids)
    with pytest.raises(BTXError, match="shared expert has no HF form with Qwen3 attention"):
        merge(
            srcs[:2],
            tmp_path / "o",
            seed=srcs[2],
            seed_as_shared_expert=True,
            export_hf=tmp_path / "o_hf",
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o_hf").exists()


# ---- routers (btx export-hf of a finetuned checkpoint) -----------------------------------------
def _with_router(ckpt: Path, dest: Path, router: str) -> Path:
    """A copy of `ckpt` whose manifest records `router` under training.router, the field
    `btx train` writes (test_switch_finetune_exports shows a real run writing it)."""
    shutil.copytree(ckpt, dest)
    record = manifest.read(dest)
    manifest.rewrite(dest, {**record, "training": {"router": router}})
    return dest


@pytest.fixture(scope="module")
def plain_moe(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "moe"
    merge(llama[:3], out, seed=llama[3])
    return out


def test_soft_router_exports_every_expert_unnormalised(plain_moe, ids, tmp_path):
    """Soft routing (every expert, weighted by softmax(W x)) is top-k with k = E, not
    renormalised: Qwen2-MoE with num_experts_per_tok = E and norm_topk_prob false."""
    ckpt = _with_router(plain_moe, tmp_path / "soft", "soft")
    megatron_to_hf(ckpt, tmp_path / "hf")
    cfg = exported_config(tmp_path / "hf")
    assert (cfg["model_type"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (
        "qwen2_moe",
        4,
        False,
    )
    assert_export_equals_megatron(ckpt, tmp_path / "hf", ids, router={"type": "soft"})


def test_sample_top1_is_refused_saying_why(plain_moe, tmp_path, capsys):
    ckpt = _with_router(plain_moe, tmp_path / "s", "sample_top1")
    rc = megatron_to_hf_main(["--load", str(ckpt), "--save", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "sample_top1 has no exact HF form" in err[0] and "first MoE layer softly" in err[0]
    assert not (tmp_path / "hf").exists()


def test_switch_finetune_exports(tmp_path, data, ids):
    """`btx train` with the Switch router (no capacity: nothing dropped) from a merged MoE; its
    checkpoint's manifest says training.router = switch, and `btx export-hf` writes Qwen2-MoE
    top-1 with norm_topk_prob false, whose logits equal the finetuned megatron model's with the
    Switch router (softmax over all experts, the chosen expert's probability as its weight)."""
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    import train_common as tc

    srcs = branches(tmp_path, "llama", count=2, num_hidden_layers=2, vocab_size=1024)
    merge(srcs[:2], tmp_path / "moe", seed=srcs[2])
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        data,
        model={"init_from": str(tmp_path / "moe")},
        train={"steps": 2},
    )
    import yaml

    config = yaml.safe_load(cfg.read_text())
    config["moe"] = {"router": {"type": "switch", "capacity_factor": None}}
    cfg.write_text(yaml.safe_dump(config))
    tc.check(tc.run(cfg))
    ckpt = tmp_path / "run" / "checkpoints" / "iter_0000002"
    assert manifest.read(ckpt)["training"]["router"] == "switch"
    megatron_to_hf(ckpt, tmp_path / "hf")
    cfg = exported_config(tmp_path / "hf")
    assert (cfg["model_type"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"]) == (
        "qwen2_moe",
        1,
        False,
    )
    router = {"type": "switch", "capacity_factor": None}
    assert_export_equals_megatron(ckpt, tmp_path / "hf", ids, router=router)


def test_megatron_qwen3_sources_merge_like_hf_sources(tmp_path):
    """Qwen3 sources converted to torch_dist (their QK-norm and head_dim read through the
    checkpoint's template) merge to exactly the tensors their HF folders give."""
    from test_merge import all_tensors

    from megatron_btx.checkpoint.convert import hf_to_megatron

    srcs = branches(tmp_path, "qwen3", count=2, num_hidden_layers=2)
    for src in srcs:
        hf_to_megatron(src, tmp_path / f"mg_{src.name}")
    mg = [tmp_path / f"mg_{src.name}" for src in srcs]
    merge(mg[:2], tmp_path / "a", seed=mg[2], moe_layers="1", verify=True)
    merge(srcs[:2], tmp_path / "b", seed=srcs[2], moe_layers="1")
    got, want = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert got.keys() == want.keys()
    assert any("q_layernorm" in key for key in got)
    for key in got:
        assert torch.equal(got[key], want[key]), key
