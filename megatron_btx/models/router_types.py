"""The BTX routing methods: one registry entry per method, holding everything about it.

A router type says, for the MoE layers it routes:

- its own settings keys and their defaults (``router: {type: NAME, KEY: VALUE}``), checked;
- how many experts a token passes through (compute accounting, megatron's ``moe_router_topk``),
  and whether a layer routes differently (Sample Top-1 routes the first MoE layer softly);
- the megatron-core TransformerConfig it needs (model-wide and per layer);
- the routing itself: router logits -> (gates, routing map, assignment for the balancing loss);
- its training-step schedule (Sample Top-1's temperature) and run-dependent defaults;
- its HF form (the HF top-k and renormalisation that compute the same function), or the reason
  none exists.

Nothing else in the package compares router type names: a new method is one class here (or in a
plugin, :mod:`megatron_btx.plugins`) decorated with :func:`register`.

The paper's four (Sukhbaatar et al. 2024, section Routing):

``topk`` (default, k = ``num_experts_per_tok``)
    g = SoftMax(TopK(W x)).
``switch``
    Top-1 with a capacity factor (default 1.5): each expert takes at most
    ``ceil(tokens / E * capacity_factor)`` tokens of a rank's micro-batch, the rest pass through
    the residual only. The gate is the softmax probability of the chosen expert. Over-full
    experts keep the most probable tokens (``drop_policy: probs``, megatron's
    ``apply_router_token_dropping``) or the first ones (``drop_policy: position``, the Switch
    paper's).
``sample_top1``
    Top-1 sampled with Gumbel-softmax at training (straight-through: the forward uses the hard
    one-hot sample, the backward the gradient of the soft sample at temperature tau), the argmax
    at inference. tau goes linearly from ``temperature`` to ``temperature_floor`` over
    ``anneal_steps`` steps (default: the run's steps). The first MoE layer routes softly.
``soft``
    Every expert gets every token, weighted by softmax(W x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from megatron_btx.errors import BTXError
from megatron_btx.registry import Registry

__all__ = ["DEFAULT", "HFRouting", "RouterType", "get", "names", "register", "temperature_at"]

#: the router type of a router config that names none (the paper's default: top-k)
DEFAULT = "topk"


@dataclass(frozen=True)
class HFRouting:
    """How an HF MoE config routes: experts per token and whether their weights are
    renormalised over the chosen ones (``norm_topk_prob``)."""

    top_k: int
    norm_topk_prob: bool


class RouterType:
    """One routing method (see the module docstring). Subclass, set ``name`` (and ``options``),
    override what differs, and decorate with :func:`register`."""

    name: ClassVar[str] = ""
    #: the method's own settings keys and their defaults
    options: ClassVar[dict[str, Any]] = {}
    #: megatron-core's moe_router_pre_softmax for this method's layers (top-1 needs it)
    pre_softmax: ClassVar[bool] = True

    # ---- settings -------------------------------------------------------------------------
    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise a BTXError naming the key for an option value the method cannot use."""

    def run_defaults(self, train_steps: int) -> dict[str, Any]:
        """Option defaults that depend on the training run (set unless the user set them)."""
        return {}

    # ---- shape and compute ------------------------------------------------------------------
    def top_k(self, model_top_k: int, num_experts: int) -> int:
        """Experts a token passes through in this method's layers."""
        return model_top_k

    def for_layer(self, moe_index: int) -> RouterType:
        """The method routing the `moe_index`-th MoE layer (0 = the first) of a model."""
        return self

    def check_model(self, model_top_k: int, num_experts: int) -> None:
        """Raise a BTXError when the model's shape makes this method meaningless."""

    # ---- megatron-core configuration ------------------------------------------------------
    def model_overrides(self, options: Mapping[str, Any], num_experts: int) -> dict[str, Any]:
        """TransformerConfig kwargs before the build, so the model-wide config says what the
        routers do (FLOPs accounting, checkpoint metadata, megatron's own validation)."""
        return {"moe_router_topk": self.top_k(1, num_experts), "moe_router_pre_softmax": True}

    def layer_config(self, cfg: Any, options: Mapping[str, Any]) -> None:
        """Set one MoE layer's private TransformerConfig copy (router and token dispatcher)."""
        cfg.moe_router_topk = self.top_k(cfg.moe_router_topk, cfg.num_moe_experts)
        cfg.moe_router_pre_softmax = self.pre_softmax

    # ---- routing ----------------------------------------------------------------------------
    def route(self, router: Any, logits: torch.Tensor, scores: torch.Tensor):
        """[T, E] logits and their softmax `scores` -> (probs, routing_map, assign): the gates
        and the [T, E] boolean map megatron's dispatcher takes, and the per-token assignment g
        the paper's balancing loss weighs (normalised per token)."""
        raise NotImplementedError

    def after_route(self, router: Any, probs: torch.Tensor, routing_map: torch.Tensor):
        """Post-routing changes (Switch's capacity drops), after padding is removed."""
        return probs, routing_map

    def set_step(self, router: Any, step: int) -> float | None:
        """Tell one layer's router the training step; returns a value to log (or None)."""
        return None

    # ---- HF form ----------------------------------------------------------------------------
    def hf_routing(self, model_top_k: int, num_experts: int) -> HFRouting:
        """The HF routing that computes the same function, or a BTXError saying why none does."""
        raise BTXError(f"router {self.name!r} has no exact HF form")

    def export_note(self) -> str | None:
        """A warning for an HF export that is exact only under a condition."""
        return None


