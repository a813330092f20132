"""The four BTX routing methods on top of megatron-core's ``TopKRouter`` / ``MoELayer``.

The BTX paper (Sukhbaatar et al. 2024, section Routing) studies four routers for the MoE that
mixes the domain experts' FFNs:

``topk`` (default, k = ``num_experts_per_tok``)
    g = SoftMax(TopK(W x)); megatron-core's top-k with ``moe_router_pre_softmax=False``.
``switch``
    Top-1 with a capacity factor (default 1.5): each expert takes at most
    ``ceil(tokens / E * capacity_factor)`` tokens of a rank's micro-batch, the rest are dropped
    (the token passes through the residual only). The gate is the softmax probability of the
    chosen expert (Switch Transformer): megatron-core's pre-softmax top-1, then its
    ``apply_router_token_dropping`` (``drop_policy: probs``, keep the most probable) or a
    first-come cut (``drop_policy: position``, the Switch paper's).
``sample_top1``
    Top-1 sampled with Gumbel-softmax at training (straight-through: the forward uses the hard
    one-hot sample, the backward the gradient of the soft sample at temperature tau), the argmax
    at inference. tau is annealed linearly from ``temperature`` to ``temperature_floor`` over
    ``anneal_steps`` steps (:func:`set_step`). The sampled expert, argmax(W x + Gumbel noise),
    does not depend on tau, so with hard samples tau shapes only the gradient. The first MoE
    layer routes softly (paper).
``soft``
    Every expert gets every token, weighted by softmax(W x) over all experts.

The load-balancing loss is the paper's, per layer:

    L = alpha * N * sum_i u_i p_i,   u_i = mean_x g_i(x),   p_i = mean_x softmax_i(W x)

with N the number of experts and g the routing assignment, normalised per token (top-k: the
top-k softmax; switch and sample_top1: the one-hot choice before capacity dropping; soft:
softmax(W x)). Gradients flow through both u and p.

**Relation to megatron-core's aux loss** (``switch_load_balancing_loss_func``):
megatron computes ``coeff * E * sum_i f_i P_i`` with ``f_i = count_i / (T * k)`` -- the fraction
of the T*k routing *slots* that went to expert i, a hard count with no gradient -- and the same
P_i = p_i. So megatron's f_i is the paper's u_i with g replaced by the uniform 1/k over the chosen
experts. The two are identical in value for k = 1 (g is then one-hot; switch, sample_top1) and
differ for k >= 2, where the paper weighs each chosen expert by its gate (u_i = mean g_i) and also
lets the gradient flow through u. We implement the paper's formula (the tests check it against a
hand computation, and against megatron's function for k = 1).

Usage by the training loop (order matters)::

    overrides = routers.config_overrides(router_cfg, num_experts=E)   # 1. before the build
    config = transformer_config(args, ..., **overrides)
    model = build_model(args, config)
    routers.install(model, router_cfg, config)                         # 2. after the build,
    model = DDP(model); optimizer = get_megatron_optimizer(...)        # 3. before DDP/optimizer
    for step in ...:
        routers.set_step(model, step)                                  # 4. every step
        ... forward/backward ...
        stats = routers.routing_stats(model)                           # 5. when logging

``install`` is self-sufficient: it gives each MoE layer's router and token dispatcher a private
copy of the TransformerConfig with that layer's top-k and capacity factor (the dispatcher sizes
its buffers from ``moe_router_topk`` and switches to dynamic sizes when a capacity factor is
set), so a model built without the overrides routes correctly too. The overrides keep the
model-wide config truthful (``moe_router_topk`` for FLOPs accounting and checkpoint metadata)
and pass megatron's own validation (top-1 needs ``moe_router_pre_softmax``).

The router runs before token dispatch on every rank with the full router weight, so expert
parallelism (EP>1) and both dispatchers (alltoall, allgather) need nothing special. With tensor
parallelism megatron-core requires sequence parallelism for MoE; the load-balancing statistics
are then summed over the TP x CP group exactly as megatron does for its aux loss.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from megatron_btx.errors import BTXError
from megatron_btx.models.router_settings import (
    DROP_POLICIES,
    ROUTER_TYPES,
    RouterSettings,
    temperature_at,
)

log = logging.getLogger(__name__)

__all__ = ["DROP_POLICIES", "ROUTER_TYPES", "RouterSettings", "install", "temperature_at"]


def config_overrides(
    router_cfg: dict[str, Any] | RouterSettings, num_experts: int | None = None
) -> dict[str, Any]:
    """TransformerConfig kwargs for ``transformer_config(..., **overrides)`` before the build.

    Not strictly required (``install`` gives each MoE layer its own config copy), but they keep
    the model-wide config equal to what the routers do and satisfy megatron's validation (top-1
    with softmax needs ``moe_router_pre_softmax``). ``num_experts`` is needed only for ``soft``
    (top-k with k = E)."""
    s = RouterSettings.from_dict(router_cfg)
    if s.type == "topk":
        return {}  # k is the model's num_experts_per_tok; install() enforces SoftMax(TopK)
    if s.type == "switch":
        return {
            "moe_router_topk": 1,
            "moe_router_pre_softmax": True,
            "moe_expert_capacity_factor": s.capacity_factor,
            "moe_token_drop_policy": s.drop_policy,
        }
    if s.type == "sample_top1":
        return {"moe_router_topk": 1, "moe_router_pre_softmax": True}
    # soft
    return {"moe_router_topk": num_experts} if num_experts else {}


# --------------------------------------------------------------------------------------------
# The router
# --------------------------------------------------------------------------------------------
def router_class() -> type:
    """The BTXRouter class (imported on first use, so importing this module stays cheap)."""
    from megatron_btx.models.btx_router import BTXRouter

    return BTXRouter


# --------------------------------------------------------------------------------------------
# Installing into a model
# --------------------------------------------------------------------------------------------
def _chunks(model: Any) -> list[torch.nn.Module]:
    if isinstance(model, torch.nn.Module):
        return [model]
    if isinstance(model, (list, tuple)):
        return list(model)
    raise BTXError(f"routers: expected a model or a list of model chunks, got {type(model)}")


def moe_layers(model: Any) -> Iterator[Any]:
    """Every megatron-core MoELayer in a model (or list of chunks, wrapped or not)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for chunk in _chunks(model):
        for m in chunk.modules():
            if isinstance(m, MoELayer):
                yield m


