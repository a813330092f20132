"""Attention experts (BAM, Branch-Attend-Mix; Zhang et al. 2024, arXiv 2408.08274): a mixture
of attention blocks in a megatron-core TransformerLayer.

A BTX merge averages every attention block; BAM keeps each source's attention as an attention
expert. In every layer the layer's ``self_attention`` is a :class:`MixtureOfAttention` of E
attention experts and a router:

    y(x) = sum_e softmax(W x)_e * Attn_e(x)

with soft routing (every token goes to every attention expert, weighted by the router's
softmax over all E; BAM's recommended form), so there is no load-balancing loss. The router
weight W is [E, hidden], in fp32 arithmetic, and each token's weights sum to 1: with identical
experts the mixture is exactly one attention block whatever W is.

Two kinds of expert (``MoEVariant.attention_shared_kv``):

- ``experts``: each expert is megatron-core's own ``SelfAttention`` (its fused ``linear_qkv``,
  core attention, ``linear_proj``, QK-norm), built from the layer spec's attention, so it is
  TP-sharded exactly as a dense layer's attention;
- ``experts_shared_kv``: the key/value projection (and the key norm) is one module shared by
  the experts, ``linear_kv`` (rows grouped per key-value head: its key rows, then its value
  rows, as megatron-core's CrossAttention), computed once per layer; each expert
  (:class:`SharedKVAttentionExpert`, megatron-core's ``Attention`` with its own ``linear_q``)
  has its query projection, query norm and output projection.

Parallelism: each expert's projections are megatron-core's column/row parallel linears, so TP
shards every expert's heads as usual (with sequence parallelism, each expert all-gathers the
layer input and reduce-scatters its output; the router sees the rank's own tokens and its
weight carries ``sequence_parallel`` so megatron all-reduces its gradient over TP). The experts
are not expert-parallel: like the rest of the attention they are replicated over the data
parallel group, so the FFN MoE and its EP in the same layer are unchanged. PP places whole
layers. In torch_dist checkpoints the experts are stacked along an expert axis
(``decoder.layers.self_attention.experts.linear_qkv.weight`` is [layers, E, rows, hidden]) as
megatron-core stacks MoE experts, so they reshard across TP and PP like every other tensor.

The attention experts are always built from megatron-core's local attention modules (its
column/row parallel linears and torch SDPA, or its DotProductAttention), also when the rest of
the layer uses Transformer Engine (whose attention fuses the input norm into the QKV projection,
which the experts do not share); the input norm is then a module of its own, saved under the
same checkpoint key as the fused one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default


@dataclass
class AttentionExpertsConfig(TransformerConfig):
    """megatron-core's TransformerConfig with the attention experts of a layer: the one config
    the layer specs, the layers and every copy megatron makes of the config carry."""

    #: attention experts per layer (0: one ordinary attention block)
    attention_experts: int = 0
    #: the experts share one key/value projection (and key norm)
    attention_shared_kv: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_experts < 0:
            raise ValueError(f"attention_experts={self.attention_experts} must be >= 0")
        if self.attention_shared_kv and not self.attention_experts:
            raise ValueError("attention_shared_kv needs attention_experts > 0")


def experts_of(config: Any) -> int:
    """The attention experts per layer a config asks for (0 for a plain TransformerConfig)."""
    return int(getattr(config, "attention_experts", 0) or 0)


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------
class AttentionRouter(MegatronModule):
    """Soft router over the attention experts: probs = softmax(W x) in fp32, [s, b, E].

    Accumulates routing statistics on the device (no host sync in the forward): the mean
    weight of each expert and the mean entropy of the routing distribution."""

    def __init__(self, config: TransformerConfig, num_experts: int) -> None:
        super().__init__(config=config)
        self.num_experts = num_experts
        self.layer_number: int | None = None
        self.weight = torch.nn.Parameter(
            torch.empty((num_experts, config.hidden_size), dtype=torch.float32)
        )
        if config.perform_initialization:
            config.init_method(self.weight)
        self.weight.data = self.weight.data.to(dtype=config.params_dtype)
        # with sequence parallelism each TP rank routes its own tokens: megatron all-reduces
        # the gradient of parameters marked so over the TP group
        self.weight.sequence_parallel = config.sequence_parallel
        self._stats: dict[str, torch.Tensor] = {}

    def gating(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router logits W x, [s, b, E], in fp32."""
        return torch.nn.functional.linear(hidden_states.float(), self.weight.float())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gating(hidden_states), dim=-1)
        # with full activation recompute, megatron runs a layer's training forward twice: once
        # without grad (the checkpointed pass) and again in the backward; count the tokens once
        checkpointed = self.config.recompute_granularity == "full" and self.training
        if not (checkpointed and not torch.is_grad_enabled()):
            self._record(probs)
        return probs

    @torch.no_grad()
    def _record(self, probs: torch.Tensor) -> None:
        flat = probs.detach().reshape(-1, self.num_experts).double()
        entropy = -(flat * torch.log(flat.clamp_min(1e-30))).sum()
        new = {
            "weight": flat.sum(dim=0),
            "entropy": entropy,
            "tokens": flat.new_tensor(float(flat.shape[0])),
        }
        if not self._stats:
            self._stats = new
        else:
            for key, value in new.items():
                self._stats[key] = self._stats[key] + value

    def read_stats(self, reset: bool = True, group: Any = None) -> dict[str, Any] | None:
        """Since the last reset: ``weight`` (each expert's mean routing weight, sums to 1),
        ``entropy`` (mean entropy of the routing distribution, in [0, log E]) and ``tokens``;
        None when no token was routed. ``group``: sum over a process group first (every rank
        of it must call)."""
        stats = self._stats
        if not stats and group is None:
            return None
        if not stats:
            dev = self.weight.device
            stats = {
                "weight": torch.zeros(self.num_experts, dtype=torch.float64, device=dev),
                "entropy": torch.zeros((), dtype=torch.float64, device=dev),
                "tokens": torch.zeros((), dtype=torch.float64, device=dev),
            }
        if group is not None:
            flat = torch.cat([stats["weight"], stats["entropy"][None], stats["tokens"][None]])
            dist.all_reduce(flat, group=group)
            stats = {"weight": flat[:-2], "entropy": flat[-2], "tokens": flat[-1]}
        if reset:
            self._stats = {}
        tokens = float(stats["tokens"])
        if tokens == 0:
            return None
        return {
            "weight": (stats["weight"] / tokens).cpu().tolist(),
            "entropy": float(stats["entropy"]) / tokens,
            "tokens": int(round(tokens)),
        }


