#!/usr/bin/env python
"""Each optional speed-up alone against the baseline, in the same run: training tokens/s of our
Trainer (bench_train.py's `ours` worker: real data, megatron-core DDP, optimizer, schedule).

Variants (each one key changed from the baseline, which is sequential experts, the all-to-all
dispatcher, torch kernels, eager):
  grouped   model.moe_experts: grouped        (torch._grouped_mm over the local experts)
  local     moe.local_dispatch: true          (no all-to-all machinery at EP = 1)
  compile   model.compile: true               (torch.compile of each transformer layer)
  liger     model.kernels: liger              (GPU only: refused on a CPU run, so not measured)

Rounds alternate the variants (baseline, grouped, local, compile, baseline, ...), each a child
process; a variant's figure is the median over rounds of its median step, and its ratio is taken
against the baseline *of the same round* (this machine's load changes from minute to minute),
the median of those ratios reported.

    python benchmarks/bench_speedups.py [--kinds moe,dense] [--rounds 3] [--out FILE]
Any other flag goes to bench_train.py (model shape, --device, --dtype, --steps ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

#: variant -> bench_train flags (each changes one key of the baseline)
VARIANTS = {
    "baseline": ["--experts-module", "sequential"],
    "grouped": ["--experts-module", "grouped"],
    "local": ["--experts-module", "sequential", "--local-dispatch"],
    "compile": ["--experts-module", "sequential", "--compile"],
}
MOE_ONLY = {"grouped", "local"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="moe,dense")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(bench_train.ROOT / "runs/bench/bench_speedups.json"))
    own, rest = p.parse_known_args()
    a = bench_train._args().parse_args(rest)
    if not a.data:
        a.data = bench_train._prepare_data()
    passthrough = [x for x in rest if not x.startswith("--data")]
    variants = own.variants.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    errors: dict[tuple[str, str], str] = {}
    for rnd in range(own.rounds):
        for kind in own.kinds.split(","):
            base = None
            for variant in variants:
                if kind == "dense" and variant in MOE_ONLY:
                    continue
                res = bench_train._child(a, "ours", kind, passthrough + VARIANTS[variant])
                if isinstance(res, str):
                    errors[(kind, variant)] = res
                    print(f"round {rnd + 1} {kind} {variant}: error", file=sys.stderr)
                    continue
                step = statistics.median(res)
                times.setdefault((kind, variant), []).append(step)
                if variant == "baseline":
                    base = step
                elif base is not None:
                    ratios.setdefault((kind, variant), []).append(base / step)
                print(f"round {rnd + 1} {kind} {variant}: {step:.3f} s/step", file=sys.stderr)
    tokens = a.batch * a.seq
    rows = []
    print(
        f"\nspeed-ups alone, {a.device} {a.dtype}, batch {a.batch} x seq {a.seq}, hidden "
        f"{a.hidden}, {a.layers} layers, {a.experts} experts top-{a.topk}, {own.rounds} rounds"
    )
    print(f"{'model':8}{'variant':10}{'median tok/s':>14}{'speed-up vs baseline':>24}  per round")
    for (kind, variant), steps in times.items():
        med = statistics.median(steps)
        r = ratios.get((kind, variant), [])
        row = {
            "kind": kind,
            "variant": variant,
            "flags": VARIANTS[variant],
            "tokens_per_s": tokens / med,
            "round_step_s": steps,
            "speedup_vs_baseline_median": statistics.median(r) if r else None,
            "speedup_per_round": r,
        }
        rows.append(row)
        sp = f"{row['speedup_vs_baseline_median']:.2f}x" if r else "-"
        per = " ".join(f"{x:.2f}" for x in r)
        print(f"{kind:8}{variant:10}{tokens / med:>14,.0f}{sp:>24}  {per}")
    rows += [{"kind": k, "variant": v, "error": e[-2000:]} for (k, v), e in errors.items()]
    out = Path(own.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rounds": own.rounds, "results": rows}, indent=2))
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