def btx_routers(model: Any) -> Iterator[Any]:
    """Every installed BTX router in a model."""
    cls = router_class()
    for layer in moe_layers(model):
        if isinstance(layer.router, cls):
            yield layer.router


def first_moe_layer_number(config: Any) -> int:
    """The 1-based global number of the model's first MoE layer (from ``moe_layer_freq``),
    known on every pipeline stage, unlike the layers a stage happens to hold."""
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return 1  # layer 0 % freq == 0 is always an MoE layer
    pattern = list(freq)
    if 1 not in pattern:
        raise BTXError("moe_layer_freq has no MoE layer")
    return pattern.index(1) + 1


def _layer_config(base: Any, mode: str, s: RouterSettings) -> Any:
    """A private TransformerConfig copy for one MoE layer's router and token dispatcher."""
    cfg = copy.copy(base)
    E = base.num_moe_experts
    cfg.moe_router_load_balancing_type = "none"  # our loss replaces megatron's
    cfg.moe_aux_loss_coeff = 0.0
    cfg.moe_router_enable_expert_bias = False
    cfg.moe_router_score_function = "softmax"
    cfg.moe_router_topk_scaling_factor = None
    cfg.moe_router_num_groups = None
    cfg.moe_router_group_topk = None
    cfg.moe_expert_capacity_factor = None
    if mode == "topk":
        cfg.moe_router_pre_softmax = False
    elif mode == "switch":
        cfg.moe_router_topk = 1
        cfg.moe_router_pre_softmax = True
        cfg.moe_expert_capacity_factor = s.capacity_factor
        cfg.moe_token_drop_policy = s.drop_policy
    elif mode == "sample_top1":
        cfg.moe_router_topk = 1
        cfg.moe_router_pre_softmax = True
    else:  # soft
        cfg.moe_router_topk = E
        cfg.moe_router_pre_softmax = True
    return cfg


def _pg_collection(router: Any) -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    pgs.tp = router.tp_group
    pgs.cp = router.cp_group
    pgs.tp_cp = router.tp_cp_group
    pgs.tp_dp_cp = router.tp_dp_cp_group
    return pgs


def _is_ddp_wrapped(model: Any) -> bool:
    from megatron.core.distributed import DistributedDataParallel

    return any(isinstance(c, DistributedDataParallel) for c in _chunks(model)) or any(
        isinstance(c, torch.nn.parallel.DistributedDataParallel) for c in _chunks(model)
    )


