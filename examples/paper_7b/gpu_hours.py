"""Expected GPU-hours of a BTX plan: training FLOPs = 6 x active parameters x tokens per stage
(the plan's own accounting), divided by an assumed sustained throughput per GPU.

    python examples/paper_7b/gpu_hours.py examples/paper_7b/btx_7b.yaml      # a BTX config
    python examples/paper_7b/gpu_hours.py /shared/btx/runs/btx_7b             # a run dir (plan.json)

Assumptions (flags): bf16 dense peak of the GPU (H100 SXM: 989 TFLOP/s), model FLOPs utilisation
of dense training (--mfu-dense, default 0.40) and of MoE training with expert parallelism
(--mfu-moe, default 0.30, all-to-all and router overheads). 6ND leaves out attention's
sequence-length term (about 7% more at 4096 tokens for a 7B) and evaluation passes.
Data preparation, the seed import and the merges are CPU/IO jobs of minutes to hours: not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def load(target: str):
    from megatron_btx.pipeline import plan

    p = Path(target)
    if p.is_dir():
        return plan.read_plan(p)
    return plan.build_plan(str(p), write=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="BTX config YAML or run directory")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU")
    ap.add_argument("--mfu-dense", type=float, default=0.40)
    ap.add_argument("--mfu-moe", type=float, default=0.30)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument(
        "--nodes-per-expert",
        type=int,
        default=4,
        help="nodes per training job (for the wall-clock column)",
    )
    a = ap.parse_args(argv)

    stages = [s for s in load(a.target) if s.kind == "train"]
    dense = min(s.active_params for s in stages)
    gpus = a.gpus_per_node * a.nodes_per_expert
    rows, totals = [], {}
    for s in stages:
        moe = s.active_params > 1.05 * dense
        rate = a.peak_tflops * 1e12 * (a.mfu_moe if moe else a.mfu_dense)
        gpu_h = s.flops / rate / 3600
        totals[s.group] = totals.get(s.group, 0.0) + gpu_h
        rows.append(
            (
                s.name,
                s.group,
                "MoE" if moe else "dense",
                s.steps,
                s.tokens,
                s.active_params,
                s.flops,
                gpu_h,
                gpu_h / gpus / 24,
            )
        )
    print(
        f"| stage | group | model | steps | tokens | active params | FLOPs (6ND) | GPU-hours "
        f"| days on {gpus} GPUs |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, grp, kind, steps, toks, act, fl, gh, days in rows:
        print(
            f"| {name} | {grp} | {kind} | {steps:,} | {toks / 1e9:.1f}B | {act / 1e9:.2f}B | "
            f"{fl:.2e} | {gh:,.0f} | {days:.1f} |"
        )
    for grp, gh in sorted(totals.items()):
        print(f"| **total {grp}** | | | | | | | **{gh:,.0f}** ({gh / 24:,.0f} GPU-days) | |")
    print(
        f"\nassumed: {a.peak_tflops:g} TFLOP/s peak, MFU {a.mfu_dense:.0%} dense, "
        f"{a.mfu_moe:.0%} MoE"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
