"""Benchmark the BTX merge against mergekit-moe and the disk floor.

Makes 4 HF Llama checkpoints (bf16, random weights written directly with safetensors: 3 experts +
seed) of a TinyLlama-1.1B shape by default, then runs, each as its own process:
- `cat` of the inputs to /dev/null (the read floor),
- our converter (tools/convert_dense_to_moe.py) to torch_dist, and again with --export-hf,
- mergekit-moe (`gate_mode: random`, from a separate venv, --mk-python) writing HF Mixtral,
and records wall time and peak resident memory (the process tree's RSS, sampled every 20 ms, and
the kernel's ru_maxrss of the largest child as a cross-check). Then our converter alone on models
of 8 and 16 layers of the same width, to show that peak memory does not grow with depth.
The disk's speed here varies from minute to minute, so `cat`, ours and an O_DIRECT `dd` of the
output's size run back to back in --rounds rounds, and ours / (cat + dd) is reported per round.
mergekit-moe is compared only with our merge that writes HF too (--export-hf), one run each; the
paired comparison over rounds is bench_merge_compare.py --only hf.

    python benchmarks/bench_merge.py --work /tmp/bench --mk-python /tmp/mk-venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
OURS_HF_RUN = "btx merge -> torch_dist + HF Mixtral"
MERGEKIT_RUN = "mergekit-moe (gate_mode random) -> HF"


def merge_argv(code: Path, srcs: list[Path]) -> list[str]:
    """Our merge of 3 experts + the seed (the 4th source) with the code of checkout `code`;
    the caller adds --save (and --export-hf)."""
    return [
        sys.executable,
        str(code / "tools" / "convert_dense_to_moe.py"),
        "--experts",
        *map(str, srcs[:3]),
        "--seed",
        str(srcs[3]),
        "--no-progress",
        "--overwrite",
    ]


def mergekit_argv(python: str, srcs: list[Path], work: Path) -> list[str]:
    """mergekit-moe's command for the same merge as ours (3 experts + the seed as base and
    fourth expert, random gates, top-2, bf16) into WORK/out_mk; writes its YAML config."""
    cfg = work / "mergekit_moe.yml"
    cfg.write_text(
        json.dumps(
            {
                "base_model": str(srcs[3]),
                "gate_mode": "random",
                "dtype": "bfloat16",
                "experts_per_token": 2,
                "experts": [{"source_model": str(s)} for s in srcs],
            },
            indent=2,
        )
    )
    return [
        python,
        "-m",
        "mergekit.scripts.moe",
        str(cfg),
        str(work / "out_mk"),
        "--i-understand-this-is-not-useful-without-training",
        "--no-copy-tokenizer",
        "--device",
        "cpu",
        "--out-shard-size",
        "1B",
        "--lazy-unpickle",
    ]


def make_llama(
    path: Path,
    layers: int,
    hidden: int,
    inter: int,
    heads: int,
    kv: int,
    vocab: int,
    seed: int,
    pool: torch.Tensor,
) -> None:
    """An HF Llama folder with pseudo-random bf16 weights (slices of a random pool, so making
    4 x 1B models takes seconds), sharded like transformers does (~2 GB per shard)."""
    from safetensors.torch import save_file

    if (path / "done").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * hd, hidden),
                p + "self_attn.k_proj.weight": (kv * hd, hidden),
                p + "self_attn.v_proj.weight": (kv * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * hd),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        h = int(hashlib.md5(f"{seed}/{name}".encode()).hexdigest()[:8], 16)
        off = h % (pool.numel() - 1)
        idx = (
            (torch.arange(n, dtype=torch.int64) + off) % pool.numel()
            if n > pool.numel() - off
            else None
        )
        t = (pool[idx] if idx is not None else pool[off : off + n]).reshape(shape).clone()
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        if size + 2 * n > 2 * 1024**3 and cur:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += 2 * n
    shards.append(cur)
    wm = {}
    for k, sd in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, str(path / fname), metadata={"format": "pt"})
        wm.update({n: fname for n in sd})
    total = sum(2 * t.numel() for sd in shards for t in sd.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_tokenizer(path, vocab)
    (path / "done").write_text("")


def _write_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer.json of the right size (mergekit-moe loads the base's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS: the process tree's summed RSS sampled every 20 ms, and the
    kernel's exact peak (ru_maxrss) of the main process as GNU time reports it (run through
    /usr/bin/time so the child's high-water mark does not inherit this process's size)."""
    mfile = Path(f"/tmp/.bench_maxrss_{os.getpid()}")
    if Path("/usr/bin/time").is_file():
        cmd = ["/usr/bin/time", "-o", str(mfile), "-f", "%M", *cmd]
    t0 = time.time()
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    peak = [0]
    out = []

    def drain():
        for line in p.stdout:
            out.append(line.decode(errors="replace")[-2000:])
            del out[:-200]  # keep the tail only

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    proc = psutil.Process(p.pid)
    rusage = None
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rusage = ru
            p.returncode = os.waitstatus_to_exitcode(status)
            break
        try:
            rss = proc.memory_info().rss
            for c in proc.children(recursive=True):
                try:
                    rss += c.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    th.join()
    wall = time.time() - t0
    res = {
        "cmd": " ".join(map(str, cmd)),
        "rc": p.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak[0] / 1024**3, 3),
        "ru_maxrss_gb": None,
    }
    del rusage
    if mfile.is_file():
        try:
            res["ru_maxrss_gb"] = round(int(mfile.read_text().split()[-1]) / 1024**2, 3)
        except ValueError:
            pass
        mfile.unlink()
    if p.returncode != 0:
        res["tail"] = "".join(out)[-3000:]
    return res


