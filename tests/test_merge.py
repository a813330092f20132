"""The BTX merge (tools/convert_dense_to_moe.py): semantics, formats, layouts, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DIST, run_script

from megatron_btx.errors import BTXError

KW = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 128,
}
V = KW["vocab_size"]


# ---- helpers ---------------------------------------------------------------------------------
def make_llama(path: Path, seed: int, base: Path | None = None, dtype=torch.float32, **kw) -> Path:
    """A random HF Llama; with `base`, every non-FFN tensor is copied from it (a BTX branch
    whose attention, norms and embeddings are shared by construction)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**{**KW, **kw})).to(dtype)
    if base is not None:
        from safetensors.torch import load_file

        ref = load_file(str(base / "model.safetensors"))
        with torch.no_grad():
            for k, p in m.state_dict().items():
                if ".mlp." not in k and k in ref:
                    p.copy_(ref[k])
    m.save_pretrained(path)
    return path


def hf_logits(path: Path, ids: torch.Tensor, cls: str = "LlamaForCausalLM") -> torch.Tensor:
    import transformers

    m = getattr(transformers, cls).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


class _Runtime:
    def __enter__(self):
        from megatron_btx import runtime

        runtime.init(device="cpu")

    def __exit__(self, *exc):
        from megatron_btx import runtime

        runtime.teardown()


def merge(experts, save, **settings):
    """The merge with MergeSettings built from keyword arguments (paths as given)."""
    from megatron_btx.merge import MergeSettings
    from megatron_btx.merge import merge as run_merge

    settings.setdefault("progress", False)
    for key in ("seed", "export_hf"):
        if settings.get(key) is not None:
            settings[key] = str(settings[key])
    return run_merge(MergeSettings(experts=[str(e) for e in experts], save=str(save), **settings))


def moe_model(ckpt: Path):
    """The merged checkpoint loaded by megatron-core (call inside _Runtime)."""
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_for_checkpoint

    args = read_args(ckpt)
    model = build_for_checkpoint(args, torch.float32, read_variant(ckpt))
    load_model(model, ckpt)
    return model.eval()


def mcore_logits(model, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, pos, None)[..., :V]


