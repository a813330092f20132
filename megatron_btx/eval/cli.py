"""``btx evaluate --run-dir RUN``: the per-domain held-out perplexity table of every model of a
BTX run, the BTM ensembles, and the routing analysis of the BTX MoE.

Models: those the plan names (plan.json's ``models``, :mod:`megatron_btx.pipeline.models`): the
seed, each expert, the merge before finetuning, BTX after finetuning, and every baseline's
(:mod:`megatron_btx.pipeline.baselines`: the dense baseline, sparse upcycling, the BTM ensembles,
...). Each is scored as its entry says: a dense or MoE checkpoint (routed by its router), or a
BTM ensemble of the experts (per held-out document the k experts whose training-data tf-idf
centroid is closest choose themselves, and their next-token distributions are averaged
uniformly). BTX is compared with every rival.

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

from megatron_btx.errors import BTXError, run_command

log = logging.getLogger(__name__)


def _progress(msg: str) -> None:
    print(f"[btx evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------------
def run_models(run_dir: Path) -> tuple[Any, list, dict[str, dict[str, Any]]]:
    """(BTX config, stages, model name -> its plan entry as a dict: checkpoint, stages, kind,
    role, part, domain, router, k, ...), from the run's btx.yaml and plan.json."""
    from megatron_btx.config import read_yaml
    from megatron_btx.pipeline import config as btx_config
    from megatron_btx.pipeline import plan as plan_mod

    cfg_path = run_dir / "btx.yaml"
    if not cfg_path.is_file():
        raise BTXError(f"{run_dir}: no btx.yaml (not a btx run directory; start it with btx run)")
    cfg = btx_config.load(read_yaml(cfg_path))
    plan = plan_mod.read_plan_file(run_dir)
    return cfg, plan.stages, {m.name: m.to_dict() for m in plan.models}


def _named(models: dict[str, dict[str, Any]], **want: Any) -> dict[str, dict[str, Any]]:
    return {n: m for n, m in models.items() if all(m.get(k) == v for k, v in want.items())}


def btx_merged(models: dict[str, dict[str, Any]]) -> str | None:
    """The merge BTX was finetuned from: the merged model (``part: merged``) whose stage is one
    of the BTX model's stages (others, e.g. a BAM merge, are merges of other rivals)."""
    btx = next(iter(_named(models, role="btx").values()), None)
    merged = _named(models, part="merged")
    if btx is not None:
        return next((n for n, m in merged.items() if m.get("stage") in btx["stages"]), None)
    return next(iter(merged), None)


def expert_labels(cfg, merged: str | None, seed_label: str):
    """(a label per routed expert of the BTX MoE, the domain its FFN came from), from the merged
    checkpoint's manifest: `code`, or `code.0`, `code.1` with split chunks, `blend0` (no single
    domain) when blended; the seed's expert is `seed_label`."""
    # the merge's sources, in the plan's order: one expert per expert domain, then the seed
    # (a domain with `expert: false`, e.g. general text, is in the blend but has no expert)
    sources = list(cfg.expert_names) + ([seed_label] if cfg.merge.seed_as_expert else [])
    record: dict[str, Any] = {}
    if merged and Path(merged, "btx_manifest.json").is_file():
        from megatron_btx.checkpoint import manifest

        record = manifest.read(merged).get("merge") or {}
    expert_sources = record.get("expert_sources", list(range(len(sources))))
    chunks = int(record.get("split_chunks") or 1)
    if record.get("blend"):
        return [f"blend{c}" for c in range(chunks)], [None] * chunks
    owners = [sources[s] if s < len(sources) else f"source{s}" for s in expert_sources]
    if chunks == 1:
        return owners, list(owners)
    labels = [f"{owner}.{c}" for owner in owners for c in range(chunks)]
    return labels, [owner for owner in owners for _ in range(chunks)]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def _score_models(
    to_load, names, sets, micro_batch_size, device, scores, missing, verify=True
) -> None:
    """Per-token log-probs of every checkpoint model on every domain (and MoE routing). With
    `verify`, each checkpoint's files are re-hashed against its manifest while it loads."""
    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import read_variant
    from megatron_btx.eval import guard, scoring
    from megatron_btx.models.compute import active_params

    runtime.init(device=device)
    try:
        for name, model_info in to_load.items():
            checkpoint = model_info["checkpoint"]
            if not checkpoint or not Path(checkpoint, "metadata.json").is_file():
                missing[name] = f"no checkpoint at {checkpoint}"
                _progress(f"skip {name}: {missing[name]}")
                continue
            t1 = time.time()
            model, args = guard.load_verified(checkpoint, model_info.get("router"), verify, sets)
            scores.logprobs[name] = {}
            for domain in names:
                scores.logprobs[name][domain] = scoring.token_logprobs(
                    model, args, sets[domain].windows, micro_batch_size
                )
                if args.is_moe:
                    scores.routing.setdefault(name, {})[domain] = scoring.routing_of(model)
            model_info["active_params"] = active_params(
                args, model_info.get("router"), read_variant(checkpoint)
            )
            ppl = {d: scoring.perplexity(lp) for d, lp in scores.logprobs[name].items()}
            _progress(
                f"{name}: "
                + " | ".join(f"{d} {v:.2f}" for d, v in ppl.items())
                + f" ({time.time() - t1:.0f}s)"
            )
            del model
    finally:
        runtime.teardown()


