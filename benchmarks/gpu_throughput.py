#!/usr/bin/env python
"""GPU throughput of the MoE finetune and the dense expert stage (issue 15), in ONE device call.

Writes one JSON (rewritten after every measurement, so a run cut short still leaves what it
measured) and prints a table. Measurements, in priority order, each in its own try block:

  env               GPU, torch, grouped-matmul fast path, bf16 GEMM ceiling (8192^3)
  experts_check     GroupedExperts vs SequentialMLP on the GPU (bf16 and fp32 rel. errors of the
                    output and of every gradient, a zero-token expert) and both timed alone
  dense             ours, dense ~1B bf16 (goal: MFU >= 45%)
  moe_sequential    ours, MoE 4 experts top-2, megatron-core's per-expert loop (the old state)
  moe_grouped       ours, model.moe_experts: grouped
  moe_grouped_local ours, grouped + moe.local_dispatch (goal: >= 1.3x hf_mixtral, MFU >= 35%)
  hf_mixtral        transformers' MixtralForCausalLM, same shape, torch AdamW (the peer)
  hf_llama          transformers' LlamaForCausalLM, dense shape (the dense peer)
  paper_dense       expert stage at a scaled-down paper shape (Llama-2 7B ratios, seq 4096)
  paper_moe         MoE stage at that shape (4 experts top-2, EP = 1), all-to-all rows counted
  dense_compile, moe_compile   model.compile: true
  dense_liger, moe_liger       model.kernels: liger (own process: liger patches megatron-core)
and last, `paper_model`: the multi-node expert-stage / MoE-stage ratio modelled from the measured
tokens/s and all-to-all volume with published link rates (see `LINKS`).

HOW TO RUN on a lent H200 (Python 3.12, torch 2.11 + CUDA 13, triton, transformers; no
megatron-core, no TE, no network). Here, once, in the repository root:
    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \\
        megatron-core==0.16.1 liger-kernel==0.8.5          # .whl/ is git-ignored, ~3.5 MB
    .venv/bin/python benchmarks/gpu_throughput.py --prepare-data   # runs/bench/data, ~2.5 MB
Then one device call (`run` tool):
    command:   bash benchmarks/gpu_throughput.sh
    carry:     [".whl", "runs/bench/data"]
    timeout_s: 540      (the script budgets itself to --budget-s 420 and skips what does not fit)
The JSON and the log come back under $OUT (gpu_throughput.json, gpu_throughput.log).

CPU smoke test (what tests/test_gpu_throughput.py runs):
    python benchmarks/gpu_throughput.py --tiny --device cpu --out /tmp/gt.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
import bench_train  # noqa: E402

#: shapes: the issue's ~1B dense and MoE (the H100 figures in BENCHMARKS.md used these), and a
#: scaled-down paper shape (Llama-2 7B's FFN ratio 11008/4096 and sequence 4096; 8 layers).
SHAPES = {
    "dense": dict(hidden=2048, ffn=5632, layers=16, heads=16, seq=2048, batch=4),
    "moe": dict(hidden=2048, ffn=2816, layers=12, heads=16, seq=2048, batch=4),
    "paper": dict(hidden=2048, ffn=5504, layers=8, heads=16, seq=4096, batch=2),
}
TINY = dict(hidden=64, ffn=96, layers=2, heads=4, seq=64, batch=2)

#: name -> (shape, kind, impl, bench_train flags, estimated seconds on an H200, group)
PLAN = {
    "env": (None, None, None, [], 10, "main"),
    "experts_check": ("moe", "moe", None, [], 20, "main"),
    "dense": ("dense", "dense", "ours", [], 40, "main"),
    "moe_sequential": ("moe", "moe", "ours", ["--experts-module", "sequential"], 40, "main"),
    "moe_grouped": ("moe", "moe", "ours", ["--experts-module", "grouped"], 40, "main"),
    "moe_grouped_local": (
        "moe",
        "moe",
        "ours",
        ["--experts-module", "grouped", "--local-dispatch"],
        40,
        "main",
    ),
    "hf_mixtral": ("moe", "moe", "hf", [], 35, "main"),
    "hf_llama": ("dense", "dense", "hf", [], 35, "main"),
    "paper_dense": ("paper", "dense", "ours", [], 35, "main"),
    "paper_moe": (
        "paper",
        "moe",
        "ours",
        ["--experts-module", "grouped", "--local-dispatch"],
        40,
        "main",
    ),
    "dense_compile": ("dense", "dense", "ours", ["--compile"], 150, "main"),
    "moe_compile": (
        "moe",
        "moe",
        "ours",
        ["--experts-module", "grouped", "--local-dispatch", "--compile"],
        150,
        "main",
    ),
    "dense_liger": ("dense", "dense", "ours", ["--kernels", "liger"], 70, "liger"),
    "moe_liger": (
        "moe",
        "moe",
        "ours",
        ["--experts-module", "grouped", "--local-dispatch", "--kernels", "liger"],
        70,
        "liger",
    ),
}

#: Published per-GPU, per-direction link rates for the all-to-all model (link rates are upper
#: bounds: an all-to-all of MoE-sized messages reaches a fraction of them).
LINKS = {
    "nvlink4_h100_h200": (
        450e9,
        "NVLink 4: 900 GB/s per GPU, both directions (NVIDIA H100 and H200 SXM datasheets)",
    ),
    "ib_ndr_400g": (
        50e9,
        "InfiniBand NDR 400 Gb/s per GPU (ConnectX-7; DGX H100/H200: one 400 Gb/s port per GPU)",
    ),
    "ib_hdr_200g": (
        25e9,
        "InfiniBand HDR 200 Gb/s per GPU (ConnectX-6; DGX A100: one 200 Gb/s port per GPU)",
    ),
}


# ---- JSON written as we go --------------------------------------------------------------------
def load_doc(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"results": {}}


def save_result(path: Path, name: str, result: dict) -> None:
    doc = load_doc(path)
    doc["results"][name] = result
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, path)


# ---- the measurements (run in a worker process) ------------------------------------------------
def bench_namespace(a: argparse.Namespace, shape: str, flags: list[str]) -> argparse.Namespace:
    """bench_train's arguments for one measurement."""
    s = TINY if a.tiny else SHAPES[shape]
    argv = [f"--{k}={v}" for k, v in s.items()] + [
        "--vocab=8064" if a.tiny else "--vocab=32000",
        f"--device={a.device}",
        f"--dtype={a.dtype}",
        f"--steps={a.steps}",
        f"--warmup={a.warmup}",
        f"--data={a.data}",
        *flags,
    ]
    return bench_train._args().parse_args(argv)