def du(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024**3, 3)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def print_mergekit_ratio(results: dict, by: dict[str, dict]) -> None:
    """mergekit-moe against ours, like for like only: mergekit-moe writes HF safetensors, so its
    time is divided by our merge's that writes HF too (--export-hf; ours writes torch_dist as
    well), never by the torch_dist-only rounds. One run of each here; the paired ratio over
    rounds is benchmarks/bench_merge_compare.py --only hf."""
    mk = by.get(MERGEKIT_RUN, {})
    hf = by.get(OURS_HF_RUN, {})
    if mk.get("rc") != 0 or hf.get("rc") != 0:
        return
    ratio = mk["wall_s"] / hf["wall_s"]
    results["mergekit_over_ours_export_hf"] = round(ratio, 2)
    print(
        f"mergekit-moe (HF) / ours --export-hf (torch_dist + HF), one run each = {ratio:.2f}"
        "\n  (paired over rounds: python benchmarks/bench_merge_compare.py --only hf)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/btx-bench", help="scratch folder (needs ~40 GB)")
    ap.add_argument(
        "--mk-python",
        default="/tmp/mk-venv/bin/python",
        help="python of a venv with mergekit installed",
    )
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument(
        "--depths",
        type=int,
        nargs="*",
        default=[8, 16],
        help="extra depths for the peak-RSS-vs-layers runs",
    )
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (cat, ours, O_DIRECT dd), each giving ours / floor: the disk's "
        "speed varies from minute to minute here, so the ratio is taken per round",
    )
    ap.add_argument("--json", default=None, help="results file (default: WORK/bench_merge.json)")
    ap.add_argument("--keep", action="store_true", help="keep outputs")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pool = (torch.randn(64 * 1024 * 1024) * 0.02).to(torch.bfloat16)
    shape = {
        "hidden": a.hidden,
        "inter": a.intermediate,
        "heads": a.heads,
        "kv": a.kv_heads,
        "vocab": a.vocab,
    }

    def models(layers: int) -> list[Path]:
        out = []
        for i, name in enumerate(["e0", "e1", "e2", "seed"]):
            p = work / f"L{layers}" / name
            make_llama(p, layers, seed=i, pool=pool, **shape)
            out.append(p)
        return out

    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        },
        "shape": {**shape, "layers": a.layers},
        "runs": [],
    }
    t = time.time()
    srcs = models(a.layers)
    print(f"made 4 sources of {du(srcs[0])} GB each in {time.time() - t:.0f}s", flush=True)
    files = [str(f) for s in srcs for f in sorted(s.glob("*.safetensors"))]
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()), PYTHONWARNINGS="ignore")
    ours = merge_argv(ROOT, srcs)

    def run(name: str, cmd: list[str], out: Path | None = None, layers: int = a.layers) -> dict:
        if a.cold:
            drop_caches()
        r = measure(cmd, env)
        r.update(name=name, layers=layers)
        if out is not None and out.exists():
            r["output_gb"] = du(out)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
        results["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "cmd"}), flush=True)
        return r

    # warm the page cache once so every run reads the same way (with --cold, no warm-up read:
    # the virtual disk's host may keep what was just read, which made the first cold `cat` fast)
    if not a.cold:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    run("cat inputs > /dev/null", ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *files])
    r = run("btx merge -> torch_dist", ours + ["--save", str(work / "out_btx")], work / "out_btx")
    # the write floor: as many bytes as our output, written and fsync'd by dd
    mb = int((r.get("output_gb") or 1) * 1024)
    dd = work / "dd.bin"
    run(
        f"dd {mb} MB to disk, page cache + fsync",
        ["dd", "if=/dev/zero", f"of={dd}", "bs=1M", f"count={mb}", "conv=fsync", "status=none"],
    )
    dd.unlink(missing_ok=True)
    # the same bytes around the page cache, as our writers do (O_DIRECT): the lower floor
    dd_direct = ["dd", "if=/dev/zero", f"of={dd}", "bs=8M", f"count={max(1, mb // 8)}"]
    dd_direct += ["oflag=direct", "conv=fsync", "status=none"]
    run(
        f"dd {mb} MB to disk, O_DIRECT + fsync",
        dd_direct,
    )
    dd.unlink(missing_ok=True)
    rounds = [(results["runs"][0]["wall_s"], r["wall_s"], results["runs"][-1]["wall_s"])]
    for k in range(2, a.rounds + 1):
        c = run(
            f"cat inputs > /dev/null (round {k})",
            ["sh", "-c", 'exec cat "$@" > /dev/null', "cat", *files],
        )
        o = run(
            f"btx merge -> torch_dist (round {k})",
            ours + ["--save", str(work / "out_btx")],
            work / "out_btx",
        )
        d = run(
            f"dd {mb} MB to disk, O_DIRECT + fsync (round {k})",
            dd_direct,
        )
        dd.unlink(missing_ok=True)
        rounds.append((c["wall_s"], o["wall_s"], d["wall_s"]))
    run(
        OURS_HF_RUN,
        ours + ["--save", str(work / "out_btx2"), "--export-hf", str(work / "out_btx2_hf")],
        work / "out_btx2",
    )
    shutil.rmtree(work / "out_btx2_hf", ignore_errors=True)
    mk_ok = Path(a.mk_python).is_file()
    if mk_ok:
        mk = mergekit_argv(a.mk_python, srcs, work)
        run(MERGEKIT_RUN, mk, work / "out_mk")
    else:
        results["mergekit"] = f"not run: {a.mk_python} not found"
    for L in a.depths:
        s = models(L)
        ours_l = merge_argv(ROOT, s)
        if not a.cold:
            subprocess.run(
                ["cat", *[str(f) for x in s for f in x.glob("*.safetensors")]],
                stdout=subprocess.DEVNULL,
                check=True,
            )
        run(
            f"btx merge -> torch_dist ({L} layers)",
            ours_l + ["--save", str(work / f"out_L{L}")],
            work / f"out_L{L}",
            layers=L,
        )
    out = Path(a.json) if a.json else work / "bench_merge.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(
        f"{'run':48s} {'layers':>6s} {'wall s':>8s} {'peak RSS GB':>12s} {'maxrss GB':>10s} "
        f"{'output GB':>10s}"
    )
    for r in results["runs"]:
        print(
            f"{r['name']:48s} {r['layers']:6d} {r['wall_s']:8.1f} {r['peak_rss_gb']:12.3f} "
            f"{r['ru_maxrss_gb'] or 0:10.3f} {r.get('output_gb', 0) or 0:10.2f}"
            + ("" if r["rc"] == 0 else f"  FAILED rc={r['rc']}")
        )
    by = {r["name"]: r for r in results["runs"]}
    ratios = sorted(o / (c + d) for c, o, d in rounds)
    results["rounds"] = [
        {
            "cat_s": c,
            "ours_s": o,
            "dd_direct_s": d,
            "floor_s": round(c + d, 2),
            "ours_over_floor": round(o / (c + d), 2),
        }
        for c, o, d in rounds
    ]
    results["ours_over_floor_median"] = round(ratios[len(ratios) // 2], 2)
    print(
        f"\n{'round':>5s} {'cat s':>6s} {'O_DIRECT dd s':>14s} {'floor s':>8s} {'ours s':>7s} "
        f"{'ours / floor':>13s}"
    )
    for k, (c, o, d) in enumerate(rounds, 1):
        print(f"{k:5d} {c:6.1f} {d:14.1f} {c + d:8.1f} {o:7.1f} {o / (c + d):13.2f}")
    print(f"median ours / floor = {results['ours_over_floor_median']:.2f}")
    print_mergekit_ratio(results, by)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")
    return 0 if all(r["rc"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
