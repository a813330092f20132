#!/usr/bin/env python
"""BTX from the real seed (SmolLM2-135M-Instruct) on one GPU, against dense, sparse upcycling
and BTM, at equal FLOPs and at equal time, in ONE device call (issue 20, item 5).

Two `btx run`s of one plan, in one run directory each:

  flops   seed -> 4 experts (code, math, prose, legal) -> merge (seed as the 5th expert, top-2)
          -> finetune; dense and sparse upcycling at the BTX stages' FLOPs; BTM top-1/top-2;
          evaluation with 95% intervals and the routing table
  time    a copy of `flops` (its BTX stages are done and are skipped) re-planned with
          baselines.compute_match: time, so dense and sparse upcycling train for as long as BTX
          did on this GPU (btx match-compute measures it), then evaluation again

The budgets are planned here (:func:`plan_budget`) to fit --budget-s: expert and finetune
steps are the largest that, at the assumed GPU speeds, leave every stage (both runs, their
start-ups, merges and evaluations) inside the budget, with finetune tokens = --finetune-ratio x
the experts' tokens together. The assumed speeds come from the H100 figures in BENCHMARKS.md
(~1B dense: 52.1k tok/s at 5.8 GFLOP/token, MFU 30%; ~1B MoE: 46.0k tok/s at MFU 22%), scaled
to this model's FLOPs per token at half that MFU (a 576-wide model keeps the GPU less busy):
dense 145k tok/s, MoE 66k tok/s. results.json records the measured speeds, so the next call
can be planned with --dense-tps / --moe-tps from them.

HOW TO RUN. The device has no network and takes at most 64 MiB per call; the seed's GGUF is 98
MB, so it travels in two parts over two calls to the same warm machine (ignored paths a call
leaves there are kept for the next, if it comes within the 30 s warm window). Here, once:

    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \\
        megatron-core==0.16.1 gguf==0.19.0
    .venv/bin/python benchmarks/gpu_real_seed.py --prepare   # runs/bench/real_seed_{a,b}, data

Call 1 (`run`): command `bash benchmarks/gpu_throughput.sh`, carry [".whl", "runs/bench/data",
"runs/bench/real_seed_a"] (it leaves part a on the machine). Call 2, at once: command
`bash benchmarks/gpu_real_seed.sh`, carry [".whl", "runs/bench/real_seed_b",
"runs/bench/real_seed_data"], timeout_s 560. results.json and the logs come back under $OUT.

    python benchmarks/gpu_real_seed.py --plan      # the plan and its predicted times, no GPU
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED_NAME = "smollm2-135m-instruct"
PARTS = ROOT / "runs" / "bench"
DOMAINS = ("code", "math", "prose", "legal")
#: SmolLM2-135M's config as its GGUF describes it (tests/test_real_seed.py checks the import)
SMOLLM2_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: time the plan assumes outside training (seconds): installing the wheels, joining and
#: importing the seed (~100 MB); one train stage's start-up (imports, model build, checkpoint
#: load) and final save of a 135M-453M model; one merge; one evaluation of 11 models on 6
#: domains; the time match. Guesses until a device call measures them: results.json records
#: every run's wall time and the stages' own times, to plan the next call from.
OVERHEAD = {"setup": 40.0, "stage": 15.0, "merge": 15.0, "evaluate": 60.0, "match": 5.0}
#: the train stages that train an MoE (the rest train the dense model)
MOE_STAGES = ("finetune", "baseline_sparse_upcycling")


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="print the plan (no GPU)")
    mode.add_argument("--prepare", action="store_true", help="here: the seed parts and the data")
    mode.add_argument("--run", action="store_true", help="on the device: both runs")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole call's wall time")
    p.add_argument("--dense-tps", type=float, default=145e3, help="assumed dense tokens/s")
    p.add_argument("--moe-tps", type=float, default=66e3, help="assumed MoE tokens/s")
    p.add_argument(
        "--finetune-ratio",
        type=float,
        default=0.5,
        help="finetune tokens / all experts' tokens (the issue: 10-20M vs 4 x 5-10M)",
    )
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=65536, help="scored tokens per domain")
    p.add_argument("--work", default="runs/real_seed_gpu")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/real_seed_gpu/out"))
    p.add_argument("--seed-config", default=None, help=argparse.SUPPRESS)  # tests: config.json
    return p.parse_args(argv)


# ---- planning (pure: no GPU, no model) ----------------------------------------------------------
def btx_config(
    a,
    seed: str,
    data: str,
    run_dir: str,
    expert_steps: int,
    finetune_steps: int,
    match: str = "flops",
) -> dict:
    """The `btx run` config of the study."""
    stage = {
        "lr": 1e-4,
        "warmup_steps": 5,
        "micro_batch_size": a.micro_batch,
        "global_batch_size": a.global_batch,
    }
    return {
        "run_dir": run_dir,
        # planning without the data: the built-in corpora, to be tokenized with the seed's
        "data": {"prepared": data, "seq_length": a.seq, "split": "test=0.08,valid=0.02"}
        if data
        else {"vocab_size": SMOLLM2_CONFIG["vocab_size"], "seq_length": a.seq},
        "domains": {
            **{d: {"source": "builtin", "weight": 0.2025} for d in DOMAINS},
            "general": {"source": "builtin", "weight": 0.19, "expert": False},
        },
        "seed": {"init_from": seed},
        "experts": {**stage, "steps": expert_steps},
        "merge": {"seed_as_expert": True, "router_init": "random", "top_k": 2},
        "finetune": {
            **stage,
            "steps": finetune_steps,
            "router": {"type": "topk"},
            "load_balancing": "aux_loss",
            "aux_loss_coeff": 0.01,
        },
        "baselines": {"dense": True, "sparse_upcycling": True, "btm": True, "compute_match": match},
        "evaluation": {"split": "test", "tokens_per_domain": a.eval_tokens, "btm_top_k": [1, 2]},
        "train": {
            "log_interval": 10,
            "eval_iters": 1,
            "min_lr_ratio": 0.1,
            "dtype": "bf16",
            "device": "cuda",
        },
        "optimizer": {"weight_decay": 0.1, "clip_grad": 1.0},
        "logging": {"tensorboard": False},
    }


def predict(a, stages) -> dict:
    """Predicted seconds of both runs from the planned stages (the pipeline's own step counts
    and tokens) at the assumed speeds; the time run's baselines train as long as BTX did."""
    speed = {"dense": a.dense_tps, "moe": a.moe_tps}

    def kind(stage) -> str:
        return "moe" if stage.name in MOE_STAGES else "dense"

    train = {s.name: s.tokens / speed[kind(s)] for s in stages if s.kind == "train"}
    btx = sum(t for name, t in train.items() if name.startswith("expert_") or name == "finetune")
    merges = sum(1 for s in stages if s.kind == "merge")
    trains = sum(1 for s in stages if s.kind == "train")
    flops_run = (
        OVERHEAD["setup"]
        + sum(train.values())
        + trains * OVERHEAD["stage"]
        + merges * OVERHEAD["merge"]
        + OVERHEAD["evaluate"]
    )
    time_run = OVERHEAD["match"] + 2 * (btx + OVERHEAD["stage"]) + OVERHEAD["evaluate"]
    return {
        "train_s": train,
        "btx_train_s": btx,
        "flops_run_s": flops_run,
        "time_run_s": time_run,
        "total_s": flops_run + time_run,
    }