class _Scores:
    def __init__(self):
        self.logprobs: dict[str, dict[str, np.ndarray]] = {}
        self.routing: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}


def _score_btm(models, all_models, names, sets, data_dir, scores, missing) -> dict[str, Any]:
    """BTM top-k: per held-out document, the k experts (of the expert domains `names`) whose
    training-data tf-idf centroid is closest to the document's routing prefix; their next-token
    distributions averaged uniformly, on every evaluated domain."""
    from megatron_btx.eval import data as edata
    from megatron_btx.eval import scoring
    from megatron_btx.eval.tfidf import TfIdf, choose_experts

    btm_models = list(_named(models, kind="btm"))
    by_domain = {m["domain"]: n for n, m in _named(all_models, part="expert").items()}
    experts = [by_domain.get(n, "") for n in names]
    if not btm_models:
        return {}
    if not all(e in scores.logprobs for e in experts):
        for model in btm_models:
            missing[model] = "needs every expert"
        return {}
    t1 = time.time()
    train_docs = {
        n: edata.documents(
            edata.split_prefix(os.path.join(data_dir, n), "train"),
            max_docs=400,
            max_tokens=500_000,
        )
        for n in names
    }
    all_docs = [*train_docs.values(), *(s.docs for s in sets.values())]
    domains = list(sets)
    vocab = 1 + max(int(doc.max()) for docs in all_docs for doc in docs)
    tfidf = TfIdf(vocab).fit([doc for docs in train_docs.values() for doc in docs])
    centroids = np.stack([tfidf.centroid(train_docs[n]) for n in names])
    info: dict[str, Any] = {}
    for model in btm_models:
        k = models[model]["k"]
        scores.logprobs[model] = {}
        correct = total = 0
        for domain in domains:
            held_out = sets[domain]
            choice = np.array(
                [
                    choose_experts(tfidf.transform(held_out.routing_prefix(doc)), centroids, k)
                    for doc in range(len(held_out.docs))
                ]
            )
            if domain in names:  # an expert's domain: did BTM pick that expert first?
                correct += int(sum(names[c[0]] == domain for c in choice))
                total += len(choice)
            chosen = choice[held_out.doc_of_target]  # [n, S, k]
            scores.logprobs[model][domain] = scoring.ensemble_logprobs(
                [scores.logprobs[e][domain] for e in experts], chosen
            )
        info[model] = {"top1_own_domain_docs": correct / max(total, 1)}
        models[model]["active_params"] = k * all_models[experts[0]].get("active_params", 0)
    _progress(
        f"BTM (tf-idf routing, {time.time() - t1:.0f}s): "
        + ", ".join(
            f"{m}: own-domain top-1 for {v['top1_own_domain_docs']:.0%} of held-out docs"
            for m, v in info.items()
        )
    )
    return info


