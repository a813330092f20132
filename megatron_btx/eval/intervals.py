"""The evaluation's statistics: document-level bootstrap intervals for every model, and BTX
against each rival, paired (eval/stats.py does the arithmetic; this module decides what is
compared, in which groups of domains).

Who is compared with whom comes from the plan's models (:mod:`megatron_btx.pipeline.models`):
the model with role ``btx`` against every ``rival``; each expert (``part: expert``) against the
seed (``part: seed``) and the other experts. Groups: the experts' domains, the general domains
(in the seed's and the finetune's data, no expert of their own) and the mixed documents
(paragraphs of several domains). The headline is the
mean of the per-domain losses (the geometric mean of the per-domain perplexities), and the goal
of the paper's ordering is stated on the mean over the groups, each group weighing the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_btx.eval import stats

MIXED = "mixed"


def named(specs: dict[str, dict[str, Any]], **want: Any) -> list[str]:
    """The models whose spec has every `want`ed value (e.g. ``role="rival"``), in spec order."""
    return [n for n, s in specs.items() if all(s.get(k) == v for k, v in want.items())]


def groups_of(
    experts: list[str], domains: list[str], new: list[str] | None = None
) -> dict[str, list[str]]:
    """{"experts": the expert domains, "general": the others, "mixed": the mixed documents,
    "new": the domains added after the finetune (the run's ``extend``)}."""
    new = list(new or [])
    groups = {"experts": [d for d in domains if d in experts]}
    general = [d for d in domains if d not in experts and d != MIXED and d not in new]
    if general:
        groups["general"] = general
    if MIXED in domains:
        groups["mixed"] = [MIXED]
    if new:
        groups["new"] = [d for d in domains if d in new]
    return groups


def document_losses(per_model: dict[str, dict[str, np.ndarray]], sets) -> dict[str, Any]:
    """{model: {domain: DocumentLosses}} from per-token log-probs [n, seq] and the eval sets."""
    return {
        model: {
            d: stats.DocumentLosses.from_logprobs(sets[d].select(lp), sets[d].scored_docs)
            for d, lp in by_domain.items()
        }
        for model, by_domain in per_model.items()
    }


def compute(
    per_model: dict[str, dict[str, np.ndarray]],
    sets,
    groups: dict[str, list[str]],
    specs: dict[str, dict[str, Any]],
    segment_labels: np.ndarray | None = None,
    segment_domains: list[str] | None = None,
    replicates: int = stats.DEFAULT_REPLICATES,
) -> dict[str, Any]:
    """Intervals of every model, and BTX minus each rival (paired); with the mixed documents'
    segment labels, each model's mixed-document loss split by the domain a segment came from.
    `specs`: each model's plan entry (role, part, domain, kind)."""
    scores = document_losses(per_model, sets)
    complete = {m: s for m, s in scores.items() if set(s) == set(sets)}
    if not complete:
        return {}
    boot = stats.DocumentBootstrap.for_models(complete, replicates=replicates)
    out: dict[str, Any] = {"groups": groups, **stats.summarize(complete, groups, boot)}
    btx = next((n for n in named(specs, role="btx") if n in complete), None)
    if btx is not None:
        out["comparisons"] = {
            rival: stats.compare(complete, btx, rival, groups, boot)
            for rival in named(specs, role="rival")
            if rival in complete
        }
    out["experts"] = _expert_comparisons(
        complete, specs, groups.get("experts", []), groups.get("general", []), boot
    )
    if segment_labels is not None and MIXED in sets:
        out["mixed_by_segment"] = _mixed_by_segment(
            per_model, sets[MIXED], segment_labels, segment_domains or []
        )
    return out


def _expert_comparisons(
    scores, specs, expert_domains: list[str], general_domains: list[str], boot
) -> dict[str, Any]:
    """Paired, per expert: minus every other dense model on the expert's own domain (is it the
    best there?), and minus the seed where forgetting shows (did it forget?): on the general
    domains, the seed's own data, when the evaluation has them; else on the other expert
    domains (a seed that never saw those is worse there by construction)."""
    dense = [m for m in named(specs, kind="dense") if m in scores]
    seed = next((m for m in named(specs, part="seed") if m in scores), None)
    experts = {specs[m].get("domain"): m for m in named(specs, part="expert")}
    out: dict[str, Any] = {}
    for domain in expert_domains:
        expert = experts.get(domain)
        if expert not in scores:
            continue
        own = {
            other: stats.paired_difference(boot, scores[expert], scores[other], [domain])
            for other in dense
            if other != expert
        }
        forgetting = {}
        if seed is not None:
            forgetting = {
                d: stats.paired_difference(boot, scores[expert], scores[seed], [d])
                for d in (general_domains or [e for e in expert_domains if e != domain])
            }
        deciders = [m for m in own if specs[m].get("part") in ("seed", "expert")]
        out[domain] = {
            "own_domain": own,
            # the models of the expert stage decide (the seed, the other experts); the others
            # (a dense baseline trained on the whole budget) are shown beside them
            "decided_by": deciders,
            "other_domains_vs_seed": forgetting,
        }
    return out


def _mixed_by_segment(per_model, mixed_set, labels: np.ndarray, names: list[str]):
    """Per model, the mixed documents' mean loss on the tokens of each segment domain."""
    scored_labels = mixed_set.select(labels)
    out = {}
    for model, by_domain in per_model.items():
        if MIXED not in by_domain:
            continue
        losses = -mixed_set.select(by_domain[MIXED])
        parts = stats.by_segment_domain(losses, mixed_set.scored_docs, scored_labels, names)
        out[model] = {d: part.mean_loss for d, part in parts.items()}
    return out


def segment_labels(data_dir: str, mixed_set, domain_names: list[str]) -> np.ndarray:
    """[n, seq] index of the segment domain of every predicted token of the mixed windows."""
    from megatron_btx.data.mixed import load_segments, token_domains

    per_token = token_domains(load_segments(data_dir), domain_names)
    window = mixed_set.windows.shape[1]
    return np.stack([per_token[s + 1 : s + window] for s in mixed_set.starts])
