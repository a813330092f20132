#!/usr/bin/env python
"""Each optional speed-up alone against the baseline, in the same process and the same run.

Variants (each changes one key of the baseline: sequential experts, megatron-core's all-to-all
dispatcher, torch kernels, eager):
  grouped   model.moe_experts: grouped        (torch._grouped_mm over the local experts)
  local     moe.local_dispatch: true          (no all-to-all machinery at EP = 1)
  compile   model.compile: true               (torch.compile of each transformer layer)
  liger     model.kernels: liger              (GPU only: refused on a CPU run, not measured)

All variants are built in one process from the same seed (the same weights), warmed up (the
compiled one compiles then), and then timed one training forward+backward step each, in turn,
for `--rounds` rounds: a machine whose load changes from second to second (this one's 2 cores are
shared) slows neighbouring steps alike, so the ratio to the baseline step of the same round is
the figure; the median over rounds is reported. The optimizer step, identical for all variants,
is not included. Prints a table and writes JSON.

    python benchmarks/bench_speedups.py [--kinds moe,dense] [--rounds 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: variant -> SpeedOptions fields (the baseline is sequential experts, everything else off)
VARIANTS = {
    "baseline": {"moe_experts": "sequential"},
    "grouped": {"moe_experts": "grouped"},
    "local": {"moe_experts": "sequential", "local_dispatch": True},
    "compile": {"moe_experts": "sequential", "compile": True},
}
MOE_ONLY = {"grouped", "local"}


def build_variants(a, moe: bool, variants: list[str]) -> dict:
    import torch

    from megatron_btx.models.llama import LlamaArgs, build_model
    from megatron_btx.models.speedups import SpeedOptions, compile_layers

    args = LlamaArgs(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(a.seq, 128),
        num_local_experts=a.experts if moe else 0,
        num_experts_per_tok=a.topk,
    )
    models = {}
    for name in variants:
        if name in MOE_ONLY and not moe:
            continue
        speed = SpeedOptions(**VARIANTS[name])
        torch.manual_seed(0)
        model = build_model(args, speed=speed)
        if speed.compile:
            compile_layers([model])
        models[name] = model
    return models


def time_variants(a, models: dict) -> dict[str, list[float]]:
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(a.seq).expand(a.batch, -1)
    losses = {}

    def step(model) -> float:
        model.zero_grad(set_to_none=True)
        loss = model(inputs, positions, None, labels=labels).mean()
        loss.backward()
        return loss.item()

    for name, model in models.items():
        for _ in range(a.warmup):
            losses[name] = step(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(a.rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t0)
    return times, losses


def report(a, kind: str, times: dict, losses: dict) -> list[dict]:
    tokens = a.batch * a.seq
    base = times["baseline"]
    rows = []
    for name, steps in times.items():
        ratios = [b / t for b, t in zip(base, steps)]
        rows.append(
            {
                "kind": kind,
                "variant": name,
                "keys": VARIANTS[name],
                "tokens_per_s_median": tokens / statistics.median(steps),
                "speedup_vs_baseline_median": statistics.median(ratios),
                "speedup_min_max": [min(ratios), max(ratios)],
                "step_s": steps,
                "loss_after_warmup": losses[name],
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="moe,dense")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8064)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs/bench/bench_speedups.json"))
    a = p.parse_args()
    import torch

    from megatron_btx import runtime

    torch.set_num_threads(a.threads)
    runtime.init(device="cpu")
    rows = []
    for kind in a.kinds.split(","):
        models = build_variants(a, kind == "moe", a.variants.split(","))
        times, losses = time_variants(a, models)
        rows += report(a, kind, times, losses)
        del models
    runtime.teardown()
    print(
        f"speed-ups alone, CPU fp32 ({a.threads} thread), batch {a.batch} x seq {a.seq}, hidden "
        f"{a.hidden}, {a.layers} layers, MoE {a.experts} experts top-{a.topk}; "
        f"forward+backward, {a.rounds} interleaved rounds"
    )
    print(f"{'model':7}{'variant':10}{'tok/s (median)':>16}{'vs baseline':>13}{'min-max':>14}")
    for r in rows:
        lo, hi = r["speedup_min_max"]
        print(
            f"{r['kind']:7}{r['variant']:10}{r['tokens_per_s_median']:>16,.0f}"
            f"{r['speedup_vs_baseline_median']:>12.2f}x{lo:>8.2f}-{hi:.2f}"
        )
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "args": vars(a),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
