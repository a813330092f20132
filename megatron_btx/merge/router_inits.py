"""How a merge starts the new routers: one registry entry per initialisation.

An entry says which :class:`~megatron_btx.merge.settings.MergeSettings` it reads and checks them,
what a BTX run passes it (the centroid init takes the run's domain data), what the output
manifest records of it, and how it makes each MoE layer's router rows during the streaming
merge (:class:`LayerRouters`, which sees every merged layer in order, so data-driven inits can
carry hidden states through the merged model). :meth:`RouterInit.expected` gives the rows an
init makes without data, which ``--verify`` checks bit for bit.

The four here: ``random`` (normal, std ``router_std``, seeded per layer by ``router_seed``),
``zero`` (every expert equally likely at the start: all logits 0), ``virtual_group``
(megatron-core's granular-upcycling init: the shards of one FFN share a random row),
``centroid`` (each expert's row the normalised mean router input of its own domain, the seed's
row that of a blend sample).
A new initialisation is one class decorated with :func:`register` (here or in a plugin,
:mod:`megatron_btx.plugins`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from megatron_btx.errors import BTXError
from megatron_btx.registry import Registry

#: a :class:`~megatron_btx.merge.settings.MergeSettings` (which lists this registry's names)
MergeSettings = Any

__all__ = ["LayerRouters", "RouterInit", "get", "names", "register"]


class LayerRouters:
    """One merge's router rows, made layer by layer by :meth:`RouterInit.start`."""

    def embed(self, embedding: torch.Tensor) -> None:
        """The merged input embedding [vocab, hidden] (before the first layer)."""

    def layer(
        self, layer: int, merged: dict[str, torch.Tensor], shape: tuple[int, int] | None
    ) -> torch.Tensor | None:
        """Every layer in order, with its merged tensors by short megatron name; `shape`
        (experts, hidden) for an MoE layer, whose router rows (fp32) are returned; None for a
        dense layer."""
        raise NotImplementedError

    def attention(
        self, layer: int, merged: dict[str, torch.Tensor], shape: tuple[int, int]
    ) -> torch.Tensor:
        """The attention router's rows (fp32) of layer `layer`, for a merge that keeps attention
        experts (BAM, ``--attention``); called before :meth:`layer` with the same tensors."""
        raise NotImplementedError


class RouterInit:
    """One initialisation (see the module docstring): set ``name`` and ``settings``, override
    :meth:`start` (and what else differs), decorate with :func:`register`."""

    name: ClassVar[str] = ""
    #: the MergeSettings fields it reads; the manifest records them
    settings: ClassVar[tuple[str, ...]] = ()

    def check(self, settings: MergeSettings) -> None:
        """Checks of the settings that need no checkpoint (BTXError naming the setting)."""

    def run_settings(self, source_data: list[str]) -> dict[str, Any]:
        """MergeSettings a BTX run gives it: `source_data` names each source's training data
        (experts in order: an indexed-dataset prefix; then the seed: the run's blend as
        ``PREFIX@WEIGHT,...``)."""
        return {}

    def record(self, settings: MergeSettings) -> dict[str, Any]:
        """What the output manifest records of it."""
        return {"init": self.name, **{key: getattr(settings, key) for key in self.settings}}

    def start(self, job: Any) -> LayerRouters:
        """The layer-by-layer maker for one merge (`job`: the planned, checked
        :class:`~megatron_btx.merge.run.MergeJob`); by default the rows of :meth:`expected`."""
        return FixedRows(self, job.settings)

    def expected(
        self, settings: MergeSettings, layer: int, shape: tuple[int, int], part: str = "ffn"
    ) -> torch.Tensor | None:
        """The rows it makes for `layer`'s router without data (fp32), or None when they depend
        on data; `part`: the FFN's router (``ffn``) or the attention experts' (``attention``)."""
        return None


_REGISTRY: Registry[RouterInit] = Registry("router init")
#: class decorator: make a RouterInit subclass the init named by its ``name``
register = _REGISTRY.register
names = _REGISTRY.names
get = _REGISTRY.get


class FixedRows(LayerRouters):
    """Rows that depend only on the layer: :meth:`RouterInit.expected`."""

    def __init__(self, init: RouterInit, settings: MergeSettings):
        self.init, self.settings = init, settings

    def layer(self, layer, merged, shape):
        return None if shape is None else self.init.expected(self.settings, layer, shape)

    def attention(self, layer, merged, shape):
        return self.init.expected(self.settings, layer, shape, "attention")


@register
class Random(RouterInit):
    """Normal rows, std ``router_std``, reproducible per layer from ``router_seed`` (so
    ``--verify`` and re-runs make them again exactly)."""

    name = "random"
    settings = ("router_std", "router_seed")

    def expected(self, settings, layer, shape, part="ffn"):
        # the attention routers draw from a stream of their own
        offset = 50_000 if part == "attention" else 0
        generator = torch.Generator().manual_seed(settings.router_seed * 100003 + offset + layer)
        return torch.randn(shape, generator=generator, dtype=torch.float32) * settings.router_std


@register
class Zero(RouterInit):
    """All-zero rows: every expert equally likely until the finetune moves them."""

    name = "zero"

    def expected(self, settings, layer, shape, part="ffn"):
        return torch.zeros(shape, dtype=torch.float32)


@register
class VirtualGroup(RouterInit):
    """megatron-core's granular-upcycling router (``upcycling_utils``, arXiv 2410.07524): the
    experts made from one copy of an FFN (its G = ``split_chunks`` shards, consecutive) form a
    virtual group with one router row: the first E/G rows of the ``random`` init, each repeated
    G times, so a group's shards are chosen together and at equal weight at the start."""

    name = "virtual_group"
    settings = ("router_std", "router_seed", "split_chunks")

    def check(self, settings):
        if settings.blend:
            raise BTXError(
                f"{settings.name('router_init')} virtual_group groups the shards of one FFN; it "
                f"is not defined with {settings.name('blend')}"
            )

    def expected(self, settings, layer, shape, part="ffn"):
        group = settings.split_chunks
        rows = Random().expected(settings, layer, shape)
        return rows[: shape[0] // group].repeat_interleave(group, dim=0)


@register
class Centroid(RouterInit):
    """Each expert's row: the normalised mean router input over a sample of its source's
    domain, computed through the merged model's earlier layers (see
    :mod:`megatron_btx.merge.centroid`)."""

    name = "centroid"
    settings = ("centroid_data", "centroid_tokens", "centroid_seq_len", "tokenizer")

    def check(self, settings):
        if settings.blend:
            raise BTXError(
                f"{settings.name('router_init')} centroid is not defined with "
                f"{settings.name('blend')} (every expert mixes all domains); use random or zero"
            )
        if not settings.centroid_data:
            raise BTXError(
                f"{settings.name('router_init')} centroid needs {settings.name('centroid_data')}: "
                f"one entry per source (the experts in order, then the seed), each an "
                f"indexed-dataset prefix, a text/jsonl file or a blend PREFIX@W,PREFIX@W"
            )

    def run_settings(self, source_data):
        return {"centroid_data": list(source_data)}

    def start(self, job):
        from megatron_btx.merge.centroid import CentroidRouter

        return CentroidRouter.for_job(job)
