"""Scoring held-out tokens with megatron-core models loaded from checkpoints (one CPU process).

A model is built exactly as the merge and training stages build it (the one builder,
``build_for_checkpoint``, with the checkpoint manifest's merge variant), loaded with megatron-core's ``dist_checkpointing``
(``load_model``), and for an MoE the BTX router of the run's finetune config is installed, which
also records per-layer routing statistics (:func:`megatron_btx.models.routers.routing_stats`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def load_for_eval(folder: str, router_cfg: dict[str, Any] | None = None):
    """(model, args) for a megatron checkpoint folder; call inside a runtime."""
    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_for_checkpoint

    args = read_args(folder)
    model = build_for_checkpoint(args, torch.float32, read_variant(folder))
    load_model(model, folder)
    if runtime.on_gpu():
        model = model.cuda()
    if args.is_moe:
        from megatron_btx.models import routers

        routers.install(model, router_cfg or {}, model.config)  # {}: the default router
        routers.reset_stats(model)
    model.eval()
    return model, args


@torch.no_grad()
def token_logprobs(model, args, windows: np.ndarray, micro_batch_size: int = 8) -> np.ndarray:
    """log p(token t+1 | tokens <= t) for every window: [n, seq_length] float64."""
    out = []
    V = args.vocab_size
    device = next(model.parameters()).device
    for i in range(0, len(windows), micro_batch_size):
        w = torch.from_numpy(np.ascontiguousarray(windows[i : i + micro_batch_size])).to(device)
        ids, labels = w[:, :-1], w[:, 1:]
        pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand(ids.shape[0], -1)
        logits = model(ids, pos, None)
        logits = logits[..., :V].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        out.append(lp.double().cpu().numpy())
    return np.concatenate(out, axis=0)


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-np.mean(logprobs)))


def ensemble_logprobs(per_expert: list[np.ndarray], chosen: np.ndarray) -> np.ndarray:
    """BTM: log of the uniform average of the chosen experts' probabilities of each token.

    per_expert: E arrays [n, S] of token log-probs; chosen: [n, S, k] expert indices per token
    (the experts chosen for the token's document)."""
    stack = np.stack(per_expert, axis=-1)  # [n, S, E]
    picked = np.take_along_axis(stack, chosen, axis=-1)  # [n, S, k]
    m = picked.max(axis=-1, keepdims=True)
    return (m + np.log(np.mean(np.exp(picked - m), axis=-1, keepdims=True)))[..., 0]


def routing_of(model) -> dict[int, dict[str, Any]]:
    from megatron_btx.models import routers

    return routers.routing_stats(model, reset=True)
