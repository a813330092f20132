"""The evaluation report: perplexity table, compute, the paper's claims checked, routing tables
and heatmaps. Pure functions of the results dict written by :mod:`megatron_btx.eval.cli`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("seed", "expert_", "dense", "btm_top", "sparse_upcycling", "btx_merge_only", "btx")
BTX_RIVALS = ("seed", "dense", "btm_top1", "btm_top2", "sparse_upcycling")


def _order(name: str, domains: list[str]) -> tuple[int, int, str]:
    for i, p in enumerate(ORDER):
        if name == p or (p.endswith("_") or p == "btm_top") and name.startswith(p):
            suffix = name[len(p) :]
            return i, domains.index(suffix) if suffix in domains else 0, name
    return len(ORDER), 0, name


def sorted_models(models: dict[str, Any], domains: list[str] | None = None) -> list[str]:
    return sorted(models, key=lambda n: _order(n, list(domains or [])))


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------
def routing_matrix(result: dict[str, Any], model: str = "btx") -> dict[str, np.ndarray] | None:
    """domain -> [layers, experts] share of assignments."""
    r = result.get("routing", {}).get(model)
    if not r:
        return None
    out = {}
    for d, layers in r.items():
        keys = sorted(layers, key=int)
        out[d] = np.array([layers[k]["load"] for k in keys])
    return out


def check_claims(result: dict[str, Any]) -> dict[str, Any]:
    m = result["models"]
    doms = result["domains"]
    claims: dict[str, Any] = {}
    dense = [k for k in m if k == "seed" or k == "dense" or k.startswith("expert_")]
    per = {}
    for d in doms:
        e = f"expert_{d}"
        if e not in m:
            continue
        best = min(dense, key=lambda k: m[k]["perplexity"][d])
        per[d] = {
            "best": best,
            "expert": m[e]["perplexity"][d],
            "best_other": min(m[k]["perplexity"][d] for k in dense if k != e)
            if len(dense) > 1
            else None,
        }
    if per:
        claims["expert_best_on_own_domain"] = {
            "holds": all(v["best"] == f"expert_{d}" for d, v in per.items()),
            "per_domain": per,
        }
    if "btx" in m:
        cmp = {
            k: {
                "btx": m["btx"]["mean"],
                "other": m[k]["mean"],
                "holds": m["btx"]["mean"] < m[k]["mean"],
            }
            for k in BTX_RIVALS
            if k in m
        }
        claims["btx_lowest_mean"] = {"holds": all(v["holds"] for v in cmp.values()), "versus": cmp}
    rm = routing_matrix(result)
    if rm:
        labels = result["experts"]
        # the domain each expert's FFN came from (several with split chunks; none when blended)
        owners = result.get("expert_domains") or labels
        per_r = {}
        for d, mat in rm.items():
            own_experts = [i for i, owner in enumerate(owners) if owner == d]
            if not own_experts:
                continue
            share = mat.mean(axis=0)
            by_owner: dict[str, float] = {}
            for i, owner in enumerate(owners):
                by_owner[owner] = by_owner.get(owner, 0.0) + float(share[i])
            per_r[d] = {
                "own_share": by_owner[d],
                "top_expert": max(by_owner, key=by_owner.get),
                "uniform": len(own_experts) / len(labels),
                "own_share_per_layer": [
                    float(mat[:, own_experts].sum(axis=1)[i]) for i in range(mat.shape[0])
                ],
            }
        if per_r:  # not with blended experts: no expert belongs to one domain
            claims["routing_to_own_expert"] = {
                "holds": all(v["top_expert"] == d for d, v in per_r.items()),
                "per_domain": per_r,
            }
    # forgetting (informational): each expert vs the seed on the other domains
    if "seed" in m:
        worse = {}
        for d in doms:
            e = f"expert_{d}"
            if e in m:
                others = [o for o in doms if o != d]
                worse[d] = {o: m[e]["perplexity"][o] > m["seed"]["perplexity"][o] for o in others}
        if worse:
            claims["experts_forget_other_domains"] = {
                "holds": all(all(v.values()) for v in worse.values()),
                "per_expert": worse,
            }
    return claims


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _f(x: float) -> str:
    return "nan" if not math.isfinite(x) else (f"{x:.2f}" if x < 1000 else f"{x:.0f}")


def _flops(x: float) -> str:
    if not x:
        return "-"
    e = int(math.floor(math.log10(x)))
    return f"{x / 10**e:.2f}e{e}"


def table_md(result: dict[str, Any]) -> str:
    m, doms = result["models"], result["domains"]
    names = sorted_models(m, doms)
    best = {d: min(m[k]["perplexity"][d] for k in names) for d in doms}
    best_mean = min(m[k]["mean"] for k in names)
    head = (
        "| model | active params | train FLOPs | train tokens | wall (s) | "
        + " | ".join(doms)
        + " | mean |"
    )
    lines = [head, "|" + "---|" * (5 + len(doms) + 1)]
    for k in names:
        r = m[k]
        cells = []
        for d in doms:
            v = r["perplexity"][d]
            cells.append(f"**{_f(v)}**" if v == best[d] else _f(v))
        mean = f"**{_f(r['mean'])}**" if r["mean"] == best_mean else _f(r["mean"])
        ap = r.get("active_params")
        lines.append(
            f"| {k} | {f'{ap / 1e6:.2f}M' if ap else '-'} | {_flops(r['train_flops'])} | "
            f"{r['train_tokens']:,} | {r['train_seconds']:.0f} | "
            + " | ".join(cells)
            + f" | {mean} |"
        )
    return "\n".join(lines)


def claims_md(claims: dict[str, Any]) -> str:
    def mark(ok: bool) -> str:
        return "holds" if ok else "DOES NOT HOLD"

    out = []
    c = claims.get("expert_best_on_own_domain")
    if c:
        parts = [
            f"{d}: {v['best']} ({v['expert']:.2f} vs best other {v['best_other']:.2f})"
            for d, v in c["per_domain"].items()
        ]
        out.append(
            f"- Each expert lowest among dense models on its own domain: "
            f"**{mark(c['holds'])}** ({'; '.join(parts)})"
        )
    c = claims.get("btx_lowest_mean")
    if c:
        parts = [
            f"{k} {v['other']:.2f} ({'ok' if v['holds'] else 'lower than BTX'})"
            for k, v in c["versus"].items()
        ]
        first = next(iter(c["versus"].values()))["btx"]
        out.append(
            f"- BTX lowest mean perplexity ({first:.2f}) vs {', '.join(parts)}: "
            f"**{mark(c['holds'])}**"
        )
    c = claims.get("routing_to_own_expert")
    if c:
        parts = [
            f"{d}: own {v['own_share']:.0%} (top: {v['top_expert']})"
            for d, v in c["per_domain"].items()
        ]
        out.append(
            f"- Each domain's tokens mostly routed to its own expert (share of top-k "
            f"assignments, mean over layers; uniform = "
            f"{next(iter(c['per_domain'].values()))['uniform']:.0%}): "
            f"**{mark(c['holds'])}** ({'; '.join(parts)})"
        )
    c = claims.get("experts_forget_other_domains")
    if c:
        n_bad = sum(not ok for v in c["per_expert"].values() for ok in v.values())
        out.append(
            f"- Experts worse than the seed on the other domains (forgetting): "
            f"**{mark(c['holds'])}**"
            + (f" ({n_bad} expert/domain pairs are not worse)" if n_bad else "")
        )
    return "\n".join(out)


def routing_md(result: dict[str, Any], model: str = "btx") -> str:
    rm = routing_matrix(result, model)
    if not rm:
        return ""
    labels = result["experts"]
    lines = [
        f"Routing of the {model} MoE: share of each domain's token->expert assignments "
        f"per expert (top-k: k per token), per layer.",
        "",
    ]
    n_layers = next(iter(rm.values())).shape[0]
    for layer in range(n_layers):
        lines += [
            f"layer {layer}:",
            "",
            "| domain | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for d, mat in rm.items():
            row = mat[layer]
            top = int(np.argmax(row))
            lines.append(
                f"| {d} | "
                + " | ".join(f"**{v:.2f}**" if i == top else f"{v:.2f}" for i, v in enumerate(row))
                + " |"
            )
        lines.append("")
    lines += [
        "mean over layers:",
        "",
        "| domain | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for d, mat in rm.items():
        lines.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in mat.mean(axis=0)) + " |")
    return "\n".join(lines) + "\n"


def results_md(result: dict[str, Any]) -> str:
    toks = ", ".join(f"{d} {n:,}" for d, n in result["tokens"].items())
    parts = [
        f"# BTX evaluation: held-out perplexity ({result['split']} split)",
        "",
        f"Scored tokens per domain: {toks}. Lower is better; bold = best in the column. "
        "Train FLOPs = 6 x active params x tokens of the stages after the seed (the seed's "
        "pretraining is shared by all); wall = sum of those stages' wall times.",
        "",
        table_md(result),
        "",
        "## The paper's claims on these numbers",
        "",
        claims_md(result["claims"]),
    ]
    if result.get("btm"):
        parts += [
            "",
            "BTM tf-idf routing: "
            + ", ".join(
                f"{k} picks the held-out document's own domain first for "
                f"{v['top1_own_domain_docs']:.0%} of documents"
                for k, v in result["btm"].items()
            ),
        ]
    if result.get("missing"):
        parts += [
            "",
            "Not evaluated: " + "; ".join(f"{k} ({v})" for k, v in result["missing"].items()),
        ]
    parts += diagnostics_md(result.get("diagnostics"))
    rmd = routing_md(result)
    if rmd:
        mean_only = rmd[rmd.index("mean over layers:") :]
        parts += [
            "",
            "## Routing (BTX MoE)",
            "",
            mean_only,
            "Per layer: routing.md; heatmaps: routing.png, routing_layer*.png.",
        ]
    return "\n".join(parts) + "\n"


def diagnostics_md(diag: dict[str, Any] | None) -> list[str]:
    """The merge diagnostics section (eval/diagnostics.py): drift, agreement, retention."""
    if not diag:
        return []
    drift = diag.get("drift") or {}
    lines = ["", "## Merge diagnostics", ""]
    if drift:
        groups = list(drift)
        experts = list(next(iter(drift.values())))
        lines += [
            "Relative L2 drift of each expert from the seed, per parameter group; then the mean "
            "cosine between two experts' updates and the share of an update's length the "
            f"average keeps (1/sqrt({len(experts)}) = {len(experts) ** -0.5:.2f} for unrelated "
            "updates):",
            "",
            "| | " + " | ".join(groups) + " |",
            "|---|" + "---|" * len(groups),
        ]
        for e in experts:
            lines.append(
                f"| drift {e} | " + " | ".join(f"{drift[g][e]:.3f}" for g in groups) + " |"
            )
        cos = [np.mean(list(diag["cosine"][g].values()) or [0.0]) for g in groups]
        lines.append("| mean cosine | " + " | ".join(f"{c:.3f}" for c in cos) + " |")
        kept = [diag["kept_by_average"][g] for g in groups]
        lines.append("| kept by averaging | " + " | ".join(f"{k:.3f}" for k in kept) + " |")
    retention = diag.get("retention") or {}
    if retention:
        shown = ", ".join(
            f"{d} {v:.0%}" if v is not None else f"{d} -" for d, v in retention.items()
        )
        lines += [
            "",
            f"Merge retention (share of each expert's loss gain the merge keeps): {shown}.",
        ]
    return lines + ["", "Plot: diagnostics.png."]


# ---------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------
def heatmaps(result: dict[str, Any], out: Path, model: str = "btx") -> list[Path]:
    rm = routing_matrix(result, model)
    if not rm:
        return []
    try:
        import matplotlib
    except ImportError:  # optional dependency (pip install megatron_btx[plots])
        print(
            "[btx evaluate] matplotlib is not installed: no heatmaps (pip install matplotlib)",
            flush=True,
        )
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = result["experts"]
    doms = list(rm)
    n_layers = next(iter(rm.values())).shape[0]
    written = []

    def draw(ax, mat, title):
        im = ax.imshow(mat, vmin=0.0, vmax=max(0.5, float(mat.max())), cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(doms)), doms)
        ax.set_xlabel("expert")
        ax.set_title(title)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{mat[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if mat[i, j] < 0.3 else "black",
                )
        return im

    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1.5, 3.4), squeeze=False)
    for layer in range(n_layers):
        mat = np.stack([rm[d][layer] for d in doms])
        im = draw(axes[0][layer], mat, f"layer {layer}")
        if layer == 0:
            axes[0][layer].set_ylabel("domain (held-out tokens)")
        else:
            axes[0][layer].set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    fig.suptitle(f"{model}: routing of each domain's tokens to experts")
    p = out / "routing.png"
    fig.savefig(_tmp(p), dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(_tmp(p), p)
    written.append(p)
    for layer in range(n_layers):
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        mat = np.stack([rm[d][layer] for d in doms])
        im = draw(ax, mat, f"{model} layer {layer}")
        ax.set_ylabel("domain")
        fig.colorbar(im, ax=ax, shrink=0.8)
        p = out / f"routing_layer{layer}.png"
        fig.savefig(_tmp(p), dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        os.replace(_tmp(p), p)
        written.append(p)
    return written


def _tmp(p: Path) -> Path:
    return p.with_name(f".{p.name}.tmp")


def _write(p: Path, text: str) -> None:
    _tmp(p).write_text(text)
    os.replace(_tmp(p), p)


def write_all(result: dict[str, Any], out: Path, routing: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if routing and result.get("routing"):
        _write(out / "routing.json", json.dumps(result["routing"], indent=1))
        parts = [routing_md(result, m) for m in result["routing"]]
        _write(out / "routing.md", "\n".join(parts))
        heatmaps(result, out)
        if "sparse_upcycling" in result["routing"]:
            heatmaps_model(result, out, "sparse_upcycling")
    _write(out / "results.md", results_md(result))
    _write(out / "results.json", json.dumps(result, indent=1))


def heatmaps_model(result: dict[str, Any], out: Path, model: str) -> None:
    sub = out / model
    sub.mkdir(exist_ok=True)
    heatmaps(result, sub, model)
