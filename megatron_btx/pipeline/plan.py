"""The BTX plan: a BTX config -> a list of stages (btx command lines) with dependencies.

The plan is the one description of a run that every executor shares: the local executor
(`btx run`, :mod:`megatron_btx.pipeline.local`) runs each stage as a subprocess ``btx <argv>``;
a Slurm executor submits the same command lines as jobs with ``--dependency=afterok``. Stages
talk only through files under the run directory, so any stage can run on any machine.

Run directory layout::

    RUN/btx.yaml                  the resolved BTX config (paths absolute)
    RUN/plan.json                 the stages below, as JSON, and the seed checkpoint; each stage
                                  names the checkpoint it leaves (and its router), which is how
                                  the evaluator finds every model
    RUN/configs/<stage>.yaml      the training config of each train stage (`btx train` input)
    RUN/data/                     prepared domains (unless data.prepared is given)
    RUN/seed/                     the pretrained seed (a `btx train` run dir)
    RUN/experts/<domain>/         one dense expert per domain (run dirs)
    RUN/merged/                   the MiX checkpoint (experts' FFNs + averaged rest + routers)
    RUN/finetune/                 the BTX MoE after finetuning (run dir)
    RUN/baselines/dense/          the seed continued on the blend (run dir)
    RUN/baselines/upcycled/       N copies of the seed merged (sparse upcycling init)
    RUN/baselines/sparse_upcycling/  that MoE trained on the blend (run dir)
    RUN/eval/                     results.{json,md}, routing.{json,md}, routing_*.png
    RUN/stages/<stage>.done       done markers (JSON: times, FLOPs), written by the executor
    RUN/logs/<stage>.log          each stage's output

Stage argv is the *single-process* command line; a train stage with ``nproc > 1`` runs under
``torchrun --nproc-per-node nproc`` (locally `btx train ... --nproc-per-node N` does that).
Train stages are resumable: re-running the same argv resumes from ``checkpoints/latest``.

Compute accounting: training FLOPs = 6 x active parameters x tokens, where the active parameters
are those in a matrix multiply per token, layer by layer and by router type
(:mod:`megatron_btx.models.compute`: attention, the FFN or the router plus the experts a token
passes through, a shared expert, and the output projection, tied or not; not the embedding
lookup). The merged MoE's shape comes from the merge's own command-line parser and plan. The
BTX budget is the experts' training plus the MoE finetune (the seed's pretraining is shared by
every model and not counted); with ``baselines.compute_match`` the dense and sparse-upcycling
baselines get as many steps as that budget buys at their own active size.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from megatron_btx import rundir
from megatron_btx.errors import BTXError
from megatron_btx.pipeline import compute_match
from megatron_btx.pipeline import config as btx_config
from megatron_btx.pipeline.config import BTXConfig, StageTrain
from megatron_btx.pipeline.plan_checks import KINDS
from megatron_btx.pipeline.stages import (  # re-exported: the executors' view of a plan
    Plan,
    Stage,
    fmt_flops,
    mark_done,
    marker_path,
    outputs_exist,
    read_marker,
    read_plan,
    read_plan_file,
    save_plan,
    stage_done,
)

__all__ = [
    "KINDS",
    "Plan",
    "Stage",
    "build_plan",
    "final_checkpoint",
    "fmt_flops",
    "mark_done",
    "marker_path",
    "outputs_exist",
    "read_marker",
    "read_plan",
    "read_plan_file",
    "save_plan",
    "seed_args",
    "stage_done",
    "write_plan",
]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def final_checkpoint(run: str | Path, steps: int) -> str:
    """The checkpoint a finished `btx train` run of `steps` steps leaves."""
    return str(rundir.checkpoint_path(run, steps))


def _resolve_checkpoint(path: str) -> str:
    """A megatron checkpoint folder from a checkpoint, a `checkpoints` folder or a run dir."""
    found = rundir.resolve_checkpoint(path)
    return str(found) if found is not None else str(path)


def _is_hf(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not rundir.is_checkpoint(p)


def _model_options() -> set[str]:
    """The model section's keys that are training options, not architecture (LlamaArgs)."""
    from megatron_btx.config import LLAMA_FIELDS, ModelConfig

    return {f.name for f in fields(ModelConfig)} - set(LLAMA_FIELDS) - {"init_from", "hf_config"}


