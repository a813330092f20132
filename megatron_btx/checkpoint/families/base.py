"""HF model families: one registry entry per HF ``model_type``, owning both halves of its
mapping: its config.json (reading it into LlamaArgs and an MoE shape, writing it back) and its
tensors (a state-dict adapter: HF names, shapes and layouts <-> megatron-core's).

A family module defines a :class:`Family` subclass (and its adapter) and decorates it with
:func:`register`; the package imports each one (:mod:`megatron_btx.checkpoint.families`), and a
plugin (:mod:`megatron_btx.plugins`) can add more. The generic parts of config.json (sizes,
RoPE, special tokens) are read and written in :mod:`.config`; a family says only what differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, MoEVariant
from megatron_btx.models.router_types import HFRouting
from megatron_btx.registry import Registry


@dataclasses.dataclass(frozen=True)
class HFModel:
    """What an HF config.json describes: the hyper-parameters and the MoE shape."""

    args: LlamaArgs
    variant: MoEVariant
    #: the config's own model_type (mixtral, qwen2_moe, ... for MoE; the dense family otherwise)
    model_type: str


class Family:
    """One HF family. Dense families describe a seed's attention; an MoE family names the dense
    family whose attention it has (``attention``) and reads that family's attention keys."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    #: the state-dict adapter class (HF <-> megatron names and layouts)
    adapter: ClassVar[type] = object
    #: the dense family of its attention (a dense family: its own model_type)
    attention: ClassVar[str] = ""
    is_moe: ClassVar[bool] = False
    #: the BOS / EOS ids a config.json that lacks them means (None: no such token)
    default_special_ids: ClassVar[tuple[int | None, int | None]] = (None, None)
    #: queries and keys are normalised per head (QK-norm)
    qk_norm: ClassVar[bool] = False
    #: an MoE family's place in the order an MoE tries to be written as (lowest first)
    export_rank: ClassVar[int] = 0

    # ---- reading config.json ----------------------------------------------------------------
    def check(self, cfg: dict[str, Any], source: str) -> None:
        """Refuse what has no exact megatron-core form (a one-line BTXError naming the key)."""

    def qkv_bias(self, cfg: dict[str, Any]) -> bool:
        return False

    def sliding_window(self, cfg: dict[str, Any], source: str) -> int | None:
        """The attention window kept in LlamaArgs (one that masks nothing), or a refusal."""
        return None

    def moe_fields(self, cfg: dict[str, Any], fields: dict[str, Any], source: str) -> MoEVariant:
        """An MoE family: set `fields`' MoE keys from `cfg`; return the shape beyond Mixtral's."""
        raise NotImplementedError

    # ---- writing config.json ----------------------------------------------------------------
    def config_fields(
        self, args: LlamaArgs, variant: MoEVariant, routing: HFRouting | None
    ) -> dict[str, Any]:
        """The family's keys of a config.json for this model (beside the generic ones)."""
        return {}

    def why_not(
        self, args: LlamaArgs, variant: MoEVariant, routing: HFRouting | None
    ) -> str | None:
        """Why this family cannot write the model exactly (None: it can)."""
        return None if args.model_type == self.model_type else f"it is a {args.model_type}"


_REGISTRY: Registry[Family] = Registry(
    "HF family",
    key="model_type",
    check=lambda cls: None if cls.architecture else "an architecture name is required",
)
#: class decorator: make a Family subclass the family of HF model_type ``model_type``
register = _REGISTRY.register
names = _REGISTRY.names


def get(model_type: Any, source: str = "config.json") -> Family:
    """The family of `model_type`; an unknown one is a BTXError naming the supported ones."""
    if model_type not in names():
        raise BTXError(
            f"{source}: model_type is {model_type!r}, not a Llama-architecture family "
            f"(supported: {', '.join(names())})"
        )
    return _REGISTRY.get(model_type)


def moe_families() -> list[Family]:
    """The MoE families, in the order an MoE tries to be written as."""
    return sorted((f for f in _REGISTRY.values() if f.is_moe), key=lambda f: f.export_rank)
