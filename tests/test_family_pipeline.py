"""The BTX family in `btx run`: the drop_upcycling and granular_upcycling baselines and the
`extend` experiment, planned (stage graph, command lines, compute counted by hand) and, for one
tiny config, run end to end through `btx evaluate`: the new rows and their paired differences
appear in the results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from cli_contract import btx
from test_pipeline_e2e import TINY_MODEL, make_text_domains
from test_pipeline_plan import _config
from test_pipeline_variants import _tensor

from megatron_btx.errors import BTXError
from megatron_btx.pipeline import plan

# TINY_MODEL: hidden 32, FFN 64, 2 layers of 2 heads of 16 (no GQA), vocabulary 300 (_config);
# per layer attention 32 x 16 x (2 + 2 x 2) + 2 x 16 x 32 = 4096; output 300 x 32 = 9600.
ATTENTION, OUTPUT = 4096, 9600


def _plan(raw: dict, write: bool = False) -> dict:
    return {s.name: s for s in plan.build_plan(raw, write=write)}


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_drop_and_granular_baselines_are_planned_with_their_options(tmp_path):
    """Off by default; on, each merges copies of the seed with its own settings and trains like
    sparse upcycling at BTX's compute, counted at its own active size. BTX: 3 experts + the seed,
    top-2 of 64-wide FFNs: 2 x (4096 + 2 x 3 x 32 x 64 + 32 x 4) + 9600 = 42,624. Granular G = 2,
    E = 2 x 4 = 8 shards of 32, top-4: 2 x (4096 + 4 x 3 x 32 x 32 + 32 x 8) + 9600 = 42,880."""
    assert not {"drop_merge", "granular_merge"} & set(_plan(_config(tmp_path / "a")))
    raw = _config(
        tmp_path / "b",
        baselines={"drop_upcycling": True, "granular_upcycling": {"granularity": 2}},
    )
    stages = _plan(raw)
    drop, granular = stages["drop_merge"].argv, stages["granular_merge"].argv
    assert _value(drop, "--drop-ratio") == "0.5"  # the paper's r
    assert "--split-chunks" not in drop and "--router-init" not in drop  # random, like sparse
    assert _value(granular, "--split-chunks") == "2" and _value(granular, "--top-k") == "4"
    assert _value(granular, "--router-init") == "virtual_group"
    assert _value(granular, "--upcycling-scale") == "topk"  # the default top-k router
    assert granular.count(granular[granular.index("--experts") + 1]) == 4  # 3 + --seed: E/G
    assert stages["finetune"].active_params == 2 * (ATTENTION + 2 * 3 * 32 * 64 + 32 * 4) + OUTPUT
    assert stages["baseline_drop_upcycling"].active_params == 42_624
    g = stages["baseline_granular_upcycling"]
    assert g.active_params == 2 * (ATTENTION + 4 * 3 * 32 * 32 + 32 * 8) + OUTPUT == 42_880
    btx = sum(s.flops for s in stages.values() if s.group == "btx")
    assert g.steps == round(btx / (6 * 42_880 * 4 * 64))  # FLOPs-matched at its own size

    raw["baselines"] = {
        "drop_upcycling": {"drop_ratio": 0.25},
        "granular_upcycling": {"granularity": 4, "num_experts": 8},
    }
    raw["finetune"]["router"] = {"type": "soft"}  # soft: megatron's pre-softmax scale
    stages = _plan(raw)
    assert _value(stages["drop_merge"].argv, "--drop-ratio") == "0.25"
    granular = stages["granular_merge"].argv
    assert _value(granular, "--split-chunks") == "4" and _value(granular, "--top-k") == "8"
    assert _value(granular, "--upcycling-scale") == "pre_softmax"
    assert granular.count(granular[granular.index("--experts") + 1]) == 2  # 8 / 4 copies
    for bad, match in [
        ({"granular_upcycling": {"granularity": 3, "num_experts": 8}}, "multiple of"),
        ({"granular_upcycling": {"granularity": 3}}, "does not divide the FFN 64"),
        ({"drop_upcycling": {"drop_ratio": 0}}, r"drop_ratio=0 must be a number in \(0, 1\]"),
        ({"drop_upcycling": {"ratio": 0.5}}, r"did you mean baselines.drop_upcycling.drop_ratio"),
    ]:
        raw["baselines"] = bad
        with pytest.raises(BTXError, match=match):
            _plan(raw)


def _extend_config(tmp_path: Path, **extend) -> dict:
    raw = _config(tmp_path)
    folder = tmp_path / "text" / "delta"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(f"delta clause {i}\n" * 20)
    raw["extend"] = {"domains": {"delta": {"source": str(folder)}}, **extend}
    return raw


def test_extend_plans_new_experts_merged_into_the_finetuned_moe(tmp_path):
    """`extend`: the new domain is prepared and gets an expert from the seed; `merge_extend`
    adds it to the finetune's checkpoint (--into, the chosen --shared and --router-init);
    `finetune_extend` trains briefly (a quarter of the finetune's 6 steps, or as given) on the
    blend with it (uniform here: 1/4 each); BTX from scratch with all 5 experts (3 + the new one
    + the seed) merges and finetunes them all. The extended MoE's active parameters count its
    5 router rows: 2 x (4096 + 2 x 3 x 32 x 64 + 32 x 5) + 9600 = 42,688."""
    raw = _extend_config(tmp_path, shared="average", router_init="zero")
    stages = _plan(raw, write=True)
    assert "delta=" + str(tmp_path / "text" / "delta") in stages["prepare_data"].argv
    expert = stages["expert_delta"]
    assert expert.deps == ["seed"] and expert.group == "extend"
    merged = stages["merge_extend"]
    assert _value(merged.argv, "--into") == stages["finetune"].checkpoint
    assert _value(merged.argv, "--experts") == expert.checkpoint
    assert _value(merged.argv, "--shared") == "average"
    assert _value(merged.argv, "--router-init") == "zero"
    assert merged.deps == ["finetune", "expert_delta"]
    finetune = stages["finetune_extend"]
    assert finetune.steps == 6 // 4 and finetune.active_params == 42_688
    config = yaml.safe_load(Path(finetune.argv[1]).read_text())
    assert config["data"]["domains"] == {n: 0.25 for n in ("alpha", "beta", "gamma", "delta")}
    assert config["model"]["init_from"] == merged.checkpoint
    scratch = stages["merge_scratch"].argv
    experts = scratch[scratch.index("--experts") + 1 : scratch.index("--save")]
    assert experts == [
        stages[f"expert_{n}"].checkpoint for n in ("alpha", "beta", "gamma", "delta")
    ]
    assert (
        stages["finetune_scratch"].steps == 6 and stages["finetune_scratch"].active_params == 42_688
    )
    # the run's own stages are unchanged: BTX's finetune does not see the new domain
    finetune_config = yaml.safe_load(Path(stages["finetune"].argv[1]).read_text())
    assert "delta" not in finetune_config["data"]["domains"]

    stages = _plan(_extend_config(tmp_path / "b", finetune={"steps": 4}, scratch=False))
    assert stages["finetune_extend"].steps == 4 and "merge_scratch" not in stages
    assert "--shared" not in stages["merge_extend"].argv  # keep
    assert "--router-init" not in stages["merge_extend"].argv  # merge.router_init: random


def test_extend_errors_name_the_key(tmp_path):
    cases = [
        ({"domains": {"alpha": "builtin"}}, "extend.domains.alpha: already a domain"),
        ({"shared": "mean"}, "extend.shared='mean'"),
        ({"router_init": "nope"}, "extend.router_init='nope'"),
        ({"domains": {}}, "extend.domains must name at least one domain"),
        ({"domain": {}}, "did you mean extend.domains"),
    ]
    for i, (extend, match) in enumerate(cases):
        raw = _extend_config(tmp_path / str(i))
        raw["extend"].update(extend)
        with pytest.raises(BTXError, match=match):
            _plan(raw)
    raw = _extend_config(tmp_path / "ep")
    raw["finetune"]["parallel"] = {"ep": 2}  # 4 experts, then 5: EP=2 cannot hold them
    raw["finetune"].update(nproc=2, micro_batch_size=2)
    with pytest.raises(BTXError, match="extend: the extended MoE: EP=2"):
        _plan(raw)


# =============================================================================================
# One tiny run, end to end
# =============================================================================================
@pytest.mark.long  # 2.5 minutes of both cores
def test_family_rows_and_paired_differences_in_one_tiny_run(tmp_path):
    """A tiny `btx run` with Drop-Upcycling, granular upcycling and a fourth domain added after
    the finetune: every new model is scored, compared with BTX (paired intervals per group, the
    added domain its own group), the extended MoE keeps the finetuned MoE's router rows bit for
    bit, and its compute is BTX's plus the new expert's and the brief finetune's."""
    doms = make_text_domains(tmp_path / "text", n_files=20, words=200)
    law = tmp_path / "text" / "law"
    law.mkdir()
    words = "whereas herein party clause shall pursuant thereof agreement licence".split()
    for i in range(20):
        (law / f"doc{i:03d}.txt").write_text(
            " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(200))
        )
    small = {"micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 1, "lr": 3e-3}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"vocab_size": 300, "split": "test=0.15,valid=0.1", "seq_length": 64},
        "domains": {n: {"source": str(p)} for n, p in doms.items()},
        "model": dict(TINY_MODEL),
        "seed": {"pretrain": {"steps": 4, **small}},
        "experts": {"steps": 2, **small},
        "finetune": {"steps": 3, **small},
        "baselines": {
            "dense": False,
            "sparse_upcycling": False,
            "btm": False,
            "drop_upcycling": True,
            "granular_upcycling": {"granularity": 2},
        },
        "extend": {"domains": {"law": {"source": str(law)}}, "router_init": "zero"},
        "evaluation": {"tokens_per_domain": 128, "micro_batch_size": 4, "btm_top_k": [1]},
        "train": {"log_interval": 1, "eval_iters": 1},
    }
    path = tmp_path / "btx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = btx("run", str(path), "--parallel", "2", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    stages = {s.name: s for s in plan.read_plan(run)}
    results = json.loads((run / "eval" / "results.json").read_text())
    rows = results["models"]
    new = {"drop_upcycling", "granular_upcycling", "btx_extended", "btx_scratch", "expert_law"}
    assert new <= set(rows) and all(math.isfinite(rows[m]["mean"]) for m in new)
    groups = results["intervals"]["groups"]
    assert groups["new"] == ["law"] and "law" not in groups["experts"]
    comparisons = results["intervals"]["comparisons"]
    for rival in ("drop_upcycling", "granular_upcycling", "btx_extended", "btx_scratch"):
        for group in ("experts", "new", "mixed"):
            loss = comparisons[rival]["groups"][group]["loss"]
            assert loss["low"] <= loss["estimate"] <= loss["high"]
    claims = results["claims"]
    assert set(claims["added_domains"]) == {"btx_extended", "btx_scratch"}
    assert set(claims["btx_lowest_mean"]["versus"]) == {
        "seed",
        "drop_upcycling",
        "granular_upcycling",
    }
    table = (run / "eval" / "results.md").read_text()
    assert "btx_extended" in table and "granular_upcycling" in table and "(gain)" in table

    # the extended MoE: the finetuned router rows kept, the new row zero, 4 + 1 experts
    key = "decoder.layers.mlp.router.weight"
    old = _tensor(stages["finetune"].checkpoint, key)
    ext = _tensor(stages["merge_extend"].checkpoint, key)
    assert old.shape == (2, 4, 32) and ext.shape == (2, 5, 32)
    assert torch.equal(ext[:, :4], old) and not ext[:, 4].any()
    # its compute: BTX's, then the new expert's and the brief finetune's
    assert rows["btx_extended"]["train_flops"] == pytest.approx(
        rows["btx"]["train_flops"] + stages["expert_law"].flops + stages["finetune_extend"].flops
    )
    granular = json.loads(
        (Path(stages["granular_merge"].checkpoint) / "btx_manifest.json").read_text()
    )["model"]
    assert (granular["num_local_experts"], granular["intermediate_size"]) == (8, 32)


def test_small_extend_example_adds_legal_at_the_small_runs_weights():
    """examples/small_extend.yaml (run after the small run, on its data and seed): code, math
    and prose experts with the seed, legal added afterwards; the blend with legal is the small
    run's own blend (examples/small_btx.yaml's weights), and BTX's finetune blend lacks legal."""
    from megatron_btx.pipeline import config as btx_config

    root = Path(__file__).resolve().parents[1] / "examples"
    extend = btx_config.load(root / "small_extend.yaml")
    small = btx_config.load(root / "small_btx.yaml")
    assert extend.expert_names == ["code", "math", "prose"]
    assert extend.new_domain_names == ["legal"] and "legal" not in extend.weights()
    assert extend.extended_weights() == pytest.approx(small.weights())
    assert extend.extend.router_init == "zero" and extend.extend.finetune.steps == 225 // 4