def seed_args(cfg: BTXConfig):
    """The dense architecture (LlamaArgs) of the seed and experts, as far as known at plan time
    (the vocabulary is the tokenizer's; data.vocab_size until the data is prepared)."""
    from megatron_btx.models.hf_config import read_plain_args
    from megatron_btx.models.llama import LlamaArgs

    if cfg.seed.init_from:
        src = cfg.seed.init_from
        if _is_hf(src):
            return read_plain_args(Path(src) / "config.json")
        from megatron_btx.checkpoint.megatron_io import read_args

        return read_args(_resolve_checkpoint(src))
    arch = {k: v for k, v in cfg.model.items() if k not in _model_options()}
    arch.setdefault("vocab_size", _vocab_size(cfg))
    try:
        return LlamaArgs(**arch)
    except TypeError as e:
        raise BTXError(f"{cfg.source or 'config'}: model: {e}") from e


def _vocab_size(cfg: BTXConfig) -> int:
    """Known before any stage runs (so compute-matched step counts never change on re-plan)."""
    if cfg.data.prepared:
        man = Path(cfg.data.prepared) / "manifest.json"
        try:
            return int(json.loads(man.read_text())["tokenizer"]["vocab_size"])
        except (OSError, KeyError, ValueError):
            pass
    if cfg.data.tokenizer:
        from megatron_btx.data.tokenizer import load_tokenizer

        try:  # a SentencePiece .model or an HF tokenizer folder (tokenizer.json)
            return int(load_tokenizer(cfg.data.tokenizer).vocab_size)
        except BTXError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure is the user's file
            raise BTXError(f"data.tokenizer={cfg.data.tokenizer}: cannot read it ({e})") from e
    return cfg.data.vocab_size


# ---------------------------------------------------------------------------------------------
# Per-stage training configs
# ---------------------------------------------------------------------------------------------
def _merge_stage(*parts: StageTrain | None) -> StageTrain:
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


def _train_section(cfg: BTXConfig, stage: StageTrain) -> dict[str, Any]:
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


def _train_config(
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
        for key in _model_options():
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
        "train": _train_section(cfg, stage),
        "logging": dict(cfg.logging or {}),
    }
    if moe:
        raw["moe"] = moe
    from megatron_btx import config as train_config

    built = train_config.Config.from_dict(raw, f"{cfg.source or 'btx config'} (stage {run})")
    built.validate(world_size=stage.nproc)
    return built.to_dict()


def _tokens(train_cfg: dict[str, Any]) -> int:
    return (
        int(train_cfg["train"]["steps"])
        * int(train_cfg["data"]["global_batch_size"])
        * int(train_cfg["data"]["seq_length"])
    )


def _global_batch(stage: StageTrain) -> int:
    from megatron_btx.config import DataConfig

    return stage.global_batch_size or DataConfig().global_batch_size


def _matched_steps(budget: float, active: int, global_batch: int, seq: int) -> int:
    return max(1, int(round(budget / (6.0 * active * global_batch * seq))))


def _train_stage(
    name: str,
    run: str,
    train_cfg: dict[str, Any],
    deps: list[str],
    nproc: int,
    active: int,
    group: str,
) -> Stage:
    steps = int(train_cfg["train"]["steps"])
    tokens = _tokens(train_cfg)
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


