"""Compute matching by measured time (`baselines.compute_match: time`), as the paper matched
GPU-days rather than FLOPs.

Dense expert training needs no all-to-all and runs more tokens per second than MoE training, so
at equal hardware time the expert stage trains more tokens than its FLOPs share suggests. With
`time`, the baselines train for as long as BTX did on the same machine:

- the BTX cost is the hardware time of its stages after the seed: every expert's and the
  finetune's training time, plus the merge's wall time; a stage's hardware time is its training
  seconds (from its metrics, start-up and evaluation excluded) times the cores it used (threads x
  processes), so stages that ran two at a time on two cores are counted fairly;
- each baseline's speed is that of the BTX stage with its architecture, measured in the same run
  (its stage's ``time_like``): a dense baseline trains like an expert, an MoE one like the
  finetune; a baseline with more (or fewer) active parameters than that stage (BAM's attention
  experts) costs proportionally more (less) per token;
- a baseline that starts from BTX's own stages (its stage's ``builds_on``: BAM merges BTX's
  experts) has their cost spent already: its budget is the BTX cost less theirs;
- baseline steps = budget / (cost per token at that speed x tokens per step).

`btx match-compute --run-dir RUN` (the plan's `match_compute` stage, after the BTX stages;
:func:`megatron_btx.pipeline.cli.match_compute_main`) writes `RUN/compute_match.json` with
:func:`measure` and re-plans the run: the planner reads the measured step counts from it
(:func:`load`), as long as the BTX stages' configs it measured are still the plan's. This module
reads the plan through :mod:`megatron_btx.pipeline.stages` and is read by the planner, never the
reverse.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_btx.config import read_yaml
from megatron_btx.errors import BTXError
from megatron_btx.pipeline.stages import read_marker, read_plan_file

RESULT = "compute_match.json"


def config_fingerprint(train_config_text: str) -> str:
    return hashlib.sha256(train_config_text.encode()).hexdigest()[:16]


def stage_cost(run_dir: str | Path) -> dict[str, float]:
    """Training seconds, core-seconds and tokens of one `btx train` run, from its metrics:
    every train event covers the steps since the previous one at its seconds_per_step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise BTXError(f"{path}: no metrics; the stage has not trained yet")
    cores, seconds, steps, previous = 1, 0.0, 0, None
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "start":
            cores = int(event.get("threads") or 1) * int(event.get("world_size") or 1)
            previous = int(event.get("step", 0))
        elif event.get("event") == "train" and previous is not None:
            count = int(event["step"]) - previous
            seconds += count * float(event["seconds_per_step"]) * cores
            steps += count
            previous = int(event["step"])
    config = _train_config(run_dir)
    tokens_per_step = config["data"]["global_batch_size"] * config["data"]["seq_length"]
    if steps == 0:
        raise BTXError(f"{path}: no training steps recorded")
    return {"core_seconds": seconds, "steps": steps, "tokens": steps * tokens_per_step}


def _train_config(run_dir: str | Path) -> dict[str, Any]:
    return read_yaml(Path(run_dir) / "config.yaml")  # no aliases, bounded nesting


def measure(run_dir: str | Path) -> dict[str, Any]:
    """The BTX cost and each baseline's time-matched steps (see the module docstring)."""
    run = Path(run_dir)
    plan = read_plan_file(run)
    stages = plan.by_name()
    experts = [stages[n] for m in plan.models if m.part == "expert" for n in m.stages]
    if "finetune" not in stages or not experts:
        raise BTXError(f"{run}: the plan has no experts or finetune to match")
    costs = {s.name: stage_cost(s.workdir) for s in [*experts, stages["finetune"]]}
    merge_marker = read_marker("merge", run) or {}
    merge_seconds = float(merge_marker.get("seconds", 0.0))
    btx = sum(c["core_seconds"] for c in costs.values()) + merge_seconds
    per_token = {
        "experts": sum(costs[s.name]["core_seconds"] for s in experts)
        / sum(costs[s.name]["tokens"] for s in experts),
        "finetune": costs["finetune"]["core_seconds"] / costs["finetune"]["tokens"],
    }
    like = {"experts": experts[0], "finetune": stages["finetune"]}
    baselines = {}
    for stage in plan.stages:
        if stage.time_like is None:
            continue
        if stage.time_like not in per_token:
            raise BTXError(f"{run}: stage {stage.name} trains like {stage.time_like!r}, unknown")
        if any(n not in costs for n in stage.builds_on):
            raise BTXError(f"{run}: stage {stage.name} builds on a stage BTX's cost does not count")
        config = _yaml(Path(stage.argv[1]))
        tokens_per_step = config["data"]["global_batch_size"] * config["data"]["seq_length"]
        reference = like[stage.time_like].active_params
        scale = stage.active_params / reference if reference and stage.active_params else 1.0
        rate = per_token[stage.time_like] * scale
        budget = btx - sum(costs[n]["core_seconds"] for n in stage.builds_on)
        steps = max(1, int(budget / (rate * tokens_per_step)))
        baselines[stage.name] = {"steps": steps, "core_seconds_per_token": rate}
    return {
        "btx_core_seconds": btx,
        "merge_seconds": merge_seconds,
        "stages": costs,
        "baselines": baselines,
        "btx_configs": {
            name: config_fingerprint(Path(stages[name].argv[1]).read_text()) for name in costs
        },
    }


def _yaml(path: Path) -> dict[str, Any]:
    return read_yaml(path)


def load(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN/compute_match.json, or None before it is measured."""
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
