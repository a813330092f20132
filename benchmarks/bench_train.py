#!/usr/bin/env python
"""Training throughput: our megatron-core loop vs a plain `transformers` loop, same run.

For a dense Llama and a 4-expert top-2 MoE of the same size and batch, in fp32 with AdamW
(weight decay 0.1, clipping 1.0), this measures training tokens/s of

- ours: megatron_btx.training.loop.Trainer.train_step (megatron-core GPTModel, DDP wrapper,
  megatron optimizer, forward_backward_func; real data from a prepared folder through the
  megatron GPTDataset loader, so data loading is *included* in our time), one process;
- peer: LlamaForCausalLM / MixtralForCausalLM (router aux loss on, as ours) with torch AdamW
  and clip_grad_norm_, on random token ids already in memory (no data loading).

Each measurement runs in its own child process, one after the other, with the same number of
threads; the first `--warmup` steps are not timed; the figure is the median over `--steps`
timed steps (each step ends with the loss on the host, so it is synchronous on a GPU too).

    python benchmarks/bench_train.py                       # CPU, prints a table
    python benchmarks/bench_train.py --device cuda --dtype bf16 --hidden 2048 --layers 16 ...
Writes JSON to --out (default runs/bench/bench_train.json).
"""

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
sys.path.insert(0, str(ROOT))


def _args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=8064, help="a multiple of 128 (ours pads to it)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (one microbatch)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternate ours/peer this many times (a shared machine's load only "
        "ever adds time: the best step is the cleanest comparison)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--kinds", default="dense,moe")
    p.add_argument("--impls", default="ours,hf")
    p.add_argument(
        "--sdpa",
        action="store_true",
        help="experiment: replace megatron's unfused local-spec core attention in our "
        "model by torch's scaled_dot_product_attention (as transformers uses)",
    )
    p.add_argument(
        "--experts-module",
        default="auto",
        choices=["auto", "sequential", "grouped"],
        help="ours: model.moe_experts",
    )
    p.add_argument("--local-dispatch", action="store_true", help="ours: moe.local_dispatch")
    p.add_argument("--kernels", default="torch", help="ours: model.kernels (torch|liger|auto)")
    p.add_argument("--compile", action="store_true", help="ours: model.compile")
    p.add_argument(
        "--data",
        default=None,
        help="prepared data folder for ours (default: prepare the built-in code "
        "corpus in a temporary folder)",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "bench_train.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    return p


def model_flops_per_token(a: argparse.Namespace, moe: bool) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + attention (12 L s h)."""
    h, f, L, v = a.hidden, a.ffn, a.layers, a.vocab
    kv = (a.kv_heads or a.heads) * (h // a.heads)
    attn = h * h * 2 + 2 * h * kv
    ffn = 3 * h * f * (a.topk if moe else 1) + (h * a.experts if moe else 0)
    params = L * (attn + ffn) + v * h  # the output layer; the embedding lookup is no matmul
    return 6.0 * params + 12.0 * L * a.seq * h


# ---- workers (one per child process) -------------------------------------------------------------
def worker_ours(
    a: argparse.Namespace, moe: bool, on_setup=None, losses: list | None = None
) -> list[float]:
    """Step times of our Trainer; `on_setup(trainer)` is called after its set-up, and each
    step's loss is appended to `losses` (the same seed and data give the same first loss in
    every variant: a check that a speed-up computes the same model)."""
    from megatron_btx import config as C
    from megatron_btx.training.loop import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    model = dict(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads or a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(a.seq, 128),
    )
    if moe:
        model.update(num_local_experts=a.experts, num_experts_per_tok=a.topk)
    model.update(
        moe_experts=getattr(a, "experts_module", "auto"),
        kernels=getattr(a, "kernels", "torch"),
        compile=getattr(a, "compile", False),
    )
    cfg = C.Config.from_dict(
        {
            "run_dir": str(run_dir),
            "model": model,
            "data": {
                "path": a.data,
                "domains": ["code"],
                "valid_domains": [],
                "seq_length": a.seq,
                "micro_batch_size": a.batch,
                "global_batch_size": a.batch,
            },
            "train": {
                "steps": a.warmup + a.steps,
                "lr": 1e-4,
                "warmup_steps": 1,
                "device": a.device,
                "dtype": a.dtype,
                "save_interval": 10**9,
            },
            "optimizer": {"weight_decay": 0.1, "clip_grad": 1.0},
            "moe": {"local_dispatch": bool(getattr(a, "local_dispatch", False)) and moe},
            "logging": {"tensorboard": False},
        }
    )
    cfg.validate()
    trainer = Trainer(cfg)
    trainer.setup()
    if on_setup is not None:
        on_setup(trainer)
    if a.sdpa:
        _use_sdpa(trainer.model)
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step()  # ends with the loss as a Python float: synchronous
        if losses is not None:
            losses.append(metrics["loss"])
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    from megatron_btx import runtime

    runtime.teardown()
    return times


def _use_sdpa(model) -> None:
    """Swap each layer's megatron DotProductAttention (baddbmm + masked softmax + bmm, the
    [b, h, s, s] scores materialised in fp32) for torch SDPA with the same interface:
    query [sq, b, heads, d], key/value [sk, b, groups, d] -> context [sq, b, heads * d]."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPA(torch.nn.Module):
        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
        ):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            if k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            sq, b = query.shape[0], query.shape[1]
            return ctx.permute(2, 0, 1, 3).reshape(sq, b, -1)

    for chunk in model:
        for mod in chunk.modules():
            att = getattr(mod, "core_attention", None)
            if isinstance(att, DotProductAttention):
                mod.core_attention = SDPA()


