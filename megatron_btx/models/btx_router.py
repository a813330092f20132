"""The BTX router class: megatron-core's TopKRouter with a routing method of
:mod:`megatron_btx.models.router_types`, the paper's load-balancing loss and routing statistics
(see :mod:`megatron_btx.models.routers` for the loss and how the training loop installs it).

Kept apart from :mod:`megatron_btx.models.routers` because it subclasses a megatron-core class at
import time: importing the settings and helpers stays cheap.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_btx.models.router_settings import RouterSettings
from megatron_btx.models.router_types import RouterType


class BTXRouter(TopKRouter):
    """megatron-core's TopKRouter with a BTX routing method, the paper's load-balancing loss
    and routing statistics. Gating (W x, input jitter, router dtype, z-loss) is megatron's;
    only :meth:`routing` is replaced, so the parameter names and the dispatcher contract
    (``probs``, ``routing_map`` of shape [tokens, E]) are unchanged."""

    def __init__(
        self,
        config: Any,
        pg_collection: Any,
        settings: RouterSettings,
        kind: RouterType,
        base_config: Any,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.settings = settings
        #: What this layer does: the settings' type, or the one it routes this layer with
        #: (Sample Top-1's first layer routes softly).
        self.kind = kind
        #: The config the model was built with, so install() can be called again.
        self.base_config = base_config
        self._stats: dict[str, torch.Tensor] = {}
        self.set_step(0)

    @property
    def mode(self) -> str:
        """The name of the routing method this layer uses."""
        return self.kind.name

    # ---- schedule ----------------------------------------------------------------------
    def set_step(self, step: int) -> float | None:
        """The settings' type's schedule at `step` (every layer follows it, whatever the
        layer's own method); returns the value it logs."""
        self.step = int(step)
        return self.settings.kind.set_step(self, self.step)

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

        probs, routing_map, assign = self.kind.route(self, logits, scores)

        if valid is not None:
            # Padding tokens go nowhere (no expert compute, no statistics, no loss).
            routing_map = routing_map & valid.unsqueeze(-1)
            probs = probs * valid.unsqueeze(-1).to(probs.dtype)
        before_drop = routing_map
        probs, routing_map = self.kind.after_route(self, probs, routing_map)

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