_REGISTRY: Registry[RouterType] = Registry("router type")
#: class decorator: make a RouterType subclass the router type named by its ``name``
register = _REGISTRY.register
names = _REGISTRY.names
#: the router type called `name` (an unknown name is a BTXError listing the known ones)
get = _REGISTRY.get


def _number(key: str, value: Any, low: float, why: str, strict: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        raise BTXError(f"router config key {key!r}: {why} (got {value!r})")


# ---------------------------------------------------------------------------------------------
# The paper's four
# ---------------------------------------------------------------------------------------------
@register
class TopK(RouterType):
    """g = SoftMax(TopK(W x)), k = the model's num_experts_per_tok."""

    name = "topk"
    pre_softmax = False

    def model_overrides(self, options, num_experts):
        return {}  # k is the model's num_experts_per_tok

    def check_model(self, model_top_k, num_experts):
        if model_top_k < 2:
            raise BTXError(
                "router type 'topk' with num_experts_per_tok=1 gives every token the constant "
                "weight SoftMax(TopK)=1, so the router learns nothing; use type 'switch' "
                "(softmax-weighted top-1) or 'sample_top1', or num_experts_per_tok >= 2"
            )

    def route(self, router, logits, scores):
        from megatron.core.transformer.moe import moe_utils

        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits,
            router.topk,
            use_pre_softmax=False,
            score_function="softmax",
            fused=router.config.moe_router_fusion,
        )
        return probs, routing_map, probs

    def hf_routing(self, model_top_k, num_experts):
        return HFRouting(model_top_k, True)  # the top-k probabilities renormalised


@register
class Switch(RouterType):
    """Softmax-weighted top-1 with expert capacity."""

    name = "switch"
    options = {"capacity_factor": 1.5, "drop_policy": "probs"}

    def check_options(self, options):
        factor = options["capacity_factor"]
        if factor is not None:
            _number("capacity_factor", factor, 0, "must be a number > 0, or null for no dropping")
        if options["drop_policy"] not in ("probs", "position"):
            raise BTXError(
                f"router config key 'drop_policy': must be one of probs, position "
                f"(got {options['drop_policy']!r})"
            )

    def top_k(self, model_top_k, num_experts):
        return 1

    def model_overrides(self, options, num_experts):
        return {
            **super().model_overrides(options, num_experts),
            "moe_expert_capacity_factor": options["capacity_factor"],
            "moe_token_drop_policy": options["drop_policy"],
        }

    def layer_config(self, cfg, options):
        super().layer_config(cfg, options)
        cfg.moe_expert_capacity_factor = options["capacity_factor"]
        cfg.moe_token_drop_policy = options["drop_policy"]

    def route(self, router, logits, scores):
        from megatron.core.transformer.moe import moe_utils

        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits,
            1,
            use_pre_softmax=True,
            score_function="softmax",
            fused=router.config.moe_router_fusion,
        )
        return probs, routing_map, routing_map.to(scores.dtype)  # the choice, before dropping

    def after_route(self, router, probs, routing_map):
        """Each expert keeps at most ceil(T / E * capacity_factor) of this rank's T tokens
        (megatron's get_capacity, per rank before dispatch). "probs" keeps the most probable
        (megatron's apply_router_token_dropping); "position" the earliest, by a cumulative
        count (megatron's "position" takes torch.topk over ties, which keeps arbitrary ones)."""
        from megatron.core.transformer.moe import moe_utils

        options = router.settings.options
        factor = options["capacity_factor"]
        if factor is None:
            return probs, routing_map
        if options["drop_policy"] == "probs":
            return moe_utils.apply_router_token_dropping(
                probs, routing_map, router_topk=1, capacity_factor=factor, drop_policy="probs"
            )
        tokens, experts = routing_map.shape
        capacity = moe_utils.get_capacity(
            num_tokens=tokens, num_experts=experts, capacity_factor=factor
        )
        keep = routing_map & (routing_map.int().cumsum(dim=0) <= capacity)
        return probs * keep, keep

    def hf_routing(self, model_top_k, num_experts):
        return HFRouting(1, False)  # softmax(Wx) of the chosen expert, not renormalised

    def export_note(self):
        return (
            "finetuned with the Switch router; the HF export routes every token (Switch's "
            "capacity drops tokens per micro-batch, which no HF model does): it equals the "
            "megatron model with capacity_factor null"
        )


