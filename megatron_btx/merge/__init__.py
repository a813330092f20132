"""The MiX stage: N dense checkpoints -> one MoE checkpoint (settings, plan, per-layer math,
centroid routers, the streaming run, verification, HF export, command line); or new dense experts
added to a trained MoE (``into``)."""

from typing import Any

from megatron_btx.merge.into import merge_into
from megatron_btx.merge.run import merge as merge_dense
from megatron_btx.merge.settings import MergeSettings

__all__ = ["MergeSettings", "merge"]


def merge(settings: MergeSettings) -> dict[str, Any]:
    """`btx merge`: the BTX merge of dense sources into a new MoE, or with ``settings.into``
    the sources added as new experts to that MoE; returns the manifest written."""
    if settings.into is not None:
        return merge_into(settings)
    return merge_dense(settings)