def worker_hf(a: argparse.Namespace, moe: bool, on_model=None) -> list[float]:
    """Step times of the transformers peer; `on_model(model)` is called after its build."""
    import torch

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    common = dict(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads or a.heads,
        vocab_size=a.vocab,
        max_position_embeddings=max(a.seq, 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with dev:  # build on the device: a 1B model initialised on the CPU takes minutes
        if moe:
            from transformers import MixtralConfig, MixtralForCausalLM

            model = MixtralForCausalLM(
                MixtralConfig(
                    **common,
                    num_local_experts=a.experts,
                    num_experts_per_tok=a.topk,
                    output_router_logits=True,
                    router_aux_loss_coef=0.01,
                )
            )
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(**common))
    model = model.to(device=dev, dtype=dtype).train()
    if on_model is not None:
        on_model(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g).to(dev) for _ in range(4)
    ]
    times = []
    for i in range(a.warmup + a.steps):
        x = batches[i % len(batches)]
        t0 = time.perf_counter()
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.loss.item()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return times


# ---- orchestration -----------------------------------------------------------------------------
def _prepare_data() -> str:
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    out = ROOT / "runs" / "bench" / "data"
    prepare_domains({"code": [fetch_corpora(["code"])["code"]]}, out, vocab_size=8000)
    return str(out)


def _child(a: argparse.Namespace, impl: str, kind: str, argv: list[str]) -> list[float] | str:
    """Step times of one child run, or its error output."""
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable,
        __file__,
        *argv,
        "--worker",
        impl,
        "--kind",
        kind,
        "--out",
        result_path,
        "--data",
        a.data or "",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode:
        return (r.stdout + r.stderr)[-3000:]
    times = json.loads(Path(result_path).read_text())["times"]
    os.unlink(result_path)
    return times