def measure_training(a, name: str) -> dict:
    shape, kind, impl, flags, _, _ = PLAN[name]
    ns = bench_namespace(a, shape, flags)
    moe = kind == "moe"
    counted: dict = {}
    hook = count_expert_rows(counted) if name == "paper_moe" else None
    losses: list[float] = []
    if impl == "ours":
        times = bench_train.worker_ours(ns, moe, on_setup=hook, losses=losses)
    else:

        def note_impl(model) -> None:
            counted["hf_impl"] = getattr(model.config, "_experts_implementation", None)

        times = bench_train.worker_hf(ns, moe, on_model=note_impl)
    res = bench_train._summary(ns, impl, kind, [times])
    res.update(shape=shape, flags=flags, step_times_s=times, losses=losses)
    if "rows" in counted:
        res["expert_rows_per_token_per_layer"] = counted["rows"] / max(counted["tokens"], 1)
        res["moe_layers"] = ns.layers
        res["hidden"] = ns.hidden
    if impl == "hf" and moe:
        res["hf_experts_implementation"] = counted.get("hf_impl")
    if res.get("mfu") is not None:  # bench_train's peak is the H100 SXM's; the H200's is equal
        res["mfu_peak_tflops"] = 989
    return res


def count_expert_rows(counted: dict):
    """An on_setup hook: count the token copies entering the experts (the rows every all-to-all
    would move with EP > 1) and the tokens entering the MoE layers."""

    def hook(trainer) -> None:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        counted.update(rows=0, tokens=0)
        for chunk in trainer.model:
            for mod in chunk.modules():
                if isinstance(mod, MoELayer):
                    mod.register_forward_pre_hook(
                        lambda m, args: counted.__setitem__(
                            "tokens", counted["tokens"] + args[0].shape[0] * args[0].shape[1]
                        )
                    )
                    mod.experts.register_forward_pre_hook(
                        lambda m, args: counted.__setitem__(
                            "rows", counted["rows"] + args[0].shape[0]
                        )
                    )

    return hook