def install(model: Any, router_cfg: dict[str, Any] | RouterSettings, config: Any = None) -> None:
    """Replace the router of every MoE layer of a built GPTModel (or list of chunks) by a
    BTX router of ``router_cfg``'s type, keeping the router weight Parameter itself (same name
    ``decoder.layers.i.mlp.router.weight``, same object, so checkpoints and any existing
    references stay valid). Call after the build and before DDP wrapping / optimizer creation
    (``freeze_experts`` changes which parameters need gradients). Calling it again switches the
    type."""
    s = RouterSettings.from_dict(router_cfg)
    layers = list(moe_layers(model))
    if not layers:
        raise BTXError(
            "routers.install: the model has no MoE layer; build it with num_local_experts > 0"
        )
    if s.freeze_experts and _is_ddp_wrapped(model):
        raise BTXError(
            "routers.install with freeze_experts must run before the model is wrapped in DDP "
            "(DDP allocates gradient buffers for the parameters that require grad)"
        )
    cls = router_class()
    for layer in layers:
        old = layer.router
        base = old.base_config if isinstance(old, cls) else (config or old.config)
        if base.num_moe_experts is None:
            raise BTXError("routers.install: the config has no num_moe_experts (not an MoE)")
        if base.moe_pad_expert_input_to_capacity:
            raise BTXError(
                "routers.install: moe_pad_expert_input_to_capacity (pad_to_capacity) is not "
                "supported by the BTX routers; set it to false"
            )
        if getattr(old, "expert_bias", None) is not None:
            raise BTXError(
                "routers.install: moe_router_enable_expert_bias is not supported by the BTX "
                "routers; build the model without it"
            )
        mode = s.type
        if s.type == "sample_top1" and old.layer_number == first_moe_layer_number(base):
            mode = "soft"  # the paper routes the first MoE layer softly under Sample Top-1
        if mode == "topk" and base.moe_router_topk < 2:
            raise BTXError(
                "router type 'topk' with num_experts_per_tok=1 gives every token the constant "
                "weight SoftMax(TopK)=1, so the router learns nothing; use type 'switch' "
                "(softmax-weighted top-1) or 'sample_top1', or num_experts_per_tok >= 2"
            )
        cfg = _layer_config(base, mode, s)
        # The throw-away initialisation must not consume the RNG (it would shift every later
        # random draw, e.g. dropout or Gumbel noise, relative to a run that installs nothing).
        init_cfg = copy.copy(cfg)
        init_cfg.perform_initialization = False
        new = cls(init_cfg, _pg_collection(old), s, mode, base)
        new.config = cfg
        new.weight = old.weight  # the same Parameter: name, value, attributes, optimizer refs
        if old.bias is not None:
            new.bias = old.bias
        new.set_layer_number(old.layer_number)
        new.train(old.training)
        layer.router = new
        layer.token_dispatcher.config = cfg  # sizes its buffers from moe_router_topk
        if hasattr(layer.token_dispatcher, "router_topk"):
            layer.token_dispatcher.router_topk = cfg.moe_router_topk
        if s.freeze_experts:
            for p in layer.experts.parameters():
                p.requires_grad_(False)
            layer._btx_frozen_experts = True
        elif getattr(layer, "_btx_frozen_experts", False):
            for p in layer.experts.parameters():
                p.requires_grad_(True)
            layer._btx_frozen_experts = False
    log.info(
        "routers: %s on %d MoE layer(s)%s%s",
        s.type,
        len(layers),
        f", load balancing alpha={s.alpha}" if s.load_balancing else ", no load balancing",
        ", experts frozen" if s.freeze_experts else "",
    )


def set_step(model: Any, step: int) -> float | None:
    """Tell every router the training step (Sample Top-1's temperature schedule). Returns the
    temperature for logging, None when no router samples."""
    temp = None
    for r in btx_routers(model):
        r.set_step(step)
        if r.settings.type == "sample_top1":
            temp = r.temperature
    return temp


def routing_stats(model: Any, reset: bool = True, group: Any = None) -> dict[int, dict[str, Any]]:
    """Per MoE layer (0-based global layer index) since the last reset, from this rank's
    forwards: ``load`` (fraction of token->expert assignments per expert, sums to 1),
    ``entropy`` (mean over tokens of the entropy of softmax(W x), in [0, log E]), ``tokens``,
    ``dropped`` (fraction of assignments dropped over capacity) and, when it was computed,
    ``lb_loss`` (mean load-balancing loss). ``group``: sum over a process group first (e.g. the
    data-parallel group; every rank of it must call). Layers with no token are left out."""
    out: dict[int, dict[str, Any]] = {}
    for r in btx_routers(model):
        layer_stats = r.read_stats(reset=reset, group=group)
        if layer_stats is not None:
            out[int(r.layer_number) - 1] = layer_stats
    return out


def reset_stats(model: Any) -> None:
    """Forget the statistics gathered so far (e.g. after validation forwards)."""
    for r in btx_routers(model):
        r._stats = {}


def router_parameters(model: Any) -> Iterable[torch.nn.Parameter]:
    """The router weights (e.g. for a separate learning rate or a check that they train)."""
    for r in btx_routers(model):
        yield r.weight
