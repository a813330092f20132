"""megatron_btx.training: the megatron-core training loop, checkpoints/resume, logging.

``train(cfg)`` runs one training (dense expert or MoE) in the current process group;
``megatron_btx.training.cli:main`` is ``btx train``. Modules are imported on demand so
``import megatron_btx.training`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from megatron_btx.config import Config
    from megatron_btx.training.loop import TrainResult


def train(cfg: "Config") -> "TrainResult":
    from megatron_btx.training.loop import train as _train

    return _train(cfg)


__all__ = ["train"]
