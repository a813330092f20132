#!/usr/bin/env python
"""Resident memory of one training process after each phase (set-up, each step), with the peak
sampled every 50 ms: where a CPU run's memory goes. Trains from a checkpoint in this process
(the `btx train` loop, no final save).

    python benchmarks/moe_memory_phases.py --init-from runs/bench/real_seed/moe \\
        --data runs/bench/real_seed/data [--dtype bf16] [--recompute]
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/moe_memory_phases.py ...   # fixed threshold

The checkpoint and data are what benchmarks/bench_real_seed_cpu.py --parts moe makes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init-from", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    import psutil

    from megatron_btx import config as C
    from megatron_btx.training.loop import Trainer

    proc, peak = psutil.Process(), [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()

    def mark(what: str) -> None:
        rss = proc.memory_info().rss / 2**30
        print(f"{what:<12} resident {rss:6.2f} GB   peak so far {peak[0] / 2**30:6.2f} GB")

    run_dir = Path(tempfile.mkdtemp(prefix="moe_memory_"))
    cfg = C.Config.from_dict(
        {
            "run_dir": str(run_dir),
            "model": {"init_from": a.init_from, "recompute": a.recompute},
            "data": {
                "path": a.data,
                "domains": ["code"],
                "valid_domains": [],
                "seq_length": a.seq,
                "micro_batch_size": a.batch,
                "global_batch_size": a.batch,
                "cache_dir": str(run_dir / "index"),
            },
            "train": {
                "steps": a.steps,
                "lr": 1e-5,
                "warmup_steps": 0,
                "dtype": a.dtype,
                "save_interval": 10**9,
                "eval_interval": 10**9,
                "device": "cpu",
            },
            "logging": {"tensorboard": False},
        }
    )
    cfg.validate()
    trainer = Trainer(cfg)
    mark("start")
    trainer.setup()
    params = sum(t.numel() * t.element_size() for m in trainer.model for t in m.parameters())
    print(f"parameters   {params / 2**30:6.2f} GB")
    mark("set-up")
    for step in range(a.steps):
        trainer.train_step()
        mark(f"step {step + 1}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
