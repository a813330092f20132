#!/usr/bin/env python
"""What checking a checkpoint's sha256 on load costs `btx train`: the start-up of a resume
(model, optimizer state and RNG loaded, nothing trained) with the check and with
`--no-verify-hashes`, and the hashing alone (every file of the checkpoint re-hashed in this
process, as `btx verify` does).

    python benchmarks/bench_verify.py [--layers 12] [--hidden 1024] [--repeats 3]
        [--out benchmarks/results/verify_cpu.json]

The checkpoint is a training checkpoint after one step of a dense model of the given shape:
fp32 weights and both Adam moments, about 12 bytes per parameter. Runs alternate
with and without the check, each its own process, the page cache warm for both (the files were
just written); the check runs on a second thread while megatron-core loads the same files, so
its cost is what it adds to the load, not the hashing time. Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepared_data(work: Path) -> Path:
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    out = work / "data"
    prepare_domains({"code": [fetch_corpora(["code"])["code"]]}, out, vocab_size=1024)
    return out


def config(work: Path, data: Path, layers: int, hidden: int) -> Path:
    import yaml

    cfg = {
        "run_dir": str(work / "run"),
        "model": {
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "max_position_embeddings": 128,
        },
        "data": {"path": str(data), "seq_length": 64, "micro_batch_size": 1},
        "train": {"steps": 1, "eval_iters": 1},
        "logging": {"tensorboard": False},
    }
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify_cpu.json"))
    a = p.parse_args()
    from megatron_btx.checkpoint import integrity

    with tempfile.TemporaryDirectory(prefix="bench_verify_", dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(tmp)
        cfg = config(work, prepared_data(work), a.layers, a.hidden)
        train = [sys.executable, "-m", "megatron_btx", "train", str(cfg)]
        timed(train)  # one step: writes checkpoints/iter_0000001, Adam moments included
        ckpt = work / "run" / "checkpoints" / "iter_0000001"
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        times: dict[str, list[float]] = {"verified": [], "not verified": [], "hashing": []}
        for _ in range(a.repeats):
            times["verified"].append(timed(train))
            times["not verified"].append(timed([*train, "--no-verify-hashes"]))
            t0 = time.perf_counter()
            assert integrity.problems(ckpt) == []
            times["hashing"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "checkpoint_bytes": size,
        "layers": a.layers,
        "hidden": a.hidden,
        "seconds": times,
        "median_seconds": med,
        "added_seconds": med["verified"] - med["not verified"],
        "hashing_gb_per_s": size / 1e9 / med["hashing"],
    }
    print(f"checkpoint: {size / 1e9:.2f} GB (fp32 weights + Adam moments)")
    print(f"{'':<34}{'median s':>10}  runs")
    for key, label in (
        ("verified", "btx train resume (load), checked"),
        ("not verified", "  ... --no-verify-hashes"),
        ("hashing", "re-hash alone (btx verify)"),
    ):
        runs = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"{label:<34}{med[key]:>10.2f}  {runs}")
    print(
        f"added by the check: {result['added_seconds']:.2f} s; hashing "
        f"{result['hashing_gb_per_s']:.2f} GB/s"
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