def _merge_argv(
    sources: list[str], seed: str | None, save: str, router_init: str, top_k: int, layout
) -> list[str]:
    """`btx merge` of `sources` (and the seed) into `save`, checked for the finetune's layout."""
    tp, pp, ep = layout
    argv = ["merge", "--experts", *sources]
    if seed is not None:
        argv += ["--seed", seed]
    argv += ["--save", save, "--router-init", router_init, "--top-k", str(top_k)]
    argv += ["--tp", str(tp), "--ep", str(ep), "--pp", str(pp), "--overwrite", "--no-progress"]
    return argv


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
class _Planner:
    """Builds a run's stages in order; each method adds one part of the plan. Pure: it reads the
    config (and a given seed's or prepared data's metadata) and writes nothing."""

    def __init__(self, cfg: BTXConfig):
        from megatron_btx.models.compute import active_params

        self.cfg = cfg
        self.run = cfg.run_dir
        self.names = cfg.expert_names  # one expert each
        self.domains = cfg.domain_names  # prepared, blended, evaluated
        self.stages: list[Stage] = []
        self.train_configs: dict[str, dict[str, Any]] = {}
        self.blend = {n: w for n, w in cfg.weights().items() if w > 0}
        self.dense_args = seed_args(cfg)
        self.dense_active = active_params(self.dense_args)
        finetune_parallel = cfg.finetune.parallel or {}
        self.moe_layout = tuple(int(finetune_parallel.get(k, 1)) for k in ("tp", "pp", "ep"))
        self.router = cfg.finetune.router or {"type": "topk"}
        self.moe_args, self.variant = self._merged_shape()
        self.moe_active = active_params(self.moe_args, self.router, self.variant)
        self.btx_flops = 0.0
        self.data_path = ""
        self.seed_checkpoint = ""
        self.seed_deps: list[str] = []

    def _merge_argv(self, experts: list[str], seed: str | None, save: str, router_init: str):
        """The `btx merge` command line of the BTX merge (or, with every source the seed, of
        sparse upcycling's): the same variant flags, so both MoEs have one architecture."""
        merge = self.cfg.merge
        argv = _merge_argv(experts, seed, save, router_init, merge.top_k, self.moe_layout)
        return argv + merge.flags() + list(merge.extra_args)

    def _merged_shape(self):
        """(LlamaArgs, MoEVariant) of the merged MoE, planned by the merge's own command-line
        parser and plan from the flags the merge stage will get: never out of step with it."""
        from megatron_btx.merge.cli import build_parser
        from megatron_btx.merge.plan import plan_for
        from megatron_btx.merge.settings import MergeSettings

        seed = "seed" if self.cfg.merge.seed_as_expert else None
        argv = self._merge_argv([f"expert_{n}" for n in self.names], seed, "merged", "random")
        try:
            ns = build_parser().parse_args(argv[1:])
        except SystemExit as e:
            raise BTXError(
                f"merge.extra_args {self.cfg.merge.extra_args}: not valid flags of btx merge"
            ) from e
        settings = MergeSettings.from_args(ns)
        sources = len(settings.source_paths)
        try:
            settings.validate()
            merge_plan = plan_for(settings, self.dense_args, sources)
        except BTXError as e:
            message = str(e)
            for flag in ("top-k", "split-chunks", "moe-layers", "dense-ffn", "blend"):
                message = message.replace(f"--{flag}", f"merge.{flag.replace('-', '_')}")
            raise BTXError(f"{self.cfg.source or 'config'}: {message}") from e
        return merge_plan.output_args(self.dense_args), merge_plan.variant(self.dense_args)

    def train(
        self,
        name: str,
        run: str,
        stage: StageTrain,
        domains,
        init_from,
        deps,
        active,
        group: str,
        moe: dict[str, Any] | None = None,
    ) -> Stage:
        train_cfg = _train_config(self.cfg, run, stage, self.data_path, domains, init_from, moe)
        self.train_configs[name] = train_cfg
        added = _train_stage(name, self.run, train_cfg, deps, stage.nproc, active, group)
        self.stages.append(added)
        return added

    def data(self) -> list[str]:
        cfg = self.cfg
        if cfg.data.prepared:
            self.data_path = cfg.data.prepared
            man = Path(self.data_path) / "manifest.json"
            if not man.is_file():
                raise BTXError(
                    f"data.prepared={self.data_path}: no manifest.json (run btx prepare-data)"
                )
            have = json.loads(man.read_text()).get("domains", {})
            missing = [n for n in self.domains if n not in have]
            if missing:
                raise BTXError(
                    f"data.prepared={self.data_path} lacks domain(s) {', '.join(missing)}"
                )
            return []
        self.data_path = f"{self.run}/data"
        argv = ["prepare-data", "--output-dir", self.data_path, "--split", cfg.data.split]
        builtin = [n for n in self.domains if cfg.domain(n).is_builtin]
        if len(builtin) == len(self.domains):
            argv += ["--builtin-domains", ",".join(self.domains), "--max-mb", str(cfg.data.max_mb)]
        else:
            for name in self.domains:
                paths = ["builtin"] if name in builtin else cfg.domain(name).paths
                bad = [p for p in paths if "," in p]
                if bad:
                    raise BTXError(f"domains.{name}: path {bad[0]!r} contains a comma; rename it")
                argv += ["--domain", f"{name}={','.join(paths)}"]
            if builtin:
                argv += ["--max-mb", str(cfg.data.max_mb)]
            if cfg.data.txt_separator is not None:
                argv += ["--txt-separator", cfg.data.txt_separator]
        if cfg.data.mixed_tokens:
            argv += ["--mixed-tokens", str(cfg.data.mixed_tokens)]
        if cfg.data.tokenizer:
            argv += ["--tokenizer", cfg.data.tokenizer]
        else:
            argv += ["--vocab-size", str(cfg.data.vocab_size)]
        self.stages.append(
            Stage(
                "prepare_data",
                "data",
                argv,
                [],
                1,
                [f"{self.data_path}/manifest.json"],
                workdir=self.data_path,
                group="shared",
            )
        )
        return ["prepare_data"]

    def seed(self, data_deps: list[str]) -> None:
        cfg = self.cfg
        self.seed_deps = list(data_deps)
        if not cfg.seed.init_from:
            stage = _merge_stage(cfg.seed.pretrain)
            run = f"{self.run}/seed"
            # the seed's own data (the paper's: general text no expert specialises in)
            data = {n: 1.0 for n in cfg.seed.domains} if cfg.seed.domains else self.blend
            added = self.train(
                "seed", run, stage, data, None, data_deps, self.dense_active, "shared"
            )
            self.seed_checkpoint = added.checkpoint
            self.seed_deps = ["seed"]
            return
        src = cfg.seed.init_from
        if _is_hf(src):
            self.seed_checkpoint = f"{self.run}/seed_import"
            argv = ["import-hf", "--load", src, "--save", self.seed_checkpoint, "--overwrite"]
            self.stages.append(
                Stage(
                    "import_seed",
                    "convert",
                    argv,
                    [],
                    1,
                    [f"{self.seed_checkpoint}/metadata.json"],
                    workdir=self.seed_checkpoint,
                    group="shared",
                    checkpoint=self.seed_checkpoint,
                )
            )
            self.seed_deps.append("import_seed")
            return
        self.seed_checkpoint = _resolve_checkpoint(src)
        if not rundir.is_checkpoint(self.seed_checkpoint):
            raise BTXError(f"seed.init_from={src}: not a megatron checkpoint or run dir")

    def experts(self) -> list[str]:
        checkpoints = []
        for name in self.names:
            run = f"{self.run}/experts/{name}"
            added = self.train(
                f"expert_{name}",
                run,
                _merge_stage(self.cfg.experts),
                [name],
                self.seed_checkpoint,
                self.seed_deps,
                self.dense_active,
                "btx",
            )
            self.btx_flops += added.flops
            checkpoints.append(added.checkpoint)
        return checkpoints

    def merge(self, expert_checkpoints: list[str]) -> str:
        cfg = self.cfg
        merged = f"{self.run}/merged"
        seed = self.seed_checkpoint if cfg.merge.seed_as_expert else None
        argv = self._merge_argv(expert_checkpoints, seed, merged, cfg.merge.router_init)
        if cfg.merge.router_init == "centroid":
            domain_data = [f"{self.data_path}/{n}_train_text_document" for n in self.names]
            argv += ["--centroid-data", *domain_data]
            if cfg.merge.seed_as_expert:  # the generalist's row: a sample of the whole blend
                weights = self.blend
                argv.append(
                    ",".join(
                        f"{self.data_path}/{n}_train_text_document@{weights[n]:g}"
                        for n in self.domains
                        if n in weights
                    )
                )
        deps = [f"expert_{n}" for n in self.names] + self.seed_deps
        self.stages.append(
            Stage(
                "merge",
                "merge",
                argv,
                deps,
                1,
                [f"{merged}/metadata.json"],
                workdir=merged,
                checkpoint=merged,
                router=self.router,
            )
        )
        return merged

    def finetune_moe_section(self) -> dict[str, Any]:
        finetune = self.cfg.finetune
        return {
            "aux_loss_coeff": finetune.aux_loss_coeff,
            "load_balancing": finetune.load_balancing,
            "router": self.router,
        }

    def finetune(self, merged: str) -> None:
        stage = _merge_stage(self.cfg.finetune)
        added = self.train(
            "finetune",
            f"{self.run}/finetune",
            stage,
            self.blend,
            merged,
            ["merge"],
            self.moe_active,
            "btx",
            self.finetune_moe_section(),
        )
        self.btx_flops += added.flops

    def _time_matched(self) -> dict[str, int]:
        """Baseline steps measured by `btx match-compute` for these very BTX stages (their
        configs unchanged since), else nothing (the plan then holds FLOPs-matched steps until
        the measurement re-plans it)."""
        measured = compute_match.load(self.run)
        if not measured:
            return {}
        current = {
            name: compute_match.config_fingerprint(_yaml_text(config))
            for name, config in self.train_configs.items()
            if name in measured.get("btx_configs", {})
        }
        if current != measured["btx_configs"]:
            return {}
        return {name: int(entry["steps"]) for name, entry in measured["baselines"].items()}

    def _baseline_steps(self, name: str, stage: StageTrain, active: int, measured) -> None:
        mode = self.cfg.baselines.compute_match
        if mode == "none":
            return
        if mode == "time" and name in measured:
            stage.steps = measured[name]
            return
        seq = self.cfg.data.seq_length
        stage.steps = _matched_steps(self.btx_flops, active, _global_batch(stage), seq)

    def baselines(self) -> list[str]:
        cfg, base = self.cfg, self.cfg.baselines
        added: list[str] = []
        if not (base.dense or base.sparse_upcycling):
            return added
        matched = self._time_matched() if base.compute_match == "time" else {}
        upcycled = f"{self.run}/baselines/upcycled"
        if base.sparse_upcycling:
            # N copies of the seed, merged with the BTX merge's flags: the same architecture
            seed = self.seed_checkpoint
            argv = self._merge_argv(
                [seed] * len(self.names),
                seed if cfg.merge.seed_as_expert else None,
                upcycled,
                "random",
            )
            self.stages.append(
                Stage(
                    "upcycle_merge",
                    "merge",
                    argv,
                    list(self.seed_deps),
                    1,
                    [f"{upcycled}/metadata.json"],
                    workdir=upcycled,
                    group="baseline",
                    checkpoint=upcycled,
                    router=self.router,
                )
            )
        waits: list[str] = []
        if base.compute_match == "time":
            waits = ["match_compute"]
            deps = [f"expert_{n}" for n in self.names] + ["merge", "finetune"]
            deps += ["upcycle_merge"] if base.sparse_upcycling else []
            self.stages.append(
                Stage(
                    "match_compute",
                    "match",
                    ["match-compute", "--run-dir", self.run],
                    deps,
                    1,
                    [f"{self.run}/compute_match.json"],
                    group="baseline",
                )
            )
        if base.dense:
            stage = _merge_stage(cfg.experts, base.dense_train)
            self._baseline_steps("baseline_dense", stage, self.dense_active, matched)
            self.train(
                "baseline_dense",
                f"{self.run}/baselines/dense",
                stage,
                self.blend,
                self.seed_checkpoint,
                self.seed_deps + waits,
                self.dense_active,
                "baseline",
            )
            added.append("baseline_dense")
        if base.sparse_upcycling:
            stage = _merge_stage(cfg.finetune, base.sparse_upcycling_train)
            self._baseline_steps("baseline_sparse_upcycling", stage, self.moe_active, matched)
            # the finetune's router and load balancing: only the initialisation differs
            self.train(
                "baseline_sparse_upcycling",
                f"{self.run}/baselines/sparse_upcycling",
                stage,
                self.blend,
                upcycled,
                ["upcycle_merge", *waits],
                self.moe_active,
                "baseline",
                self.finetune_moe_section(),
            )
            added.append("baseline_sparse_upcycling")
        return added

    def evaluate(self, deps: list[str]) -> None:
        run = self.run
        self.stages.append(
            Stage(
                "evaluate",
                "eval",
                ["evaluate", "--run-dir", run, "--no-table"],
                deps,
                1,
                [f"{run}/eval/results.json", f"{run}/eval/results.md"],
                workdir=f"{run}/eval",
                group="shared",
            )
        )