def _rows(models, scores, markers, sets) -> dict[str, dict[str, Any]]:
    """The results table's rows: perplexity and loss per domain (scored tokens only), compute
    per model."""
    from megatron_btx.eval import scoring

    rows = {}
    for name, model_info in models.items():
        per_target = scores.logprobs.get(name)
        if not per_target:
            continue
        logprobs = {d: sets[d].select(lp) for d, lp in per_target.items()}
        ppl = {d: scoring.perplexity(lp) for d, lp in logprobs.items()}
        loss = {d: float(-np.mean(lp)) for d, lp in logprobs.items()}
        stages = model_info["stages"]
        rows[name] = {
            "perplexity": ppl,
            # the mean of the per-domain losses: the geometric mean of the perplexities
            "mean": float(np.exp(np.mean(list(loss.values())))),
            "loss": loss,
            "active_params": model_info.get("active_params"),
            "train_flops": sum(float(markers.get(s, {}).get("flops", 0.0)) for s in stages),
            "train_tokens": sum(int(markers.get(s, {}).get("tokens", 0)) for s in stages),
            "train_seconds": sum(float(markers.get(s, {}).get("seconds", 0.0)) for s in stages),
            **{k: model_info.get(k) for k in ("kind", "role", "part", "domain", "label", "order")},
        }
    return rows


def _diagnostics(models, names, rows, out: Path) -> dict[str, Any] | None:
    """Merge diagnostics (eval/diagnostics.py) when the seed and every expert are there."""
    from megatron_btx.eval import diagnostics

    by_domain = {m["domain"]: n for n, m in _named(models, part="expert").items()}
    experts = {d: (models.get(by_domain.get(d)) or {}).get("checkpoint") for d in names}
    seed_name = next(iter(_named(models, part="seed")), None)
    seed = (models.get(seed_name) or {}).get("checkpoint")
    usable = [seed, *experts.values()]
    if not all(c and Path(c, "metadata.json").is_file() for c in usable):
        return None
    t1 = time.time()
    found = diagnostics.parameter_drift(seed, experts)
    losses = {m: r["loss"] for m, r in rows.items()}

    def retention(merged: str | None) -> dict[str, float | None]:
        return diagnostics.merge_retention(
            {
                "seed": losses.get(seed_name, {}),
                "merged": losses.get(merged, {}),
                "experts": {d: losses.get(by_domain.get(d), {}) for d in names},
            },
            names,
        )

    found["retention"] = retention(btx_merged(models))  # BTX's merge
    # every merge's (BTX's, and a rival's such as BAM's), by model
    found["retention_by_merge"] = {m: retention(m) for m in _named(models, part="merged")}
    out.mkdir(parents=True, exist_ok=True)
    if diagnostics.plot(found, found["retention"], out / "diagnostics.png"):
        found["plot"] = "diagnostics.png"
    _progress(f"merge diagnostics ({time.time() - t1:.0f}s): drift, agreement, retention")
    return found


def _has_mixed(data_dir: str) -> bool:
    """The prepared data holds mixed held-out documents (prepare-data --mixed-tokens)."""
    import json

    manifest = Path(data_dir) / "manifest.json"
    try:
        return bool(json.loads(manifest.read_text()).get("mixed"))
    except (OSError, ValueError):
        return False


