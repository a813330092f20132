"""The validated settings of a BTX router (:class:`RouterSettings`): the keys every routing
method has (its type, the paper's load-balancing loss, frozen experts) and the type's own options
(:mod:`megatron_btx.models.router_types` declares them), shared by the router
(:mod:`megatron_btx.models.btx_router`) and the code that installs it
(:mod:`megatron_btx.models.routers`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from megatron_btx.errors import BTXError
from megatron_btx.models import router_types

#: what a training checkpoint's manifest names as its router when no BTX router was installed
MEGATRON_ROUTER = "megatron top-k"
#: the keys every router type has, and their defaults
COMMON = {
    "type": router_types.DEFAULT,
    #: add the paper's load-balancing loss alpha * N * sum_i u_i p_i (per MoE layer)
    "load_balancing": True,
    "alpha": 0.01,
    #: paper ablation: train only the routers (and the dense parts), not the expert FFNs
    "freeze_experts": False,
}


@dataclass(frozen=True)
class RouterSettings:
    """The validated ``router_cfg`` of :func:`~megatron_btx.models.routers.install`."""

    type: str = router_types.DEFAULT
    load_balancing: bool = True
    alpha: float = 0.01
    freeze_experts: bool = False
    #: the type's own keys (all of them, defaults filled in), read-only
    options: Any = field(default_factory=lambda: MappingProxyType({}))

    @property
    def kind(self) -> router_types.RouterType:
        return router_types.get(self.type)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | RouterSettings | None) -> RouterSettings:
        """Validate a router config dict; a bad key or value is a BTXError naming the key."""
        if isinstance(cfg, RouterSettings):
            return cfg
        cfg = dict(cfg or {})
        name = cfg.get("type", COMMON["type"])
        if not isinstance(name, str) or name not in router_types.names():
            raise BTXError(
                f"router config key 'type': must be one of {', '.join(router_types.names())} "
                f"(got {name!r})"
            )
        kind = router_types.get(name)
        known = [*COMMON, *kind.options]
        for key in cfg:
            if key in known:
                continue
            owners = [t for t in router_types.names() if key in router_types.get(t).options]
            if owners:
                raise BTXError(
                    f"router config key {key!r} applies to router type {' or '.join(owners)}, "
                    f"not {kind.name!r}: remove it"
                )
            raise BTXError(f"router config: unknown key {key!r} (known keys: {', '.join(known)})")
        common = {k: cfg.get(k, v) for k, v in COMMON.items()}
        options = {k: cfg.get(k, v) for k, v in kind.options.items()}
        for key in ("load_balancing", "freeze_experts"):
            if not isinstance(common[key], bool):
                raise BTXError(
                    f"router config key {key!r}: must be true or false (got {common[key]!r})"
                )
        alpha = common["alpha"]
        if not _is_number(alpha) or alpha < 0:
            raise BTXError(f"router config key 'alpha': must be a number >= 0 (got {alpha!r})")
        kind.check_options(options)
        return cls(**common, options=MappingProxyType(options))

    def to_dict(self) -> dict[str, Any]:
        """The flat config dict this was read from (defaults filled in)."""
        return {
            "type": self.type,
            "load_balancing": self.load_balancing,
            "alpha": self.alpha,
            "freeze_experts": self.freeze_experts,
            **self.options,
        }


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def type_name(router: dict[str, Any] | str | None) -> str | None:
    """The router type of a run's router entry: a config dict, a manifest's type name, or None
    (megatron-core's own top-k router)."""
    if router is None or isinstance(router, str):
        return router
    return router.get("type", COMMON["type"])


def hf_routing(router: dict[str, Any] | str | None, top_k: int, num_experts: int, norm: bool):
    """The HF routing of a model routed by `router` (None: megatron-core's top-k router, whose
    renormalisation is the model's `norm`)."""
    name = type_name(router)
    if name in (None, MEGATRON_ROUTER):
        return router_types.HFRouting(top_k, norm)
    return router_types.get(name).hf_routing(top_k, num_experts)


def router_note(router: dict[str, Any] | str | None) -> str | None:
    """The router type's warning for an HF export of a model it routes (None: none)."""
    name = type_name(router)
    if name in (None, MEGATRON_ROUTER):
        return None
    return router_types.get(name).export_note()


def why_no_hf_form(router: dict[str, Any] | str | None) -> str | None:
    """Why a model routed by `router` has no HF export (the type's reason), or None."""
    name = type_name(router)
    if name in (None, MEGATRON_ROUTER):
        return None
    try:
        router_types.get(name).hf_routing(2, 2)
    except BTXError as e:
        return str(e)
    return None
