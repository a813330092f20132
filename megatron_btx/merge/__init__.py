"""The MiX stage: N dense checkpoints -> one MoE checkpoint (settings, plan, per-layer math,
centroid routers, the streaming run, verification, HF export, command line)."""

from megatron_btx.merge.run import merge
from megatron_btx.merge.settings import MergeSettings

__all__ = ["MergeSettings", "merge"]
