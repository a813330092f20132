#!/usr/bin/env python
"""Throughput of prepare-data (read, tokenise, write the indexed datasets) with an HF byte-level
BPE tokenizer.json beside SentencePiece, on the same text.

    python benchmarks/bench_prepare.py [--mb 8] [--vocab 8000] [--rounds 3] [--workers 1 2]
        [--hf-dir SEED_FOLDER] [--json benchmarks/results_prepare.json]

Text: the Python standard library's own .py files (the built-in code corpus, present on every
machine), one document per file, cut at --mb megabytes, written once as JSONL. Both tokenizers
are trained on that text with the same vocabulary size: SentencePiece with the project's
round-trip settings (`train_sentencepiece`), the HF one as a Llama-3-style byte-level BPE with
the `tokenizers` trainer (or --hf-dir uses a seed's folder instead). Each round runs
`preprocess_files` (what `btx prepare-data --input` runs) once per tokenizer and thread count,
alternating, so both see the same machine state; MB/s is input bytes / its own wall time, and
MB per CPU-second (input bytes / the process's CPU time, all threads) is the figure that a busy
shared machine disturbs least.
Prints a table of medians and writes every round to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def write_corpus(path: Path, max_mb: float) -> int:
    """Standard-library modules as JSONL documents, at most ``max_mb`` MB of text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    budget, written = int(max_mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as out:
        for file in sorted(stdlib.rglob("*.py")):
            parts = file.relative_to(stdlib).parts
            if "site-packages" in parts or any(p in ("test", "tests") for p in parts):
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"id": "/".join(parts), "text": text}) + "\n")
            written += len(text.encode("utf-8"))
            if written >= budget:
                break
    return written


def make_tokenizers(work: Path, corpus: Path, vocab: int, hf_dir: str | None) -> dict[str, str]:
    from hf_tokenizers import make_hf_tokenizer

    from megatron_btx.data.preprocess import iter_documents
    from megatron_btx.data.spm_tokenizer import train_sentencepiece

    texts = [text for _, text in iter_documents([corpus])]
    sp = train_sentencepiece(texts, work / "spm", vocab)
    if hf_dir is None:
        hf_dir = str(make_hf_tokenizer(work / "hf", texts, "llama3", vocab))
    return {"sentencepiece": sp.path, "hf_tokenizer_json": hf_dir}


def one_round(corpus: Path, tokenizer: str, workers: int, out: Path) -> dict[str, float]:
    import warnings

    from megatron_btx.data.preprocess import preprocess_files

    t0, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = preprocess_files([corpus], out, tokenizer, None, workers)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(result["tokens"].values())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "mb_per_s": result["input_bytes"] / 1e6 / seconds,
        "mb_per_cpu_s": result["input_bytes"] / 1e6 / cpu_seconds,
        "tokens": tokens,
        "bytes_per_token": result["input_bytes"] / tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text (default 8)")
    ap.add_argument("--vocab", type=int, default=8000, help="vocabulary of both (default 8000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, median reported (>= 3)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="thread counts")
    ap.add_argument("--hf-dir", default=None, help="a seed's tokenizer folder instead of training")
    ap.add_argument("--json", default=None, help="write every round here")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the median of fewer says little)")
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="btx-bench-prepare-") as tmp:
        work = Path(tmp)
        corpus = work / "stdlib.jsonl"
        size = write_corpus(corpus, args.mb)
        tokenizers = make_tokenizers(work, corpus, args.vocab, args.hf_dir)
        rounds: list[dict] = []
        for r in range(args.rounds):
            for workers in args.workers:
                for name, path in tokenizers.items():
                    m = one_round(corpus, path, workers, work / f"out_{name}_{workers}")
                    rounds.append({"round": r, "tokenizer": name, "workers": workers, **m})
                    print(
                        f"round {r} {name:18s} workers {workers}: {m['mb_per_s']:.2f} MB/s",
                        file=sys.stderr,
                    )
    rows = []
    for workers in args.workers:
        for name in tokenizers:
            mine = [x for x in rounds if x["tokenizer"] == name and x["workers"] == workers]
            rows.append(
                {
                    "tokenizer": name,
                    "workers": workers,
                    "median_mb_per_s": statistics.median(x["mb_per_s"] for x in mine),
                    "min_mb_per_s": min(x["mb_per_s"] for x in mine),
                    "max_mb_per_s": max(x["mb_per_s"] for x in mine),
                    "median_mb_per_cpu_s": statistics.median(x["mb_per_cpu_s"] for x in mine),
                    "bytes_per_token": mine[0]["bytes_per_token"],
                }
            )
    print(
        f"\nprepare-data on {size / 1e6:.1f} MB of stdlib code, vocab {args.vocab}, "
        f"median of {args.rounds} rounds (load average before: {load_before})\n"
    )
    print(
        "| tokenizer | threads | MB/s (median) | min-max | vs SentencePiece "
        "| MB per CPU-second | bytes/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(
            x for x in rows if x["tokenizer"] == "sentencepiece" and x["workers"] == row["workers"]
        )
        print(
            f"| {row['tokenizer']} | {row['workers']} | {row['median_mb_per_s']:.2f} | "
            f"{row['min_mb_per_s']:.2f}-{row['max_mb_per_s']:.2f} | "
            f"{row['median_mb_per_s'] / base['median_mb_per_s']:.2f}x | "
            f"{row['median_mb_per_cpu_s']:.2f} | {row['bytes_per_token']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": f"{platform.machine()}, {platform.processor() or '?'}",
                    "python": platform.python_version(),
                    "input_mb": size / 1e6,
                    "load_average_before": load_before,
                    "vocab": args.vocab,
                    "summary": rows,
                    "rounds": rounds,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