def build_plan(
    config_path_or_obj: Any, run_dir: str | os.PathLike[str] | None = None, write: bool = True
) -> list[Stage]:
    """Stages of the BTX run described by `config_path_or_obj` (YAML path, dict or BTXConfig),
    in a valid execution order. With `write`, saves RUN/btx.yaml, RUN/plan.json and each train
    stage's config under RUN/configs/. `run_dir` overrides the config's."""
    cfg = btx_config.load(config_path_or_obj)
    if run_dir is not None:
        cfg.run_dir = os.fspath(run_dir)
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    planner = _Planner(cfg)
    planner.seed(planner.data())
    merged = planner.merge(planner.experts())
    planner.finetune(merged)
    baselines = planner.baselines()
    experts = [f"expert_{n}" for n in planner.names]
    planner.evaluate(["finetune", *experts, *planner.seed_deps, *baselines])
    _check(planner.stages)
    if write:
        write_plan(cfg, Plan(planner.stages, planner.seed_checkpoint), planner.train_configs)
    return planner.stages


def _check(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for s in stages:
        if s.kind not in KINDS:
            raise BTXError(f"stage {s.name}: unknown kind {s.kind!r}")
        for d in s.deps:
            if d not in seen:
                raise BTXError(f"stage {s.name} depends on {d!r}, which is not before it")
        if s.name in seen:
            raise BTXError(f"duplicate stage {s.name}")
        seen.add(s.name)


def _yaml_text(train_config: dict[str, Any]) -> str:
    """A train stage's config file exactly as write_plan writes it."""
    return yaml.safe_dump(train_config, sort_keys=False, default_flow_style=False)


def write_plan(cfg: BTXConfig, plan: Plan, train_configs: dict[str, dict]) -> None:
    run = Path(cfg.run_dir)
    (run / "configs").mkdir(parents=True, exist_ok=True)
    for name, train_cfg in train_configs.items():
        rundir.atomic_write_text(run / "configs" / f"{name}.yaml", _yaml_text(train_cfg))
    rundir.atomic_write_text(run / "btx.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_plan(run, plan)
