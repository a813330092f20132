"""Each train stage's `btx train` config, built from the run config, and its Stage record
(steps, tokens, FLOPs, the checkpoint it leaves): the planner's
(:mod:`megatron_btx.pipeline.plan`) building blocks for training stages."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from megatron_btx import rundir
from megatron_btx.pipeline.config import BTXConfig, StageTrain
from megatron_btx.pipeline.stages import Stage


def final_checkpoint(run: str | Path, steps: int) -> str:
    """The checkpoint a finished `btx train` run of `steps` steps leaves."""
    return str(rundir.checkpoint_path(run, steps))


def model_options() -> set[str]:
    """The model section's keys that are training options, not architecture (LlamaArgs)."""
    from megatron_btx.config import LLAMA_FIELDS, ModelConfig

    return {f.name for f in fields(ModelConfig)} - set(LLAMA_FIELDS) - {"init_from", "hf_config"}


def combine_stages(*parts: StageTrain | None) -> StageTrain:
    """Later parts override earlier ones field by field."""
    out = StageTrain()
    for part in parts:
        if part is None:
            continue
        for key in (
            "steps",
            "lr",
            "warmup_steps",
            "min_lr_ratio",
            "micro_batch_size",
            "global_batch_size",
        ):
            if getattr(part, key) is not None:
                setattr(out, key, getattr(part, key))
        if part.nproc != 1:
            out.nproc = part.nproc
        if part.parallel:
            out.parallel = {**(out.parallel or {}), **part.parallel}
        if part.train:
            out.train = {**(out.train or {}), **part.train}
    return out


def train_section(cfg: BTXConfig, stage: StageTrain) -> dict[str, Any]:
    train = {"log_interval": 10, "eval_iters": 2, "keep_last": 1, "device": "auto"}
    train.update(cfg.train or {})
    train.update(stage.train or {})
    train["steps"] = int(stage.steps or 0)
    for key in ("lr", "warmup_steps", "min_lr_ratio"):
        if getattr(stage, key) is not None:
            train[key] = getattr(stage, key)
    train["warmup_steps"] = min(int(train.get("warmup_steps", 100)), max(train["steps"] // 5, 0))
    train.setdefault("eval_interval", max(train["steps"], 1))
    train.setdefault("save_interval", max(train["steps"] // 4, 1))  # resumable when killed
    train["eval_interval"] = max(1, min(int(train["eval_interval"]), max(train["steps"], 1)))
    return train


def train_config(
    cfg: BTXConfig,
    run: str,
    stage: StageTrain,
    data_path: str,
    domains: list[str] | dict[str, float],
    init_from: str | None,
    moe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `btx train` config of one stage, built and validated as `btx train` will read it."""
    data: dict[str, Any] = {
        "path": data_path,
        "domains": domains,
        "valid_domains": cfg.domain_names,
        "seq_length": cfg.data.seq_length,
    }
    if stage.micro_batch_size is not None:
        data["micro_batch_size"] = stage.micro_batch_size
    if stage.global_batch_size is not None:
        data["global_batch_size"] = stage.global_batch_size
    model: dict[str, Any]
    if init_from:
        model = {"init_from": init_from}
        for key in model_options():
            if key in cfg.model:
                model[key] = cfg.model[key]
    else:
        model = dict(cfg.model)
    raw: dict[str, Any] = {
        "run_dir": run,
        "model": model,
        "parallel": dict(stage.parallel or {}),
        "data": data,
        "optimizer": dict(cfg.optimizer or {}),
        "train": train_section(cfg, stage),
        "logging": dict(cfg.logging or {}),
    }
    if moe:
        raw["moe"] = moe
    from megatron_btx.config import Config

    built = Config.from_dict(raw, f"{cfg.source or 'btx config'} (stage {run})")
    built.validate(world_size=stage.nproc)
    return built.to_dict()


def stage_tokens(train_cfg: dict[str, Any]) -> int:
    return (
        int(train_cfg["train"]["steps"])
        * int(train_cfg["data"]["global_batch_size"])
        * int(train_cfg["data"]["seq_length"])
    )


def global_batch(stage: StageTrain) -> int:
    from megatron_btx.config import DataConfig

    return stage.global_batch_size or DataConfig().global_batch_size


def matched_steps(budget: float, active: int, global_batch: int, seq: int) -> int:
    return max(1, int(round(budget / (6.0 * active * global_batch * seq))))


def train_stage(
    name: str,
    run: str,
    train_cfg: dict[str, Any],
    deps: list[str],
    nproc: int,
    active: int,
    group: str,
) -> Stage:
    steps = int(train_cfg["train"]["steps"])
    tokens = stage_tokens(train_cfg)
    checkpoint = final_checkpoint(train_cfg["run_dir"], steps)
    return Stage(
        name,
        "train",
        ["train", f"{run}/configs/{name}.yaml"],
        list(deps),
        nproc,
        [checkpoint + "/metadata.json"],
        True,
        workdir=train_cfg["run_dir"],
        steps=steps,
        tokens=tokens,
        active_params=active,
        flops=6.0 * active * tokens,
        group=group,
        checkpoint=checkpoint,
        router=(train_cfg.get("moe") or {}).get("router"),
    )