@register
class Soft(RouterType):
    """Every expert, weighted by softmax(W x)."""

    name = "soft"

    def top_k(self, model_top_k, num_experts):
        return num_experts

    def route(self, router, logits, scores):
        probs = scores.to(logits.dtype)
        return probs, torch.ones_like(logits, dtype=torch.bool), probs

    def hf_routing(self, model_top_k, num_experts):
        return HFRouting(num_experts, False)


@register
class SampleTop1(RouterType):
    """Gumbel-softmax top-1 (straight-through), the argmax at inference; soft first layer."""

    name = "sample_top1"
    options = {"temperature": 1.0, "temperature_floor": 0.5, "anneal_steps": 1000}

    def check_options(self, options):
        _number("temperature", options["temperature"], 0, "must be a number > 0")
        _number("temperature_floor", options["temperature_floor"], 0, "must be a number > 0")
        if options["temperature_floor"] > options["temperature"]:
            raise BTXError(
                f"router config key 'temperature_floor': must not exceed temperature "
                f"{options['temperature']} (got {options['temperature_floor']!r})"
            )
        steps = options["anneal_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise BTXError(
                f"router config key 'anneal_steps': must be an integer >= 0 (got {steps!r})"
            )

    def run_defaults(self, train_steps):
        return {"anneal_steps": train_steps}

    def top_k(self, model_top_k, num_experts):
        return 1

    def for_layer(self, moe_index):
        return get("soft") if moe_index == 0 else self  # the paper's soft first layer

    def route(self, router, logits, scores):
        """Train: a hard sample in the forward, the soft sample's gradient in the backward, so
        every token still runs exactly one expert at full weight, as at inference."""
        if router.training:
            # the device's default generator: megatron's activation checkpointing saves and
            # restores it, so a recomputed forward draws the same sample
            u = torch.rand_like(logits, dtype=torch.float32)
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
            soft = torch.softmax((logits.float() + gumbel) / router.temperature, dim=-1)
            index = soft.argmax(dim=-1, keepdim=True)
            hard = torch.zeros_like(soft).scatter(1, index, 1.0)
            probs = hard - soft.detach() + soft
        else:
            index = logits.argmax(dim=-1, keepdim=True)
            probs = torch.zeros_like(logits, dtype=torch.float32).scatter(1, index, 1.0)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True)
        probs = (probs * routing_map).to(logits.dtype)
        return probs, routing_map, probs

    def set_step(self, router, step):
        options = router.settings.options
        router.temperature = temperature_at(
            step, options["temperature"], options["temperature_floor"], options["anneal_steps"]
        )
        return router.temperature

    def hf_routing(self, model_top_k, num_experts):
        raise BTXError(
            "router sample_top1 has no exact HF form: it routes its first MoE layer softly (every "
            "expert) and the others to the argmax with weight 1, and an HF config has one top-k "
            "for all layers; finetune with router topk, switch or soft to export"
        )


def temperature_at(step: int, start: float, floor: float, anneal_steps: int) -> float:
    """Gumbel-softmax temperature at ``step``: linear from ``start`` to ``floor`` over
    ``anneal_steps`` steps, then ``floor`` (a high temperature explores experts early; the floor
    keeps the soft sample's gradient from becoming too peaked and noisy, 0.5 in the paper)."""
    if anneal_steps <= 0:
        return float(floor)
    frac = min(max(step, 0) / anneal_steps, 1.0)
    return float(start + (floor - start) * frac)
