"""The rivals a BTX run trains beside BTX: one registry entry per baseline.

An entry is named by its run config key (``baselines.<name>: true|false``; a training baseline
also takes ``baselines.<name>_train``, train-stage keys over its defaults). When enabled, its
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

Beyond the paper (off unless turned on):

``bam``
    Branch-Attend-Mix (Zhang et al. 2024): the same experts merged with their attention kept as
    attention experts (``merge.attention: experts``), finetuned like BTX at BTX's compute; its
    merge before finetuning is shown too (``bam_merge_only``, for the merge diagnostics).
"""

from __future__ import annotations

from typing import Any, ClassVar

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


@register
class SparseUpcycling(Baseline):
    name = "sparse_upcycling"
    order = 40

    def plan(self, planner, train):
        # N copies of the seed, merged with the BTX merge's settings: the same architecture
        merged = planner.merge_stage(
            "upcycle_merge",
            [planner.seed_checkpoint] * len(planner.names),
            "baselines/upcycled",
            deps=planner.seed_deps,
            group="baseline",
            router_init="random",
        )
        stage = planner.stage_like("finetune", train)
        added = planner.train_baseline(
            "baseline_sparse_upcycling",
            "sparse_upcycling",
            stage,
            init_from=merged.checkpoint,
            deps=[merged.name],
            moe=True,  # the finetune's router and load balancing: only the init differs
        )
        planner.add_model(
            ModelSpec(
                self.name,
                "moe",
                "rival",
                checkpoint=added.checkpoint,
                stages=[merged.name, added.name],
                stage=added.name,
                router=planner.router,
                order=self.order,
                label="sparse upcycling",
            )
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
            active=planner.moe_active_of(**choices),
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
