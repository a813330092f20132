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
from pathlib import Path
from typing import Any

import yaml

from megatron_btx import rundir
from megatron_btx.errors import BTXError
from megatron_btx.merge.settings import MergeSettings
from megatron_btx.models.router_settings import COMMON
from megatron_btx.pipeline import compute_match
from megatron_btx.pipeline import config as btx_config
from megatron_btx.pipeline.config import BTXConfig, StageTrain
from megatron_btx.pipeline.models import BTX, MERGED, SEED, ModelSpec, expert_name
from megatron_btx.pipeline.plan_checks import KINDS
from megatron_btx.pipeline.stage_configs import (
    combine_stages,
    final_checkpoint,
    global_batch,
    matched_steps,
    model_options,
    train_config,
    train_stage,
)
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
    "Planner",
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
def _resolve_checkpoint(path: str) -> str:
    """A megatron checkpoint folder from a checkpoint, a `checkpoints` folder or a run dir."""
    found = rundir.resolve_checkpoint(path)
    return str(found) if found is not None else str(path)


def _is_hf(path: str) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not rundir.is_checkpoint(p)


def seed_args(cfg: BTXConfig):
    """The dense architecture (LlamaArgs) of the seed and experts, as far as known at plan time
    (the vocabulary is the tokenizer's; data.vocab_size until the data is prepared)."""
    from megatron_btx.checkpoint.families import read_plain_args
    from megatron_btx.models.llama import LlamaArgs

    if cfg.seed.init_from:
        src = cfg.seed.init_from
        if _is_hf(src):
            return read_plain_args(Path(src) / "config.json")
        from megatron_btx.checkpoint.megatron_io import read_args

        return read_args(_resolve_checkpoint(src))
    arch = {k: v for k, v in cfg.model.items() if k not in model_options()}
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
# The plan
# ---------------------------------------------------------------------------------------------
class Planner:
    """Builds a run's stages in order; each method adds one part of the plan, and the baselines
    (:mod:`megatron_btx.pipeline.baselines`) add theirs through :meth:`stage_like`,
    :meth:`train_baseline`, :meth:`merge_stage` and :meth:`add_model`. Pure: it reads the config
    (and a given seed's or prepared data's metadata) and writes nothing."""

    def __init__(self, cfg: BTXConfig):
        from megatron_btx.models.compute import active_params

        self.cfg = cfg
        self.run = cfg.run_dir
        self.names = cfg.expert_names  # one expert each
        self.domains = cfg.all_domain_names  # prepared and evaluated (with extend's)
        self.stages: list[Stage] = []
        self.models: list[ModelSpec] = []
        self.train_configs: dict[str, dict[str, Any]] = {}
        self.blend = {n: w for n, w in cfg.weights().items() if w > 0}
        self.dense_args = seed_args(cfg)
        self.dense_active = active_params(self.dense_args)
        finetune_parallel = cfg.finetune.parallel or {}
        self.moe_layout = {k: int(finetune_parallel.get(k, 1)) for k in ("tp", "pp", "ep")}
        self.router = cfg.finetune.router or {"type": COMMON["type"]}
        #: (LlamaArgs, MoEVariant) of the MoE each merge stage writes, by stage name
        self.shapes: dict[str, Any] = {}
        self.moe_args, self.variant = self._merged_shape()
        self.moe_active = active_params(self.moe_args, self.router, self.variant)
        self.btx_flops = 0.0
        self.data_path = ""
        self.seed_checkpoint = ""
        self.seed_deps: list[str] = []
        self.expert_stages: list[Stage] = []
        self.match_deps: list[str] = []
        self.measured: dict[str, int] = {}

    # ---- the merge ----------------------------------------------------------------------------
    def merge_settings(
        self, experts: list[str], save: str, seed: str | None = None, **choices: Any
    ) -> MergeSettings:
        """The `btx merge` settings of a merge of `experts` (and `seed`) into `save`: the run
        config's merge settings, the finetune's layout, `choices` over them; checked."""
        settings = MergeSettings.from_choices(
            {**self.cfg.merge.settings, **choices},
            experts=list(experts),
            seed=seed,
            save=save,
            overwrite=True,
            progress=False,
            **self.moe_layout,
        )
        settings.validate()
        return settings

    def _merged_shape(self, **choices: Any):
        """(LlamaArgs, MoEVariant) of the merged MoE, planned by the merge's own plan from the
        settings the merge stage will get (`choices` over the run's): never out of step."""

        seed = SEED if self.cfg.merge.seed_as_expert else None
        choices = {**choices, "router_init": "random"}  # the shape does not depend on it
        settings = self.merge_settings(
            [expert_name(n) for n in self.names], "merged", seed, **choices
        )
        return self.shape_of(settings)

    def shape_of(self, settings: MergeSettings):
        """(LlamaArgs, MoEVariant) of the MoE a merge with these settings writes."""
        from megatron_btx.merge.plan import plan_for

        try:
            merge_plan = plan_for(settings, self.dense_args, len(settings.source_paths))
        except BTXError as e:
            raise BTXError(f"{self.cfg.source or 'config'}: {e}") from e
        return merge_plan.output_args(self.dense_args), merge_plan.variant(self.dense_args)

    def active_of(self, merge: Stage) -> int:
        """Active parameters of the MoE merge stage `merge` leaves, under the run's router."""
        from megatron_btx.models.compute import active_params

        args, variant = self.shapes[merge.name]
        return active_params(args, self.router, variant)

    def merge_stage(
        self,
        name: str,
        experts: list[str],
        folder: str,
        deps: list[str],
        group: str = "btx",
        with_seed: bool | None = None,
        **choices: Any,
    ) -> Stage:
        """A merge stage of `experts` (and the seed, when the run keeps it as an expert, or as
        `with_seed` says) into RUN/`folder`, with the run's merge settings and `choices` over
        them."""
        save = f"{self.run}/{folder}"
        with_seed = self.cfg.merge.seed_as_expert if with_seed is None else with_seed
        seed = self.seed_checkpoint if with_seed else None
        settings = self.merge_settings(experts, save, seed, **choices)
        self.shapes[name] = self.shape_of(settings)
        stage = Stage(
            name,
            "merge",
            ["merge", *settings.to_argv()],
            list(deps),
            1,
            [f"{save}/metadata.json"],
            workdir=save,
            group=group,
            checkpoint=save,
            router=self.router,
        )
        self.stages.append(stage)
        return stage

    # ---- training ---------------------------------------------------------------------------
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
        time_like: str | None = None,
    ) -> Stage:
        train_cfg = train_config(self.cfg, run, stage, self.data_path, domains, init_from, moe)
        self.train_configs[name] = train_cfg
        added = train_stage(name, self.run, train_cfg, deps, stage.nproc, active, group)
        added.time_like = time_like
        self.stages.append(added)
        return added

    def stage_like(self, which: str, overrides: StageTrain | None) -> StageTrain:
        """A baseline's training stage: the experts' (``experts``) or the finetune's
        (``finetune``) stage settings, with the baseline's own over them."""
        base = {"experts": self.cfg.experts, "finetune": self.cfg.finetune}[which]
        return combine_stages(base, overrides)

    def train_baseline(
        self,
        name: str,
        folder: str,
        stage: StageTrain,
        init_from: str,
        deps: list[str],
        moe: bool,
        domains: list[str] | dict[str, float] | None = None,
        active: int | None = None,
        builds_on: list[Stage] | None = None,
    ) -> Stage:
        """A baseline's training stage from `init_from` on `domains` (default: the blend), at
        BTX's compute (``baselines.compute_match``), in RUN/baselines/`folder`: a dense model
        (`moe` false) trains as the experts did and is timed like them; an MoE as the finetune
        (its router and load balancing). `active`: its active parameters, when not BTX's MoE's
        (or the dense model's) shape (:meth:`active_of` a merge stage). `builds_on`: BTX's own
        stages the baseline starts from (BAM: the experts); their compute is part of its
        budget, so it trains for what is left of BTX's."""
        if active is None:
            active = self.moe_active if moe else self.dense_active
        spent = sum(s.flops for s in builds_on or [])
        self._baseline_steps(name, stage, active, self.btx_flops - spent)
        added = self.train(
            name,
            f"{self.run}/baselines/{folder}",
            stage,
            self.blend if domains is None else domains,
            init_from,
            list(deps) + self.match_deps,
            active,
            "baseline",
            self.finetune_moe_section() if moe else None,
            time_like="finetune" if moe else "experts",
        )
        added.builds_on = [s.name for s in builds_on or []]
        return added

    def add_model(self, spec: ModelSpec) -> None:
        if any(m.name == spec.name for m in self.models):
            raise BTXError(f"two models of the run are called {spec.name!r}")
        self.models.append(spec)

    # ---- the run's own stages ---------------------------------------------------------------
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
        spec = ModelSpec(SEED, "dense", "rival", part="seed", order=0)
        self.add_model(spec)
        if not cfg.seed.init_from:
            stage = combine_stages(cfg.seed.pretrain)
            run = f"{self.run}/seed"
            # the seed's own data (the paper's: general text no expert specialises in)
            data = {n: 1.0 for n in cfg.seed.domains} if cfg.seed.domains else self.blend
            added = self.train(SEED, run, stage, data, None, data_deps, self.dense_active, "shared")
            self.seed_checkpoint = spec.checkpoint = added.checkpoint
            spec.stage = added.name
            self.seed_deps = [added.name]
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
            spec.checkpoint, spec.stage = self.seed_checkpoint, "import_seed"
            return
        self.seed_checkpoint = spec.checkpoint = _resolve_checkpoint(src)
        if not rundir.is_checkpoint(self.seed_checkpoint):
            raise BTXError(f"seed.init_from={src}: not a megatron checkpoint or run dir")

    def experts(self) -> list[str]:
        checkpoints = []
        for domain in self.names:
            name = expert_name(domain)
            added = self.train(
                name,
                f"{self.run}/experts/{domain}",
                combine_stages(self.cfg.experts),
                [domain],
                self.seed_checkpoint,
                self.seed_deps,
                self.dense_active,
                "btx",
            )
            self.btx_flops += added.flops
            self.expert_stages.append(added)
            checkpoints.append(added.checkpoint)
            self.add_model(
                ModelSpec(
                    name,
                    "dense",
                    "reference",
                    checkpoint=added.checkpoint,
                    stages=[name],
                    stage=name,
                    part="expert",
                    domain=domain,
                    order=10,
                    label=f"the {domain} expert",
                )
            )
        return checkpoints

    def merge_experts(self, name: str, folder: str, group: str = "btx", **choices: Any) -> Stage:
        """A merge of the run's experts (and the seed, when the run keeps it as an expert) into
        RUN/`folder`, with the run's merge settings and `choices` over them; a data-driven
        router init gets the run's data: each expert its domain's training set, the seed (the
        generalist) a sample of the whole blend."""
        from megatron_btx.merge import router_inits

        prefix = f"{self.data_path}/{{}}_train_text_document"
        data = [prefix.format(n) for n in self.names]
        if self.cfg.merge.seed_as_expert:
            data.append(",".join(f"{prefix.format(n)}@{w:g}" for n, w in self.blend.items()))
        init = router_inits.get(choices.get("router_init", self.cfg.merge.value("router_init")))
        experts = [s.name for s in self.expert_stages]
        checkpoints = [s.checkpoint for s in self.expert_stages]
        deps = experts + self.seed_deps
        choices = {**init.run_settings(data), **choices}
        return self.merge_stage(name, checkpoints, folder, deps, group, **choices)

    def merge(self) -> Stage:
        """The MiX step: the experts (and the seed) merged into the BTX MoE."""
        stage = self.merge_experts("merge", "merged")
        self.add_model(
            ModelSpec(
                MERGED,
                "moe",
                "reference",
                checkpoint=stage.checkpoint,
                stages=[*(s.name for s in self.expert_stages), stage.name],
                stage=stage.name,
                part="merged",
                router=self.router,
                order=90,
                label="the merge before finetuning",
            )
        )
        return stage

    def finetune_moe_section(self) -> dict[str, Any]:
        finetune = self.cfg.finetune
        return {
            "aux_loss_coeff": finetune.aux_loss_coeff,
            "load_balancing": finetune.load_balancing,
            "router": self.router,
        }

    def finetune(self, merged: Stage) -> None:
        stage = combine_stages(self.cfg.finetune)
        added = self.train(
            "finetune",
            f"{self.run}/finetune",
            stage,
            self.blend,
            merged.checkpoint,
            [merged.name],
            self.moe_active,
            "btx",
            self.finetune_moe_section(),
        )
        self.btx_flops += added.flops
        experts = [s.name for s in self.expert_stages]
        self.add_model(
            ModelSpec(
                BTX,
                "moe",
                "btx",
                checkpoint=added.checkpoint,
                stages=[*experts, merged.name, added.name],
                stage=added.name,
                router=self.router,
                order=100,
                label="BTX",
            )
        )

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

    def _baseline_steps(self, name: str, stage: StageTrain, active: int, budget: float) -> None:
        mode = self.cfg.baselines.compute_match
        if mode == "none":
            return
        if mode == "time" and name in self.measured:
            stage.steps = self.measured[name]
            return
        seq = self.cfg.data.seq_length
        if budget <= 0:
            raise BTXError(f"{name}: the stages it builds on already spend BTX's whole compute")
        stage.steps = matched_steps(budget, active, global_batch(stage), seq)

    def baselines(self) -> None:
        """Every enabled baseline's stages and models, after the BTX stages they match."""
        from megatron_btx.pipeline import baselines as registry

        config = self.cfg.baselines
        enabled = [registry.get(n) for n in registry.names() if config.on(n)]
        if config.compute_match == "time" and any(b.trains for b in enabled):
            self.measured = self._time_matched()
            self.match_deps = ["match_compute"]
            self.stages.append(
                Stage(
                    "match_compute",
                    "match",
                    ["match-compute", "--run-dir", self.run],
                    [*(s.name for s in self.expert_stages), "merge", "finetune"],
                    1,
                    [f"{self.run}/compute_match.json"],
                    group="baseline",
                )
            )
        for baseline in enabled:
            baseline.plan(self, config.train.get(baseline.name))

    def evaluate(self) -> None:
        run = self.run
        deps = [s.name for s in self.stages]
        self.stages.append(
            Stage(
                "evaluate",
                "eval",
                ["evaluate", "--run-dir", run, "--no-table", *self.cfg.evaluation.lm_eval.argv()],
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
    planner = Planner(cfg)
    planner.seed(planner.data())
    planner.experts()
    planner.finetune(planner.merge())
    planner.baselines()
    if cfg.extend is not None:  # domains added to the finetuned MoE
        from megatron_btx.pipeline.extend import plan_extend

        plan_extend(planner)
    planner.evaluate()
    _check(planner.stages)
    if write:
        plan = Plan(planner.stages, planner.seed_checkpoint, planner.models)
        write_plan(cfg, plan, planner.train_configs)
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
