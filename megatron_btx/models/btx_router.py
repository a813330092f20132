"""The BTX router class: megatron-core's TopKRouter with the paper's routing modes, its
load-balancing loss and routing statistics (see :mod:`megatron_btx.models.routers` for the
methods, the loss and how the training loop installs it).

Kept apart from :mod:`megatron_btx.models.routers` because it subclasses a megatron-core class at
import time: importing the settings and helpers stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_btx.models.router_settings import RouterSettings, temperature_at


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
        self.temperature = temperature_at(step, s.temperature, s.temperature_floor, s.anneal_steps)

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
        # logged as added to the objective (alpha included), like the routing statistics
        moe_utils.save_to_aux_losses_tracker(
            "load_balancing_loss",
            value / size,
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
        stats = self._stats
        if group is not None:
            flat = torch.cat(
                [stats["routed"]]
                + [
                    stats[k].reshape(1)
                    for k in ("assigned", "entropy", "tokens", "lb_sum", "lb_count")
                ]
            )
            dist.all_reduce(flat, group=group)
            E = stats["routed"].numel()
            stats = {"routed": flat[:E]}
            for i, k in enumerate(("assigned", "entropy", "tokens", "lb_sum", "lb_count")):
                stats[k] = flat[E + i]
        if reset:
            self._stats = {}
        tokens = float(stats["tokens"])
        if tokens == 0:
            return None
        routed = stats["routed"].cpu()
        total = float(routed.sum())
        out: dict[str, Any] = {
            "load": (routed / total).tolist() if total > 0 else [0.0] * routed.numel(),
            "entropy": float(stats["entropy"]) / tokens,
            "tokens": int(round(tokens)),
            "dropped": 1.0 - total / float(stats["assigned"]) if float(stats["assigned"]) else 0.0,
        }
        if float(stats["lb_count"]) > 0:
            out["lb_loss"] = float(stats["lb_sum"]) / float(stats["lb_count"])
        return out