def plan_budget(a, seed: str, data: str | None = None) -> dict:
    """The largest expert steps (finetune steps from --finetune-ratio) whose predicted time
    fits --budget-s; the pipeline plans every stage, baselines at equal FLOPs included."""
    from megatron_btx.pipeline.plan import build_plan

    def attempt(expert_steps: int):
        tokens_per_step = a.global_batch * a.seq
        finetune = max(1, round(a.finetune_ratio * len(DOMAINS) * expert_steps))
        cfg = btx_config(a, seed, data, str(Path(a.work).resolve() / "run"), expert_steps, finetune)
        stages = build_plan(cfg, write=False)
        times = predict(a, stages)
        return cfg, stages, times, tokens_per_step

    low, high = 1, 1
    while attempt(high * 2)[2]["total_s"] <= a.budget_s and high < 1 << 16:
        high *= 2
    high *= 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if attempt(mid)[2]["total_s"] <= a.budget_s else (low, mid)
    cfg, stages, times, tokens_per_step = attempt(low)
    if times["total_s"] > a.budget_s:
        raise SystemExit(f"error: even 1 expert step does not fit {a.budget_s:.0f} s")
    return {
        "config": cfg,
        "stages": {
            s.name: {
                "kind": s.kind,
                "steps": s.steps,
                "tokens": s.tokens,
                "flops": s.flops,
                "group": s.group,
            }
            for s in stages
        },
        "predicted": times,
        "expert_tokens": low * tokens_per_step,
        "finetune_tokens": cfg["finetune"]["steps"] * tokens_per_step,
        "assumed_tokens_per_s": {"dense": a.dense_tps, "moe": a.moe_tps},
        "budget_s": a.budget_s,
    }


# ---- here: the seed in two parts, the prepared data ---------------------------------------------
def prepare(a) -> None:
    from megatron_btx.checkpoint import seeds
    from megatron_btx.checkpoint.convert import hf_to_megatron
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    gguf = seeds.fetch(SEED_NAME)
    data = gguf.read_bytes()
    half = len(data) // 2
    for part, chunk in (("a", data[:half]), ("b", data[half:])):
        folder = PARTS / f"real_seed_{part}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part_{part}").write_bytes(chunk)
    work = PARTS / "real_seed_import"
    if not (work / "btx_manifest.json").is_file():
        hf_to_megatron(gguf, work, overwrite=True)
    corpora = fetch_corpora([*DOMAINS, "general"], max_mb=2.0)
    prepare_domains(
        {d: [p] for d, p in corpora.items()},
        PARTS / "real_seed_data",
        tokenizer=work / "tokenizer",
        split="test=0.08,valid=0.02",
    )
    print(f"parts and data under {PARTS}")


