"""The rivals a BTX run trains beside BTX: one registry entry per baseline.

An entry is named by its run config key (``baselines.<name>: true|false``, or a mapping of the
baseline's own options, which turns it on: ``baselines.granular_upcycling: {granularity: 4}``;
a training baseline also takes ``baselines.<name>_train``, train-stage keys over its defaults). When enabled, its
:meth:`Baseline.plan` adds its stages to the plan through the planner
(:class:`~megatron_btx.pipeline.plan.Planner`: train and merge stages, compute matching) and
names the models it leaves (:class:`~megatron_btx.pipeline.models.ModelSpec`, role ``rival``),
which the evaluator scores and compares with BTX like any other. A new baseline is one class
decorated with :func:`register` (here or in a plugin, :mod:`megatron_btx.plugins`).

The paper's three:

``dense``
    the seed continued on the blend (the experts' stage settings), at BTX's compute;
``sparse_upcycling``
    copies of the seed's FFN merged into an MoE with the BTX merge's settings and a random
    router, trained on the blend like the finetune (its router and load balancing), at BTX's
    compute;
``btm``
    the experts kept apart and ensembled at evaluation (Branch-Train-Merge): per held-out
    document the k experts whose training data is closest (tf-idf) average their next-token
    distributions, for each k of ``evaluation.btm_top_k``; nothing to train.

Beyond the paper, the family around BTX (off unless the run config turns them on):

``drop_upcycling``
    sparse upcycling with Drop-Upcycling (Nakamura et al., ICLR 2025): in every expert,
    ``drop_ratio`` (the paper's 0.5) of the seed's FFN units re-initialised, each expert its own
    subset (``btx merge --drop-ratio``); trained like sparse upcycling;
``granular_upcycling``
    megatron-core's granular upcycling (He et al., arXiv 2410.07524): the seed's FFN split into
    ``granularity`` shards, copied into ``num_experts`` experts (default: granularity x BTX's
    expert count, BTX's parameters), the virtual-group router, the weights scaled by the MoE
    activation scale ^ 1/3 for the run's router; as many FFN widths per token as BTX's experts
    (top-k = granularity x BTX's top-k), so its compute counts its own fine-grained experts.

``bam``
    Branch-Attend-Mix (Zhang et al. 2024): the same experts merged with their attention kept as
    attention experts (``merge.attention: experts``), finetuned like BTX for what is left of BTX's
    compute after the experts they share (at its own, larger, active parameters); its
    merge before finetuning is shown too (``bam_merge_only``, for the merge diagnostics).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from megatron_btx.errors import BTXError
from megatron_btx.pipeline.models import ModelSpec
from megatron_btx.registry import Registry

__all__ = ["Baseline", "get", "names", "register"]


class Baseline:
    """One baseline (see the module docstring)."""

    name: ClassVar[str] = ""
    #: planned unless the run config turns it off
    default: ClassVar[bool] = True
    #: it trains: ``baselines.<name>_train`` overrides its training stage
    trains: ClassVar[bool] = True
    #: its place among the results' rows
    order: ClassVar[int] = 50
    #: its own options (``baselines.<name>: {KEY: VALUE}``) and their defaults
    options: ClassVar[dict[str, Any]] = {}

    def check_options(self, options: dict[str, Any], where: str) -> None:
        """Raise a BTXError naming ``baselines.<name>.<key>`` (in `where`) for a value the
        baseline cannot use; `options`: every option, defaults filled in."""

    def plan(self, planner: Any, train: Any) -> None:
        """Add the baseline's stages and models to the plan, through `planner` (the run's
        :class:`~megatron_btx.pipeline.plan.Planner`); `train`: the run config's
        ``baselines.<name>_train`` (a :class:`~megatron_btx.pipeline.config.StageTrain`), or
        None."""
        raise NotImplementedError


_REGISTRY: Registry[Baseline] = Registry(
    "baseline", valid=lambda name: name.isidentifier() and not name.endswith("_train")
)
#: class decorator: make a Baseline subclass the baseline named by its ``name``
register = _REGISTRY.register
names = _REGISTRY.names
get = _REGISTRY.get


@register
class Dense(Baseline):
    name = "dense"
    order = 20

    def plan(self, planner, train):
        stage = planner.stage_like("experts", train)
        added = planner.train_baseline(
            "baseline_dense",
            "dense",
            stage,
            init_from=planner.seed_checkpoint,
            deps=planner.seed_deps,
            moe=False,
        )
        planner.add_model(
            ModelSpec(
                self.name,
                "dense",
                "rival",
                checkpoint=added.checkpoint,
                stages=[added.name],
                stage=added.name,
                order=self.order,
                label="dense",
            )
        )


def _upcycled(
    baseline: Baseline,
    planner: Any,
    train: Any,
    merge_name: str,
    folder: str,
    copies: int,
    label: str,
    **choices: Any,
) -> None:
    """Copies of the seed merged into an MoE (the run's merge settings, `choices` over them),
    then trained on the blend like the finetune (its router and load balancing: only the init
    differs), at BTX's compute counted at the MoE's own active size."""
    # the merge adds the seed itself when the run keeps it as an expert
    with_seed = planner.cfg.merge.seed_as_expert and copies > 1
    merged = planner.merge_stage(
        merge_name,
        [planner.seed_checkpoint] * (copies - int(with_seed)),
        folder,
        deps=planner.seed_deps,
        group="baseline",
        with_seed=with_seed,
        **choices,
    )
    added = planner.train_baseline(
        f"baseline_{baseline.name}",
        baseline.name,
        planner.stage_like("finetune", train),
        init_from=merged.checkpoint,
        deps=[merged.name],
        moe=True,
        active=planner.active_of(merged),
    )
    planner.add_model(
        ModelSpec(
            baseline.name,
            "moe",
            "rival",
            checkpoint=added.checkpoint,
            stages=[merged.name, added.name],
            stage=added.name,
            router=planner.router,
            order=baseline.order,
            label=label,
        )
    )


def _btx_sources(planner: Any) -> int:
    """The BTX merge's sources: one expert per expert domain, and the seed when kept."""
    return len(planner.names) + (1 if planner.cfg.merge.seed_as_expert else 0)


#: what upcycling baselines take from no run setting: plain copies of the seed's FFN
_PLAIN = {"drop_ratio": 0.0, "upcycling_scale": "none"}


@register
class SparseUpcycling(Baseline):
    name = "sparse_upcycling"
    order = 40

    def plan(self, planner, train):
        # copies of the seed, merged with the BTX merge's settings: the same architecture
        _upcycled(
            self,
            planner,
            train,
            "upcycle_merge",
            "baselines/upcycled",
            _btx_sources(planner),
            "sparse upcycling",
            router_init="random",
            **_PLAIN,
        )


@register
class DropUpcycling(Baseline):
    name = "drop_upcycling"
    default = False
    order = 42
    options = {"drop_ratio": 0.5}

    def check_options(self, options, where):
        ratio = options["drop_ratio"]
        ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if not ok or not 0 < ratio <= 1:
            raise BTXError(
                f"{where}: baselines.{self.name}.drop_ratio={ratio!r} must be a number in (0, 1]"
            )

    def plan(self, planner, train):
        ratio = float(planner.cfg.baselines.options_of(self.name)["drop_ratio"])
        _upcycled(
            self,
            planner,
            train,
            "drop_merge",
            "baselines/drop_upcycled",
            _btx_sources(planner),
            f"Drop-Upcycling r={ratio:g}",
            router_init="random",
            **{**_PLAIN, "drop_ratio": ratio},
        )


@register
class GranularUpcycling(Baseline):
    name = "granular_upcycling"
    default = False
    order = 44
    options = {"granularity": 2, "num_experts": None}

    def check_options(self, options, where):
        for key in ("granularity", "num_experts"):
            value = options[key]
            if value is None and key == "num_experts":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BTXError(
                    f"{where}: baselines.{self.name}.{key}={value!r} must be an integer >= 1"
                )
        experts = options["num_experts"]
        if experts is not None and experts % options["granularity"]:
            raise BTXError(
                f"{where}: baselines.{self.name}.num_experts={experts} must be a multiple of "
                f"its granularity {options['granularity']} (E/G copies of G shards)"
            )

    def plan(self, planner, train):
        from megatron_btx.models import router_types
        from megatron_btx.models.router_settings import type_name

        options = planner.cfg.baselines.options_of(self.name)
        granularity = options["granularity"]
        experts = options["num_experts"] or granularity * _btx_sources(planner)
        where = f"{planner.cfg.source or 'config'}: baselines.{self.name}"
        ffn = planner.dense_args.intermediate_size
        if ffn % granularity:
            raise BTXError(f"{where}.granularity={granularity} does not divide the FFN {ffn}")
        # as many FFN widths per token as BTX's routed experts pass
        width = planner.moe_args.num_experts_per_tok * planner.moe_args.intermediate_size
        top_k = width * granularity / ffn
        if top_k != math.floor(top_k) or not 1 <= top_k <= experts:
            raise BTXError(
                f"{where}: BTX's experts pass {width} FFN units per token, not a whole number "
                f"of {experts} shards of {ffn // granularity}; choose another granularity"
            )
        kind = router_types.get(type_name(planner.router) or router_types.DEFAULT)
        _upcycled(
            self,
            planner,
            train,
            "granular_merge",
            "baselines/granular_upcycled",
            experts // granularity,
            f"granular upcycling G={granularity} E={experts}",
            router_init="virtual_group",
            split_chunks=granularity,
            top_k=int(top_k),
            blend=False,
            expert_map=None,
            average_weights=None,
            seed_as_shared_expert=False,
            drop_ratio=0.0,
            upcycling_scale="pre_softmax" if kind.pre_softmax else "topk",
        )


@register
class BTM(Baseline):
    name = "btm"
    trains = False
    order = 30

    def plan(self, planner, train):
        experts = [s.name for s in planner.expert_stages]
        for k in planner.cfg.evaluation.btm_top_k:
            planner.add_model(
                ModelSpec(
                    f"btm_top{k}",
                    "btm",
                    "rival",
                    stages=list(experts),
                    k=int(k),
                    order=self.order,
                    label=f"BTM top-{k}",
                )
            )


@register
class BAM(Baseline):
    name = "bam"
    default = False
    order = 95

    def plan(self, planner, train):
        choices = {"attention": "experts"}
        merged = planner.merge_experts("bam_merge", "baselines/bam_merged", "baseline", **choices)
        experts = [s.name for s in planner.expert_stages]
        added = planner.train_baseline(
            "baseline_bam",
            "bam",
            planner.stage_like("finetune", train),
            init_from=merged.checkpoint,
            deps=[merged.name],
            moe=True,
            active=planner.active_of(merged),
            builds_on=planner.expert_stages,
        )
        planner.add_model(
            ModelSpec(
                "bam_merge_only",
                "moe",
                "reference",
                checkpoint=merged.checkpoint,
                stages=[*experts, merged.name],
                stage=merged.name,
                part="merged",
                router=planner.router,
                order=92,
                label="the BAM merge before finetuning",
            )
        )
        planner.add_model(
            ModelSpec(
                self.name,
                "moe",
                "rival",
                checkpoint=added.checkpoint,
                stages=[*experts, merged.name, added.name],
                stage=added.name,
                router=planner.router,
                order=self.order,
                label="BAM",
            )
        )
