#!/usr/bin/env python
"""GPU check of the foundation: the same converted checkpoints, the same fixed batch, run by
tests/dist/equiv.py on the GPU (NCCL, megatron-core's CUDA path, no CPU adjustments) in fp32
and bf16, against the CPU (gloo) run and against `transformers` on the GPU.

    python benchmarks/gpu_check.py --out results.json
Prints a table and writes JSON. Needs a GPU; uses 1 process per run (TP/PP need >1 GPU)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(ckpt: Path, batch: Path, out: Path, device: str, dtype: str, nproc: int = 1) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "tests/dist/equiv.py"),
        "--ckpt",
        str(ckpt),
        "--batch",
        str(batch),
        "--out",
        str(out),
        "--device",
        device,
        "--dtype",
        dtype,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-3000:]}
    res = json.loads(out.read_text())
    res["logits"] = torch.load(str(out) + ".logits.pt", weights_only=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_check.json")
    a = p.parse_args()
    from conftest import make_hf_llama, make_hf_mixtral

    tmp = Path(tempfile.mkdtemp())
    rows = []
    g = torch.Generator().manual_seed(7)
    batch = tmp / "batch.pt"
    torch.save(torch.randint(0, 300, (4, 17), generator=g), batch)
    for name, maker in (("dense-llama-gqa", make_hf_llama), ("moe-mixtral-4x2", make_hf_mixtral)):
        hf = maker(tmp / f"hf-{name}")
        mg = tmp / f"mg-{name}"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools/convert_hf_to_megatron.py"),
                "--load",
                str(hf),
                "--save",
                str(mg),
            ],
            check=True,
            capture_output=True,
        )
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = ref_model(torch.load(batch, weights_only=True)[:, :-1].cuda()).logits.cpu()
        cpu = run(mg, batch, tmp / f"{name}-cpu.json", "cpu", "fp32")
        if "error" in cpu:
            print("CPU run failed:", cpu["error"][-2500:])
            cpu = {"loss": float("nan"), "grad_norm": float("nan"), "logits": ref * float("nan")}
        for dtype in ("fp32", "bf16"):
            gpu = run(mg, batch, tmp / f"{name}-gpu-{dtype}.json", "cuda", dtype)
            if "error" in gpu:
                rows.append({"model": name, "dtype": dtype, "error": gpu["error"]})
                continue
            rows.append(
                {
                    "model": name,
                    "dtype": dtype,
                    "device": torch.cuda.get_device_name(),
                    "loss_gpu": gpu["loss"],
                    "loss_cpu": cpu["loss"],
                    "loss_rel_diff": abs(gpu["loss"] - cpu["loss"]) / cpu["loss"],
                    "grad_norm_gpu": gpu["grad_norm"],
                    "grad_norm_cpu": cpu["grad_norm"],
                    "grad_norm_rel_diff": abs(gpu["grad_norm"] - cpu["grad_norm"])
                    / cpu["grad_norm"],
                    "max_abs_logit_diff_vs_hf_gpu": float((gpu["logits"] - ref).abs().max()),
                    "max_abs_logit_diff_vs_cpu": float((gpu["logits"] - cpu["logits"]).abs().max()),
                }
            )
    print(
        f"{'model':18} {'dtype':5} {'loss gpu':>10} {'loss cpu':>10} {'rel':>9} "
        f"{'gnorm rel':>9} {'|dlogit| vs HF':>15}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['model']:18} {r['dtype']:5} ERROR {r['error'][-300:]}")
            continue
        print(
            f"{r['model']:18} {r['dtype']:5} {r['loss_gpu']:10.6f} {r['loss_cpu']:10.6f} "
            f"{r['loss_rel_diff']:9.2e} {r['grad_norm_rel_diff']:9.2e} "
            f"{r['max_abs_logit_diff_vs_hf_gpu']:15.3e}"
        )
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
