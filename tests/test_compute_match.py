"""Compute matching by measured time (baselines.compute_match: time): the plan waits for the
measurement, the measurement is worked out by hand from the stages' metrics, the re-plan gives
the baselines the measured steps, and a stale measurement is ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_contract import btx
from test_pipeline_plan import _config

from megatron_btx.pipeline import compute_match, plan


def _fake_training(stage: plan.Stage, seconds_per_step: float, threads: int) -> None:
    """The metrics and config a finished `btx train` of this stage would leave."""
    run = Path(stage.workdir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(Path(stage.argv[1]).read_text())
    events = [{"event": "start", "step": 0, "threads": threads, "world_size": 1}]
    for step in range(2, stage.steps + 1, 2):  # log every 2 steps
        events.append({"event": "train", "step": step, "seconds_per_step": seconds_per_step})
    if stage.steps % 2:
        events.append({"event": "train", "step": stage.steps, "seconds_per_step": seconds_per_step})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")


def _fake_btx(stages: dict[str, plan.Stage], run: Path) -> None:
    """BTX's stages as measured: experts 8 steps at 0.5 s on 1 thread, the finetune 6 steps at
    2.0 s on 2 threads, the merge 3 s."""
    for name in ("expert_alpha", "expert_beta", "expert_gamma"):
        _fake_training(stages[name], 0.5, 1)
    _fake_training(stages["finetune"], 2.0, 2)
    (run / "stages").mkdir(exist_ok=True)
    (run / "stages" / "merge.done").write_text(json.dumps({"seconds": 3.0}))


def test_time_matching_by_hand(tmp_path):
    raw = _config(tmp_path, baselines={"compute_match": "time"})
    stages = {s.name: s for s in plan.build_plan(raw)}
    run = Path(raw["run_dir"])
    match = stages["match_compute"]
    assert match.argv == ["match-compute", "--run-dir", str(run)]
    assert {"expert_alpha", "merge", "finetune"} <= set(match.deps)
    assert "match_compute" in stages["baseline_dense"].deps
    assert "match_compute" in stages["baseline_sparse_upcycling"].deps
    flops_steps = stages["baseline_dense"].steps  # until measured: the FLOPs-matched steps

    _fake_btx(stages, run)
    measured = compute_match.measure(run)
    # BTX: 3 x 8 x 0.5 + 6 x 2.0 x 2 + merge 3 = 12 + 24 + 3 = 39 core-seconds
    assert measured["btx_core_seconds"] == 39.0
    tokens = 4 * 64  # global batch x sequence length
    dense_per_token = 12.0 / (3 * 8 * tokens)
    moe_per_token = 24.0 / (6 * tokens)
    assert measured["baselines"]["baseline_dense"]["steps"] == int(39 / (dense_per_token * tokens))
    assert measured["baselines"]["baseline_sparse_upcycling"]["steps"] == int(
        39 / (moe_per_token * tokens)
    )
    (run / compute_match.RESULT).write_text(json.dumps(measured))
    replanned = {s.name: s for s in plan.build_plan(raw)}
    assert replanned["baseline_dense"].steps == 78 != flops_steps
    assert replanned["baseline_sparse_upcycling"].steps == 9
    config = yaml.safe_load(Path(replanned["baseline_dense"].argv[1]).read_text())
    assert config["train"]["steps"] == 78

    # a measurement of other BTX stages (the experts' steps changed) is not used
    raw["experts"]["steps"] = 10
    stale = {s.name: s for s in plan.build_plan(raw)}
    assert stale["baseline_dense"].steps != 78


def test_compute_match_none_and_flops_and_booleans(tmp_path):
    none = {
        s.name: s
        for s in plan.build_plan(
            _config(
                tmp_path / "a", baselines={"compute_match": "none", "dense_train": {"steps": 5}}
            ),
            write=False,
        )
    }
    assert none["baseline_dense"].steps == 5 and "match_compute" not in none
    legacy = {
        s.name: s
        for s in plan.build_plan(
            _config(
                tmp_path / "b", baselines={"compute_match": False, "dense_train": {"steps": 5}}
            ),
            write=False,
        )
    }
    assert legacy["baseline_dense"].steps == 5
    flops = {s.name: s for s in plan.build_plan(_config(tmp_path / "c"), write=False)}
    assert flops["baseline_dense"].steps != 5 and "match_compute" not in flops


@pytest.mark.long
def test_time_matched_run_end_to_end(tmp_path):
    """`btx run` with compute_match: time measures after the BTX stages, re-plans, and the
    baseline trains the measured steps (its final checkpoint is the re-planned one)."""

    from test_pipeline_variants import _config as variant_config

    cfg = variant_config(tmp_path, {})
    raw = yaml.safe_load(cfg.read_text())
    raw["baselines"] = {
        "dense": True,
        "sparse_upcycling": False,
        "btm": False,
        "compute_match": "time",
    }
    cfg.write_text(yaml.safe_dump(raw))
    result = btx("run", str(cfg), "--parallel", "2", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    measured = json.loads((run / compute_match.RESULT).read_text())
    steps = measured["baselines"]["baseline_dense"]["steps"]
    stage = plan.read_plan_file(run).by_name()["baseline_dense"]
    assert stage.steps == steps and stage.checkpoint.endswith(f"iter_{steps:07d}")
    assert (Path(stage.checkpoint) / "metadata.json").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"]["dense"]["train_tokens"] == steps * 4 * 64


def test_bam_trains_for_what_is_left_after_the_experts_it_shares(tmp_path):
    """BAM merges BTX's own experts, so their compute is spent already: its finetune gets BTX's
    budget less the experts', at its own (larger) active parameters, by FLOPs and by time."""
    raw = _config(tmp_path / "flops", baselines={"bam": True})
    stages = {s.name: s for s in plan.build_plan(raw, write=False)}
    experts = [stages[n] for n in ("expert_alpha", "expert_beta", "expert_gamma")]
    bam, finetune = stages["baseline_bam"], stages["finetune"]
    assert bam.builds_on == [s.name for s in experts]
    assert bam.active_params > finetune.active_params  # 4 attention experts per layer
    per_step = 6.0 * bam.active_params * 4 * 64  # global batch 4, sequence 64
    assert bam.steps == max(1, round(finetune.flops / per_step))
    # BAM's whole cost (the shared experts + its finetune) is BTX's to within one step
    assert abs(bam.flops - finetune.flops) <= per_step / 2

    raw = _config(tmp_path / "time", baselines={"bam": True, "compute_match": "time"})
    stages = {s.name: s for s in plan.build_plan(raw)}
    run = Path(raw["run_dir"])
    _fake_btx(stages, run)
    measured = compute_match.measure(run)
    # as above: BTX 39 core-seconds, of which the experts 12; the finetune 24 / (6 x 256) per
    # token, BAM's per token that times its active parameters over the finetune's
    tokens = 4 * 64
    rate = (
        24.0
        / (6 * tokens)
        * stages["baseline_bam"].active_params
        / (stages["finetune"].active_params)
    )
    assert measured["baselines"]["baseline_bam"]["steps"] == int((39 - 12) / (rate * tokens))
    assert measured["baselines"]["baseline_sparse_upcycling"]["steps"] == int(39 / (24.0 / 6))