# ---- on the device -----------------------------------------------------------------------------
def join_seed() -> Path:
    """The GGUF from its two parts, checked against the pinned sha256, into the model cache."""
    from megatron_btx.checkpoint import seeds

    target = seeds.cached_path(SEED_NAME)
    if target.is_file():
        return target
    parts = [PARTS / f"real_seed_{p}" / f"part_{p}" for p in ("a", "b")]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} missing: carry both parts (see the top)")
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != seeds.SEEDS[SEED_NAME].sha256:
        raise SystemExit("error: the joined GGUF does not have the pinned sha256")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def _btx(argv: list[str], log: Path, timeout: float) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as out:
        try:
            return subprocess.run(
                [sys.executable, "-m", "megatron_btx", *argv],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, timeout),
            ).returncode
        except subprocess.TimeoutExpired:
            return 124


def run(a) -> int:
    started = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve()
    doc: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
    doc["gguf"] = str(join_seed())
    seed = work / "seed"
    code = _btx(
        ["import-hf", "--load", f"gguf:{SEED_NAME}", "--save", str(seed), "--overwrite"],
        out / "import.log",
        300,
    )
    if code:
        doc["error"] = f"import-hf exited {code}"
    else:
        data = str((PARTS / "real_seed_data").resolve())
        planned = plan_budget(a, str(seed), data)
        doc["plan"] = planned
        flops_cfg = planned["config"]
        time_cfg = copy.deepcopy(flops_cfg)
        time_cfg["baselines"]["compute_match"] = "time"
        run_dir = Path(flops_cfg["run_dir"])
        for name, cfg in (("flops", flops_cfg), ("time", time_cfg)):
            path = work / f"{name}.yaml"
            path.write_text(json.dumps(cfg))
            left = a.budget_s - (time.time() - started) - 10
            t0 = time.time()
            code = _btx(["run", str(path), "--quiet"], out / f"run_{name}.log", left)
            doc["runs"][name] = {"exit": code, "seconds": time.time() - t0}
            if name == "flops":
                doc["runs"][name].update(set_aside_baselines(run_dir, "flops"))
        doc["runs"]["time"].update(_collect(run_dir, "eval"))
        doc["runs"]["flops"].update(_collect(run_dir, "eval_flops"))
    doc["seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps({k: v for k, v in doc.items() if k != "plan"}, indent=2, default=str)[-6000:])
    return 0


def set_aside_baselines(run_dir: Path, tag: str) -> dict:
    """Move the baselines and the evaluation of the finished run aside (to `eval_<tag>`,
    `baselines_<tag>`) and drop their done markers, so the same run directory re-planned with
    another compute match re-runs exactly those: the BTX stages keep their command lines and
    configs, and are skipped."""
    moved = {}
    for sub, stage in (
        ("baselines/dense", "baseline_dense"),
        ("baselines/sparse_upcycling", "baseline_sparse_upcycling"),
        ("eval", "evaluate"),
    ):
        src = run_dir / sub
        dst = run_dir / (f"eval_{tag}" if sub == "eval" else f"baselines_{tag}/{src.name}")
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dst, ignore_errors=True)
            src.rename(dst)
            moved[sub] = str(dst)
        (run_dir / "stages" / f"{stage}.done").unlink(missing_ok=True)
    return {"set_aside": moved}


def _collect(run_dir: Path, eval_dir: str) -> dict:
    """The evaluation's results and each train stage's median measured speed."""
    found: dict = {}
    for path in (run_dir / eval_dir / "results.json", run_dir / "compute_match.json"):
        if path.is_file():
            found[path.name] = json.loads(path.read_text())
    speeds = {}
    for metrics in sorted(run_dir.glob("**/metrics.jsonl")) if run_dir.is_dir() else []:
        rates = []
        for line in metrics.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if event.get("event") == "train":
                rates.append(event.get("tokens_per_s"))
        rates = sorted(r for r in rates if r)
        if rates:
            speeds[str(metrics.parent.relative_to(run_dir))] = rates[len(rates) // 2]
    found["median_tokens_per_s"] = speeds
    return found


def main(argv=None) -> int:
    a = _args(argv)
    if a.prepare:
        prepare(a)
        return 0
    if a.run:
        return run(a)
    seed = a.seed_config
    if seed is None:
        folder = Path(a.work) / "planning_seed"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
        seed = str(folder)
    planned = plan_budget(a, seed)
    print(json.dumps({k: v for k, v in planned.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
