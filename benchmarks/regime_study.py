"""The regime study: when does BTX beat the best compute-matched baseline?

One command runs a faithful miniature of the paper's setup (examples/small_btx.yaml: the seed
pretrained on general text, four domain experts, the MoE finetuned on their blend with 19%
general data, evaluation on the experts' domains, the general domain and mixed documents) at
several settings, and reports BTX minus the best baseline (mean loss over the evaluation groups,
nats; negative = BTX better) with its paired 95% interval, as a function of:

- seed convergence: tokens per parameter of the seed's pretraining;
- the experts' learning rate;
- the split of the BTX compute between the expert stage and the MoE finetune;

together with the merge diagnostics (the experts' drift from the seed, the share of their
updates the average keeps, the merge's retention of their gains), which test the explanation that
averaging large, unrelated updates of an unconverged seed is what costs BTX.

The data is prepared once and the seed pretrained once, at a constant learning rate after warm-up,
so its checkpoints at each convergence point are the seeds of shorter runs; every setting is then
a `btx run` from that seed (its own run directory). Varying one factor at a time around the centre
setting keeps the cost to a few hours on 2 cores:

    python benchmarks/regime_study.py --work runs/regime             # all, resumable
    python benchmarks/regime_study.py --work runs/regime --report    # table and plot only

Writes WORK/regime_study.json, WORK/regime_study.md and WORK/regime_study.png (docs/RESULTS.md
shows the table and plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: the study's grid: one factor at a time around CENTRE
CENTRE = {"tokens_per_param": 16, "expert_lr": 3e-4, "expert_share": 0.5, "compute_match": "flops"}
FACTORS = {
    "tokens_per_param": [4, 16, 64],
    "expert_lr": [1e-3, 3e-4, 1e-4],
    # of each expert's steps + the finetune's steps (the FLOPs share is in the table)
    "expert_share": [0.25, 0.5, 0.75],
    # the baselines' budget: BTX's FLOPs, or its measured core-seconds (the paper's GPU-days)
    "compute_match": ["flops", "time"],
}


def settings() -> list[dict[str, Any]]:
    """The settings to run: the centre, then each factor's other values."""
    out = [dict(CENTRE)]
    for factor, values in FACTORS.items():
        for value in values:
            point = {**CENTRE, factor: value}
            if point not in out:
                out.append(point)
    return out


def name_of(point: dict[str, Any]) -> str:
    name = f"tpp{point['tokens_per_param']}_lr{point['expert_lr']:g}_share{point['expert_share']:g}"
    return name if point["compute_match"] == "flops" else f"{name}_{point['compute_match']}"


