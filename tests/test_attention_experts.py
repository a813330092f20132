"""Attention experts (BAM; models.attention_experts, merge --attention): the mixture's function,
the merge, parameter and compute counts, checkpoint checks and the refused HF export.

Expectations come from outside the code under test: megatron-core's own SelfAttention (one
attention block), `transformers` models of the sources (and of a source whose key/value
projections are replaced by the sources' mean, built by hand), hand counts of parameters, and the
RMSNorm of the embedding written out for the centroid router.

Tolerance for megatron-core vs `transformers` logits (fp32): atol 2e-5, rtol 1e-5, as
tests/test_merge.py: the same function computed with other kernels and summation orders; the
tiny models' logits are O(1), so a few ulps per layer stay far below 1e-5, while a wrong expert,
a wrong QKV row or a router that is not one-hot moves logits by 1e-2 or more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_contract import btx, one_error
from families_common import Runtime, make_hf
from safetensors.torch import load_file

from megatron_btx.errors import BTXError

V = 300
TOL = dict(atol=2e-5, rtol=1e-5)


# ---- helpers ---------------------------------------------------------------------------------
def make_branch(family: str, path: Path, seed: int, base: Path | None) -> Path:
    """A random HF model whose embeddings and RMSNorms (input, post-attention, final) are
    `base`'s: sources whose averaged tensors are shared, so that a source's own attention and
    FFN, routed to with weight 1, give exactly that source's function."""
    import transformers

    make_hf(family, path, seed=seed)
    if base is None:
        return path
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = load_file(str(base / "model.safetensors"))
    shared = (
        "embed_tokens",
        "lm_head",
        "model.norm",
        "input_layernorm",
        "post_attention_layernorm",
    )
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if any(s in name for s in shared) and name in ref:
                param.copy_(ref[name])
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def merge(sources: list[Path], save: Path, **settings):
    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge import merge as run_merge

    settings.setdefault("progress", False)
    *experts, seed = sources
    return run_merge(
        MergeSettings(experts=[str(e) for e in experts], seed=str(seed), save=str(save), **settings)
    )


def load_merged(ckpt: Path):
    """The merged checkpoint built from its manifest and loaded (call inside Runtime)."""
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_for_checkpoint

    model = build_for_checkpoint(read_args(ckpt), torch.float32, read_variant(ckpt))
    load_model(model, ckpt)
    return model.eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, pos, None)[..., :V]


def plant(model, expert: int, attention_expert: int | None = None) -> None:
    """Every router of the model sends every token to one expert with weight exactly 1 (logits
    1e4 apart: the fp32 softmax of the others underflows to 0)."""

    def one_hot(E: int, index: int):
        def gating(x):
            logits = torch.zeros(x.shape[:-1] + (E,), dtype=torch.float32)
            logits[..., index] = 1e4
            return logits

        return gating

    for layer in model.decoder.layers:
        layer.mlp.router.gating = one_hot(layer.mlp.router.weight.shape[0], expert)
        router = layer.self_attention.router
        index = expert if attention_expert is None else attention_expert
        router.gating = one_hot(router.weight.shape[0], index)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def branches(request, tmp_path_factory) -> tuple[str, list[Path]]:
    """Per family: 2 branches + the seed (last), sharing embeddings and norms, each with its own
    attention (q/k/v/o, and Qwen3's QK-norm) and FFN. Llama with GQA (4 heads, 2 KV heads);
    Qwen3 with QK-norm and a head_dim apart from hidden / heads."""
    family = request.param
    root = tmp_path_factory.mktemp(f"bam_{family}")
    seed = make_branch(family, root / "seed", 0, None)
    return family, [make_branch(family, root / f"e{i}", i + 1, seed) for i in range(2)] + [seed]


