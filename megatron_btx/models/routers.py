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
import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_btx.errors import BTXError

log = logging.getLogger(__name__)

ROUTER_TYPES = ("topk", "switch", "sample_top1", "soft")
DROP_POLICIES = ("probs", "position")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterSettings:
    """The validated ``router_cfg`` of :func:`install` (one place for defaults and checks)."""

    type: str = "topk"
    #: Add the paper's load-balancing loss alpha * N * sum_i u_i p_i (per MoE layer).
    load_balancing: bool = True
    alpha: float = 0.01
    #: switch only: expert capacity = ceil(tokens * capacity_factor / E); None = no dropping.
    capacity_factor: float | None = 1.5
    #: switch only: which tokens an over-full expert keeps: the most probable ("probs",
    #: megatron's default) or the first in the micro-batch ("position", the Switch paper's).
    drop_policy: str = "probs"
    #: sample_top1 only: Gumbel-softmax temperature at step 0, its floor, and the steps of the
    #: linear annealing from one to the other (0: the floor from the start).
    temperature: float = 1.0
    temperature_floor: float = 0.5
    anneal_steps: int = 1000
    #: Paper ablation: train only the routers (and the dense parts), not the expert FFNs.
    freeze_experts: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | "RouterSettings" | None) -> "RouterSettings":
        """Validate a router config dict; a bad key or value is a BTXError naming the key."""
        if isinstance(cfg, RouterSettings):
            return cfg
        cfg = dict(cfg or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in cfg:
            if key not in known:
                raise BTXError(
                    f"router config: unknown key {key!r} (known keys: {', '.join(known)})"
                )
        s = cls(**cfg)
        s._check()
        return s

    def _check(self) -> None:
        def bad(key: str, why: str) -> BTXError:
            return BTXError(f"router config key {key!r}: {why} (got {getattr(self, key)!r})")

        if self.type not in ROUTER_TYPES:
            raise bad("type", f"must be one of {', '.join(ROUTER_TYPES)}")
        for key in ("load_balancing", "freeze_experts"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        if not _is_number(self.alpha) or self.alpha < 0:
            raise bad("alpha", "must be a number >= 0")
        if self.capacity_factor is not None and (
            not _is_number(self.capacity_factor) or self.capacity_factor <= 0
        ):
            raise bad("capacity_factor", "must be a number > 0, or null for no token dropping")
        if self.drop_policy not in DROP_POLICIES:
            raise bad("drop_policy", f"must be one of {', '.join(DROP_POLICIES)}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "must be a number > 0")
        if not _is_number(self.temperature_floor) or self.temperature_floor <= 0:
            raise bad("temperature_floor", "must be a number > 0")
        if self.temperature_floor > self.temperature:
            raise bad("temperature_floor", f"must not exceed temperature {self.temperature}")
        if (
            not isinstance(self.anneal_steps, int)
            or isinstance(self.anneal_steps, bool)
            or self.anneal_steps < 0
        ):
            raise bad("anneal_steps", "must be an integer >= 0")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def temperature_at(step: int, start: float, floor: float, anneal_steps: int) -> float:
    """Gumbel-softmax temperature at ``step``: linear from ``start`` to ``floor`` over
    ``anneal_steps`` steps, then ``floor`` (a high temperature explores experts early; the floor
    keeps the soft sample's gradient from becoming too peaked and noisy, 0.5 in the paper)."""
    if anneal_steps <= 0:
        return float(floor)
    frac = min(max(step, 0) / anneal_steps, 1.0)
    return float(start + (floor - start) * frac)


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
def _topk_router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter


def _make_router_class():
    from megatron.core.transformer.moe import moe_utils

    TopKRouter = _topk_router_class()

    class BTXRouter(TopKRouter):
        """megatron-core's TopKRouter with the BTX routing modes, the paper's load-balancing loss
        and routing statistics. Gating (W x, input jitter, router dtype, z-loss) is megatron's;
        only :meth:`routing` is replaced, so the parameter names and the dispatcher contract
        (``probs``, ``routing_map`` of shape [tokens, E]) are unchanged."""

        def __init__(
            self,
            config: Any,
            pg_collection: Any,
            settings: RouterSettings,
            mode: str,
            base_config: Any,
        ) -> None:
            super().__init__(config=config, pg_collection=pg_collection)
            self.settings = settings
            #: What this layer does: the settings' type, except the first layer of sample_top1.
            self.mode = mode
            #: The config the model was built with, so install() can be called again.
            self.base_config = base_config
            self.step = 0
            self.temperature = temperature_at(
                0, settings.temperature, settings.temperature_floor, settings.anneal_steps
            )
            self._stats: dict[str, torch.Tensor] = {}

        # ---- schedule ----------------------------------------------------------------------
        def set_step(self, step: int) -> None:
            self.step = int(step)
            s = self.settings
            self.temperature = temperature_at(
                step, s.temperature, s.temperature_floor, s.anneal_steps
            )

        # ---- routing -----------------------------------------------------------------------
        def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
            """[S, B, E] logits -> (probs, routing_map), both [S*B, E]."""
            E = self.config.num_moe_experts
            logits = logits.reshape(-1, E)
            valid = None
            if padding_mask is not None:  # megatron's convention here: True = padding
                padding_mask = padding_mask.reshape(-1)
                valid = ~padding_mask
            logits = self.apply_z_loss(logits, padding_mask=padding_mask)
            scores = torch.softmax(logits.float(), dim=-1)  # p(x): the routing distribution

            if self.mode == "topk":
                probs, routing_map = moe_utils.topk_routing_with_score_function(
                    logits,
                    self.topk,
                    use_pre_softmax=False,
                    score_function="softmax",
                    fused=self.config.moe_router_fusion,
                )
                assign = probs  # g = SoftMax(TopK(Wx)), sums to 1 per token
            elif self.mode == "switch":
                probs, routing_map = moe_utils.topk_routing_with_score_function(
                    logits,
                    1,
                    use_pre_softmax=True,
                    score_function="softmax",
                    fused=self.config.moe_router_fusion,
                )
                assign = routing_map.to(scores.dtype)  # the one-hot choice, before dropping
            elif self.mode == "sample_top1":
                probs, routing_map = self._sample_top1(logits)
                assign = probs
            else:  # soft
                probs = scores.to(logits.dtype)
                routing_map = torch.ones_like(logits, dtype=torch.bool)
                assign = probs

            if valid is not None:
                # Padding tokens go nowhere (no expert compute, no statistics, no loss).
                routing_map = routing_map & valid.unsqueeze(-1)
                probs = probs * valid.unsqueeze(-1).to(probs.dtype)
            before_drop = routing_map
            if self.mode == "switch" and self.settings.capacity_factor is not None:
                probs, routing_map = self._drop_over_capacity(probs, routing_map)

            lb_value = None
            if (
                self.settings.load_balancing
                and self.settings.alpha > 0
                and self.training
                and torch.is_grad_enabled()
            ):
                probs, lb_value = self._attach_load_balancing_loss(probs, assign, scores, valid)
            self._record(scores, routing_map, before_drop, valid, lb_value)
            return probs, routing_map

        def _drop_over_capacity(
            self, probs: torch.Tensor, routing_map: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Switch capacity: each expert keeps at most ceil(T / E * capacity_factor) of this
            rank's T tokens (megatron's get_capacity; per rank, before dispatch, as megatron).
            "probs" keeps the most probable (megatron's apply_router_token_dropping);
            "position" keeps the earliest, by a cumulative count, because megatron's
            "position" policy takes torch.topk over tied ones, which keeps arbitrary tokens."""
            T, E = routing_map.shape
            capacity = moe_utils.get_capacity(
                num_tokens=T, num_experts=E, capacity_factor=self.settings.capacity_factor
            )
            if self.settings.drop_policy == "probs":
                return moe_utils.apply_router_token_dropping(
                    probs,
                    routing_map,
                    router_topk=1,
                    capacity_factor=self.settings.capacity_factor,
                    drop_policy="probs",
                )
            keep = routing_map & (routing_map.int().cumsum(dim=0) <= capacity)
            return probs * keep, keep

        def _sample_top1(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Gumbel-softmax top-1. Train: a hard sample in the forward, the soft sample's
            gradient in the backward (straight-through), so the router learns while every token
            still runs exactly one expert at full weight, as at inference. Eval: the argmax."""
            if self.training:
                # Noise from the device's default generator: megatron's activation checkpointing
                # saves and restores it, so a recomputed forward draws the same sample.
                u = torch.rand_like(logits, dtype=torch.float32)
                gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
                soft = torch.softmax((logits.float() + gumbel) / self.temperature, dim=-1)
                index = soft.argmax(dim=-1, keepdim=True)
                hard = torch.zeros_like(soft).scatter(1, index, 1.0)
                probs = hard - soft.detach() + soft
            else:
                index = logits.argmax(dim=-1, keepdim=True)
                probs = torch.zeros_like(logits, dtype=torch.float32).scatter(1, index, 1.0)
            routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
            probs = (probs * routing_map).to(logits.dtype)
            return probs, routing_map

        # ---- load balancing ----------------------------------------------------------------
        def _attach_load_balancing_loss(
            self,
            probs: torch.Tensor,
            assign: torch.Tensor,
            scores: torch.Tensor,
            valid: torch.Tensor | None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Attach L = alpha N sum_i u_i p_i to ``probs`` through megatron's
            MoEAuxLossAutoScaler (its gradient joins the main loss's backward, scaled like it).

            With sequence parallelism a rank sees only its slice of the tokens, so u and p are
            sums over the TP x CP group. Each rank attaches the surrogate
            c * sum_i (U_i^local P_i^global + U_i^global P_i^local) (globals detached,
            c = alpha N / T^2), whose gradients summed over the group (megatron all-reduces the
            sequence-parallel router grads) are exactly dL; its value is set to L / group size so
            the values also sum to L."""
            E = self.config.num_moe_experts
            alpha = self.settings.alpha
            assign = assign.float()
            if valid is not None:
                w = valid.unsqueeze(-1).float()
                assign, scores = assign * w, scores * w
                n_local = valid.sum().float()
            else:
                n_local = torch.tensor(float(assign.shape[0]), device=assign.device)
            u_local = assign.sum(dim=0)
            p_local = scores.sum(dim=0)
            packed = torch.cat([u_local.detach(), p_local.detach(), n_local.reshape(1)])
            group = self.tp_cp_group
            size = group.size() if group is not None else 1
            if size > 1:
                packed = packed.clone()
                dist.all_reduce(packed, group=group)
            u_glob, p_glob, n_glob = packed[:E], packed[E : 2 * E], packed[2 * E].clamp(min=1)
            c = alpha * E / (n_glob * n_glob)
            surrogate = c * (torch.dot(u_local, p_glob) + torch.dot(u_glob, p_local))
            value = (alpha * E * torch.dot(u_glob / n_glob, p_glob / n_glob)).detach()
            aux = surrogate - surrogate.detach() + value / size
            if self.calculate_per_token_loss:
                aux = aux * n_local  # as megatron: the loop divides grads by the token count
            probs = moe_utils.MoEAuxLossAutoScaler.apply(probs, aux)
            num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
            moe_utils.save_to_aux_losses_tracker(
                "load_balancing_loss",
                value / alpha / size,
                self.layer_number,
                num_layers,
                reduce_group=group,
            )
            return probs, value

        # ---- statistics --------------------------------------------------------------------
        @torch.no_grad()
        def _record(
            self,
            scores: torch.Tensor,
            routing_map: torch.Tensor,
            before_drop: torch.Tensor,
            valid: torch.Tensor | None,
            lb_value: torch.Tensor | None,
        ) -> None:
            """Accumulate on the device (no host sync in the forward): expert load, router
            entropy, dropped assignments, load-balancing loss."""
            ent = -(scores * torch.log(scores.clamp_min(1e-30))).sum(dim=-1)
            if valid is not None:
                ent = ent * valid
                n = valid.sum().double()
            else:
                n = torch.tensor(float(scores.shape[0]), dtype=torch.float64, device=ent.device)
            new = {
                "routed": routing_map.sum(dim=0).double(),
                "assigned": before_drop.sum().double(),
                "entropy": ent.double().sum(),
                "tokens": n,
                "lb_sum": (lb_value.double() if lb_value is not None else n.new_zeros(())),
                "lb_count": n.new_tensor(1.0 if lb_value is not None else 0.0),
            }
            if not self._stats:
                self._stats = new
            else:
                for k, v in new.items():
                    self._stats[k] = self._stats[k] + v

        def read_stats(self, reset: bool = True, group: Any = None) -> dict[str, Any] | None:
            """This layer's statistics since the last reset (None when it saw no token).
            ``group``: a process group to sum over (every rank of it must call)."""
            if not self._stats:
                if group is None:
                    return None
                E = self.config.num_moe_experts
                dev = self.weight.device
                self._stats = {
                    "routed": torch.zeros(E, dtype=torch.float64, device=dev),
                    **{
                        k: torch.zeros((), dtype=torch.float64, device=dev)
                        for k in ("assigned", "entropy", "tokens", "lb_sum", "lb_count")
                    },
                }
            st = self._stats
            if group is not None:
                flat = torch.cat(
                    [st["routed"]]
                    + [
                        st[k].reshape(1)
                        for k in ("assigned", "entropy", "tokens", "lb_sum", "lb_count")
                    ]
                )
                dist.all_reduce(flat, group=group)
                E = st["routed"].numel()
                st = {"routed": flat[:E]}
                for i, k in enumerate(("assigned", "entropy", "tokens", "lb_sum", "lb_count")):
                    st[k] = flat[E + i]
            if reset:
                self._stats = {}
            tokens = float(st["tokens"])
            if tokens == 0:
                return None
            routed = st["routed"].cpu()
            total = float(routed.sum())
            out: dict[str, Any] = {
                "load": (routed / total).tolist() if total > 0 else [0.0] * routed.numel(),
                "entropy": float(st["entropy"]) / tokens,
                "tokens": int(round(tokens)),
                "dropped": 1.0 - total / float(st["assigned"]) if float(st["assigned"]) else 0.0,
            }
            if float(st["lb_count"]) > 0:
                out["lb_loss"] = float(st["lb_sum"]) / float(st["lb_count"])
            return out

    return BTXRouter


_BTX_ROUTER_CLASS: type | None = None


def router_class() -> type:
    """The BTXRouter class (built on first use, so importing this module stays cheap)."""
    global _BTX_ROUTER_CLASS
    if _BTX_ROUTER_CLASS is None:
        _BTX_ROUTER_CLASS = _make_router_class()
    return _BTX_ROUTER_CLASS


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
        st = r.read_stats(reset=reset, group=group)
        if st is not None:
            out[int(r.layer_number) - 1] = st
    return out


def reset_stats(model: Any) -> None:
    """Forget the statistics gathered so far (e.g. after validation forwards)."""
    for r in btx_routers(model):
        r._stats = {}


def router_parameters(model: Any) -> Iterable[torch.nn.Parameter]:
    """The router weights (e.g. for a separate learning rate or a check that they train)."""
    for r in btx_routers(model):
        yield r.weight
