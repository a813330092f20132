"""The paper's claims checked on an evaluation's numbers.

A comparative claim holds only when the 95% interval of its paired difference (document-level
bootstrap, eval/intervals.py) excludes 0 in the claimed direction. Without intervals (an
evaluation without them), the point estimates decide and the claim says so.

- experts specialise: each expert lower than the seed and every other expert on its own domain
  (the models of the expert stage; the dense baseline, trained on the whole budget, is shown
  beside them but does not decide);
- experts forget: each expert higher than the seed on the general domains (the seed's own
  data) when the evaluation has them, else on every other expert domain;
- BTX best on average: BTX lower than every rival (seed, dense, BTM top-1/2, sparse upcycling)
  on the mean over the evaluation's groups (each group weighing the same), and per group;
- routing specialises: each expert domain's tokens go mostly to its own expert(s) (a share of
  the top-k assignments, descriptive; no interval);
- domains added to the finetuned MoE (the run's ``extend``; models of part ``extension``, not
  in the equal-compute claim above): the extended MoE higher than BTX on the old expert domains
  (forgetting) and lower on the added ones (gain), each paired.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _difference(entry: dict[str, Any]) -> dict[str, Any]:
    """A paired difference (loss, nats) for the results: estimate, interval, verdict."""
    loss = entry["loss"]
    return {
        "difference": loss["estimate"],
        "low": loss["low"],
        "high": loss["high"],
        "lower": entry["a_better"],  # the first model is lower, the interval excludes 0
        "higher": entry["b_better"],
    }


def _experts(result: dict[str, Any]) -> dict[str, Any]:
    per = result.get("intervals", {}).get("experts") or {}
    if not per:
        return {}
    groups = result["intervals"].get("groups") or {}
    claims = {}
    own = {d: {o: _difference(v) for o, v in e["own_domain"].items()} for d, e in per.items()}
    claims["expert_best_on_own_domain"] = {
        "holds": all(
            all(own[d][other]["lower"] for other in e["decided_by"]) for d, e in per.items()
        ),
        "decided_by": "the seed and the other experts",
        "per_domain": own,
    }
    forget = {
        d: {o: _difference(v) for o, v in e["other_domains_vs_seed"].items()}
        for d, e in per.items()
        if e["other_domains_vs_seed"]
    }
    if forget:
        claims["experts_forget_other_domains"] = {
            "holds": all(all(v["higher"] for v in vs.values()) for vs in forget.values()),
            # where intervals measured it: general text when the evaluation has any
            "on": "general" if groups.get("general") else "other_expert_domains",
            "per_expert": forget,
        }
    return claims


def _extensions(result: dict[str, Any]) -> set[str]:
    return {n for n, row in result["models"].items() if row.get("part") == "extension"}


def _extension(result: dict[str, Any]) -> dict[str, Any]:
    """Per model of the ``extend`` experiment, BTX minus it on the old expert domains
    (forgetting: BTX lower) and on the added domains (gain: BTX higher)."""
    comparisons = result.get("intervals", {}).get("comparisons") or {}
    found = {}
    for name in sorted(_extensions(result) & set(comparisons)):
        groups = comparisons[name]["groups"]
        if "experts" not in groups or "new" not in groups:
            continue
        old, new = _difference(groups["experts"]), _difference(groups["new"])
        found[name] = {
            "forgetting_on_old_domains": {"holds": old["lower"], **old},
            "gain_on_new_domains": {"holds": new["higher"], **new},
        }
    return {"added_domains": found} if found else {}


def _btx(result: dict[str, Any]) -> dict[str, Any]:
    extensions = _extensions(result)
    comparisons = {
        k: v
        for k, v in (result.get("intervals", {}).get("comparisons") or {}).items()
        if k not in extensions
    }
    models = {k: v for k, v in result["models"].items() if k not in extensions}
    if comparisons:
        key = (
            "mean_of_groups" if any("mean_of_groups" in c for c in comparisons.values()) else "mean"
        )
        versus = {rival: _difference(c[key]) for rival, c in comparisons.items()}
        per_group = {
            group: {rival: _difference(c["groups"][group]) for rival, c in comparisons.items()}
            for group in next(iter(comparisons.values()))["groups"]
        }
        return {
            "btx_lowest_mean": {
                "holds": all(v["lower"] for v in versus.values()),
                "statistic": key,
                "versus": versus,
                "per_group": {
                    g: {"holds": all(v["lower"] for v in vs.values()), "versus": vs}
                    for g, vs in per_group.items()
                },
            }
        }
    btx = next((n for n, row in models.items() if row.get("role") == "btx"), None)
    if btx is None:
        return {}
    versus = {
        k: {"difference": float(np.log(models[btx]["mean"] / row["mean"]))}
        for k, row in models.items()
        if row.get("role") == "rival"
    }
    for v in versus.values():
        v["lower"] = v["difference"] < 0
    return {
        "btx_lowest_mean": {
            "holds": all(v["lower"] for v in versus.values()),
            "statistic": "point estimates (no intervals)",
            "versus": versus,
        }
    }


def _routing(result: dict[str, Any], matrix: dict[str, np.ndarray] | None) -> dict[str, Any]:
    if not matrix:
        return {}
    labels = result["experts"]
    # the domain each expert's FFN came from (several with split chunks; none when blended)
    owners = result.get("expert_domains") or labels
    per = {}
    for domain, mat in matrix.items():
        own_experts = [i for i, owner in enumerate(owners) if owner == domain]
        if not own_experts:
            continue
        share = mat.mean(axis=0)
        by_owner: dict[str, float] = {}
        for i, owner in enumerate(owners):
            key = owner if owner is not None else labels[i]
            by_owner[key] = by_owner.get(key, 0.0) + float(share[i])
        per[domain] = {
            "own_share": by_owner[domain],
            "top_expert": max(by_owner, key=by_owner.get),
            "uniform": len(own_experts) / len(labels),
            "own_share_per_layer": [float(x) for x in mat[:, own_experts].sum(axis=1)],
        }
    if not per:  # blended experts: no expert belongs to one domain
        return {}
    return {
        "routing_to_own_expert": {
            "holds": all(v["top_expert"] == d for d, v in per.items()),
            "per_domain": per,
        }
    }


def check_claims(result: dict[str, Any], routing: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Every claim that the evaluation's models allow (see the module docstring)."""
    return {
        **_experts(result),
        **_btx(result),
        **_routing(result, routing),
        **_extension(result),
    }
