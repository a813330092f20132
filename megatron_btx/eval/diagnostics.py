"""Merge diagnostics: how far each expert moved from the seed, whether the experts moved the
same way, and how much of their gain the averaged merge keeps.

The merge averages every non-FFN tensor of the experts. If the experts' updates from the seed
(delta_e = theta_e - theta_seed) are large and unrelated, their average is much shorter than each
of them and the merged model keeps little of what any expert learned in those tensors:

- drift: ||delta_e|| / ||theta_seed||, per expert and parameter group;
- agreement: the cosine between two experts' updates, per group (0 = unrelated, 1 = the same);
- kept by averaging: ||mean_e delta_e|| / mean_e ||delta_e|| per group (1 when the updates
  agree; 1/sqrt(N) for N unrelated updates of equal length);
- merge retention, per domain: the share of its expert's loss gain over the seed that the merged
  model before finetuning keeps, (loss_seed - loss_merged) / (loss_seed - loss_expert).

The tensors are read a layer at a time (checkpoint.sources), so memory holds one layer of each
checkpoint, not the models.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_btx.checkpoint.mapping import EMB, FC1, FC2, FINAL_LN, LN1, LN2, OUT, PROJ, QKV

#: parameter groups by megatron name (short names within a layer, full names for globals)
GROUPS = {
    "attention": (QKV, PROJ),
    "norms": (LN1, LN2, FINAL_LN),
    "embedding_output": (EMB, OUT),
    "ffn": (FC1, FC2),
}


def _group_of(name: str) -> str:
    return next(group for group, names in GROUPS.items() if name in names)


class _Sums:
    """Running sums per group: seed norm^2, and the Gram matrix of the experts' updates."""

    def __init__(self, n_experts: int):
        self.seed = {g: 0.0 for g in GROUPS}
        self.gram = {g: np.zeros((n_experts, n_experts)) for g in GROUPS}

    def add(self, name: str, seed: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
        group = _group_of(name)
        base = seed.double()
        deltas = torch.stack([e.double().reshape(-1) - base.reshape(-1) for e in experts])
        self.seed[group] += float(base.square().sum())
        self.gram[group] += (deltas @ deltas.T).numpy()


def parameter_drift(seed_path: str, expert_paths: dict[str, str]) -> dict[str, Any]:
    """Drift, agreement and kept-by-averaging of the experts' updates from the seed, per group
    (see the module docstring), read a layer at a time."""
    from megatron_btx import runtime
    from megatron_btx.checkpoint.sources import open_source

    names = list(expert_paths)
    sources = [open_source(seed_path)] + [open_source(expert_paths[n]) for n in names]
    sums = _Sums(len(names))
    try:
        with runtime.single_process():
            seed, experts = sources[0], sources[1:]
            globals_ = [EMB, FINAL_LN] + ([] if seed.args.tie_word_embeddings else [OUT])
            for name in globals_:
                sums.add(name, seed.global_tensor(name), [e.global_tensor(name) for e in experts])
            for layer in range(seed.args.num_hidden_layers):
                base = seed.layer(layer)
                tensors = [e.layer(layer) for e in experts]
                for name, value in base.items():
                    sums.add(name, value, [t[name] for t in tensors])
    finally:
        for source in sources:
            source.close()
    return _summarise(sums, names)


def _summarise(sums: _Sums, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"experts": names, "drift": {}, "cosine": {}, "kept_by_average": {}}
    for group, gram in sums.gram.items():
        if sums.seed[group] == 0:
            continue
        lengths = np.sqrt(np.diag(gram))
        out["drift"][group] = {
            n: float(lengths[i] / np.sqrt(sums.seed[group])) for i, n in enumerate(names)
        }
        pairs = {}
        for i, j in itertools.combinations(range(len(names)), 2):
            denom = lengths[i] * lengths[j]
            pairs[f"{names[i]}~{names[j]}"] = float(gram[i, j] / denom) if denom else 0.0
        out["cosine"][group] = pairs
        mean_update = np.sqrt(max(gram.sum(), 0.0)) / len(names)
        out["kept_by_average"][group] = (
            float(mean_update / lengths.mean()) if lengths.any() else 1.0
        )
    return out


def merge_retention(losses: dict[str, Any], domains: list[str]) -> dict[str, float]:
    """Per domain, the share of its expert's loss gain over the seed that the merged model
    (before finetuning) keeps; None where the expert did not improve on the seed. `losses`:
    {"seed": {domain: loss}, "merged": {...}, "experts": {domain: {domain: loss}}}."""
    out = {}
    for domain in domains:
        expert = losses.get("experts", {}).get(domain, {}).get(domain)
        seed = losses.get("seed", {}).get(domain)
        merged = losses.get("merged", {}).get(domain)
        if None in (expert, seed, merged) or seed - expert <= 0:
            out[domain] = None
            continue
        out[domain] = (seed - merged) / (seed - expert)
    return out


def plot(diagnostics: dict[str, Any], retention: dict[str, float | None], path: Path) -> bool:
    """Three panels: drift per expert and group, mean cosine between experts' updates per
    group, merge retention per domain. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(diagnostics["drift"])
    names = diagnostics["experts"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [diagnostics["drift"][g][name] for g in groups]
        axes[0].bar(np.arange(len(groups)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=15)
    axes[0].set_title("relative L2 drift from the seed")
    axes[0].legend(fontsize=7)
    cosines = [np.mean(list(diagnostics["cosine"][g].values()) or [0.0]) for g in groups]
    kept = [diagnostics["kept_by_average"][g] for g in groups]
    axes[1].bar(np.arange(len(groups)) - 0.2, cosines, 0.4, label="mean cosine of updates")
    axes[1].bar(np.arange(len(groups)) + 0.2, kept, 0.4, label="kept by averaging")
    axes[1].axhline(1 / np.sqrt(max(len(names), 1)), ls="--", c="grey", lw=1)
    axes[1].set_xticks(np.arange(len(groups)), groups, rotation=15)
    axes[1].set_title("experts' updates: agreement (dashed: 1/sqrt(N))")
    axes[1].legend(fontsize=7)
    domains = [d for d, v in retention.items() if v is not None]
    axes[2].bar(domains, [retention[d] for d in domains])
    axes[2].axhline(0, c="black", lw=0.8)
    axes[2].set_title("merge retention of each expert's gain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