def evaluate_run(
    run_dir: str | os.PathLike[str],
    tokens_per_domain: int | None = None,
    split: str | None = None,
    models_wanted: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    verify_hashes: bool = True,
) -> dict[str, Any]:
    from megatron_btx.eval import claims, guard, intervals, report
    from megatron_btx.eval import data as edata
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
    data_dir = cfg.data.prepared or str(run / "data")
    names = cfg.expert_names
    domains = cfg.all_domain_names + ([intervals.MIXED] if _has_mixed(data_dir) else [])
    t0 = time.time()
    tokens = tokens_per_domain or ev.tokens_per_domain
    sets = {
        n: edata.eval_set(data_dir, n, split, cfg.data.seq_length, tokens, ev.btm_route_tokens)
        for n in domains
    }
    _progress(
        f"{len(models)} models x {len(names)} domains; held-out '{split}' split, "
        + ", ".join(f"{n} {s.n_tokens} tokens/{len(s.docs)} docs" for n, s in sets.items())
    )
    to_load = {k: v for k, v in models.items() if v["kind"] != "btm"}
    if _named(models, kind="btm"):  # BTM ensembles score with the experts
        to_load = {**_named(all_models, part="expert"), **to_load}
    scores, missing = _Scores(), {}
    out = Path(out_dir) if out_dir else run / "eval"
    guard.check_out(out)
    _score_models(
        to_load, domains, sets, ev.micro_batch_size, device, scores, missing, verify_hashes
    )
    btm_info = _score_btm(models, to_load, names, sets, data_dir, scores, missing)
    markers = {s.name: (plan_mod.read_marker(s, run) or {}) for s in stages}
    groups = intervals.groups_of(names, domains, cfg.new_domain_names)
    labels_of_mixed = None
    if intervals.MIXED in sets:
        labels_of_mixed = intervals.segment_labels(data_dir, sets[intervals.MIXED], domains)
    evaluated = {m: lp for m, lp in scores.logprobs.items() if m in models}
    found = intervals.compute(evaluated, sets, groups, models, labels_of_mixed, domains)
    merged = all_models.get(btx_merged(all_models) or "", {})
    seed_label = next(iter(_named(all_models, part="seed")), "generalist")
    labels, owners = expert_labels(cfg, merged.get("checkpoint"), seed_label)
    result = {
        "run_dir": str(run),
        "split": split,
        "domains": domains,
        "expert_domains_evaluated": names,
        "groups": groups,
        "tokens": {n: s.n_tokens for n, s in sets.items()},
        "documents": {n: len(s.docs) for n, s in sets.items()},
        "models": _rows(models, scores, markers, sets),
        "missing": missing,
        "btm": btm_info,
        "experts": labels,
        "expert_domains": owners,
        "routing": {
            m: {d: {str(layer): st for layer, st in r.items()} for d, r in rr.items()}
            for m, rr in scores.routing.items()
        },
        "intervals": found,
        "seconds": round(time.time() - t0, 1),
    }
    result["claims"] = claims.check_claims(result, report.routing_matrix(result))
    result["diagnostics"] = _diagnostics(all_models, names, result["models"], out)
    report.write_all(result, out, cfg.evaluation.routing)
    _progress(
        f"wrote {out}/results.md, results.json"
        + (", routing.md, routing*.png" if scores.routing else "")
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
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the models run (auto: a GPU when torch sees one)",
    )
    p.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    p.add_argument(
        "--no-verify-hashes",
        dest="verify_hashes",
        action="store_false",
        help="do not re-hash each checkpoint against its manifest's sha256 while it loads",
    )
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
    p.add_argument(
        "--lm-eval-batch-size",
        type=int,
        default=1,
        metavar="N",
        help="requests per forward pass of lm-eval's HF model (speed; the same scores)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return run_command(_evaluate, args)


def _evaluate(args: argparse.Namespace) -> int:
    from megatron_btx.eval import lm_eval  # --lm-eval: checked before the perplexity eval

    if args.lm_eval_batch_size < 1:
        raise BTXError(f"--lm-eval-batch-size {args.lm_eval_batch_size}: must be >= 1")
    lm_tasks = lm_eval.requested_tasks(args.lm_eval, args.lm_eval_tasks_dir)
    res = evaluate_run(
        args.run_dir,
        args.tokens_per_domain,
        args.split,
        args.models,
        args.out,
        args.device,
        args.verify_hashes,
    )
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    if lm_tasks:  # downstream tasks on each model's HF export
        models = run_models(Path(args.run_dir).resolve())[2]
        lm_eval.evaluate_run_models(
            res,
            models,
            out,
            lm_tasks,
            args.lm_eval_tasks_dir,
            args.lm_eval_limit,
            _progress,
            batch_size=args.lm_eval_batch_size,
        )
    if not args.no_table:
        print((out / "results.md").read_text())
    bad = [m for m, r in res["models"].items() if not np.isfinite(r["mean"])]
    if bad:
        print(f"error: non-finite perplexity for {', '.join(bad)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
