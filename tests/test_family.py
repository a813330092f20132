"""The BTX family through the one merge: Drop-Upcycling, granular upcycling as megatron-core does
it (checked against megatron-core's own ``upcycle_state_dict``), and experts added to a trained
MoE (``btx merge --into``).

Expectations come from outside the code under test: unit counts by hand, the sample statistics
of the source matrices (numpy, float64) with tolerances from the sample size, megatron-core's
upcycling function, the source checkpoints' own tensors, transformers' Mixtral for the HF
export, and megatron-core's forward of the written model for centroid rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIST
from test_merge import (
    KW,
    _Runtime,
    all_tensors,
    hf_logits,
    make_llama,
    mcore_logits,
    merge,
    moe_model,
    run,
)

F, H = KW["intermediate_size"], KW["hidden_size"]  # 96, 64
EXPERT = "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc{}.weight"
ROUTER = "decoder.layers.{}.mlp.router.weight"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A seed, three branches sharing its non-FFN tensors, and an MoE merged from two branches
    and the seed (3 experts, top-2): the MoE new experts are added to."""
    root = tmp_path_factory.mktemp("family")
    seed = make_llama(root / "seed", 0)
    out = {
        "seed": seed,
        **{f"b{i}": make_llama(root / f"b{i}", i + 1, base=seed) for i in range(3)},
    }
    merge([out["b0"], out["b1"]], root / "moe", seed=seed, router_init="random", router_seed=5)
    out["moe"] = root / "moe"
    return out