def _btx(*args: str, log: Path, cwd: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with open(log, "a") as out:
        result = subprocess.run(
            [sys.executable, "-m", "megatron_btx", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    if result.returncode != 0:
        raise SystemExit(f"btx {' '.join(args)} failed (exit {result.returncode}); see {log}")


def _base(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _params(base: dict[str, Any]) -> int:
    """Total parameters of the seed (for tokens per parameter)."""
    from megatron_btx.pipeline import config as btx_config
    from megatron_btx.pipeline.plan import seed_args

    return seed_args(btx_config.load(base)).num_params()


def prepare(base: dict[str, Any], work: Path) -> Path:
    """The data, once: the base config's own prepare-data stage, run in WORK/data."""
    from megatron_btx.pipeline import plan

    data = work / "data"
    if (data / "manifest.json").is_file():
        return data
    raw = dict(base, run_dir=str(work / "prep"))
    stage = {s.name: s for s in plan.build_plan(raw, write=False)}["prepare_data"]
    argv = list(stage.argv)
    argv[argv.index("--output-dir") + 1] = str(data)
    _btx(*argv, log=work / "prepare.log", cwd=work)
    return data


def pretrain_seed(base: dict[str, Any], work: Path, data: Path) -> dict[int, Path]:
    """One seed run at a constant learning rate after warm-up, saving at every convergence
    point: {tokens per parameter: checkpoint}."""
    pretrain = base["seed"]["pretrain"]
    batch = int(pretrain["global_batch_size"]) * int(base["data"]["seq_length"])
    params = _params(base)
    # Every point is a multiple of the smallest so that one save interval hits them all.
    smallest = min(FACTORS["tokens_per_param"])
    unit = max(1, round(smallest * params / batch))
    steps = {tpp: unit * tpp // smallest for tpp in FACTORS["tokens_per_param"]}
    run = work / "seed"
    config = {
        "run_dir": str(run),
        "model": dict(base["model"]),
        "parallel": {},
        "data": {
            "path": str(data),
            "domains": {d: 1.0 for d in base["seed"]["domains"]},
            "seq_length": base["data"]["seq_length"],
            "micro_batch_size": pretrain["micro_batch_size"],
            "global_batch_size": pretrain["global_batch_size"],
        },
        "train": {
            "steps": max(steps.values()),
            "lr": pretrain["lr"],
            "warmup_steps": pretrain.get("warmup_steps", 100),
            "lr_decay_style": "constant",
            "save_interval": min(steps.values()),
            "keep_last": 1000,
            "eval_interval": 10**9,
            "eval_iters": 1,
            "log_interval": 100,
        },
        "optimizer": base.get("optimizer", {}),
        "logging": {"tensorboard": False},
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "seed.yaml"
    path.write_text(yaml.safe_dump(config))
    nproc = int(pretrain.get("nproc", 1))
    needed = [run / "checkpoints" / f"iter_{s:07d}" for s in steps.values()]
    if not all((p / "metadata.json").is_file() for p in needed):
        args = ["train", str(path)] + (["--nproc-per-node", str(nproc)] if nproc > 1 else [])
        _btx(*args, log=work / "seed.log", cwd=work)
    return {tpp: run / "checkpoints" / f"iter_{s:07d}" for tpp, s in steps.items()}


def point_config(base: dict[str, Any], point: dict[str, Any], seed: Path, data: Path, run: Path):
    """The base config at one setting: the given seed and data; the expert learning rate; the
    BTX steps split between experts and finetune (their total kept)."""
    raw = json.loads(json.dumps(base))
    raw["run_dir"] = str(run)
    raw["data"]["prepared"] = str(data)
    raw["seed"] = {"init_from": str(seed)}  # its architecture and data are the given seed's
    raw.pop("model", None)
    raw["experts"]["lr"] = point["expert_lr"]
    raw["baselines"]["compute_match"] = point["compute_match"]
    total = int(base["experts"]["steps"]) + int(base["finetune"]["steps"])
    raw["experts"]["steps"] = max(1, round(total * point["expert_share"]))
    raw["finetune"]["steps"] = max(1, total - raw["experts"]["steps"])
    return raw


def run_point(base, point, seeds, data, work) -> Path:
    run = work / "points" / name_of(point)
    run.mkdir(parents=True, exist_ok=True)
    raw = point_config(base, point, seeds[point["tokens_per_param"]], data, run)
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    if not (run / "eval" / "results.json").is_file():
        _btx("run", str(path), "--parallel", "2", log=run.parent / f"{run.name}.log", cwd=work)
    return run


def summarise(point: dict[str, Any], run: Path) -> dict[str, Any]:
    """BTX minus the best baseline (by the point estimate of the mean over groups), paired, and
    the merge diagnostics of one setting."""
    result = json.loads((run / "eval" / "results.json").read_text())
    comparisons = result["intervals"]["comparisons"]
    key = "mean_of_groups" if "mean_of_groups" in next(iter(comparisons.values())) else "mean"
    best = max(comparisons, key=lambda r: comparisons[r][key]["loss"]["estimate"])
    loss = comparisons[best][key]["loss"]
    diag = result.get("diagnostics") or {}
    drift = diag.get("drift", {}).get("attention", {})
    retention = [v for v in (diag.get("retention") or {}).values() if v is not None]
    models = result["intervals"]["models"]
    return {
        **point,
        "run": str(run),
        "best_baseline": best,
        "btx_minus_best": loss,
        "btx_better": comparisons[best][key]["a_better"],
        "versus": {r: c[key]["loss"] for r, c in comparisons.items()},
        "expert_flops_share": _expert_flops_share(result["models"]),
        "mean_ppl": {m: models[m].get(key, models[m]["mean"])["perplexity"] for m in models},
        "attention_drift": sum(drift.values()) / len(drift) if drift else None,
        "attention_kept_by_average": diag.get("kept_by_average", {}).get("attention"),
        "merge_retention": sum(retention) / len(retention) if retention else None,
    }


def _expert_flops_share(models: dict[str, Any]) -> float | None:
    """The experts' share of BTX's training FLOPs (the rest is the MoE finetune)."""
    experts = sum(
        m.get("train_flops") or 0 for name, m in models.items() if name.startswith("expert_")
    )
    total = (models.get("btx") or {}).get("train_flops")
    return experts / total if total else None


def report(rows: list[dict[str, Any]], work: Path) -> str:
    lines = [
        "| tokens/param | expert lr | expert share (steps; FLOPs) | compute match | best baseline "
        "| BTX - best (nats, 95% CI) | attention drift | kept by averaging | merge retention |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["btx_minus_best"]
        cell = f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(
            f"| {r['tokens_per_param']} | {r['expert_lr']:g} | {r['expert_share']:g}; "
            f"{_num(r.get('expert_flops_share'))} | {r.get('compute_match', 'flops')} | "
            f"{r['best_baseline']} | {cell}{' (BTX better)' if r['btx_better'] else ''} | "
            f"{_num(r['attention_drift'])} | {_num(r['attention_kept_by_average'])} | "
            f"{_num(r['merge_retention'])} |"
        )
    text = "\n".join(lines) + "\n"
    (work / "regime_study.md").write_text(text)
    _plot(rows, work / "regime_study.png")
    return text


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(FACTORS), figsize=(5 * len(FACTORS), 4), sharey=True)
    for ax, factor in zip(axes, FACTORS):
        others = {k: v for k, v in CENTRE.items() if k != factor}
        picked = [r for r in rows if all(r[k] == v for k, v in others.items())]
        picked.sort(key=lambda r: r[factor])
        categorical = isinstance(CENTRE[factor], str)
        xs = [FACTORS[factor].index(r[factor]) if categorical else r[factor] for r in picked]
        est = [r["btx_minus_best"]["estimate"] for r in picked]
        low = [r["btx_minus_best"]["estimate"] - r["btx_minus_best"]["low"] for r in picked]
        high = [r["btx_minus_best"]["high"] - r["btx_minus_best"]["estimate"] for r in picked]
        ax.errorbar(xs, est, yerr=[low, high], marker="o", capsize=4)
        ax.axhline(0, color="grey", lw=1, ls="--")
        if xs and factor in ("tokens_per_param", "expert_lr"):
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        if categorical:
            ax.set_xticks(range(len(FACTORS[factor])), FACTORS[factor])
        ax.set_xlabel(factor.replace("_", " "))
        ax.set_title(f"others at the centre {others}", fontsize=7)
    axes[0].set_ylabel("BTX - best baseline (nats; < 0: BTX better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(ROOT / "examples" / "small_btx.yaml"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "regime"))
    parser.add_argument("--report", action="store_true", help="table and plot of finished runs")
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = _base(Path(args.base))
    rows = []
    t0 = time.time()
    if not args.report:
        data = prepare(base, work)
        seeds = pretrain_seed(base, work, data)
        print(f"[regime] data and seeds ready in {time.time() - t0:.0f}s", flush=True)
    for point in settings():
        run = work / "points" / name_of(point)
        if not args.report and (args.only is None or name_of(point) in args.only):
            t1 = time.time()
            run_point(base, point, seeds, data, work)
            print(f"[regime] {name_of(point)} in {time.time() - t1:.0f}s", flush=True)
        if (run / "eval" / "results.json").is_file():
            rows.append(summarise(point, run))
    (work / "regime_study.json").write_text(json.dumps({"centre": CENTRE, "rows": rows}, indent=1))
    print(report(rows, work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
