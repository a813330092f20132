"""Every merge variant goes through `btx run` (merge, a few finetune steps) and `btx evaluate`:
the seed as a shared expert, MoE in some layers, split chunks, blending. The training loop and
the evaluator build each from the merge's manifest (the one model builder), and the finetune
trains the variant's own weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_contract import btx
from test_pipeline_e2e import TINY_MODEL, make_text_domains

from megatron_btx.pipeline import plan

pytestmark = pytest.mark.long  # each test a whole `btx run`: half a minute of both cores


def _config(tmp_path: Path, merge: dict) -> Path:
    doms = make_text_domains(tmp_path / "text", n_files=20, words=200)
    small = {"micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 1, "lr": 3e-3}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"vocab_size": 300, "split": "test=0.15,valid=0.1", "seq_length": 64},
        "domains": {n: {"source": str(p)} for n, p in doms.items()},
        "model": dict(TINY_MODEL),
        "seed": {"pretrain": {"steps": 4, **small}},
        "experts": {"steps": 2, **small},
        "merge": merge,
        "finetune": {"steps": 3, **small},
        "baselines": {"dense": False, "sparse_upcycling": False, "btm": False},
        "evaluation": {"tokens_per_domain": 128, "micro_batch_size": 4, "btm_top_k": [1]},
        "train": {"log_interval": 1, "eval_iters": 1},
    }
    path = tmp_path / "btx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tensor(checkpoint: str, key: str) -> torch.Tensor:
    from megatron_btx.checkpoint.dcp_stream import PartialReader

    reader = PartialReader(checkpoint)
    try:
        size = reader.md.state_dict_metadata[key].size
        return reader.read_region(key, [0] * len(size), list(size))
    finally:
        reader.close()


@pytest.mark.parametrize(
    "name,merge",
    [
        ("shared", {"seed_as_shared_expert": True}),
        ("partial", {"moe_layers": "1", "dense_ffn": "seed"}),
        ("split", {"split_chunks": 2}),
        ("blend", {"blend": True, "split_chunks": 2}),
    ],
)
def test_every_merge_variant_finetunes_and_evaluates(tmp_path, name, merge):
    cfg = _config(tmp_path, merge)
    result = btx("run", str(cfg), "--parallel", "2", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    stages = {s.name: s for s in plan.read_plan(run)}
    merged, finetuned = stages["merge"].checkpoint, stages["finetune"].checkpoint
    manifest = json.loads((Path(finetuned) / "btx_manifest.json").read_text())
    merged_manifest = json.loads((Path(merged) / "btx_manifest.json").read_text())
    assert manifest["moe"] == merged_manifest["moe"]  # the finetune keeps the variant
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"btx", "btx_merge_only"} <= set(results["models"])
    for model in ("btx", "btx_merge_only"):
        assert math.isfinite(results["models"][model]["mean"]), model
    # the finetune moved the model: its held-out loss differs from the merge's
    assert results["models"]["btx"]["loss"] != results["models"]["btx_merge_only"]["loss"]
    if name == "shared":
        key = "decoder.layers.mlp.shared_experts.linear_fc1.weight"
        before, after = _tensor(merged, key), _tensor(finetuned, key)
        assert before.shape == after.shape == (2, 2 * 64, 32)
        assert (after - before).abs().max() > 0  # trained, not frozen or dropped
    if name == "partial":
        assert manifest["moe"]["layer_freq"] == [0, 1]
        dense_fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
        assert not torch.equal(_tensor(merged, dense_fc2), _tensor(finetuned, dense_fc2))
    if name in ("split", "blend"):
        experts = {"split": 8, "blend": 2}[name]
        assert manifest["model"]["num_local_experts"] == experts
        assert manifest["model"]["intermediate_size"] == {"split": 32, "blend": 128}[name]


def test_centroid_routers_with_the_seed_as_an_expert_run_end_to_end(tmp_path):
    """`merge.router_init: centroid` with the seed as the generalist expert (the default): the
    planner gives the seed's row a sample of the whole blend (PREFIX@W,...), which the merge
    reads; every row is a normalised mean hidden state (unit length), and the run finishes
    through finetune and evaluation."""
    cfg = _config(
        tmp_path, {"router_init": "centroid", "centroid_tokens": 256, "centroid_seq_len": 64}
    )
    result = btx("run", str(cfg), "--parallel", "2", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    merged = {s.name: s for s in plan.read_plan(run)}["merge"].checkpoint
    record = json.loads((Path(merged) / "btx_manifest.json").read_text())["merge"]
    assert record["router"]["init"] == "centroid"
    seed_data = record["router"]["centroid_data"][-1]
    assert seed_data.count("@") == 3 and seed_data.count(",") == 2  # the blend of 3 domains
    routers = _tensor(merged, "decoder.layers.mlp.router.weight")
    assert routers.shape == (TINY_MODEL["num_hidden_layers"], 4, 32)  # 3 experts + the seed
    for rows in routers:
        torch.testing.assert_close(rows.float().norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
        assert (rows[-1] - rows[0]).abs().max() > 1e-3  # the seed's row is its own
    results = json.loads((run / "eval" / "results.json").read_text())
    assert math.isfinite(results["models"]["btx"]["mean"])


def test_attention_experts_through_btx_run_and_bam_as_a_rival(tmp_path):
    """`merge.attention: experts_shared_kv` makes the run's own MoE keep attention experts with
    shared keys/values; `baselines.bam: true` adds BAM (the experts merged with `attention:
    experts`, finetuned for what is left of BTX's FLOPs after the experts it shares) as a rival: its row, its paired difference with BTX,
    its merge's retention, and its compute from its own (larger) active parameter count."""
    cfg = _config(tmp_path, {"attention": "experts_shared_kv"})
    raw = yaml.safe_load(cfg.read_text())
    raw["baselines"]["bam"] = True
    cfg.write_text(yaml.safe_dump(raw))
    result = btx("run", str(cfg), "--parallel", "2", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    stages = {s.name: s for s in plan.read_plan(run)}
    moe = json.loads((Path(stages["finetune"].checkpoint) / "btx_manifest.json").read_text())
    assert moe["moe"]["attention_experts"] == 4 and moe["moe"]["attention_shared_kv"]
    bam = json.loads((Path(stages["baseline_bam"].checkpoint) / "btx_manifest.json").read_text())
    assert bam["moe"]["attention_experts"] == 4 and not bam["moe"].get("attention_shared_kv")
    # hidden 32, 2 heads of 16, FFN 64, 2 layers, vocab 300, 4 experts top-2:
    # BAM: 4 x (q, k, v, o) + an attention router (32 x 4) per layer, the FFN MoE as BTX's
    attention, router = 4 * 32 * 32, 32 * 4
    ffn = 2 * 3 * 32 * 64 + 32 * 4
    assert stages["baseline_bam"].active_params == 2 * (4 * attention + router + ffn) + 300 * 32
    # shared keys/values: 4 x (q, o) + k and v once + the router
    shared = 4 * 2 * 32 * 32 + 2 * 32 * 32 + router
    assert stages["finetune"].active_params == 2 * (shared + ffn) + 300 * 32
    # BAM shares BTX's experts: its finetune gets what is left of BTX's FLOPs, the finetune's
    per_step = 6.0 * stages["baseline_bam"].active_params * 4 * 64
    assert stages["baseline_bam"].steps == max(1, round(stages["finetune"].flops / per_step))
    assert stages["baseline_bam"].builds_on == [n for n in stages if n.startswith("expert_")]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"bam", "bam_merge_only", "btx"} <= set(results["models"])
    diff = results["intervals"]["comparisons"]["bam"]["mean_of_groups"]["loss"]
    assert diff["low"] - 1e-9 <= diff["estimate"] <= diff["high"] + 1e-9
    retention = results["diagnostics"]["retention_by_merge"]
    assert set(retention) == {"btx_merge_only", "bam_merge_only"}
    assert "Merge retention of bam_merge_only" in (run / "eval" / "results.md").read_text()
