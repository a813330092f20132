"""The validated settings of a BTX router (:class:`RouterSettings`) and the Sample Top-1
temperature schedule: shared by the router itself (:mod:`megatron_btx.models.btx_router`) and
the code that installs it (:mod:`megatron_btx.models.routers`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megatron_btx.errors import BTXError

ROUTER_TYPES = ("topk", "switch", "sample_top1", "soft")
DROP_POLICIES = ("probs", "position")
#: keys that only one router type reads (setting them for another type would do nothing)
TYPE_KEYS = {
    "capacity_factor": ("switch",),
    "drop_policy": ("switch",),
    "temperature": ("sample_top1",),
    "temperature_floor": ("sample_top1",),
    "anneal_steps": ("sample_top1",),
}


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
        for key, types in TYPE_KEYS.items():
            if key in cfg and s.type not in types:
                raise BTXError(
                    f"router config key {key!r} applies to router type {' or '.join(types)}, "
                    f"not {s.type!r}: remove it"
                )
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
