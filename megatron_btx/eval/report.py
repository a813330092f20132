"""The evaluation report: perplexity table, compute, the paper's claims checked, routing tables
and heatmaps. Pure functions of the results dict written by :mod:`megatron_btx.eval.cli`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def sorted_models(models: dict[str, Any], domains: list[str] | None = None, rows=None) -> list[str]:
    """Model names in table order: each row's planned ``order``, experts by their domain's
    place, then the plan's order. `rows`: where the orders are (default: `models` itself)."""
    rows = rows if rows is not None else models
    doms = list(domains or [])
    names = list(models)

    def key(name: str) -> tuple[int, int, int]:
        row = rows.get(name) or {}
        domain = row.get("domain")
        return row.get("order", 0), doms.index(domain) if domain in doms else 0, names.index(name)

    return sorted(names, key=key)


def btx_name(result: dict[str, Any]) -> str | None:
    """The model under test (role ``btx``) of an evaluation's results."""
    return next((n for n, row in result["models"].items() if row.get("role") == "btx"), None)


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------
def routing_matrix(
    result: dict[str, Any], model: str | None = None
) -> dict[str, np.ndarray] | None:
    """domain -> [layers, experts] share of assignments (default: of the BTX model)."""
    r = result.get("routing", {}).get(model or btx_name(result))
    if not r:
        return None
    out = {}
    for d, layers in r.items():
        keys = sorted(layers, key=int)
        out[d] = np.array([layers[k]["load"] for k in keys])
    return out


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


def _interval_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    ppl = entry["perplexity"]
    return f"{_f(ppl['estimate'])} [{_f(ppl['low'])}, {_f(ppl['high'])}]"


def table_md(result: dict[str, Any]) -> str:
    """One row per model: compute, the perplexity per domain, the geometric mean per group and
    over all domains, with 95% intervals where the evaluation has them."""
    m, doms = result["models"], result["domains"]
    names = sorted_models(m, doms)
    best = {d: min(m[k]["perplexity"][d] for k in names) for d in doms}
    best_mean = min(m[k]["mean"] for k in names)
    intervals = (result.get("intervals") or {}).get("models") or {}
    groups = list((result.get("intervals") or {}).get("groups") or {})
    head = (
        "| model | active params | train FLOPs | train tokens | wall (s) | "
        + " | ".join(doms)
        + " | mean |"
        + "".join(f" {g} (95% CI) |" for g in groups)
        + (" all groups (95% CI) |" if groups else "")
    )
    lines = [head, "|" + "---|" * (6 + len(doms) + len(groups) + (1 if groups else 0))]
    for k in names:
        r = m[k]
        cells = []
        for d in doms:
            v = r["perplexity"][d]
            cells.append(f"**{_f(v)}**" if v == best[d] else _f(v))
        mean = f"**{_f(r['mean'])}**" if r["mean"] == best_mean else _f(r["mean"])
        ap = r.get("active_params")
        row = intervals.get(k) or {}
        extra = "".join(f" {_interval_cell(row.get('groups', {}).get(g))} |" for g in groups)
        if groups:
            extra += f" {_interval_cell(row.get('mean_of_groups'))} |"
        lines.append(
            f"| {k} | {f'{ap / 1e6:.2f}M' if ap else '-'} | {_flops(r['train_flops'])} | "
            f"{r['train_tokens']:,} | {r['train_seconds']:.0f} | "
            + " | ".join(cells)
            + f" | {mean} |"
            + extra
        )
    return "\n".join(lines)