# ---------------------------------------------------------------------------------------------
# The shared-KV expert
# ---------------------------------------------------------------------------------------------
@dataclass
class SharedKVExpertSubmodules:
    """An attention expert whose keys and values come from the mixture's shared projection."""

    linear_q: Any
    core_attention: Any
    linear_proj: Any
    q_layernorm: Any = None


class SharedKVAttentionExpert(Attention):
    """megatron-core's ``Attention`` (RoPE, core attention, output projection) with a query
    projection of its own; the keys and values arrive through ``key_value_states`` as the pair
    (key, value) the mixture computed once for all experts ([s, b, groups per rank, head
    dim] each, the key already normalised)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SharedKVExpertSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type="self",
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **kwargs,
        )
        if config.num_query_groups < self.world_size:
            raise ValueError("shared-KV attention experts need TP <= num_query_groups")
        if config.attention_output_gate:
            raise ValueError("shared-KV attention experts do not support an output gate")
        self.linear_q = build_module(
            submodules.linear_q,
            config.hidden_size,
            self.query_projection_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="q",
            tp_group=self.pg_collection.tp,
        )
        self.q_layernorm = None
        if submodules.q_layernorm is not None:
            self.q_layernorm = build_module(
                submodules.q_layernorm,
                hidden_size=self.hidden_size_per_attention_head,
                config=config,
                eps=config.layernorm_epsilon,
            )
        self.k_layernorm = None  # the key norm is the mixture's (shared)

    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Any = None,
        output_gate: bool = False,
        split_qkv: bool = True,
    ):
        if key_value_states is None or not split_qkv or output_gate:
            raise ValueError("a shared-KV attention expert runs only inside MixtureOfAttention")
        key, value = key_value_states
        query, _ = self.linear_q(hidden_states)
        query = query.view(
            *query.shape[:-1],
            self.num_attention_heads_per_partition,
            self.hidden_size_per_attention_head,
        )
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        return query, key, value


# ---------------------------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------------------------
@dataclass
class MixtureOfAttentionSubmodules:
    #: one attention expert: megatron-core's SelfAttention spec, or a SharedKVAttentionExpert's
    expert: ModuleSpec
    #: shared-KV only: the shared key/value projection (a column-parallel linear) and key norm
    linear_kv: Any = None
    k_layernorm: Any = None


class MixtureOfAttention(MegatronModule):
    """A layer's ``self_attention``: E attention experts mixed per token by a soft router
    (module docstring). Same call and return contract as megatron-core's SelfAttention
    (``(output, bias)``, here with the bias folded into the output)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MixtureOfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        experts = experts_of(config)
        if experts < 1:
            raise ValueError("MixtureOfAttention needs config.attention_experts >= 1")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.num_experts = experts
        self.shared_kv = bool(config.attention_shared_kv)
        self.router = AttentionRouter(config, experts)
        self.router.layer_number = layer_number
        name = kwargs.pop("name", None)
        self.experts = torch.nn.ModuleList(
            build_module(
                submodules.expert,
                config=config,
                layer_number=layer_number,
                cp_comm_type=cp_comm_type,
                pg_collection=pg_collection,
                **kwargs,
                **({"name": f"{name}.experts.{e}"} if name is not None else {}),
            )
            for e in range(experts)
        )
        self.linear_kv = None
        self.k_layernorm = None
        if self.shared_kv:
            self._build_shared_kv(config, submodules)

    def _build_shared_kv(self, config: TransformerConfig, submodules) -> None:
        tp = self.pg_collection.tp.size() if self.pg_collection.tp is not None else 1
        if config.num_query_groups % tp:
            raise ValueError(f"TP={tp} does not divide num_query_groups={config.num_query_groups}")
        self.groups_per_partition = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.linear_kv = build_module(
            submodules.linear_kv,
            config.hidden_size,
            2 * config.kv_channels * config.num_query_groups,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="kv",
            tp_group=self.pg_collection.tp,
        )
        if submodules.k_layernorm is not None:
            self.k_layernorm = build_module(
                submodules.k_layernorm,
                hidden_size=self.head_dim,
                config=config,
                eps=config.layernorm_epsilon,
            )

    def shared_key_value(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (key, value), [s, b, groups per rank, head dim] each, key normalised."""
        mixed, _ = self.linear_kv(hidden_states)
        mixed = mixed.view(*mixed.shape[:-1], self.groups_per_partition, 2 * self.head_dim)
        key, value = torch.split(mixed, [self.head_dim, self.head_dim], dim=-1)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        key_value_states: torch.Tensor | None = None,
        inference_context: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if key_value_states is not None:
            raise NotImplementedError("attention experts are self-attention only")
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError(
                "attention experts have no KV-cache inference; score full sequences instead"
            )
        probs = self.router(hidden_states)  # [s, b, E], fp32
        shared = self.shared_key_value(hidden_states) if self.shared_kv else None
        out: torch.Tensor | None = None
        dtype = hidden_states.dtype
        for e, expert in enumerate(self.experts):
            y, bias = expert(hidden_states, attention_mask, key_value_states=shared, **kwargs)
            if bias is not None:
                y = y + bias
            term = y.float() * probs[..., e : e + 1]
            out = term if out is None else out + term
            dtype = y.dtype
        return out.to(dtype), None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The router and shared modules as usual; the experts stacked along an expert axis
        (megatron-core's SequentialMLP convention), so that the checkpoint holds one tensor per
        weight whatever the expert count, and reshards across TP and PP like the others."""
        out: dict[str, Any] = {}
        for name, child in self.named_children():
            if name != "experts":
                out.update(
                    sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata)
                )
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for e, expert in enumerate(self.experts):
            local = f"{prefix}experts.{e}."
            if singleton:
                key_prefix, offsets = local, sharded_offsets
            else:
                key_prefix = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), e, self.num_experts))
            part = expert.sharded_state_dict(local, offsets, metadata)
            replace_prefix_for_sharding(part, local, key_prefix)
            out.update(part)
        return out


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------
def mixture_spec(attention: ModuleSpec, config: Any) -> ModuleSpec:
    """The ``self_attention`` spec of a layer with attention experts, from the spec of one
    attention block of megatron-core's local spec (its linears, core attention and norms)."""
    sub = attention.submodules
    params = {"attn_mask_type": attention.params.get("attn_mask_type", AttnMaskType.causal)}
    if not config.attention_shared_kv:
        return ModuleSpec(
            module=MixtureOfAttention,
            params=params,
            submodules=MixtureOfAttentionSubmodules(expert=attention),
        )
    expert = ModuleSpec(
        module=SharedKVAttentionExpert,
        params=dict(attention.params),
        submodules=SharedKVExpertSubmodules(
            linear_q=sub.linear_qkv,
            core_attention=sub.core_attention,
            linear_proj=sub.linear_proj,
            q_layernorm=sub.q_layernorm,
        ),
    )
    return ModuleSpec(
        module=MixtureOfAttention,
        params=params,
        submodules=MixtureOfAttentionSubmodules(
            expert=expert, linear_kv=sub.linear_qkv, k_layernorm=sub.k_layernorm
        ),
    )


# ---------------------------------------------------------------------------------------------
# A model's mixtures
# ---------------------------------------------------------------------------------------------
def mixtures(model: Any):
    """Every MixtureOfAttention of a model (or list of chunks, wrapped or not)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MixtureOfAttention):
                yield module


def routing_stats(model: Any, reset: bool = True, group: Any = None) -> dict[int, dict]:
    """Per layer with attention experts (0-based global index): its router's statistics
    (:meth:`AttentionRouter.read_stats`)."""
    out = {}
    for mixture in mixtures(model):
        stats = mixture.router.read_stats(reset=reset, group=group)
        if stats is not None:
            out[int(mixture.layer_number) - 1] = stats
    return out


def reset_stats(model: Any) -> None:
    """Forget the attention routers' statistics so far (e.g. after validation forwards)."""
    for mixture in mixtures(model):
        mixture.router._stats = {}