def hf_ffn(path: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(megatron fc1 = [gate; up], fc2 = down) of an HF Llama's layer, from its safetensors."""
    from safetensors.torch import load_file

    t = load_file(str(path / "model.safetensors"))
    p = f"model.layers.{layer}.mlp."
    return torch.cat([t[p + "gate_proj.weight"], t[p + "up_proj.weight"]]), t[
        p + "down_proj.weight"
    ]


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by megatron state-dict name, loaded by megatron-core."""
    with _Runtime():
        return {k: v.clone() for k, v in moe_model(ckpt).state_dict().items() if "_extra" not in k}


# =============================================================================================
# Drop-Upcycling
# =============================================================================================
def _ffn(units: int, hidden: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An FFN whose three matrices have different means and stds (so a wrong matrix's
    statistics would show)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(units, hidden, generator=g) * 0.7 + 0.3
    up = torch.randn(units, hidden, generator=g) * 0.2 - 0.1
    down = torch.randn(hidden, units, generator=g) * 1.5 + 0.05
    return torch.cat([gate, up]), down


def _changed_units(fc1, fc2, new1, new2) -> tuple[set, set, set]:
    units = fc2.shape[1]
    rows = lambda a, b: {i for i in range(a.shape[0]) if not torch.equal(a[i], b[i])}  # noqa: E731
    gate = rows(fc1[:units], new1[:units])
    up = rows(fc1[units:], new1[units:])
    down = rows(fc2.T, new2.T)
    return gate, up, down


@pytest.mark.parametrize(
    "ratio,units,count",
    # round(r x F) by hand; 0.25 x 10 = 2.5 rounds half up to 3
    [(0.5, 400, 200), (0.25, 10, 3), (0.1, 400, 40), (0.0, 400, 0), (1.0, 40, 40)],
)
def test_drop_units_reinitialises_exactly_round_r_f_units(ratio, units, count):
    from megatron_btx.merge.upcycling import drop_units

    fc1, fc2 = _ffn(units, 48)
    before = (fc1.clone(), fc2.clone())
    new1, new2, index = drop_units(fc1, fc2, ratio, torch.Generator().manual_seed(1))
    assert torch.equal(fc1, before[0]) and torch.equal(fc2, before[1])  # inputs untouched
    gate, up, down = _changed_units(fc1, fc2, new1, new2)
    # the same units in the three matrices, exactly round(r x F) of them
    assert gate == up == down == set(index.tolist()) and len(gate) == count
    keep = sorted(set(range(units)) - gate)
    assert torch.equal(new1[:units][keep], fc1[:units][keep])  # the others bit-equal
    assert torch.equal(new1[units:][keep], fc1[units:][keep])
    assert torch.equal(new2[:, keep], fc2[:, keep])


def test_drop_units_draw_from_each_matrix_mean_and_std():
    """The re-initialised values of each matrix have that matrix's mean and std: with n values,
    the sample mean's standard error is s / sqrt(n) and the sample std's about s / sqrt(2n);
    5 standard errors (two-sided chance of a false failure < 1e-6 per check)."""
    from megatron_btx.merge.upcycling import drop_units

    units, hidden = 400, 48
    fc1, fc2 = _ffn(units, hidden)
    new1, new2, index = drop_units(fc1, fc2, 0.5, torch.Generator().manual_seed(2))
    idx = index.numpy()
    pairs = [
        (fc1[:units].numpy(), new1[:units].numpy()[idx]),
        (fc1[units:].numpy(), new1[units:].numpy()[idx]),
        (fc2.numpy(), new2.numpy()[:, idx]),
    ]
    for source, drawn in pairs:
        n = drawn.size
        assert n == 200 * hidden
        mean, std = source.astype(np.float64).mean(), source.astype(np.float64).std(ddof=1)
        assert abs(drawn.mean() - mean) < 5 * std / math.sqrt(n)
        assert abs(drawn.std(ddof=1) - std) < 5 * std / math.sqrt(2 * (n - 1))


def test_drop_upcycling_merge_gives_each_expert_its_own_subset(family, tmp_path):
    """Sparse upcycling with --drop-ratio 0.5: in every layer, each of the 4 experts has exactly
    48 of the seed's 96 units re-initialised and the rest bit-equal; the subsets differ between
    experts and layers; everything outside the experts is the seed's; --verify re-derives it;
    the same --drop-seed gives the same bits, another seed other subsets."""
    seed = family["seed"]
    m = merge([seed] * 4, tmp_path / "drop", drop_ratio=0.5, drop_seed=3, verify=True)
    assert m["merge"]["settings"]["drop_ratio"] == 0.5 and m["verify"]["routers"] == 2
    got = state(tmp_path / "drop")
    subsets = {}
    for layer in range(KW["num_hidden_layers"]):
        fc1, fc2 = hf_ffn(seed, layer)
        for e in range(4):
            new1, new2 = got[EXPERT.format(layer, e, 1)], got[EXPERT.format(layer, e, 2)]
            gate, up, down = _changed_units(fc1, fc2, new1, new2)
            assert gate == up == down and len(gate) == round(0.5 * F) == 48
            subsets[layer, e] = frozenset(gate)
    assert len(set(subsets.values())) == len(subsets)  # every expert of every layer its own
    from safetensors.torch import load_file

    hf = load_file(str(seed / "model.safetensors"))
    assert torch.equal(
        got["embedding.word_embeddings.weight"][: KW["vocab_size"]], hf["model.embed_tokens.weight"]
    )
    again = merge([seed] * 4, tmp_path / "again", drop_ratio=0.5, drop_seed=3)
    other = merge([seed] * 4, tmp_path / "other", drop_ratio=0.5, drop_seed=4)
    assert again["merge"]["settings"]["drop_seed"] == 3 and other
    a, b = all_tensors(tmp_path / "drop"), all_tensors(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = state(tmp_path / "other")
    fc1, fc2 = hf_ffn(seed, 0)
    changed = _changed_units(fc1, fc2, c[EXPERT.format(0, 0, 1)], c[EXPERT.format(0, 0, 2)])[0]
    assert changed != subsets[0, 0] and len(changed) == 48


def _one_error(capsys, argv: list[str], needle: str) -> None:
    """`btx merge ARGV` in this process: exit 2 and one `error:` line holding `needle`."""
    from megatron_btx.merge.cli import main

    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_drop_ratio_on_the_command_line_and_its_errors(family, tmp_path, capsys):
    """`btx merge --drop-ratio` (the flag tools/convert_dense_to_moe.py shares) reaches the
    merge; a ratio outside [0, 1] is a one-line error naming the flag, nothing written."""
    from megatron_btx.merge.settings import MergeSettings, build_parser

    ns = build_parser().parse_args(
        ["--experts", "a", "--save", "b", "--drop-ratio", "0.25", "--drop-seed", "7"]
    )
    settings = MergeSettings.from_args(ns)
    assert (settings.drop_ratio, settings.drop_seed) == (0.25, 7)
    assert settings.to_argv()[-4:] == ["--drop-ratio", "0.25", "--drop-seed", "7"]
    seed = str(family["seed"])
    argv = ["--experts", seed, seed, "--save", str(tmp_path / "x"), "--drop-ratio", "1.5"]
    _one_error(capsys, argv, "--drop-ratio 1.5 must be a number in [0, 1]")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_dense_to_moe_tool_takes_the_drop_ratio(family, tmp_path):
    """tools/convert_dense_to_moe.py, in a process of its own, has the flag (the error
    contract for a bad value: test_drop_ratio_on_the_command_line_and_its_errors)."""
    import subprocess
    import sys

    from cli_contract import ROOT, tc

    tool = [sys.executable, str(ROOT / "tools" / "convert_dense_to_moe.py")]
    seed = str(family["seed"])
    argv = ["--experts", seed, seed, "--save", str(tmp_path / "x"), "--no-progress"]
    proc = subprocess.run(
        [*tool, *argv, "--drop-ratio", "0.25"], env=tc.env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "x" / "btx_manifest.json").read_text())["merge"]
    assert record["settings"]["drop_ratio"] == 0.25


# =============================================================================================
# Granular upcycling: megatron-core's upcycle_state_dict is the reference
# =============================================================================================
@pytest.mark.parametrize(
    "granularity,experts,scale",
    [(1, 4, "topk"), (2, 4, "topk"), (2, 8, "pre_softmax")],
)
def test_granular_upcycling_equals_megatron_core(family, tmp_path, granularity, experts, scale):
    """E/G copies of the dense model, each FFN split into G shards, the virtual-group router
    and the weights scaled: every tensor equals megatron-core's own ``upcycle_state_dict`` of
    the same dense model into the same MoE (whose router starts from the rows of our random
    init: megatron-core keeps the first E/G rows of the MoE's router and repeats each G times).
    The pre_softmax case builds megatron-core's MoE with its pre-softmax router."""
    import dataclasses

    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from megatron_btx.checkpoint.convert import hf_to_megatron
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.merge import router_inits
    from megatron_btx.merge.settings import MergeSettings
    from megatron_btx.models.llama import build_for_checkpoint

    dense_ckpt = tmp_path / "dense"
    hf_to_megatron(family["seed"], dense_ckpt)
    top_k = 2 * granularity  # two FFNs' worth per token, like BTX's top-2
    m = merge(
        [dense_ckpt] * (experts // granularity),
        tmp_path / "granular",
        split_chunks=granularity,
        router_init="virtual_group",
        upcycling_scale=scale,
        top_k=top_k,
        router_seed=11,
        ep=2,
        verify=True,
    )
    assert m["model"]["num_local_experts"] == experts
    assert m["model"]["intermediate_size"] == F // granularity
    with _Runtime():
        args = read_args(tmp_path / "granular")
        if scale == "pre_softmax":
            args = dataclasses.replace(args, norm_topk_prob=False)  # megatron's pre-softmax
        reference = build_for_checkpoint(args, torch.float32, read_variant(tmp_path / "granular"))
        assert reference.decoder.layers[0].mlp.config.moe_router_pre_softmax == (
            scale == "pre_softmax"
        )
        settings = MergeSettings(experts=["x"], save="y", router_seed=11)
        for i, layer in enumerate(reference.decoder.layers):
            rows = router_inits.get("random").expected(settings, i, (experts, H))
            layer.mlp.router.weight.data.copy_(rows)
        dense = build_for_checkpoint(read_args(dense_ckpt), torch.float32)
        load_model(dense, dense_ckpt)
        want = upcycle_state_dict([reference], [dense])["model"]
        ours = moe_model(tmp_path / "granular").state_dict()
    keys = {k for k in want if "_extra_state" not in k}
    assert keys == {k for k in ours if "_extra_state" not in k}
    for key in sorted(keys):
        assert torch.equal(ours[key], want[key]), key
    if granularity == 2:  # the scale was applied: 2^(1/3), or (8 x 2 / 4)^(1/3) = 4^(1/3)
        fc2 = hf_ffn(family["seed"], 0)[1]
        factor = (2 if scale == "topk" else 4) ** (1 / 3)
        torch.testing.assert_close(
            ours[EXPERT.format(0, 1, 2)], fc2[:, F // 2 :] * factor, rtol=0, atol=0
        )


def test_granular_compute_counts_the_fine_grained_experts():
    """Active parameters of a granular MoE (hidden 64, FFN 96 split in G = 2, E = 4 experts of
    48, top-4; 2 layers of 4 query and 2 key-value heads of 16; vocabulary 300), by hand:
    attention 64 x 16 x (4 + 2 x 2) + 4 x 16 x 64 = 12288 per layer; experts 4 x 3 x 64 x 48 =
    36864; router 64 x 4 = 256; output 300 x 64 = 19200. The same two FFNs' worth as a top-2
    MoE of whole FFNs, plus the wider router."""
    from megatron_btx.models.compute import active_params
    from megatron_btx.models.llama import LlamaArgs

    fields = {**KW, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 4}
    granular = LlamaArgs(**fields)
    assert active_params(granular, {"type": "topk"}) == 2 * (12288 + 36864 + 256) + 19200
    whole = LlamaArgs(**{**KW, "num_local_experts": 2, "num_experts_per_tok": 2})
    assert active_params(granular) - active_params(whole) == 2 * 64 * (4 - 2)


# =============================================================================================
# Adding experts to a trained MoE
# =============================================================================================
def test_into_keeps_the_moe_and_adds_the_new_ffns(family, ids, tmp_path):
    """--into: the MoE's 3 experts and router rows are bit-equal, expert 3 is the new branch's
    FFN, attention/norms/embeddings are the MoE's, the new rows are zero; the manifest records
    4 experts and where each came from; the HF export (transformers' Mixtral) gives the megatron
    model's logits; --verify passes."""
    from megatron_btx.checkpoint import manifest

    out = tmp_path / "ext"
    m = merge(
        [family["b2"]],
        out,
        into=family["moe"],
        router_init="zero",
        verify=True,
        export_hf=tmp_path / "ext_hf",
    )
    assert m["model"]["num_local_experts"] == 4 and m["merge"]["num_experts"] == 4
    assert m["merge"]["into"]["old_experts"] == 3 and m["merge"]["into"]["new_experts"] == [3]
    assert m["sources"][0]["role"].startswith("moe") and m["sources"][1]["role"] == "expert 0"
    assert m["verify"]["old_experts_equal"] == 2 * 3 * 2 and m["verify"]["new_experts_equal"] == 4
    old, new = state(family["moe"]), state(out)
    assert set(new) - set(old) == {EXPERT.format(i, 3, j) for i in range(2) for j in (1, 2)}
    for key, tensor in old.items():
        if key.endswith("router.weight"):
            assert torch.equal(new[key][:3], tensor) and not new[key][3].any()
        else:
            assert torch.equal(new[key], tensor), key
    for layer in range(2):
        fc1, fc2 = hf_ffn(family["b2"], layer)
        assert torch.equal(new[EXPERT.format(layer, 3, 1)], fc1)
        assert torch.equal(new[EXPERT.format(layer, 3, 2)], fc2)
    assert manifest.read(tmp_path / "ext_hf")["model"]["num_local_experts"] == 4
    ref = hf_logits(tmp_path / "ext_hf", ids, "MixtralForCausalLM")
    with _Runtime():
        got = mcore_logits(moe_model(out), ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, KW["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def test_into_shared_average_weighs_n_over_n_plus_k(family, tmp_path):
    """--shared average with n = 3 old and k = 2 new experts: every tensor outside the experts
    is (3 x the MoE's + each new source's) / 5 in fp32 (the issue's n/(n+k) and k/(n+k)); the
    experts and old router rows stay the MoE's; --router-init random gives the new rows."""
    from safetensors.torch import load_file

    out = tmp_path / "avg"
    other = make_llama(tmp_path / "other", 9)  # attention of its own: the average moves
    m = merge(
        [other, family["b0"]],
        out,
        into=family["moe"],
        shared="average",
        router_init="random",
        router_std=0.5,
        verify=True,
    )
    assert m["merge"]["into"]["weights"] == {"moe": 0.6, "new": 0.4}
    old, new = state(family["moe"]), state(out)
    hf = [load_file(str(p / "model.safetensors")) for p in (other, family["b0"])]
    pairs = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.layers.1.self_attention.linear_proj.weight": "model.layers.1.self_attn.o_proj.weight",
        "decoder.layers.0.input_layernorm.weight": "model.layers.0.input_layernorm.weight",
    }
    for key, hf_key in pairs.items():
        moe = old[key].float()
        rows = hf[0][hf_key].shape[0]
        want = (moe[:rows] * 3 + hf[0][hf_key] + hf[1][hf_key]) / 5
        torch.testing.assert_close(new[key][:rows], want, rtol=0, atol=2e-7)
        if "norm" not in key:  # (HF initialises every norm to ones)
            assert not torch.equal(new[key], old[key])  # the new sources moved it
    for layer in range(2):
        assert torch.equal(new[ROUTER.format(layer)][:3], old[ROUTER.format(layer)])
        rows = new[ROUTER.format(layer)][3:]
        assert rows.shape == (2, H) and 0.3 < rows.std().item() < 0.7  # std 0.5
        assert torch.equal(new[EXPERT.format(layer, 4, 1)], hf_ffn(family["b0"], layer)[0])


def test_into_centroid_rows_and_a_shared_expert(family, tmp_path):
    """An MoE with the seed as a shared expert (2 routed experts) gets one more expert whose
    router row is the centroid of its domain sample through the extended model (megatron-core's
    forward of the written checkpoint, the old rows in place); the shared expert is kept."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefix = str(tmp_path / "dom")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        builder.add_document(torch.randint(100, 160, (40,), generator=g).numpy(), [40])
    builder.finalize(prefix + ".idx")
    merge(
        [family["b0"], family["b1"]],
        tmp_path / "shared",
        seed=family["seed"],
        seed_as_shared_expert=True,
    )
    merge(
        [family["b2"]],
        tmp_path / "ext",
        into=tmp_path / "shared",
        router_init="centroid",
        centroid_data=[prefix],
        centroid_tokens=256,
        centroid_seq_len=32,
        verify=True,
    )
    old, new = state(tmp_path / "shared"), state(tmp_path / "ext")
    shared = [k for k in old if "shared_experts" in k]
    assert len(shared) == 4 and all(torch.equal(new[k], old[k]) for k in shared)
    ds = IndexedDataset(prefix)
    toks = torch.tensor(np.concatenate([ds[i] for i in range(len(ds))])[:256]).reshape(8, 32)
    with _Runtime():
        model = moe_model(tmp_path / "ext")
        seen = {}
        hooks = [
            layer.mlp.router.register_forward_pre_hook(
                lambda mod, inp, i=i: seen.__setitem__(i, inp[0].reshape(-1, H).mean(0))
            )
            for i, layer in enumerate(model.decoder.layers)
        ]
        mcore_logits(model, toks.long())
        for hook in hooks:
            hook.remove()
        for i, layer in enumerate(model.decoder.layers):
            row = layer.mlp.router.weight[2].detach()
            torch.testing.assert_close(row, seen[i] / seen[i].norm(), atol=1e-4, rtol=1e-4)
            assert torch.equal(layer.mlp.router.weight[:2].detach(), old[ROUTER.format(i)])


def test_into_with_the_seed_adds_it_last(family, tmp_path):
    """--seed under --into is one more new source, the last (the generalist, as in a merge):
    the MoE's 3 experts, then the new branch's FFN, then the seed's; top-k as given."""
    m = merge([family["b2"]], tmp_path / "ext", into=family["moe"], seed=family["seed"], top_k=3)
    assert m["model"]["num_local_experts"] == 5 and m["model"]["num_experts_per_tok"] == 3
    assert [s["role"] for s in m["sources"]][1:] == ["expert 0", "seed"]
    got = state(tmp_path / "ext")
    for layer in range(2):
        for expert, source in ((3, "b2"), (4, "seed")):
            fc1, fc2 = hf_ffn(family[source], layer)
            assert torch.equal(got[EXPERT.format(layer, expert, 1)], fc1)
            assert torch.equal(got[EXPERT.format(layer, expert, 2)], fc2)


def test_into_errors_name_the_setting(family, tmp_path, capsys):
    """Choices the MoE decides, a width that does not fit, a dense model given as the MoE and
    --shared without --into: one line naming the setting, nothing written."""
    save = str(tmp_path / "x")
    b2, moe = str(family["b2"]), str(family["moe"])
    cases = [
        (["--into", moe, "--split-chunks", "2"], "--split-chunks does not apply with --into"),
        (["--into", b2], "not a megatron MoE checkpoint"),
        (["--shared", "average"], "--shared applies only with --into"),
        (
            ["--into", moe, "--top-k", "9"],
            "--top-k 9 must be between 1 and the number of experts (4)",
        ),
        (["--into", moe, "--ep", "3"], "EP=3"),
    ]
    for extra, needle in cases:
        _one_error(capsys, ["--experts", b2, "--save", save, *extra], needle)
    merge([family["b0"], family["b1"]], tmp_path / "bf16", dtype="bf16")
    argv = ["--experts", b2, "--save", save, "--into", str(tmp_path / "bf16")]
    _one_error(capsys, argv, "is bf16, the new sources fp32; set --dtype")
    merge([family["b0"], family["b1"]], tmp_path / "split", split_chunks=2)
    argv = ["--experts", b2, "--save", save, "--into", str(tmp_path / "split")]
    _one_error(capsys, argv, "its experts are 48 wide, the new sources' FFNs 96")
    assert not Path(save).exists()


@pytest.mark.slow
@pytest.mark.dist
def test_into_output_loads_at_ep2_with_the_ep1_logits(family, ids, tmp_path):
    """EP resharding: the extended MoE (3 + 1 experts), written for EP=2, loaded by two
    processes at EP=2 gives the logits it gives in one process."""
    merge([family["b2"]], tmp_path / "ext", into=family["moe"], ep=2, router_init="random")
    torch.save(ids, tmp_path / "ids.pt")
    args = [tmp_path / "ext", tmp_path / "ids.pt", tmp_path / "ep2.pt"]
    run(DIST / "merge_ep_logits.py", args, 2)
    with _Runtime():
        ref = mcore_logits(moe_model(tmp_path / "ext"), ids)
    torch.testing.assert_close(torch.load(tmp_path / "ep2.pt"), ref, atol=1e-5, rtol=1e-5)
