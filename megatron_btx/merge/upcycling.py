"""The per-expert math of the upcycling methods around BTX, on tensors only.

- Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): in each expert, a random
  subset of round(r x F) of its F intermediate units is re-initialised (the rows of gate and up,
  the columns of down), each matrix's new values drawn from a normal with that matrix's own mean
  and std; every expert draws its own subset.
- Granular upcycling as megatron-core does it (``megatron.core.transformer.moe.upcycling_utils``,
  He et al., arXiv 2410.07524): each dense FFN split into G shards (the merge's split chunks),
  copied E/G times, every expert's fc1 and fc2 multiplied by the MoE activation scale ^ 1/3
  (SwiGLU is cubic in its weights), so that at the start the MoE's output matches the dense
  model's; the router's virtual-group initialisation is
  :class:`megatron_btx.merge.router_inits.VirtualGroup`.

:func:`transform_expert` is what the merge applies to each routed expert it writes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

__all__ = ["activation_scale", "drop_count", "drop_units", "transform_expert", "weight_scale"]


def drop_count(ratio: float, units: int) -> int:
    """round(ratio x units), halves rounded up (Python's round() would round 2.5 to 2)."""
    return min(units, int(math.floor(ratio * units + 0.5)))


def drop_generator(seed: int, layer: int, expert: int) -> torch.Generator:
    """The generator of one expert's subset and values: reproducible from (seed, layer,
    expert), different for every expert of every layer."""
    digest = hashlib.sha256(f"drop-upcycling:{seed}:{layer}:{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _normal_like(
    matrix: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Values of `shape` from N(mean, std) of `matrix` (statistics in fp64), in its dtype."""
    values = matrix.to(torch.float64)
    mean, std = values.mean(), values.std()
    draw = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (draw * std + mean).to(matrix.dtype)


def drop_units(
    fc1: torch.Tensor, fc2: torch.Tensor, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's SwiGLU FFN (fc1 = [gate; up] of [2F, H], fc2 = down of [H, F]) with
    round(ratio x F) of its units re-initialised: (new fc1, new fc2, the units' indices, sorted).
    The inputs are not changed; every other value is copied bit for bit."""
    units = fc2.shape[1]
    count = drop_count(ratio, units)
    index = torch.randperm(units, generator=generator)[:count].sort().values
    fc1, fc2 = fc1.clone(), fc2.clone()
    if count == 0:
        return fc1, fc2, index
    gate, up = fc1[:units], fc1[units:]
    # each matrix's statistics before any of its values change
    new_gate = _normal_like(gate, (count, gate.shape[1]), generator)
    new_up = _normal_like(up, (count, up.shape[1]), generator)
    new_down = _normal_like(fc2, (fc2.shape[0], count), generator)
    gate[index], up[index] = new_gate, new_up
    fc2[:, index] = new_down
    return fc1, fc2, index


def activation_scale(granularity: int, experts: int, top_k: int, pre_softmax: bool) -> float:
    """megatron-core's MoE activation scale relative to the dense FFN (arXiv 2410.07524): with
    the softmax over the top-k, a virtual group's G shards share the probability mass of one
    expert, so G; with the softmax before the top-k, E x G / k."""
    if pre_softmax:
        return (experts // granularity) * granularity * granularity / top_k
    return granularity


def weight_scale(granularity: int, experts: int, top_k: int, pre_softmax: bool) -> float:
    """The factor on fc1 and fc2: the activation scale ^ 1/3 (SwiGLU: gate x up x down)."""
    return activation_scale(granularity, experts, top_k, pre_softmax) ** (1 / 3)


def transform_expert(
    plan: Any, layer: int, expert: int, fc1: torch.Tensor, fc2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed expert `expert` of `layer` as the merge writes it (`plan`: the merge's
    :class:`~megatron_btx.merge.plan.MergePlan`): its source FFN (or chunk), Drop-Upcycled when
    ``plan.drop_ratio`` > 0, scaled by ``plan.expert_scale``."""
    if plan.drop_ratio > 0:
        generator = drop_generator(plan.drop_seed, layer, expert)
        fc1, fc2, _ = drop_units(fc1, fc2, plan.drop_ratio, generator)
    if plan.expert_scale != 1.0:
        # the same operation as megatron-core's upcycling (param * scale in the param's dtype)
        fc1, fc2 = fc1 * plan.expert_scale, fc2 * plan.expert_scale
    return fc1, fc2
