#!/usr/bin/env python
"""Time and peak RSS of converting a ~1B-parameter random HF Llama (bf16) to megatron-core
torch_dist at TP=2, next to reading the same files with `cat > /dev/null` (the disk's floor).

    python benchmarks/bench_convert.py [--layers 22] [--out bench_convert.json]
Prints a table and writes JSON. Each command runs as its own process; peak RSS is its
ru_maxrss. Files are written once, so the page cache is warm for every reader alike."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def make_llama(folder: Path, layers: int) -> int:
    """TinyLlama-1.1B's shape, random bf16 weights, one safetensors shard per 4 layers."""
    h, f, heads, kv, vocab = 2048, 5632, 32, 4, 32000
    d = h // heads
    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=h,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        hidden_act="silu",
        torch_dtype="bfloat16",
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, n = {}, 0
    groups = [list(range(i, min(i + 4, layers))) for i in range(0, layers, 4)]
    for gi, group in enumerate(groups + [[]]):
        t = {}
        for i in group:
            p = f"model.layers.{i}."
            t.update(
                {
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "self_attn.q_proj.weight": rnd(h, h),
                    p + "self_attn.k_proj.weight": rnd(kv * d, h),
                    p + "self_attn.v_proj.weight": rnd(kv * d, h),
                    p + "self_attn.o_proj.weight": rnd(h, h),
                    p + "mlp.gate_proj.weight": rnd(f, h),
                    p + "mlp.up_proj.weight": rnd(f, h),
                    p + "mlp.down_proj.weight": rnd(h, f),
                }
            )
        if not group:
            t = {
                "model.embed_tokens.weight": rnd(vocab, h),
                "lm_head.weight": rnd(vocab, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        name = f"model-{gi + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        n += sum(x.numel() for x in t.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return n


_MEASURE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:] if len(sys.argv) > 2 else sys.argv[1], shell=len(sys.argv) == 2)
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)
"""


def timed(cmd: list[str] | str, shell: bool = False) -> dict:
    """Wall time and peak RSS of one command, measured by a small fresh process that starts it
    (ru_maxrss of children read in this big process would include the fork of this process)."""
    args = [cmd] if shell else list(cmd)
    r = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True)
    dt, peak_kb, rc = r.stdout.strip().splitlines()[-1].split()
    if int(rc):
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-3000:]}")
    return {"seconds": round(float(dt), 2), "peak_rss_mb": round(int(peak_kb) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", default="bench_convert.json")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="btx-bench-"))
    try:
        n = make_llama(tmp / "hf", a.layers)
        size = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors"))
        rows = [
            {
                "what": "cat *.safetensors > /dev/null",
                **timed(f"cat {tmp}/hf/*.safetensors > /dev/null", shell=True),
            }
        ]
        conv = timed(
            [
                sys.executable,
                str(ROOT / "tools/convert_hf_to_megatron.py"),
                "--load",
                str(tmp / "hf"),
                "--save",
                str(tmp / "mg"),
                "--tp",
                str(a.tp),
            ]
        )
        rows.append({"what": f"convert_hf_to_megatron --tp {a.tp}", **conv})
        exp = timed(
            [
                sys.executable,
                str(ROOT / "tools/convert_megatron_to_hf.py"),
                "--load",
                str(tmp / "mg"),
                "--save",
                str(tmp / "back"),
            ]
        )
        rows.append({"what": "convert_megatron_to_hf", **exp})
        out_size = sum(f.stat().st_size for f in (tmp / "mg").rglob("*") if f.is_file())
        res = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, "
            f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
            "params": n,
            "input_gb": round(size / 1e9, 2),
            "output_gb": round(out_size / 1e9, 2),
            "layers": a.layers,
            "rows": rows,
            "time_ratio_vs_cat": round(rows[1]["seconds"] / max(rows[0]["seconds"], 1e-3), 1),
            "rss_over_input": round(rows[1]["peak_rss_mb"] * 1024**2 / size, 2),
        }
        print(f"{n / 1e9:.2f}B params, {size / 1e9:.2f} GB bf16 in, {out_size / 1e9:.2f} GB out")
        print(f"{'command':40} {'seconds':>8} {'peak RSS MB':>12}")
        for r in rows:
            print(f"{r['what']:40} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f}")
        Path(a.out).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
