#!/usr/bin/env python
"""CPU training speed and memory at the real seed's size (SmolLM2-135M), in one run:

- dense, ours: `btx train` (one process) from the imported seed in fp32, and in bf16 with fp32
  master weights (megatron-core's mixed-precision optimizer);
- dense, peer: a plain transformers loop (LlamaForCausalLM of the exported seed, torch AdamW,
  clipping) in fp32, and in bf16 autocast over fp32 weights (plain PyTorch's mixed precision);
- the same at a small size (hidden 256, 4 layers), which is what decides `train.dtype: auto`;
- the MoE finetune's memory: the seed merged with 4 copies of itself (5 experts, top-2, 453M
  parameters), a few steps of `btx train` each way: fp32 and bf16, each with and without full
  activation recompute (model.recompute), and fp32 with the distributed optimizer over 2 ranks
  (DP=2, each rank half the batch); peak memory of all its processes together (PSS) and of the
  largest one (RSS), sampled every 0.2 s.

Every child runs alone, one after the other, with the same threads, and the throughput arms
alternate over `--rounds` rounds: on a shared machine another job's load only ever adds time,
so each arm's best step is the cleanest comparison, its median the typical one. Tokens/s is per
timed step (the first `--warmup` steps are dropped); the JSON keeps every step time, the load
average around every child, and each ratio of medians with a percentile-bootstrap 95% interval
over the steps of both arms (which the load's drift between children widens, as it should).

    python benchmarks/bench_real_seed_cpu.py                     # ~20 min on 2 cores
    python benchmarks/bench_real_seed_cpu.py --parts dense       # only the throughput part
Writes JSON to --out (default benchmarks/results_real_seed_cpu.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "real_seed"))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="alternate the arms this many times")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--moe-steps", type=int, default=3)
    p.add_argument("--moe-variants", default=None, help="comma-separated: only these MoE runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default="dense,small,moe")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_real_seed_cpu.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--hf", default=None, help=argparse.SUPPRESS)
    return p


# ---- the peer: a plain transformers loop (child process) ---------------------------------------
def worker_hf(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g) for _ in range(4)]
    times, cpu = [], []
    for i in range(a.warmup + a.steps):
        x = batches[i % len(batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"tokens_per_step": a.batch * a.seq, "step_s": times, "cpu_s": cpu}


# ---- ours: btx train (child processes) ----------------------------------------------------------
class PeakRSS:
    """Peak memory of a process tree, sampled every 0.2 s: the sum of its processes'
    proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so forked
    data-loader workers are not counted twice) and the largest process's resident set."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.total = self.largest = 0
        self.timeline: list[tuple[float, float]] = []  # (wall time, CPU seconds of the tree)
        self._cpu_done: dict[int, float] = {}  # CPU seconds of processes seen, by pid
        self.floor = 1.5 * 2**30  # bytes of available memory below which the run is ended
        self.killed_for_memory = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss, pss = [], []
                for proc in procs:
                    try:
                        info = proc.memory_full_info()
                        cpu = proc.cpu_times()
                    except psutil.Error:
                        continue
                    rss.append(info.rss)
                    pss.append(getattr(info, "pss", info.rss))
                    self._cpu_done[proc.pid] = cpu.user + cpu.system
                self.timeline.append((time.time(), sum(self._cpu_done.values())))
                if psutil.virtual_memory().available < self.floor:
                    # a shared machine: end our own run rather than let the kernel's OOM killer
                    # choose a process (perhaps someone else's)
                    self.killed_for_memory = True
                    for proc in reversed(procs):
                        with contextlib.suppress(psutil.Error):
                            proc.kill()
                self.total = max(self.total, sum(pss))
                self.largest = max(self.largest, max(rss, default=0))
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {
            "killed_for_memory": self.killed_for_memory,
            "peak_pss_gb_total": self.total / 2**30,
            "peak_rss_gb_largest": self.largest / 2**30,
        }

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two wall times (interpolated samples)."""
        wall, cpu = np.array(self.timeline).T
        return float(np.interp(end, wall, cpu) - np.interp(start, wall, cpu))


def run_ours(a, name: str, config: dict, nproc: int = 1, extra_env=None) -> dict:
    """`btx train` with `config`; step times from its metrics, peak RSS sampled."""
    import yaml

    run_dir = Path(a.work) / "runs" / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    config = dict(config, run_dir=str(run_dir))
    path = Path(a.work) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    train = [sys.executable, "-m", "megatron_btx.training", str(path)]
    if nproc > 1:
        train = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megatron_btx.training",
            str(path),
        ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(max(1, a.threads // nproc)),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra_env or {})
    log = open(Path(a.work) / f"{name}.log", "w")
    proc = subprocess.Popen(
        train, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    sampler = PeakRSS(proc.pid)
    code = proc.wait()
    memory = sampler.stop()
    log.close()
    if code:
        return {"error": (Path(a.work) / f"{name}.log").read_text()[-3000:], **memory}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    tokens = config["data"]["global_batch_size"] * config["data"]["seq_length"]
    step_s = [tokens / r["tokens_per_s"] for r in steps[a.warmup :]]
    # CPU seconds per step: between consecutive train events (one per step: log_interval 1)
    ends = [r["time"] for r in steps]
    cpu_s = [sampler.cpu_between(t0, t1) for t0, t1 in zip(ends, ends[1:])]
    cpu_s = cpu_s[max(0, a.warmup - 1) :]
    return {
        "tokens_per_step": tokens,
        "step_s": step_s,
        "cpu_s": cpu_s,
        **memory,
        "first_loss": steps[0]["loss"] if steps else None,
    }


def _config(a, data: str, model: dict, dtype: str, steps: int, **parallel) -> dict:
    return {
        "model": model,
        "parallel": parallel,
        "data": {
            "path": data,
            "domains": ["code"],
            "valid_domains": [],
            "seq_length": a.seq,
            "micro_batch_size": a.batch,
            "global_batch_size": a.batch,
            "cache_dir": str(Path(a.work) / "index"),
        },
        "train": {
            "steps": steps,
            "lr": 1e-5,
            "warmup_steps": 0,
            "dtype": dtype,
            "eval_interval": 10**6,
            "save_interval": 10**6,
            "log_interval": 1,
            "device": "cpu",
        },
        "logging": {"tensorboard": False},
    }


# ---- set-up: the seed, its export, data, the 5-expert MoE ---------------------------------------
def prepare(a) -> dict[str, str]:
    from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_btx.data.corpora import fetch_corpora
    from megatron_btx.data.domains import prepare_domains

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: str(work / k) for k in ("seed", "seed_hf", "data", "moe")}
    if not (work / "seed" / "btx_manifest.json").is_file():
        hf_to_megatron("gguf:smollm2-135m-instruct", paths["seed"], overwrite=True)
    if not (work / "seed_hf" / "config.json").is_file():
        megatron_to_hf(paths["seed"], paths["seed_hf"], overwrite=True)
    prepare_domains(
        {"code": [fetch_corpora(["code"])["code"]]},
        paths["data"],
        tokenizer=work / "seed" / "tokenizer",
    )
    return paths


def make_moe(paths: dict[str, str]) -> None:
    if (Path(paths["moe"]) / "btx_manifest.json").is_file():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_btx.cli",
            "merge",
            "--experts",
            *[paths["seed"]] * 4,
            "--seed",
            paths["seed"],
            "--save",
            paths["moe"],
            "--overwrite",
            "--no-progress",
        ],
        check=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore"),
    )


def run_hf(a, hf: str, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "hf",
        "--hf",
        hf,
        "--dtype",
        dtype,
        "--out",
        out,
        "--seq",
        str(a.seq),
        "--batch",
        str(a.batch),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    sampler = PeakRSS(proc.pid)
    _, err = proc.communicate()
    memory = sampler.stop()
    if proc.returncode:
        return {"error": err[-3000:]}
    return {**json.loads(Path(out).read_text()), **memory}


# ---- statistics ---------------------------------------------------------------------------------
def summary(runs: list[dict]) -> dict:
    """One arm over its rounds: every step pooled; median and best tokens/s, mean with a t
    interval over steps, peak memory of its worst round."""
    errors = [r["error"] for r in runs if "error" in r]
    ok = [r for r in runs if "step_s" in r]
    if not ok:
        killed = any(r.get("killed_for_memory") for r in runs)
        return {"error": errors[-1] if errors else "no run", "killed_for_memory": killed}
    steps = [s for r in ok for s in r["step_s"]]
    cpu = [c for r in ok for c in r.get("cpu_s", []) if c > 0]
    tokens = ok[0]["tokens_per_step"]
    tps = np.array([tokens / s for s in steps])
    half = 0.0
    if tps.size > 1:
        from scipy import stats as st

        half = float(st.t.ppf(0.975, tps.size - 1) * tps.std(ddof=1) / np.sqrt(tps.size))
    keep = ("peak_pss_gb_total", "peak_rss_gb_largest")
    return {
        "tokens_per_step": tokens,
        "step_s": steps,
        "tokens_per_s_median": float(np.median(tps)),
        "tokens_per_s_best": float(tps.max()),
        "tokens_per_s_mean": float(tps.mean()),
        "tokens_per_s_mean_ci95": [float(tps.mean() - half), float(tps.mean() + half)],
        "round_medians": [float(np.median([tokens / s for s in r["step_s"]])) for r in ok],
        "cpu_s": cpu,
        "tokens_per_cpu_s_median": float(np.median([tokens / c for c in cpu])) if cpu else None,
        **{k: max(r[k] for r in ok) for k in keep if all(k in r for r in ok)},
        "load_average": [r.get("load_average") for r in ok],
        "first_loss": ok[0].get("first_loss"),
        "errors": errors,
    }


def ratio(num: dict, den: dict, rng=None) -> dict | None:
    """Median tokens/s of `num` over `den` with a percentile-bootstrap 95% interval over
    steps, and the ratio of their best steps."""
    if "step_s" not in num or "step_s" not in den:
        return None
    rng = rng or np.random.default_rng(0)
    a = np.array([num["tokens_per_step"] / s for s in num["step_s"]])
    b = np.array([den["tokens_per_step"] / s for s in den["step_s"]])
    boots = [
        np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(2000)
    ]
    cpu_ratio = None
    if num.get("cpu_s") and den.get("cpu_s"):
        ca = np.array([num["tokens_per_step"] / c for c in num["cpu_s"]])
        cb = np.array([den["tokens_per_step"] / c for c in den["cpu_s"]])
        cboots = [
            np.median(rng.choice(ca, ca.size)) / np.median(rng.choice(cb, cb.size))
            for _ in range(2000)
        ]
        cpu_ratio = {
            "median_ratio": float(np.median(ca) / np.median(cb)),
            "ci95": [float(np.percentile(cboots, 2.5)), float(np.percentile(cboots, 97.5))],
        }
    return {
        "per_cpu_second": cpu_ratio,
        "median_ratio": float(np.median(a) / np.median(b)),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "best_ratio": float(a.max() / b.max()),
    }


# ---- main ---------------------------------------------------------------------------------------
def main() -> int:
    a = _args().parse_args()
    if a.worker == "hf":
        Path(a.out).write_text(json.dumps(worker_hf(a)))
        return 0
    parts = set(a.parts.split(","))
    paths = prepare(a)
    seed = {"init_from": paths["seed"]}
    small = {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "vocab_size": 49152,
    }
    runs: dict[str, list[dict]] = {}
    steps = a.warmup + a.steps
    arms = []
    for dtype in ("fp32", "bf16"):
        if "dense" in parts:
            arms.append(
                (
                    f"ours_seed_{dtype}",
                    lambda d=dtype: run_ours(
                        a, f"seed_{d}", _config(a, paths["data"], seed, d, steps)
                    ),
                )
            )
            arms.append((f"hf_seed_{dtype}", lambda d=dtype: run_hf(a, paths["seed_hf"], d)))
        if "small" in parts:
            arms.append(
                (
                    f"ours_small_{dtype}",
                    lambda d=dtype: run_ours(
                        a, f"small_{d}", _config(a, paths["data"], small, d, steps)
                    ),
                )
            )
    for _ in range(a.rounds):
        for name, arm in arms:
            before = os.getloadavg()[0]
            result = arm()
            result["load_average"] = [before, os.getloadavg()[0]]
            runs.setdefault(name, []).append(result)
            print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'error'})}")
    if "moe" in parts:
        make_moe(paths)
        moe = {"init_from": paths["moe"]}
        a_moe = argparse.Namespace(**{**vars(a), "warmup": 1})
        for name, dtype, recompute, par, nproc in (
            ("moe_fp32", "fp32", False, {}, 1),
            ("moe_fp32_recompute", "fp32", True, {}, 1),
            ("moe_bf16", "bf16", False, {}, 1),
            ("moe_bf16_recompute", "bf16", True, {}, 1),
            ("moe_fp32_distopt_dp2", "fp32", False, {"distributed_optimizer": True}, 2),
            ("moe_fp32_recompute_fixed_mmap", "fp32", True, {}, 1),
        ):
            if a.moe_variants and name not in a.moe_variants.split(","):
                continue
            model = dict(moe, recompute=recompute)
            cfg = _config(a_moe, paths["data"], model, dtype, a.moe_steps, **par)
            if nproc == 2:
                cfg["data"]["global_batch_size"] = 2 * a.batch
            # glibc's mmap threshold fixed (freed tensors go back to the system at once)
            fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"} if name.endswith("fixed_mmap") else {}
            runs[name] = [run_ours(a_moe, name, cfg, nproc, fixed)]
    results = {k: summary(v) for k, v in runs.items()}
    ratios = {
        f"{num} / {den}": ratio(results[num], results[den])
        for num, den in (
            ("ours_seed_bf16", "ours_seed_fp32"),
            ("hf_seed_bf16", "hf_seed_fp32"),
            ("ours_seed_fp32", "hf_seed_fp32"),
            ("ours_seed_bf16", "hf_seed_bf16"),
            ("ours_small_bf16", "ours_small_fp32"),
        )
        if num in results and den in results
    }
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": a.threads,
            "python": platform.python_version(),
        },
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "batch": {"sequences": a.batch, "seq_length": a.seq},
        "results": results,
        "ratios": ratios,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    head = f"{'run':<22} {'median tok/s':>12} {'best':>8} {'tok/CPU-s':>10}"
    print(f"{head} {'PSS all / RSS largest, GB':>26}")
    for name, r in results.items():
        if "step_s" not in r:
            print(f"{name:<22} error: {(r.get('error') or '').strip().splitlines()[-1:]}")
            continue
        mem = f"{r.get('peak_pss_gb_total', 0):.2f} / {r.get('peak_rss_gb_largest', 0):.2f}"
        med, best = r["tokens_per_s_median"], r["tokens_per_s_best"]
        per_cpu = r.get("tokens_per_cpu_s_median") or 0.0
        print(f"{name:<22} {med:>12.1f} {best:>8.1f} {per_cpu:>10.1f} {mem:>26}")
    for name, r in ratios.items():
        if r:
            lo, hi = r["ci95"]
            line = f"{name:<36} wall: median {r['median_ratio']:.2f} [{lo:.2f}, {hi:.2f}]"
            line += f" best {r['best_ratio']:.2f}"
            if r["per_cpu_second"]:
                c = r["per_cpu_second"]
                line += f" | per CPU-s: {c['median_ratio']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
            print(line)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