def _summary(a: argparse.Namespace, impl: str, kind: str, runs: list[list[float]]) -> dict:
    tokens = a.batch * a.seq
    medians = [statistics.median(t) for t in runs]
    med = statistics.median(medians)
    best = min(min(t) for t in runs)
    res = {
        "impl": impl,
        "kind": kind,
        "tokens_per_s": tokens / med,
        "tokens_per_s_best": tokens / best,
        "step_s_median": med,
        "step_s_best": best,
        "round_medians_s": medians,
        "steps_timed": sum(len(t) for t in runs),
    }
    if a.device == "cuda":
        peak = {"fp32": 67e12, "bf16": 989e12}.get(a.dtype)  # H100 SXM dense peaks
        flops = model_flops_per_token(a, kind == "moe") * res["tokens_per_s"]
        res["model_tflops"] = flops / 1e12
        res["mfu"] = flops / peak if peak else None
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args().parse_args(argv)
    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        moe = a.kind == "moe"
        times = (worker_ours if a.worker == "ours" else worker_hf)(a, moe)
        Path(a.out).write_text(json.dumps({"times": times}))
        return 0
    if "ours" in a.impls and not a.data:
        a.data = _prepare_data()
    # the workers get our arguments minus --out/--data (they get their own)
    clean: list[str] = []
    skip = False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in ("--out", "--data"):
            skip = True
            continue
        if x.startswith("--out=") or x.startswith("--data="):
            continue
        clean.append(x)
    passthrough = clean
    runs: dict[tuple[str, str], list] = {}
    errors: dict[tuple[str, str], str] = {}
    for rnd in range(a.rounds):
        for kind in a.kinds.split(","):
            for impl in a.impls.split(","):
                if (kind, impl) in errors:
                    continue
                res = _child(a, impl, kind, passthrough)
                if isinstance(res, str):
                    errors[(kind, impl)] = res
                else:
                    runs.setdefault((kind, impl), []).append(res)
                print(
                    f"round {rnd + 1}/{a.rounds} {kind} {impl}: "
                    + (
                        "error"
                        if isinstance(res, str)
                        else f"median step {statistics.median(res):.3f}s"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    rows = [_summary(a, impl, kind, r) for (kind, impl), r in runs.items()]
    rows += [{"impl": impl, "kind": kind, "error": e} for (kind, impl), e in errors.items()]
    import torch

    meta = {
        "rounds": a.rounds,
        "device": (
            torch.cuda.get_device_name(0)
            if a.device == "cuda"
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        ),
        "torch": torch.__version__,
        "threads": a.threads or torch.get_num_threads(),
        "model": {
            "hidden": a.hidden,
            "ffn": a.ffn,
            "layers": a.layers,
            "heads": a.heads,
            "kv_heads": a.kv_heads or a.heads,
            "vocab": a.vocab,
            "experts": a.experts,
            "topk": a.topk,
        },
        "batch": a.batch,
        "seq": a.seq,
        "dtype": a.dtype,
        "steps": a.steps,
        "warmup": a.warmup,
        "ours_speedups": {
            "moe_experts": a.experts_module,
            "local_dispatch": a.local_dispatch,
            "kernels": a.kernels,
            "compile": a.compile,
        },
    }
    try:
        import megatron.core
        import transformers

        meta["megatron_core"] = megatron.core.__version__
        meta["transformers"] = transformers.__version__
    except Exception:
        pass
    print(
        f"\ntraining throughput, {meta['device']}, {a.dtype}, batch {a.batch} x seq {a.seq}, "
        f"hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}"
    )
    print("tokens/s from the median over rounds of each run's median step; [best step]")
    print(f"{'model':<14}{'ours tok/s':>22}{'transformers tok/s':>24}{'ours / peer':>14}")
    by = {(r["kind"], r["impl"]): r for r in rows}
    for kind in a.kinds.split(","):
        o, h = by.get((kind, "ours"), {}), by.get((kind, "hf"), {})
        ot, ht = o.get("tokens_per_s"), h.get("tokens_per_s")
        ob, hb = o.get("tokens_per_s_best"), h.get("tokens_per_s_best")
        label = "dense" if kind == "dense" else f"MoE {a.experts}x top-{a.topk}"

        def cell(v, b, r):
            return f"{v:,.0f} [{b:,.0f}]" if v else ("error" if "error" in r else "not run")

        ratio = f"{ot / ht:.2f}x [{ob / hb:.2f}x]" if ot and ht else "-"
        print(f"{label:<14}{cell(ot, ob, o):>22}{cell(ht, hb, h):>24}{ratio:>16}")
        for r in (o, h):
            if "error" in r:
                print(f"  {r['impl']} {kind} failed:\n{r['error']}")
            if r.get("mfu") is not None:
                print(
                    f"  {r['impl']} {kind}: {r['model_tflops']:.1f} model TFLOP/s, "
                    f"MFU {r['mfu']:.1%}"
                )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