# ---- the mixture -----------------------------------------------------------------------------
@pytest.mark.parametrize("shared_kv", [False, True], ids=["experts", "shared_kv"])
@pytest.mark.parametrize(
    "qk_norm,qkv_bias", [(False, False), (True, True)], ids=["plain", "extras"]
)
def test_identical_experts_equal_one_attention_block(shared_kv, qk_norm, qkv_bias):
    """A mixture of E copies of one attention block is that block, whatever the router: the
    logits of a megatron-core GPTModel with attention experts, each a copy of a dense model's
    attention, equal the dense model's for routers of std 0 to 5 (weights far from uniform)."""
    from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_model

    args = LlamaArgs(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
    )
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with Runtime():
        torch.manual_seed(0)
        dense = build_model(args, spec="local").eval()
        with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation
            for name, param in dense.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.2)
        reference = logits_of(dense, ids)
        variant = MoEVariant(attention_experts=3, attention_shared_kv=shared_kv)
        mixture = build_model(args, spec="local", variant=variant).eval()
        state = _copies_of_the_dense_attention(dense.state_dict(), mixture.state_dict(), args)
        for std in (0.0, 1.0, 5.0):
            for layer in range(args.num_hidden_layers):
                key = f"decoder.layers.{layer}.self_attention.router.weight"
                state[key] = torch.randn(state[key].shape) * std
            mixture.load_state_dict(state)
            torch.testing.assert_close(logits_of(mixture, ids), reference, atol=1e-5, rtol=1e-5)
            weights = mixture.decoder.layers[0].self_attention.router.read_stats()["weight"]
            assert sum(weights) == pytest.approx(1.0)
            if std == 5.0:  # the routing is far from uniform: the test is not vacuous
                assert max(weights) - min(weights) > 0.05


def _copies_of_the_dense_attention(dense: dict, state: dict, args) -> dict:
    """The mixture's state dict with every attention expert a copy of the dense attention. The
    shared-KV form is built from the fused QKV's documented row layout (per key-value group:
    its query heads, its key, its value) written out here."""
    groups, d = args.num_key_value_heads, args.head_dim
    per_group = args.num_attention_heads // groups
    out = dict(state)
    for key in state:
        if key.endswith("_extra_state"):
            continue
        if ".self_attention.experts." in key:
            layer, _, tail = key.partition(".self_attention.experts.")
            name = tail.split(".", 1)[1]
            if name.startswith("linear_q."):  # a shared-KV expert's query rows
                fused = dense[f"{layer}.self_attention.linear_qkv.{name.split('.')[1]}"]
                rows = fused.reshape(groups, (per_group + 2) * d, -1)[:, : per_group * d]
                out[key] = rows.reshape(-1, *fused.shape[1:])
            else:
                out[key] = dense[f"{layer}.self_attention.{name}"]
        elif ".self_attention.linear_kv." in key:
            fused = dense[key.replace("linear_kv", "linear_qkv")]
            rows = fused.reshape(groups, (per_group + 2) * d, -1)[:, per_group * d :]
            out[key] = rows.reshape(-1, *fused.shape[1:])
        elif not key.endswith("router.weight"):
            out[key] = dense[key]
    return out


# ---- the merge -------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", [0, 2], ids=["expert0", "seed"])
def test_one_hot_router_gives_the_source_model(branches, ids, tmp_path, expert):
    """`--attention experts`: with every router (attention and FFN) planted on source i, the
    merged MoE is source i's own dense model: its logits equal `transformers`' for that
    checkpoint (sources share only embeddings and norms, so nothing else can make them equal)."""
    family, sources = branches
    written = merge(sources, tmp_path / "bam", attention="experts", verify=True)
    assert written["moe"]["attention_experts"] == 3
    assert written["merge"]["attention"] == "experts"
    assert written["verify"]["attention_experts_bit_identical"] > 0
    destinations = [c["attention_to"] for c in written["verify"]["source_keys"]]
    assert destinations == ["attention experts 0", "attention experts 1", "attention experts 2"]
    with Runtime():
        model = load_merged(tmp_path / "bam")
        averaged = logits_of(model, ids)
        plant(model, expert)
        out = logits_of(model, ids)
    reference = hf_logits(sources[expert], ids)
    torch.testing.assert_close(out, reference, **TOL)
    # the sources' attentions differ: the soft mixture is none of them
    assert (averaged - reference).abs().max() > 1e-2