def all_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a torch_dist checkpoint, assembled from its chunks."""
    from megatron_btx.checkpoint.dcp_stream import PartialReader

    r = PartialReader(ckpt)
    out = {}
    for k, md in r.md.state_dict_metadata.items():
        if hasattr(md, "size"):
            out[k] = r.read_region(k, [0] * len(md.size), list(md.size))
    r.close()
    return out


def run(script: Path, args: list[str], nproc: int) -> None:
    result = run_script(script, [str(a) for a in args], nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def branches(tmp_path_factory) -> list[Path]:
    """Seed + 3 branches that share every non-FFN tensor with the seed, FFNs all different."""
    root = tmp_path_factory.mktemp("branches")
    seed = make_llama(root / "seed", 0)
    return [make_llama(root / f"e{i}", i + 1, base=seed) for i in range(3)] + [seed]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))


# ---- semantics -------------------------------------------------------------------------------
def test_upcycling_copies_of_one_model_equal_dense(branches, ids, tmp_path):
    """N copies of one dense model: all experts are the same function, so whatever the router,
    the MoE's logits equal the dense model's (fp32)."""
    src = branches[0]
    m = merge(
        [src, src, src],
        tmp_path / "moe",
        router_init="random",
        router_std=1.0,
        progress=False,
        verify=True,
    )
    assert m["verify"]["logits"]["upcycled_check"] == "passed"
    ref = hf_logits(src, ids)
    with _Runtime():
        out = mcore_logits(moe_model(tmp_path / "moe"), ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_random_router_is_seeded_per_layer(branches, tmp_path):
    """--router-init random: each layer's rows are normal with std --router-std (the sample std
    of 4 x hidden values within 4 standard errors of it), different per layer; the same
    --router-seed gives the same rows, another seed others, another std the same rows scaled;
    zero gives zeros."""

    def routers(name, **settings):
        merge(branches[:2], tmp_path / name, seed=branches[3], **settings)
        return all_tensors(tmp_path / name)["decoder.layers.mlp.router.weight"].float()

    base = routers("a", router_std=0.5, router_seed=11)
    layers, experts, hidden = base.shape
    n = experts * hidden
    for layer in base:
        assert abs(layer.std().item() - 0.5) < 4 * 0.5 / (2 * (n - 1)) ** 0.5
    assert not torch.equal(base[0], base[1])
    torch.testing.assert_close(routers("b", router_std=0.5, router_seed=11), base, rtol=0, atol=0)
    assert not torch.equal(routers("d", router_std=0.5, router_seed=12), base)
    torch.testing.assert_close(routers("e", router_std=1.0, router_seed=11), 2 * base)
    assert not routers("f", router_init="zero").any()


@pytest.mark.parametrize("expert", [0, 1, 3])
def test_one_hot_router_gives_source_logits(branches, ids, tmp_path, expert):
    """Sources share attention, different FFNs; router forced to expert i -> source i's logits."""
    merge(branches[:3], tmp_path / "moe", seed=branches[3], progress=False)
    ref = hf_logits(branches[expert], ids)
    with _Runtime():
        model = moe_model(tmp_path / "moe")
        for layer in model.decoder.layers:
            router = layer.mlp.router
            E = router.weight.shape[0]

            def gating(x, E=E):
                logits = torch.zeros(x.shape[:-1] + (E,), dtype=torch.float32)
                logits[..., expert] = 1e4
                return logits

            router.gating = gating
        out = mcore_logits(model, ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_experts_bit_identical_and_averages_fp32(branches, tmp_path):
    """bf16 sources: experts are the sources' FFN bytes; averages are fp32 means cast once."""
    from safetensors.torch import load_file

    root = tmp_path / "bf16"
    seed = make_llama(root / "s", 0, dtype=torch.bfloat16)
    srcs = [make_llama(root / f"e{i}", 10 + i, dtype=torch.bfloat16) for i in range(2)]
    merge(srcs, tmp_path / "moe", seed=seed, average_weights=[1, 1, 2], progress=False, verify=True)
    t = all_tensors(tmp_path / "moe")
    sd = [load_file(str(p / "model.safetensors")) for p in [*srcs, seed]]
    fc1 = t["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert fc1.dtype == torch.bfloat16 and fc1.shape == (2, 3, 2 * 96, 64)
    for e, s in enumerate(sd):
        gate_up = torch.cat(
            [s["model.layers.1.mlp.gate_proj.weight"], s["model.layers.1.mlp.up_proj.weight"]]
        )
        assert torch.equal(fc1[1, e], gate_up)
        fc2 = t["decoder.layers.mlp.experts.experts.linear_fc2.weight"][1, e]
        assert torch.equal(fc2, s["model.layers.1.mlp.down_proj.weight"])
    w = [1.0, 1.0, 2.0]
    want = sum(wi * s["model.norm.weight"].float() for wi, s in zip(w, sd)) / 4.0
    assert torch.equal(t["decoder.final_layernorm.weight"], want.to(torch.bfloat16))
    emb = sum(wi * s["model.embed_tokens.weight"].float() for wi, s in zip(w, sd)) / 4.0
    assert torch.equal(t["embedding.word_embeddings.weight"][:V], emb.to(torch.bfloat16))
    assert not t["embedding.word_embeddings.weight"][V:].any()  # vocab padding stays zero


def test_bf16_experts_beside_an_fp32_seed_merge_in_fp32(tmp_path):
    """Experts trained in bf16 (train.dtype auto on a CPU with bf16 units) beside an fp32 seed
    (an imported one): without --dtype the merge writes fp32, which holds both exactly: each
    expert's FFN is its bf16 bytes widened, the seed's its fp32 bytes."""
    from safetensors.torch import load_file

    root = tmp_path / "mixed"
    seed = make_llama(root / "s", 0, dtype=torch.float32)
    srcs = [make_llama(root / f"e{i}", 20 + i, dtype=torch.bfloat16) for i in range(2)]
    merge(srcs, tmp_path / "moe", seed=seed, progress=False)
    t = all_tensors(tmp_path / "moe")
    fc2 = t["decoder.layers.mlp.experts.experts.linear_fc2.weight"]
    assert fc2.dtype == torch.float32
    for e, path in enumerate([*srcs, seed]):
        down = load_file(str(path / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(fc2[0, e], down.float())
    record = json.loads((tmp_path / "moe" / "btx_manifest.json").read_text())
    assert record["dtype"] == "fp32"


def test_hf_export_matches_megatron_and_manifest(branches, ids, tmp_path):
    """--export-hf: transformers' MixtralForCausalLM gives our megatron MoE's logits; both
    manifests record sources (path, sha256, step), settings and tokenizer hash."""
    from megatron_btx.checkpoint import manifest
    from megatron_btx.merge.cli import main

    rc = main(
        [
            "--experts",
            *map(str, branches[:3]),
            "--seed",
            str(branches[3]),
            "--save",
            str(tmp_path / "moe"),
            "--export-hf",
            str(tmp_path / "hf"),
            "--hf-shard-gb",
            "0.0002",
            "--ep",
            "2",
            "--verify",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # several shards
    ref = hf_logits(tmp_path / "hf", ids, "MixtralForCausalLM")
    with _Runtime():
        out = mcore_logits(moe_model(tmp_path / "moe"), ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    m = manifest.read(tmp_path / "moe")
    assert m["model"]["num_local_experts"] == 4 and m["layout"]["ep"] == 2
    assert [s["role"] for s in m["sources"]] == ["expert 0", "expert 1", "expert 2", "seed"]
    assert all(s["sha256"]["model.safetensors"] for s in m["sources"])
    assert all("step" in s for s in m["sources"])
    assert m["merge"]["router"] == {"init": "random", "router_std": 0.02, "router_seed": 1234}
    assert m["merge"]["top_k"] == 2 and m["merge"]["settings"]["router_init"] == "random"
    assert m["verify"]["experts_bit_identical"] == 2 * 4 * 2
    assert m["verify"]["logits"]["upcycled_check"] == "passed"
    cov = m["verify"]["source_keys"]
    assert [c["ffn_to"] for c in cov] == ["experts 0", "experts 1", "experts 2", "experts 3"]


def test_megatron_sources_equal_hf_sources(branches, tmp_path):
    """Megatron torch_dist sources (incl. a run folder with checkpoints/latest) merge to exactly
    the tensors HF sources give."""
    from megatron_btx.checkpoint.convert import hf_to_megatron

    mg = []
    for i, b in enumerate(branches[:2]):
        out = tmp_path / f"run{i}" / "checkpoints" / "iter_0000005"
        hf_to_megatron(b, out)
        (tmp_path / f"run{i}" / "checkpoints" / "latest").write_text("iter_0000005\n")
        mg.append(tmp_path / f"run{i}")
    m = merge(mg, tmp_path / "a", progress=False, verify=True)
    merge(branches[:2], tmp_path / "b", progress=False)
    assert m["sources"][0]["step"] == 5
    ta, tb = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_variants_load_in_megatron(branches, ids, tmp_path):
    """Split chunks, blending, shared expert and partial MoE layers: megatron-core loads each
    and runs; the split experts are the source FFN's chunks."""
    from megatron_btx.checkpoint import manifest

    cases = {
        "split": {"split_chunks": 2},
        "blend": {"blend": True, "split_chunks": 3},
        "shared": {"seed_as_shared_expert": True},
        "partial": {"moe_layers": "1", "dense_ffn": "seed"},
    }
    for name, kw in cases.items():
        merge(branches[:3], tmp_path / name, seed=branches[3], progress=False, verify=True, **kw)
    m = manifest.read(tmp_path / "split")
    assert m["model"]["num_local_experts"] == 8 and m["model"]["intermediate_size"] == 48
    assert m["model"]["num_experts_per_tok"] == 4
    assert manifest.read(tmp_path / "blend")["model"]["num_local_experts"] == 3
    assert manifest.read(tmp_path / "shared")["moe"]["shared_expert_intermediate_size"] == 96
    assert manifest.read(tmp_path / "partial")["moe"]["layer_freq"] == [0, 1]
    t = all_tensors(tmp_path / "split")
    from safetensors.torch import load_file

    s1 = load_file(str(branches[1] / "model.safetensors"))
    fc1 = t["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert torch.equal(fc1[0, 3, :48], s1["model.layers.0.mlp.gate_proj.weight"][48:])
    assert torch.equal(fc1[0, 3, 48:], s1["model.layers.0.mlp.up_proj.weight"][48:])
    tp = all_tensors(tmp_path / "partial")
    seed = load_file(str(branches[3] / "model.safetensors"))
    # heterogeneous layers: megatron-core keys them per layer, not stacked
    assert torch.equal(
        tp["decoder.layers.0.mlp.linear_fc2.weight"], seed["model.layers.0.mlp.down_proj.weight"]
    )
    with _Runtime():
        for name in cases:
            out = mcore_logits(moe_model(tmp_path / name), ids)
            assert torch.isfinite(out).all(), name


def test_centroid_router(branches, tmp_path):
    """Router rows are the normalised mean router input of each expert's domain sample, through
    the merged model itself (checked against megatron-core's forward of the written model)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = []
    for d in range(4):
        prefix = tmp_path / f"dom{d}"
        b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
        g = torch.Generator().manual_seed(d)
        lo = 60 * d
        for _ in range(8):
            b.add_document(torch.randint(lo, lo + 60, (40,), generator=g).numpy(), [40])
        b.finalize(str(prefix) + ".idx")
        prefixes.append(str(prefix))
    merge(
        branches[:3],
        tmp_path / "moe",
        seed=branches[3],
        router_init="centroid",
        centroid_data=prefixes,
        centroid_tokens=256,
        centroid_seq_len=32,
        progress=False,
        verify=True,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with _Runtime():
        model = moe_model(tmp_path / "moe")
        for e, prefix in enumerate(prefixes):
            ds = IndexedDataset(prefix)
            toks = torch.tensor(
                np.concatenate([ds[i] for i in range(len(ds))])[:256], dtype=torch.long
            ).reshape(8, 32)
            seen = {}
            hooks = [
                layer.mlp.router.register_forward_pre_hook(
                    lambda mod, inp, i=i, seen=seen: seen.__setitem__(
                        i, inp[0].reshape(-1, 64).mean(0)
                    )
                )
                for i, layer in enumerate(model.decoder.layers)
            ]
            mcore_logits(model, toks)
            for h in hooks:
                h.remove()
            for i, layer in enumerate(model.decoder.layers):
                row = layer.mlp.router.weight[e]
                want = seen[i] / seen[i].norm()
                torch.testing.assert_close(row, want, atol=1e-4, rtol=1e-4)


# ---- errors: clear message, nothing written -------------------------------------------------
def _expect_error(tmp_path, sources, match: str, **kw):
    out = tmp_path / "out"
    with pytest.raises(BTXError, match=match):
        merge(sources, out, progress=False, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_error_mismatched_vocab(branches, tmp_path):
    other = make_llama(tmp_path / "v", 5, vocab_size=320)
    _expect_error(tmp_path, [branches[0], other], r"vocabularies differ: vocab_size = 300 vs 320")


def test_error_missing_layer(branches, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(branches[1], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.1.")}
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _expect_error(
        tmp_path, [branches[0], bad], r"missing.*model\.layers\.1\.|model\.layers\.1\..*missing"
    )


def test_error_truncated_safetensors(branches, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(branches[1], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _expect_error(tmp_path, [branches[0], bad], r"truncated")


def test_error_not_llama(branches, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(branches[1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp_path, [branches[0], bad], r"not a Llama")


def test_error_bad_layout_and_cli_exit(branches, tmp_path, capsys):
    from megatron_btx.merge.cli import main

    _expect_error(tmp_path, branches[:3], r"EP=2", ep=2)  # 3 experts, EP=2
    rc = main(
        [
            "--experts",
            str(branches[0]),
            str(tmp_path / "nope"),
            "--save",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lineage_warning(branches, tmp_path, caplog):
    """Unrelated sources (independent inits) merge, with a warning."""
    other = make_llama(tmp_path / "u", 99)
    with caplog.at_level("WARNING"):
        m = merge([branches[0], other], tmp_path / "moe", progress=False)
    assert "do not look like branches of one seed" in caplog.text
    assert m["merge"]["lineage_cosine"][1] < 0.5


def test_streaming_safetensors_writer(tmp_path):
    from safetensors.torch import load_file

    from megatron_btx.checkpoint.hf import StreamingSafetensorsWriter

    ts = {
        f"t{i}": torch.randn(10, 7).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)
    }
    w = StreamingSafetensorsWriter(
        tmp_path, [(k, tuple(v.shape), v.dtype) for k, v in ts.items()], max_shard_bytes=300
    )
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / f)))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)


# ---- layouts (several processes) --------------------------------------------------------------
@pytest.mark.dist
def test_tp2_sources_and_ep2_output(branches, ids, tmp_path):
    """Sources saved at TP=2 and at TP=1 give bit-identical merged outputs; the output loaded at
    EP=2 gives the EP=1 logits."""
    from megatron_btx.checkpoint.convert import hf_to_megatron

    tp1, tp2 = [], []
    for i, b in enumerate(branches[:2]):
        hf_to_megatron(b, tmp_path / f"tp1_{i}")
        run(DIST / "merge_tp_resave.py", [tmp_path / f"tp1_{i}", tmp_path / f"tp2_{i}"], 2)
        tp1.append(tmp_path / f"tp1_{i}")
        tp2.append(tmp_path / f"tp2_{i}")
    from megatron_btx.checkpoint.dcp_stream import read_metadata

    md = read_metadata(tmp_path / "tp2_0").state_dict_metadata
    assert len(md["decoder.layers.self_attention.linear_qkv.weight"].chunks) == 2 * 2  # TP-sharded
    merge(tp1, tmp_path / "a", ep=2, progress=False, export_hf=tmp_path / "a_hf")
    m = merge(tp2, tmp_path / "b", ep=2, progress=False, export_hf=tmp_path / "b_hf", verify=True)
    assert m["sources"][0]["step"] == 7
    ta, tb = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "a_hf" / "model.safetensors").read_bytes() == (
        tmp_path / "b_hf" / "model.safetensors"
    ).read_bytes()
    torch.save(ids, tmp_path / "ids.pt")
    run(DIST / "merge_ep_logits.py", [tmp_path / "b", tmp_path / "ids.pt", tmp_path / "ep2.pt"], 2)
    with _Runtime():
        ref = mcore_logits(moe_model(tmp_path / "b"), ids)
    torch.testing.assert_close(torch.load(tmp_path / "ep2.pt"), ref, atol=1e-5, rtol=1e-5)


def test_torch_threads_leave_a_core_to_the_source_hashing(monkeypatch):
    """While the sources' sha256 runs on its own thread, torch's intra-op pool is sized to the
    cores left (on 2 cores its second thread spin-waited on the hashing's core), then restored."""
    import concurrent.futures

    from megatron_btx import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        running = concurrent.futures.Future()
        with runtime.threads_beside(lambda: not running.done()):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        running.set_result({})
        with runtime.threads_beside(lambda: not running.done()):
            assert torch.get_num_threads() == 3  # hashing done: nothing to leave room for
    finally:
        torch.set_num_threads(before)


def test_a_source_saved_in_two_dtypes_is_read_as_saved(tmp_path):
    """A checkpoint holding bf16 and fp32 tensors, as bf16 training leaves them, is read a
    layer at a time in the dtypes it was saved in (megatron-core refused the read: the template's
    entries named fp32 for the bf16 tensors, and BTX from bf16-trained experts failed)."""
    from megatron_btx import runtime
    from megatron_btx.checkpoint import manifest
    from megatron_btx.checkpoint.mapping import FC1, LN1
    from megatron_btx.checkpoint.megatron_io import atomic_folder, save_model
    from megatron_btx.checkpoint.sources import open_source
    from megatron_btx.models.llama import LlamaArgs, build_model

    args = LlamaArgs(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
    )
    runtime.init(device="cpu", seed=3)
    try:
        model = build_model(args, spec="local")
        for layer in model.decoder.layers:  # one stacked checkpoint tensor: every layer's
            norm = layer.input_layernorm.weight
            norm.data = (norm.data + torch.randn_like(norm.data)).to(torch.bfloat16)
        norm = model.decoder.layers[0].input_layernorm.weight
        with atomic_folder(tmp_path / "mixed") as tmp:
            save_model(model, tmp)
            record = manifest.Manifest(
                kind="megatron_torch_dist", model=args.to_dict(), dtype="fp32"
            )
            manifest.write(tmp, record)
        source = open_source(tmp_path / "mixed")
        layer = source.layer(0)
        source.close()
    finally:
        runtime.teardown()
    assert layer[LN1].dtype == torch.bfloat16 and torch.equal(layer[LN1], norm.data)
    assert layer[FC1].dtype == torch.float32
    assert torch.equal(layer[FC1], model.decoder.layers[0].mlp.linear_fc1.weight.data)
