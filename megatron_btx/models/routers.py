"""The BTX routers on top of megatron-core's ``TopKRouter`` / ``MoELayer``: installing them in a
built model, stepping their schedules and reading their routing statistics. The routing methods
themselves (the paper's topk, switch, sample_top1 and soft, and any plugin's) are entries of
:mod:`megatron_btx.models.router_types`.

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
from collections.abc import Iterator
from typing import Any

import torch

from megatron_btx.errors import BTXError
from megatron_btx.models import router_types
from megatron_btx.models.router_settings import RouterSettings
from megatron_btx.models.router_types import temperature_at

log = logging.getLogger(__name__)

__all__ = ["RouterSettings", "config_overrides", "install", "temperature_at"]


def config_overrides(
    router_cfg: dict[str, Any] | RouterSettings, num_experts: int | None = None
) -> dict[str, Any]:
    """TransformerConfig kwargs for ``transformer_config(..., **overrides)`` before the build.

    Not strictly required (``install`` gives each MoE layer its own config copy), but they keep
    the model-wide config equal to what the routers do and satisfy megatron's validation (top-1
    with softmax needs ``moe_router_pre_softmax``). ``num_experts`` is needed by methods whose
    experts per token depend on it (soft: all of them)."""
    s = RouterSettings.from_dict(router_cfg)
    if num_experts is None:
        overrides = s.kind.model_overrides(s.options, 0)
        return {k: v for k, v in overrides.items() if k != "moe_router_topk" or v}
    return s.kind.model_overrides(s.options, num_experts)


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


def moe_index(config: Any, layer_number: int) -> int:
    """How many MoE layers come before the 1-based global layer `layer_number` (from
    ``moe_layer_freq``: known on every pipeline stage, unlike the layers a stage holds)."""
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return sum(1 for i in range(layer_number - 1) if i % freq == 0)
    return sum(list(freq)[: layer_number - 1])


def _layer_config(base: Any, kind: router_types.RouterType, s: RouterSettings) -> Any:
    """A private TransformerConfig copy for one MoE layer's router and token dispatcher."""
    cfg = copy.copy(base)
    cfg.moe_router_load_balancing_type = "none"  # our loss replaces megatron's
    cfg.moe_aux_loss_coeff = 0.0
    cfg.moe_router_enable_expert_bias = False
    cfg.moe_router_score_function = "softmax"
    cfg.moe_router_topk_scaling_factor = None
    cfg.moe_router_num_groups = None
    cfg.moe_router_group_topk = None
    cfg.moe_expert_capacity_factor = None
    kind.layer_config(cfg, s.options)
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
        kind = s.kind.for_layer(moe_index(base, old.layer_number))
        kind.check_model(base.moe_router_topk, base.num_moe_experts)
        cfg = _layer_config(base, kind, s)
        # The throw-away initialisation must not consume the RNG (it would shift every later
        # random draw, e.g. dropout or Gumbel noise, relative to a run that installs nothing).
        init_cfg = copy.copy(cfg)
        init_cfg.perform_initialization = False
        new = cls(init_cfg, _pg_collection(old), s, kind, base)
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
    """Tell every router the training step (e.g. Sample Top-1's temperature schedule). Returns
    the value the router type logs (the temperature), None when it has no schedule."""
    value = None
    for r in btx_routers(model):
        logged = r.set_step(step)
        value = logged if logged is not None else value
    return value


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
