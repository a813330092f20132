"""A BTX run's stages as the executors see them: the Stage record, RUN/plan.json, and the done
markers under RUN/stages/ (see megatron_btx.pipeline.plan for how the plan is made)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from megatron_btx import rundir
from megatron_btx.errors import BTXError
from megatron_btx.pipeline.models import ModelSpec
from megatron_btx.pipeline.plan_checks import check_stage_entry, model_entries, stage_entries

PLAN_FORMAT = 3


@dataclass
class Stage:
    name: str  # e.g. "prepare_data", "seed", "expert_code", "merge", "finetune", "evaluate"
    kind: str  # one of plan_checks.KINDS: "data", "convert", "train", "merge", "match", "eval"
    argv: list[str]  # the btx command line, run as `btx <argv>`
    deps: list[str] = field(default_factory=list)  # stages that must finish first
    nproc: int = 1  # processes (torchrun --nproc-per-node) for train stages
    outputs: list[str] = field(default_factory=list)  # paths that exist when it is done
    resumable: bool = False  # train stages: re-running resumes from checkpoints/latest
    # ---- informational (executors may ignore) -------------------------------------------
    workdir: str | None = None  # the stage's own folder (train: its run dir)
    steps: int = 0  # train stages: optimizer steps
    tokens: int = 0  # train stages: training tokens (steps x global batch x seq length)
    active_params: int = 0  # train stages: parameters active per token (for FLOPs)
    flops: float = 0.0  # train stages: 6 x active_params x tokens
    group: str = "btx"  # btx | baseline | shared (accounting)
    # ---- what it leaves (the evaluator reads these) -------------------------------------
    checkpoint: str | None = None  # the checkpoint folder a model-producing stage leaves
    router: dict[str, Any] | None = None  # an MoE stage's router config
    #: a baseline's training stage under time matching: the BTX stage whose measured speed
    #: it trains at ("experts" or "finetune"; megatron_btx.pipeline.compute_match)
    time_like: str | None = None
    #: a baseline's training stage that starts from BTX's own stages (BAM merges BTX's experts):
    #: those stages, whose cost is part of its budget (megatron_btx.pipeline.compute_match)
    builds_on: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> Stage:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in known})


@dataclass
class Plan:
    """A run's stages in execution order, the seed checkpoint they branch from, and the models
    the evaluator scores (:mod:`megatron_btx.pipeline.models`). `moved_from`: where the run
    was planned, when it has been moved or copied since (its paths inside the run then name
    the new place, see :func:`read_plan_file`)."""

    stages: list[Stage]
    seed_checkpoint: str | None
    models: list[ModelSpec] = field(default_factory=list)
    moved_from: str | None = None

    def by_name(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}


def save_plan(run_dir: str | os.PathLike[str], plan: Plan) -> None:
    """RUN/plan.json (atomically), with the run directory it was planned in (see
    :func:`read_plan_file`)."""
    document = {
        "format_version": PLAN_FORMAT,
        "run_dir": os.path.abspath(run_dir),
        "seed_checkpoint": plan.seed_checkpoint,
        "stages": [s.to_dict() for s in plan.stages],
        "models": [m.to_dict() for m in plan.models],
    }
    rundir.atomic_write_text(Path(run_dir) / "plan.json", json.dumps(document, indent=1))


def read_plan_file(run_dir: str | os.PathLike[str]) -> Plan:
    """RUN/plan.json: the stages and the seed checkpoint.

    A run directory is relocatable: plan.json records where it was planned, and when it is read
    from another place (the run was moved or copied), every path it holds inside the old run
    directory (checkpoints, outputs, work folders, the seed) is read as the same path inside
    this one, so a copy is evaluated on its own checkpoints, never the original's. The stages'
    command lines keep the old paths: a moved run is re-planned (`btx run`, or `btx launch
    CONFIG --run-dir`) before its stages run again (:attr:`Plan.moved_from` says it moved)."""
    from megatron_btx.inputs import read_json

    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        raise BTXError(f"{run_dir}: no plan.json (not a btx run directory; start it with btx run)")
    document = read_json(path, "plan.json", limit=PLAN_LIMIT)
    if not isinstance(document, dict) or document.get("format_version") != PLAN_FORMAT:
        raise BTXError(
            f"{path}: written by another version of megatron_btx; re-run `btx run` to plan again"
        )
    entries = stage_entries(document, path)
    stages = [Stage.from_dict(check_stage_entry(entry, path)) for entry in entries]
    check_order(stages, path)
    seed = document.get("seed_checkpoint")
    if seed is not None and not isinstance(seed, str):
        raise BTXError(f"{path}: seed_checkpoint={seed!r} is not a path")
    planned_in = document.get("run_dir")
    if planned_in is not None and not isinstance(planned_in, str):
        raise BTXError(f"{path}: run_dir={planned_in!r} is not a path")
    try:
        models = [ModelSpec.from_dict(e) for e in model_entries(document, path, stages)]
    except BTXError as e:  # a kind, role or part the planner never writes
        raise e if str(path) in str(e) else BTXError(f"{path}: {e}") from None
    here = os.path.abspath(run_dir)
    if planned_in is None or os.path.normpath(planned_in) == here:
        return Plan(stages, seed, models)

    def moved(value: str | None) -> str | None:
        if value is None or not (value == planned_in or value.startswith(planned_in + os.sep)):
            return value
        return here + value[len(planned_in) :]

    for stage in stages:
        stage.workdir, stage.checkpoint = moved(stage.workdir), moved(stage.checkpoint)
        stage.outputs = [moved(p) for p in stage.outputs]
    for model in models:
        model.checkpoint = moved(model.checkpoint)
    return Plan(stages, moved(seed), models, moved_from=planned_in)


#: the largest plan.json we read (kilobytes: a few dozen stages)
PLAN_LIMIT = 16 * 1024 * 1024


def check_order(stages: list[Stage], path: Path) -> None:
    """Each stage's dependencies are stages before it (the order is the order of execution:
    an executor submits or starts stages in it) and no name is used twice."""
    seen: set[str] = set()
    for stage in stages:
        later = [d for d in stage.deps if d not in seen]
        if later:
            raise BTXError(
                f"{path}: stage {stage.name} depends on {later[0]!r}, which is not a stage "
                f"before it; re-run `btx run` to plan again"
            )
        if stage.name in seen:
            raise BTXError(f"{path}: stage {stage.name} appears twice; re-run `btx run`")
        seen.add(stage.name)


def read_plan(run_dir: str | os.PathLike[str]) -> list[Stage]:
    return read_plan_file(run_dir).stages


# ---------------------------------------------------------------------------------------------
# Done markers
# ---------------------------------------------------------------------------------------------
def marker_path(stage: Stage | str, run_dir: str | os.PathLike[str]) -> Path:
    name = stage if isinstance(stage, str) else stage.name
    return Path(run_dir) / "stages" / f"{name}.done"


def outputs_exist(stage: Stage) -> bool:
    return all(os.path.exists(p) for p in stage.outputs)


def stage_done(stage: Stage, run_dir: str | os.PathLike[str]) -> bool:
    """Finished: its done marker exists, names the same command line, and its outputs exist."""
    m = marker_path(stage, run_dir)
    if not m.is_file():
        return False
    info = read_marker(stage, run_dir)
    return info is not None and info.get("argv") == stage.argv and outputs_exist(stage)


def mark_done(stage: Stage, run_dir: str | os.PathLike[str], **info: Any) -> Path:
    """Write the done marker atomically (after checking the outputs)."""
    if not outputs_exist(stage):
        missing = [p for p in stage.outputs if not os.path.exists(p)]
        raise BTXError(f"stage {stage.name}: finished but {missing[0]} does not exist")
    m = marker_path(stage, run_dir)
    m.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "stage": stage.name,
        "kind": stage.kind,
        "argv": stage.argv,
        "steps": stage.steps,
        "tokens": stage.tokens,
        "active_params": stage.active_params,
        "flops": stage.flops,
        "finished_ts": time.time(),
        **info,
    }
    rundir.atomic_write_text(m, json.dumps(body, indent=1))
    return m


def read_marker(stage: Stage | str, run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    m = marker_path(stage, run_dir)
    try:
        info = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None  # a hand-edited marker: not done


def fmt_flops(x: float) -> str:
    if x <= 0:
        return "-"
    e = int(math.floor(math.log10(x)))
    return f"{x / 10**e:.2f}e{e}"