def test_shared_kv_one_hot_router_gives_source_queries_with_mean_keys(branches, ids, tmp_path):
    """`--attention experts_shared_kv`: routers planted on source 1 give source 1's model with
    its key/value projections (and Qwen3's key norm) replaced by the sources' mean: that model
    is written by hand with `transformers` and its logits are the expectation."""
    import transformers

    family, sources = branches
    merge(sources, tmp_path / "bam", attention="experts_shared_kv", verify=True)
    with Runtime():
        model = load_merged(tmp_path / "bam")
        plant(model, 1)
        out = logits_of(model, ids)
    states = [load_file(str(s / "model.safetensors")) for s in sources]
    model = transformers.AutoModelForCausalLM.from_pretrained(sources[1], dtype=torch.float32)
    shared = ("k_proj", "v_proj", "k_norm")
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if any(f".{s}." in name for s in shared):
                param.copy_(sum(s[name] for s in states) / len(states))
    model.save_pretrained(tmp_path / "hand")
    torch.testing.assert_close(out, hf_logits(tmp_path / "hand", ids), **TOL)


def test_centroid_attention_router_is_the_mean_normed_embedding(branches, tmp_path):
    """`--router-init centroid`: layer 0's attention router row e is the normalised mean, over
    source e's domain sample, of the attention's input RMSNorm(embedding) * norm weight,
    written out here from the merged checkpoint's own embedding and norm."""
    family, sources = branches
    ids = torch.tensor([[5 + 30 * d + (i % 7) for i in range(32)] for d in range(3)])
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = []
    for d in range(3):
        prefix = tmp_path / f"ds{d}"
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
        builder.add_document(ids[d].numpy(), [32])
        builder.finalize(str(prefix) + ".idx")
        prefixes.append(str(prefix))
    merge(
        sources,
        tmp_path / "bam",
        attention="experts",
        router_init="centroid",
        centroid_data=prefixes,
        centroid_tokens=32,
        centroid_seq_len=32,
    )
    from megatron_btx.checkpoint.dcp_stream import PartialReader

    reader = PartialReader(tmp_path / "bam")
    try:

        def tensor(key: str) -> torch.Tensor:
            size = list(reader.md.state_dict_metadata[key].size)
            return reader.read_region(key, [0] * len(size), size).float()

        emb = tensor("embedding.word_embeddings.weight")
        norm = tensor("decoder.layers.self_attention.linear_qkv.layer_norm_weight")[0]
        router = tensor("decoder.layers.self_attention.router.weight")[0]
    finally:
        reader.close()
    eps = json.loads((sources[0] / "config.json").read_text())["rms_norm_eps"]
    for e in range(3):
        x = emb[ids[e]]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm
        row = x.mean(0)
        torch.testing.assert_close(router[e], row / row.norm(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("branches", ["llama"], indirect=True)
def test_with_the_other_merge_variants(branches, ids, tmp_path):
    """Attention experts beside MoE in some layers (a dense seed FFN in the others) and a
    shared expert, and beside split FFN experts: --verify passes (every attention expert is its
    source's), the model loads and runs, and the per-layer checkpoint keys hold E experts."""
    from megatron_btx.checkpoint.dcp_stream import read_metadata

    family, sources = branches
    cases = {
        "partial": dict(
            attention="experts_shared_kv",
            moe_layers="1",
            dense_ffn="seed",
            seed_as_shared_expert=True,
        ),
        "split": dict(attention="experts", split_chunks=2),
    }
    for name, settings in cases.items():
        written = merge(sources, tmp_path / name, verify=True, **settings)
        assert written["verify"]["attention_experts_bit_identical"] > 0
        assert written["moe"]["attention_experts"] == 3
    index = read_metadata(tmp_path / "partial").state_dict_metadata
    # heterogeneous layers: megatron-core keys them per layer, the experts stacked
    size = index["decoder.layers.0.self_attention.experts.linear_q.weight"].size
    assert tuple(size) == (3, 64, 64)
    assert tuple(index["decoder.layers.1.self_attention.linear_kv.weight"].size) == (64, 64)
    with Runtime():
        for name in cases:
            assert torch.isfinite(logits_of(load_merged(tmp_path / name), ids)).all(), name


# ---- counts ----------------------------------------------------------------------------------
# The merge of two branches + seed of tests/conftest.py's Llama shape, cut to 2 layers:
# hidden 64, 4 heads of 16, 2 key-value heads, FFN 96, vocabulary 300 (padded to 384), 3 sources.
H, D, FFN, E = 64, 16, 96, 3
Q = O = 4 * D * H  # 4096: one expert's query projection, and its output projection
KV = 2 * 2 * D * H  # 4096: keys and values of 2 heads
ROUTER = E * H  # 192: either router
EXPERT_FFN = 3 * H * FFN  # 18,432: gate, up, down


def test_shared_kv_parameter_count_by_hand():
    """Total parameters of the megatron-core model of a shared-KV merge, and its active
    parameters per token, against hand counts."""
    from megatron_btx import runtime
    from megatron_btx.models.compute import active_params
    from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_for_checkpoint

    args = LlamaArgs(
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        num_local_experts=E,
        num_experts_per_tok=2,
    )
    variant = MoEVariant(attention_experts=E, attention_shared_kv=True)
    with runtime.single_process():
        model = build_for_checkpoint(args, "fp32", variant, meta=True)
    # per layer: 2 norms, the attention router, the shared keys/values, 3 x (q + o),
    # the FFN router and 3 expert FFNs; then the padded embedding, output layer, final norm
    layer = 2 * H + ROUTER + KV + E * (Q + O) + ROUTER + E * EXPERT_FFN
    assert layer == 84_480
    total = 2 * layer + 2 * 384 * H + H
    assert sum(p.numel() for p in model.parameters()) == total == 218_176
    # active per token: every attention expert (soft routing), the shared k/v once, the
    # router; 2 of 3 FFN experts and their router; the output projection (vocabulary 300)
    active = 2 * (E * (Q + O) + KV + ROUTER + 2 * EXPERT_FFN + ROUTER) + V * H
    assert active_params(args, {"type": "topk"}, variant) == active == 151_040
    # not shared: each expert has its own keys and values
    full = MoEVariant(attention_experts=E)
    assert active_params(args, {"type": "topk"}, full) == active + 2 * (E - 1) * KV


# ---- refusals and checks ---------------------------------------------------------------------
@pytest.mark.parametrize("branches", ["llama"], indirect=True)
def test_hf_export_is_refused_with_one_line(branches, tmp_path):
    """No `transformers` architecture has attention experts: `btx merge --export-hf` and `btx
    convert` of a BAM checkpoint refuse with one line, and nothing is written."""
    family, sources = branches
    proc = btx(
        "merge",
        "--experts",
        *map(str, sources[:2]),
        "--seed",
        str(sources[2]),
        "--attention",
        "experts",
        "--save",
        str(tmp_path / "bam"),
        "--export-hf",
        str(tmp_path / "hf"),
    )
    one_error(proc, "attention experts (BAM) have no HF form")
    assert not (tmp_path / "bam").exists() and not (tmp_path / "hf").exists()
    merge(sources, tmp_path / "bam", attention="experts_shared_kv")
    proc = btx("export-hf", "--load", str(tmp_path / "bam"), "--save", str(tmp_path / "hf"))
    one_error(proc, "no transformers architecture mixes several attention blocks")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("branches", ["llama"], indirect=True)
def test_manifest_claiming_other_attention_experts_is_refused(branches, tmp_path):
    """A manifest edited to claim another number of attention experts (or none) than the
    checkpoint holds is refused before any model is built, naming the tensor."""
    import shutil

    from megatron_btx.checkpoint.megatron_io import read_args

    family, sources = branches
    merge(sources, tmp_path / "bam", attention="experts", hash_output=False)
    for claim in (5, 0, "three"):
        folder = tmp_path / f"claim_{claim}"
        shutil.copytree(tmp_path / "bam", folder)
        path = folder / "btx_manifest.json"
        m = json.loads(path.read_text())
        m["moe"]["attention_experts"] = claim
        path.write_text(json.dumps(m))
        with pytest.raises(BTXError) as err:
            read_args(folder)
        assert "the manifest" in str(err.value) and "\n" not in str(err.value), claim


def test_attention_flag_is_checked():
    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge.cli import build_parser

    ns = build_parser().parse_args(["--experts", "a", "--save", "b", "--attention", "experts"])
    assert MergeSettings.from_args(ns).attention == "experts"
    assert (
        MergeSettings.from_args(
            build_parser().parse_args(["--experts", "a", "--save", "b"])
        ).attention
        == "average"
    )
    with pytest.raises(BTXError, match="--attention 'heads'"):
        MergeSettings(experts=["a"], save="b", attention="heads").validate()
