"""The merge plan: what each output tensor is made of, decided once from the settings and the
sources, before anything is read, and recorded in the output's manifest."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from megatron_btx.checkpoint.sources import DTYPE_NAMES, Source
from megatron_btx.errors import BTXError
from megatron_btx.merge.settings import MergeSettings
from megatron_btx.models.llama import LlamaArgs, MoEVariant, to_dtype


@dataclasses.dataclass
class MergePlan:
    """Everything that decides the output, recorded in the manifest."""

    n_sources: int
    expert_sources: list[int]  # routed expert j (before splitting) <- source index
    weights: list[float]  # per source, for the averages
    split_chunks: int = 1
    blend: bool = False
    shared_source: int | None = None  # source whose FFN is the shared expert
    moe_layers: list[int] | None = None  # None: every layer
    dense_ffn: str = "average"  # FFN of non-MoE layers: average | seed (last source)
    top_k: int = 2
    dtype: str = "bf16"
    #: average (BTX) | experts | experts_shared_kv (BAM: merge.attention)
    attention: str = "average"
    #: attention expert e <- source attention_sources[e] (every source, in order; [] = average)
    attention_sources: list[int] = dataclasses.field(default_factory=list)
    #: Drop-Upcycling of the routed experts (merge.upcycling): ratio and seed
    drop_ratio: float = 0.0
    drop_seed: int = 0
    #: the factor on every routed expert's weights (granular upcycling's scale; 1: none)
    expert_scale: float = 1.0

    @property
    def num_experts(self) -> int:
        if self.blend:
            return self.split_chunks
        return len(self.expert_sources) * self.split_chunks

    def expert_size(self, ffn: int) -> int:
        if self.blend:
            return ffn * len(self.expert_sources) // self.split_chunks
        return ffn // self.split_chunks

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers is None or layer in self.moe_layers

    def layer_freq(self, num_layers: int) -> tuple[int, ...] | None:
        if self.moe_layers is None:
            return None
        return tuple(1 if i in self.moe_layers else 0 for i in range(num_layers))

    def routed_expert_sources(self) -> list[int]:
        """The source each routed expert comes from (after splitting)."""
        if self.blend:
            raise BTXError("blended experts have no source of their own (each mixes all)")
        return [s for s in self.expert_sources for _ in range(self.split_chunks)]

    def output_args(self, dense: LlamaArgs) -> LlamaArgs:
        """The merged MoE's hyper-parameters (Mixtral fields) from the sources' dense ones."""
        fields = dense.to_dict()
        fields.update(
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            intermediate_size=self.expert_size(dense.intermediate_size),
        )
        return LlamaArgs.from_dict(fields)

    def variant(self, dense: LlamaArgs) -> MoEVariant:
        """What the output needs beyond a Mixtral shape (shared expert, dense layers)."""
        layer_freq = self.layer_freq(dense.num_hidden_layers)
        return MoEVariant(
            shared_expert_intermediate_size=(
                dense.intermediate_size if self.shared_source is not None else None
            ),
            layer_freq=layer_freq,
            dense_ffn_hidden_size=dense.intermediate_size if layer_freq is not None else None,
            attention_experts=len(self.attention_sources),
            attention_shared_kv=self.attention == "experts_shared_kv",
        )


def parse_layers(spec: str | None, num_layers: int, name: str = "--moe-layers") -> list[int] | None:
    """`all` | `0,2,5` | `every:2` (layers 0,2,4,..) | `last:4` -> sorted layers (None: all);
    `name`: the setting as the user gave it, for errors."""
    if spec is None or spec == "all":
        return None
    try:
        if spec.startswith("every:"):
            layers = list(range(0, num_layers, int(spec.split(":", 1)[1])))
        elif spec.startswith("last:"):
            count = int(spec.split(":", 1)[1])
            layers = list(range(max(0, num_layers - count), num_layers))
        else:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as e:
        raise BTXError(f"{name} {spec!r}: use all, 0,2,5, every:K or last:K") from e
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise BTXError(f"{name} {spec!r}: layer {bad[0]} outside 0..{num_layers - 1}")
    if not layers:
        raise BTXError(f"{name} {spec!r} selects no layer")
    return None if len(layers) == num_layers else layers


def _weights(settings: MergeSettings, n: int) -> list[float]:
    if settings.average_weights is None:
        return [1.0] * n
    weights = [float(x) for x in settings.average_weights]
    if len(weights) != n:
        raise BTXError(
            f"{settings.name('average_weights')} has {len(weights)} values for {n} sources "
            f"(experts, then the seed)"
        )
    if any(not math.isfinite(x) or x < 0 for x in weights) or sum(weights) <= 0:
        raise BTXError(
            f"{settings.name('average_weights')} must be finite and non-negative, with a "
            f"positive sum"
        )
    return weights


def _expert_map(settings: MergeSettings, n: int, shared: int | None) -> list[int]:
    if settings.expert_map is None:
        return list(range(n - 1 if shared is not None else n))
    emap = [int(x) for x in settings.expert_map]
    if not emap or any(not 0 <= x < n for x in emap):
        raise BTXError(
            f"{settings.name('expert_map')} {list(settings.expert_map)}: indices must be in "
            f"0..{n - 1} (experts in "
            f"order, then the seed)"
        )
    return emap


def _output_dtype(settings: MergeSettings, sources: Sequence[Source]) -> str:
    if settings.dtype is not None:
        return DTYPE_NAMES[to_dtype(settings.dtype)]
    widest = sources[0].dtype
    for source in sources[1:]:  # bf16 and fp16 promote to fp32, which holds both exactly
        widest = torch.promote_types(widest, source.dtype)
    return DTYPE_NAMES[widest]


def make_plan(sources: Sequence[Source], settings: MergeSettings) -> MergePlan:
    """The plan for these (checked) sources; every inconsistent choice is an error naming it."""
    return plan_for(settings, sources[0].args, len(sources), _output_dtype(settings, sources))


def plan_for(settings: MergeSettings, dense: LlamaArgs, n: int, dtype: str = "bf16") -> MergePlan:
    """The plan for `n` sources of architecture `dense`, before any is opened (the pipeline
    plans the merged model's shape this way, from the merge's own command line)."""
    shared = n - 1 if settings.seed_as_shared_expert else None
    emap = _expert_map(settings, n, shared)
    chunks = settings.split_chunks
    ffn = dense.intermediate_size
    if ffn % chunks:
        raise BTXError(
            f"{settings.name('split_chunks')} {chunks} does not divide intermediate_size {ffn}"
        )
    if settings.blend and chunks == 1:
        chunks = len(emap)
        if ffn % chunks:
            raise BTXError(
                f"{settings.name('blend')} uses {chunks} chunks, which does not divide "
                f"intermediate_size {ffn}; set {settings.name('split_chunks')}"
            )
    plan = MergePlan(
        n_sources=n,
        expert_sources=emap,
        weights=_weights(settings, n),
        split_chunks=chunks,
        blend=settings.blend,
        shared_source=shared,
        moe_layers=parse_layers(
            settings.moe_layers, dense.num_hidden_layers, settings.name("moe_layers")
        ),
        dense_ffn=settings.dense_ffn,
        top_k=0,
        dtype=dtype,
        attention=settings.attention,
        attention_sources=[] if settings.attention == "average" else list(range(n)),
    )
    if settings.dense_ffn == "seed" and settings.seed is None and plan.moe_layers is not None:
        raise BTXError(f"{settings.name('dense_ffn')} seed needs {settings.name('seed')}")
    experts = plan.num_experts
    top_k = settings.top_k
    if top_k is None:
        top_k = min(experts, 2 * (1 if settings.blend else chunks))
    if not 1 <= top_k <= experts:
        raise BTXError(
            f"{settings.name('top_k')} {top_k} must be between 1 and the number of experts "
            f"({experts})"
        )
    plan.top_k = top_k
    plan.drop_ratio, plan.drop_seed = float(settings.drop_ratio), settings.drop_seed
    if settings.upcycling_scale != "none":
        from megatron_btx.merge.upcycling import weight_scale

        pre_softmax = settings.upcycling_scale == "pre_softmax"
        plan.expert_scale = weight_scale(chunks, experts, top_k, pre_softmax)
    return plan


@dataclasses.dataclass
class ReadPlan:
    """Sources given more than once (sparse upcycling: N copies of one checkpoint) are read
    once. `alias[i]` is source i's read, `first[u]` the first source of read u, and `plan` the
    merge plan over reads (sources renumbered, the weights of repeated sources summed). The
    merge and its verification share it."""

    alias: list[int]
    first: dict[int, int]
    plan: MergePlan

    @property
    def reads(self) -> list[int]:
        return sorted(self.first)

    @classmethod
    def of(cls, sources: Sequence[Source], plan: MergePlan) -> ReadPlan:
        unique: dict[object, int] = {}
        alias = [unique.setdefault(s.folder.resolve(), len(unique)) for s in sources]
        first = {u: alias.index(u) for u in set(alias)}
        weights = [0.0] * len(unique)
        for i, u in enumerate(alias):
            weights[u] += plan.weights[i]
        if len(unique) == 1:
            weights = [1.0]  # copies of one model: its own tensors, not (n x t) / n in fp32
        shared = plan.shared_source
        read_plan = dataclasses.replace(
            plan,
            weights=weights,
            expert_sources=[alias[s] for s in plan.expert_sources],
            attention_sources=[alias[s] for s in plan.attention_sources],
            shared_source=None if shared is None else alias[shared],
            n_sources=len(unique),
        )
        if plan.dense_ffn == "seed" and plan.moe_layers is not None:
            # the dense layers take the last read's FFN: the seed must be that read
            if alias[plan.n_sources - 1] != len(unique) - 1:
                raise BTXError("--dense-ffn seed: the seed must not also be given as an expert")
        return cls(alias, first, read_plan)