def measure_env(a) -> dict:
    import torch

    from megatron_btx.models.grouped_experts import grouped_mm_unavailable
    from megatron_btx.models.specs import grouped_mm_fast_path

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    n = 512 if a.tiny else 8192
    x, y = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        x @ y
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        x @ y
    sync(dev)
    secs = (time.perf_counter() - t0) / 10
    res = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "grouped_mm_fast_path": grouped_mm_fast_path(dev, dtype),
        "grouped_mm_unavailable": grouped_mm_unavailable(dev.type, dtype),
        "gemm_tflops": 2 * n**3 / secs / 1e12,
        "gemm_shape": n,
    }
    if dev.type == "cuda":
        res["capability"] = list(torch.cuda.get_device_capability(dev))
        res["memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        import megatron.core

        res["megatron_core"] = megatron.core.__version__
    except Exception as e:
        res["megatron_core"] = f"missing: {e}"
    return res


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_experts(a) -> dict:
    """GroupedExperts against SequentialMLP at the MoE shape: errors and time of fwd + bwd."""
    from megatron_btx import runtime

    rt = runtime.init(device=a.device)
    try:
        out = {}
        for dtype in ("bf16", "fp32") if a.device == "cuda" else ("fp32",):
            out[dtype] = compare_experts(a, rt.device, dtype)
        return out
    finally:
        runtime.teardown()


def compare_experts(a, dev, dtype_name: str) -> dict:
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_btx.models.grouped_experts import GroupedExperts
    from megatron_btx.models.llama import LlamaArgs, transformer_config

    s = TINY if a.tiny else SHAPES["moe"]
    args = LlamaArgs(
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=1,
        num_attention_heads=s["heads"],
        vocab_size=8064,
        num_local_experts=4,
    )
    cfg = transformer_config(args, dtype=dtype_name, cpu_init=dev.type == "cpu")
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    torch.manual_seed(0)
    pg = get_default_pg_collection()
    seq = SequentialMLP(4, cfg, sub, pg_collection=pg).to(dev)
    grp = GroupedExperts(4, cfg, sub, pg_collection=pg).to(dev)
    grp.load_state_dict(seq.state_dict())
    tokens = s["seq"] * s["batch"] * 2  # top-2 copies
    counts = torch.tensor([tokens // 2, 0, tokens // 3, tokens - tokens // 2 - tokens // 3])
    x = torch.randn(tokens, s["hidden"], device=dev, dtype=cfg.params_dtype)
    probs = torch.rand(tokens, device=dev)
    grad = torch.randn_like(x)
    ref, ref_t = run_experts(seq, x, counts, probs, grad)
    got, got_t = run_experts(grp, x, counts, probs, grad)

    def rel(u, v):
        return float((u.float() - v.float()).norm() / v.float().norm().clamp(min=1e-30))

    return {
        "kernel": grp.last_kernel,
        "rel_err_output": rel(got[0], ref[0]),
        "rel_err_grad_input": rel(got[1], ref[1]),
        "rel_err_grad_weights_max": max(rel(g, r) for g, r in zip(got[2], ref[2]) if r.norm() > 0),
        "zero_token_expert_grad_is_zero": bool(got[2][2].abs().max() == 0),
        "ms_sequential": ref_t * 1e3,
        "ms_grouped": got_t * 1e3,
        "speedup": ref_t / got_t,
        "counts": counts.tolist(),
    }


def run_experts(module, x, counts, probs, grad, reps: int = 5):
    """(output, input grad, weight grads) of one forward+backward, and its median time."""
    times = []
    for _ in range(reps + 2):
        xi = x.detach().clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        sync(x.device)
        t0 = time.perf_counter()
        out, _ = module(xi, counts, probs)
        out.backward(grad)
        sync(x.device)
        times.append(time.perf_counter() - t0)
    grads = [p.grad for p in module.parameters()]
    return (out.detach(), xi.grad, grads), statistics.median(times[2:])


def worker(a) -> int:
    """Run the named measurements in order, each in its own try block, saving after each."""
    out = Path(a.out)
    for name in a.names.split(","):
        est = PLAN[name][4]
        left = a.deadline - time.time()
        if not a.tiny and left < est:
            save_result(out, name, {"skipped": f"budget: {left:.0f} s left, needs ~{est} s"})
            continue
        t0 = time.time()
        print(f"[gpu_throughput] {name} ...", file=sys.stderr, flush=True)
        try:
            if name == "env":
                res = measure_env(a)
            elif name == "experts_check":
                res = measure_experts(a)
            else:
                res = measure_training(a, name)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            try:
                from megatron_btx import runtime

                runtime.teardown()
            except Exception:
                pass
        res["wall_s"] = time.time() - t0
        save_result(out, name, res)
        free_memory()
    return 0


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---- the multi-node model -------------------------------------------------------------------------
def paper_model(results: dict, ep: int = 4) -> dict:
    """Expert stage / MoE stage tokens per second per GPU across nodes, modelled.

    The MoE stage's compute per token is the measured paper_moe step (EP = 1, one GPU). With EP
    over `ep` ranks, each MoE layer moves every routed copy of a token out and back (dispatch and
    combine) in the forward pass and again in the backward pass: 4 x rows/token x hidden x 2 bytes
    (bf16), of which (ep - 1) / ep leaves the GPU under balanced routing; one EP rank per node puts
    all of it on the inter-node link. Communication is not overlapped with compute (megatron-core's
    all-to-all dispatcher runs it on the compute stream), so time per token = compute + bytes / link.
    The dense expert stage has no all-to-all (its gradient all-reduce is the same order for both
    stages and is left out of both)."""
    dense, moe = results.get("paper_dense", {}), results.get("paper_moe", {})
    if "tokens_per_s" not in dense or "tokens_per_s" not in moe:
        return {"error": "needs paper_dense and paper_moe"}
    rows = moe.get("expert_rows_per_token_per_layer")
    layers, hidden = moe.get("moe_layers"), moe.get("hidden")
    if not rows or not layers or not hidden:
        return {"error": "paper_moe did not count the expert rows"}
    bytes_per_token = 4 * rows * hidden * 2 * layers * (ep - 1) / ep
    compute_s = 1.0 / moe["tokens_per_s"]
    out = {
        "measured_one_gpu_dense_over_moe": dense["tokens_per_s"] / moe["tokens_per_s"],
        "expert_rows_per_token_per_layer": rows,
        "ep": ep,
        "a2a_bytes_per_token_leaving_gpu": bytes_per_token,
        "links": {},
    }
    for name, (bandwidth, source) in LINKS.items():
        moe_tps = 1.0 / (compute_s + bytes_per_token / bandwidth)
        out["links"][name] = {
            "bytes_per_s": bandwidth,
            "source": source,
            "moe_tokens_per_s_per_gpu": moe_tps,
            "dense_over_moe": dense["tokens_per_s"] / moe_tps,
        }
    return out


# ---- orchestration ----------------------------------------------------------------------------------
def run_group(a, names: list[str], deadline: float) -> None:
    """Run `names` in worker processes; a worker that dies takes only its current measurement
    down (recorded as an error), and the next worker goes on with the rest."""
    out = Path(a.out)
    pending = list(names)
    while pending and time.time() < deadline:
        cmd = [sys.executable, __file__, "--worker", "--names", ",".join(pending)]
        cmd += ["--out", a.out, "--deadline", str(deadline), "--device", a.device]
        cmd += ["--dtype", a.dtype, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += ["--data", a.data] + (["--tiny"] if a.tiny else [])
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        with tempfile.TemporaryFile("w+") as log:
            try:
                proc = subprocess.run(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=deadline - time.time() + 30,
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log.seek(0)
            tail = log.read()[-4000:]
        sys.stderr.write(tail[-1500:])
        done = set(load_doc(out)["results"])
        pending = [n for n in pending if n not in done]
        if pending and rc != 0:
            save_result(out, pending[0], {"error": f"worker exited with {rc}", "log_tail": tail})
            pending = pending[1:]
    for name in pending:
        save_result(out, name, {"skipped": "budget: the run's deadline passed"})


def summary(doc: dict) -> list[str]:
    """The table printed last (the device call returns the end of the output)."""
    res = doc["results"]
    lines = [f"{'measurement':20}{'tok/s':>12}{'MFU':>8}  note"]
    for name in PLAN:
        r = res.get(name, {})
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        note = r.get("error", r.get("skipped", "" if r else "not run"))[:60]
        if name == "experts_check" and not note:
            note = "; ".join(
                f"{k}: {v.get('kernel')} err {v.get('rel_err_output', 0):.1e} x{v.get('speedup', 0):.2f}"
                for k, v in r.items()
                if isinstance(v, dict)
            )
        if name == "env" and not note:
            note = (
                f"{r.get('device')} torch {r.get('torch')} GEMM {r.get('gemm_tflops', 0):.0f} TF/s"
            )
        lines.append(f"{name:20}{tps:>12}{mfu:>8}  {note}")
    goals = doc.get("goals", {})
    for key, val in goals.items():
        lines.append(f"goal {key}: {val}")
    return lines


#: variant -> the measurement it must agree with (same shape, seed and data: the same first
#: loss up to bf16 rounding of differently ordered sums)
BASELINES = {
    "moe_grouped": "moe_sequential",
    "moe_grouped_local": "moe_sequential",
    "moe_compile": "moe_sequential",
    "moe_liger": "moe_sequential",
    "dense_compile": "dense",
    "dense_liger": "dense",
}


def goals(res: dict) -> dict:
    def tps(name):
        return res.get(name, {}).get("tokens_per_s")

    out = {}
    for variant, base in BASELINES.items():
        mine, ref = res.get(variant, {}).get("losses"), res.get(base, {}).get("losses")
        if mine and ref:
            out[f"{variant}_first_loss_rel_diff"] = f"{abs(mine[0] - ref[0]) / abs(ref[0]):.1e}"
    if res.get("dense", {}).get("mfu") is not None:
        out["dense_mfu>=45%"] = f"{res['dense']['mfu']:.1%}"
    best = max(
        (n for n in ("moe_grouped_local", "moe_grouped", "moe_compile", "moe_liger") if tps(n)),
        key=tps,
        default=None,
    )
    if best and tps("hf_mixtral"):
        out["moe_vs_mixtral>=1.3x"] = f"{tps(best) / tps('hf_mixtral'):.2f}x ({best})"
        if res[best].get("mfu") is not None:
            out["moe_mfu>=35%"] = f"{res[best]['mfu']:.1%} ({best})"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs/bench/gpu_throughput.json"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script)")
    p.add_argument("--only", default=None, help="comma-separated measurement names")
    p.add_argument("--skip", default="", help="comma-separated measurement names")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--data", default=str(ROOT / "runs/bench/data"))
    p.add_argument("--prepare-data", action="store_true", help="prepare --data and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", default="", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.steps = a.steps or (2 if a.tiny else 8)
    a.warmup = a.warmup or (1 if a.tiny else 3)
    if a.worker:
        return worker(a)
    t_start = time.time()
    if a.prepare_data or not (Path(a.data) / "manifest.json").is_file():
        a.data = bench_train._prepare_data() if a.data == str(ROOT / "runs/bench/data") else a.data
        if a.prepare_data:
            return 0
    names = a.only.split(",") if a.only else list(PLAN)
    names = [n for n in names if n not in a.skip.split(",")]
    unknown = [n for n in names if n not in PLAN]
    if unknown:
        print(f"error: unknown measurement(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    deadline = t_start + a.budget_s
    for group in ("main", "liger"):  # liger patches megatron-core process-wide: its own worker
        run_group(a, [n for n in names if PLAN[n][5] == group], deadline)
    doc = load_doc(out)
    doc["paper_model"] = paper_model(doc["results"])
    doc["goals"] = goals(doc["results"])
    doc["args"] = {k: v for k, v in vars(a).items() if k not in ("worker", "names", "deadline")}
    doc["wall_s"] = time.time() - t_start
    out.write_text(json.dumps(doc, indent=2, default=str))
    print("\n".join(summary(doc)))
    print(f"paper model: {json.dumps(doc['paper_model'], default=str)[:1500]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
