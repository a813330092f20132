"""``btx evaluate --run-dir RUN``: the per-domain held-out perplexity table of every model of a
BTX run, the BTM ensembles, and the routing analysis of the BTX MoE.

Models (those whose checkpoints exist): ``seed``; ``expert_<domain>`` each; ``dense`` (the seed
continued on the blend); ``btm_top1`` / ``btm_top2`` (the experts kept separate; per held-out
document the k experts whose training-data tf-idf centroid is closest choose themselves, and their
next-token distributions are averaged uniformly); ``sparse_upcycling``; ``btx_merge_only`` (the
MiX checkpoint before finetuning, for reference); ``btx`` (after MoE finetuning).

Outputs in ``RUN/eval/``: ``results.json`` (everything), ``results.md`` (the table, compute per
model, and the paper's claims checked on these numbers), ``routing.json`` / ``routing.md`` (per
domain and layer, the share of token->expert assignments each expert got) and
``routing_layer<L>.png`` / ``routing.png`` heatmaps (domains x experts, like the paper's routing
figures). Written atomically (temporary names, then rename).

Compute of a model = the training FLOPs of the stages that produced it after the seed (6 x active
parameters x tokens, see :mod:`megatron_btx.pipeline.plan`); wall = the sum of those stages' wall
times on the machine that ran them (serial time; experts that ran in parallel overlap).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_btx.errors import BTXError

log = logging.getLogger(__name__)


def _progress(msg: str) -> None:
    print(f"[btx evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------
def _ckpt_of(stage) -> str:
    out = stage.outputs[0]
    return out[: -len("/metadata.json")] if out.endswith("/metadata.json") else out


def run_models(run_dir: Path) -> tuple[Any, list, dict[str, dict[str, Any]]]:
    """(BTX config, stages, model name -> {checkpoint, stages: [names], kind})."""
    from megatron_btx.pipeline import config as btx_config
    from megatron_btx.pipeline import plan as plan_mod

    cfg_path = run_dir / "btx.yaml"
    if not cfg_path.is_file():
        raise BTXError(f"{run_dir}: no btx.yaml (not a btx run directory; start it with btx run)")
    cfg = btx_config.load(yaml.safe_load(cfg_path.read_text()))
    stages = plan_mod.read_plan(run_dir)
    by = {s.name: s for s in stages}
    names = cfg.domain_names
    models: dict[str, dict[str, Any]] = {}
    first = by.get(f"expert_{names[0]}")
    seed_ckpt = None
    if first is not None:
        tc = yaml.safe_load(Path(first.argv[1]).read_text())
        seed_ckpt = tc["model"]["init_from"]
    if seed_ckpt:
        models["seed"] = {"checkpoint": seed_ckpt, "stages": [], "kind": "dense"}
    for n in names:
        s = by.get(f"expert_{n}")
        if s:
            models[f"expert_{n}"] = {
                "checkpoint": _ckpt_of(s),
                "stages": [s.name],
                "kind": "dense",
                "domain": n,
            }
    if "baseline_dense" in by:
        models["dense"] = {
            "checkpoint": _ckpt_of(by["baseline_dense"]),
            "stages": ["baseline_dense"],
            "kind": "dense",
        }
    expert_stages = [f"expert_{n}" for n in names if f"expert_{n}" in by]
    if cfg.baselines.btm:
        for k in cfg.evaluation.btm_top_k:
            models[f"btm_top{k}"] = {
                "checkpoint": None,
                "stages": expert_stages,
                "kind": "btm",
                "k": k,
            }
    if "baseline_sparse_upcycling" in by:
        models["sparse_upcycling"] = {
            "checkpoint": _ckpt_of(by["baseline_sparse_upcycling"]),
            "stages": ["upcycle_merge", "baseline_sparse_upcycling"],
            "kind": "moe",
            "router": _router(by["baseline_sparse_upcycling"]),
        }
    if "merge" in by:
        models["btx_merge_only"] = {
            "checkpoint": _ckpt_of(by["merge"]),
            "stages": [*expert_stages, "merge"],
            "kind": "moe",
            "router": _router(by.get("finetune")),
        }
    if "finetune" in by:
        models["btx"] = {
            "checkpoint": _ckpt_of(by["finetune"]),
            "stages": [*expert_stages, "merge", "finetune"],
            "kind": "moe",
            "router": _router(by["finetune"]),
        }
    return cfg, stages, models


def _router(stage) -> dict[str, Any] | None:
    if stage is None:
        return None
    tc = yaml.safe_load(Path(stage.argv[1]).read_text())
    return (tc.get("moe") or {}).get("router")


def _expert_labels(cfg) -> list[str]:
    labels = list(cfg.domain_names)
    if cfg.merge.seed_as_expert:
        labels.append("seed")
    return labels


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_run(
    run_dir: str | os.PathLike[str],
    tokens_per_domain: int | None = None,
    split: str | None = None,
    models_wanted: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    from megatron_btx import runtime
    from megatron_btx.eval import data as edata
    from megatron_btx.eval import report, scoring
    from megatron_btx.eval.tfidf import TfIdf, choose_experts
    from megatron_btx.pipeline import plan as plan_mod

    run = Path(run_dir).resolve()
    cfg, stages, all_models = run_models(run)
    models = dict(all_models)
    if models_wanted:
        unknown = [m for m in models_wanted if m not in models]
        if unknown:
            raise BTXError(f"--models {unknown[0]}: not a model of this run ({', '.join(models)})")
        models = {k: v for k, v in models.items() if k in models_wanted}
    ev = cfg.evaluation
    split = split or ev.split
    tokens = tokens_per_domain or ev.tokens_per_domain
    data_dir = cfg.data.prepared or str(run / "data")
    names = cfg.domain_names
    seq = cfg.data.seq_length
    t0 = time.time()
    sets = {n: edata.eval_set(data_dir, n, split, seq, tokens) for n in names}
    _progress(
        f"{len(models)} models x {len(names)} domains; held-out '{split}' split, "
        + ", ".join(f"{n} {s.n_tokens} tokens/{len(s.docs)} docs" for n, s in sets.items())
    )

    logprobs: dict[str, dict[str, np.ndarray]] = {}
    routing: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    missing: dict[str, str] = {}
    need_experts = any(m["kind"] == "btm" for m in models.values())
    to_load = {k: v for k, v in models.items() if v["kind"] != "btm"}
    if need_experts:
        for n in names:
            key = f"expert_{n}"
            if key not in to_load and key in all_models:
                to_load[key] = all_models[key]
    runtime.init(device="cpu")
    try:
        for name, m in to_load.items():
            ck = m["checkpoint"]
            if not ck or not Path(ck, "metadata.json").is_file():
                missing[name] = f"no checkpoint at {ck}"
                _progress(f"skip {name}: {missing[name]}")
                continue
            t1 = time.time()
            model, args = scoring.load_for_eval(ck, m.get("router"))
            logprobs[name] = {}
            for n in names:
                logprobs[name][n] = scoring.token_logprobs(
                    model, args, sets[n].windows, ev.micro_batch_size
                )
                if args.is_moe:
                    routing.setdefault(name, {})[n] = scoring.routing_of(model)
            m["active_params"] = plan_mod.matmul_params(args)
            ppl = {n: scoring.perplexity(lp) for n, lp in logprobs[name].items()}
            _progress(
                f"{name}: "
                + " | ".join(f"{n} {v:.2f}" for n, v in ppl.items())
                + f" ({time.time() - t1:.0f}s)"
            )
            del model
    finally:
        runtime.teardown()

    # ---- BTM ----------------------------------------------------------------------------
    btm_info: dict[str, Any] = {}
    btm_models = [k for k, v in models.items() if v["kind"] == "btm"]
    experts = [f"expert_{n}" for n in names]
    if btm_models and all(e in logprobs for e in experts):
        t1 = time.time()
        train_docs = {
            n: edata.documents(
                edata.split_prefix(os.path.join(data_dir, n), "train"),
                max_docs=400,
                max_tokens=500_000,
            )
            for n in names
        }
        vocab = 1 + max(
            int(d.max())
            for docs in [*train_docs.values(), *(s.docs for s in sets.values())]
            for d in docs
        )
        tf = TfIdf(vocab).fit([d for docs in train_docs.values() for d in docs])
        centroids = np.stack([tf.centroid(train_docs[n]) for n in names])
        for mname in btm_models:
            k = models[mname]["k"]
            logprobs[mname] = {}
            correct = total = 0
            for n in names:
                s = sets[n]
                choice = np.array([choose_experts(tf.transform(d), centroids, k) for d in s.docs])
                correct += int(sum(names[c[0]] == n for c in choice))
                total += len(choice)
                chosen = choice[s.doc_of_target]  # [n, S, k]
                logprobs[mname][n] = scoring.ensemble_logprobs(
                    [logprobs[e][n] for e in experts], chosen
                )
            btm_info[mname] = {"top1_own_domain_docs": correct / max(total, 1)}
            models[mname]["active_params"] = k * to_load[experts[0]].get("active_params", 0)
        _progress(
            f"BTM (tf-idf routing, {time.time() - t1:.0f}s): "
            + ", ".join(
                f"{m}: own-domain top-1 for {v['top1_own_domain_docs']:.0%} of held-out docs"
                for m, v in btm_info.items()
            )
        )
    elif btm_models:
        for m in btm_models:
            missing[m] = "needs every expert"

    # ---- results ------------------------------------------------------------------------
    markers = {s.name: (plan_mod.read_marker(s, run) or {}) for s in stages}
    rows = {}
    for name, m in models.items():
        if name not in logprobs or not logprobs[name]:
            continue
        ppl = {n: scoring.perplexity(lp) for n, lp in logprobs[name].items()}
        flops = sum(float(markers.get(s, {}).get("flops", 0.0)) for s in m["stages"])
        secs = sum(float(markers.get(s, {}).get("seconds", 0.0)) for s in m["stages"])
        toks = sum(int(markers.get(s, {}).get("tokens", 0)) for s in m["stages"])
        rows[name] = {
            "perplexity": ppl,
            "mean": float(np.mean(list(ppl.values()))),
            "loss": {n: float(-np.mean(lp)) for n, lp in logprobs[name].items()},
            "active_params": m.get("active_params"),
            "train_flops": flops,
            "train_tokens": toks,
            "train_seconds": secs,
            "kind": m["kind"],
        }
    result = {
        "run_dir": str(run),
        "split": split,
        "domains": names,
        "tokens": {n: s.n_tokens for n, s in sets.items()},
        "documents": {n: len(s.docs) for n, s in sets.items()},
        "models": rows,
        "missing": missing,
        "btm": btm_info,
        "experts": _expert_labels(cfg),
        "routing": {
            m: {d: {str(layer): st for layer, st in r.items()} for d, r in rr.items()}
            for m, rr in routing.items()
        },
        "seconds": round(time.time() - t0, 1),
    }
    result["claims"] = report.check_claims(result)
    out = Path(out_dir) if out_dir else run / "eval"
    report.write_all(result, out, cfg.evaluation.routing)
    _progress(
        f"wrote {out}/results.md, results.json"
        + (", routing.md, routing*.png" if routing else "")
        + f" in {time.time() - t0:.0f}s"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="btx evaluate",
        description="Per-domain held-out perplexity of every model of a BTX run (seed, experts, "
        "dense, BTM top-k, sparse upcycling, BTX), and the routing analysis of the BTX MoE.",
    )
    p.add_argument("--run-dir", required=True, help="a btx run directory (btx run CONFIG)")
    p.add_argument(
        "--tokens-per-domain",
        type=int,
        default=None,
        help="scored tokens per domain (default: the config's evaluation section)",
    )
    p.add_argument("--split", choices=["test", "valid"], default=None)
    p.add_argument("--models", nargs="+", default=None, help="only these models")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="comma-separated lm-evaluation-harness tasks, run offline on each model's HF export "
        "(RUN/eval/hf/MODEL); needs the eval extra",
    )
    p.add_argument(
        "--lm-eval-tasks-dir",
        default=None,
        metavar="DIR",
        help="folder of local task YAML files (default: lm-eval's built-in tasks)",
    )
    p.add_argument(
        "--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents per task"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from megatron_btx.eval import lm_eval  # --lm-eval: checked before the perplexity eval

        lm_tasks = lm_eval.requested_tasks(args.lm_eval, args.lm_eval_tasks_dir)
        res = evaluate_run(args.run_dir, args.tokens_per_domain, args.split, args.models, args.out)
        out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
        if lm_tasks:  # downstream tasks on each model's HF export
            models = run_models(Path(args.run_dir).resolve())[2]
            lm_eval.evaluate_run_models(
                res, models, out, lm_tasks, args.lm_eval_tasks_dir, args.lm_eval_limit, _progress
            )
    except BTXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.no_table:
        print((out / "results.md").read_text())
    bad = [m for m, r in res["models"].items() if not np.isfinite(r["mean"])]
    if bad:
        print(f"error: non-finite perplexity for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