def comparisons_md(result: dict[str, Any]) -> str:
    """BTX minus each rival, paired, in mean loss (nats; negative = BTX lower), per group and
    over all groups, with 95% intervals."""
    comparisons = (result.get("intervals") or {}).get("comparisons") or {}
    if not comparisons:
        return ""
    groups = list(next(iter(comparisons.values()))["groups"])
    keys = [*groups, "mean_of_groups"] if groups else ["mean"]
    head = "| BTX minus | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]
    for rival, c in comparisons.items():
        cells = []
        for k in keys:
            entry = c["groups"][k] if k in groups else c[k]
            loss = entry["loss"]
            mark = (
                " (BTX lower)"
                if entry["a_better"]
                else " (BTX higher)"
                if entry["b_better"]
                else ""
            )
            cells.append(f"{loss['estimate']:+.3f} [{loss['low']:+.3f}, {loss['high']:+.3f}]{mark}")
        lines.append(f"| {rival} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff(v: dict[str, Any]) -> str:
    if "low" in v:
        return f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
    return f"{v['difference']:+.3f} (no interval)"


def claims_md(claims: dict[str, Any]) -> str:
    """The claims as a list; each comparison is a paired loss difference in nats with its 95%
    interval, and a claim holds only when every interval lies on its side of 0."""

    def mark(ok: bool) -> str:
        return "holds" if ok else "DOES NOT HOLD"

    out = []
    c = claims.get("expert_best_on_own_domain")
    if c:
        parts = [
            f"{d}: " + ", ".join(f"vs {o} {_diff(v)}" for o, v in vs.items())
            for d, vs in c["per_domain"].items()
        ]
        out.append(
            f"- Each expert lower than the seed and every other expert on its own domain (expert "
            f"minus other; the dense baseline shown, not deciding): **{mark(c['holds'])}** "
            f"({'; '.join(parts)})"
        )
    c = claims.get("experts_forget_other_domains")
    if c:
        n_bad = sum(not v["higher"] for vs in c["per_expert"].values() for v in vs.values())
        where = {"general": "general text, the seed's own data"}.get(
            c.get("on"), "the other expert domains"
        )
        out.append(
            f"- Experts worse than the seed on {where} (forgetting): "
            f"**{mark(c['holds'])}**"
            + (f" ({n_bad} expert/domain pairs are not clearly worse)" if n_bad else "")
        )
    c = claims.get("btx_lowest_mean")
    if c:
        parts = [f"vs {k} {_diff(v)}" for k, v in c["versus"].items()]
        out.append(
            f"- BTX lowest on the {c['statistic'].replace('_', ' ')} (BTX minus rival): "
            f"**{mark(c['holds'])}** ({'; '.join(parts)})"
        )
        for group, g in (c.get("per_group") or {}).items():
            parts = [f"vs {k} {_diff(v)}" for k, v in g["versus"].items()]
            out.append(f"  - {group}: **{mark(g['holds'])}** ({'; '.join(parts)})")
    for model, c in (claims.get("added_domains") or {}).items():
        old, new = c["forgetting_on_old_domains"], c["gain_on_new_domains"]
        out.append(
            f"- {model} against BTX, which never saw the added domains (BTX minus it): worse on "
            f"the old expert domains (forgetting) **{mark(old['holds'])}** ({_diff(old)}); "
            f"better on the added domains (gain) **{mark(new['holds'])}** ({_diff(new)})"
        )
    c = claims.get("routing_to_own_expert")
    if c and c["per_domain"]:
        parts = [
            f"{d}: own {v['own_share']:.0%} (top: {v['top_expert']})"
            for d, v in c["per_domain"].items()
        ]
        uniform = next(iter(c["per_domain"].values()))["uniform"]
        out.append(
            f"- Each domain's tokens mostly routed to its own expert (share of top-k "
            f"assignments, mean over layers; uniform = {uniform:.0%}): "
            f"**{mark(c['holds'])}** ({'; '.join(parts)})"
        )
    return "\n".join(out)


def routing_md(result: dict[str, Any], model: str | None = None) -> str:
    model = model or btx_name(result)
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
        "mean = the mean of the per-domain losses, i.e. the geometric mean of the per-domain "
        "perplexities; the group columns are the same over each group of domains, and "
        "all groups weighs every group the same. Intervals: 95%, bootstrap over held-out "
        "documents. Train FLOPs = 6 x active params x tokens of the stages after the seed (the "
        "seed's pretraining is shared by all); wall = sum of those stages' wall times.",
        "",
        table_md(result),
        "",
        *(
            [
                "BTX minus each rival: paired difference in mean loss (nats per token; negative "
                "= BTX lower), 95% interval; a difference counts only when its interval "
                "excludes 0.",
                "",
                comparisons_md(result),
                "",
            ]
            if comparisons_md(result)
            else []
        ),
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
    if result.get("lm_eval"):
        parts += ["", lm_eval_md(result)]
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
    by_merge = diag.get("retention_by_merge") or {}
    if not by_merge and diag.get("retention"):
        by_merge = {"the merge": diag["retention"]}
    for merged, retention in by_merge.items():
        shown = ", ".join(
            f"{d} {v:.0%}" if v is not None else f"{d} -" for d, v in retention.items()
        )
        lines += [
            "",
            f"Merge retention of {merged} (share of each expert's loss gain the merge keeps "
            f"before finetuning): {shown}.",
        ]
    if diag.get("plot"):
        return lines + ["", f"Plot: {diag['plot']}."]
    return lines + ["", "No plot: matplotlib is not installed (pip install megatron_btx[plots])."]


# ---------------------------------------------------------------------------------------------
# Downstream tasks (btx evaluate --lm-eval, megatron_btx.eval.lm_eval)
# ---------------------------------------------------------------------------------------------
def headline(metrics: dict[str, float]) -> float:
    """The one number of a task: acc, else exact_match, else its first metric."""
    for key in ("acc", "exact_match"):
        if key in metrics:
            return metrics[key]
    return next(iter(metrics.values()), float("nan"))


def lm_eval_md(result: dict[str, Any]) -> str:
    """Models x (task, metric) table of the lm-evaluation-harness scores, and what was skipped."""
    lm = result["lm_eval"]
    scores = lm["scores"]
    columns = sorted({(t, m) for per in scores.values() for t, ms in per.items() for m in ms})
    limit = f", at most {lm['limit']} documents per task" if lm.get("limit") else ""
    lines = [f"## Downstream tasks (lm-evaluation-harness{limit})", ""]
    if columns:
        lines.append("| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |")
        lines.append("|---|" + "---|" * len(columns))
        for name in sorted_models(scores, result.get("domains"), result["models"]):
            cells = [scores[name].get(t, {}).get(m) for t, m in columns]
            lines.append(
                f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |"
            )
    if lm.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in lm["skipped"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------
def heatmaps(result: dict[str, Any], out: Path, model: str | None = None) -> list[Path]:
    model = model or btx_name(result)
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
        btx = btx_name(result)
        for name, row in result["models"].items():  # every other MoE's in a folder of its own
            if name != btx and name in result["routing"] and row.get("role") == "rival":
                heatmaps_model(result, out, name)
    write_results(result, out)


def write_results(result: dict[str, Any], out: Path) -> None:
    """Rewrite results.md and results.json only (after scores were added to ``result``)."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "results.md", results_md(result))
    _write(out / "results.json", json.dumps(result, indent=1))


def heatmaps_model(result: dict[str, Any], out: Path, model: str) -> None:
    sub = out / model
    sub.mkdir(exist_ok=True)
    heatmaps(result, sub, model)
