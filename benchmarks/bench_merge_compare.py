"""Paired merge timings with farm-bench (A and B alternate, the ratio is taken pair by pair, so a
machine whose speed drifts still gives a fair ratio):

- `hf`: like for like with mergekit-moe, which writes HF safetensors: ours with `--export-hf`
  (torch_dist and HF Mixtral) against mergekit-moe (HF only);
- `before`: our merge against an earlier version of our code on the same inputs (`--before DIR`,
  a checkout of that version), e.g. the redesign's "within 5% of before".

The inputs are bench_merge.py's (4 x TinyLlama-1.1B-shaped bf16 HF Llamas under WORK/L22, made
by it). Prints a table and writes JSON.

    python benchmarks/bench_merge_compare.py --work /tmp/btx-bench --mk-python /tmp/mk-venv/bin/python \\
        --before /path/to/old/checkout --rounds 5 --json benchmarks/results/merge_compare.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import merge_argv, mergekit_argv  # this folder: run as a script

ROOT = Path(__file__).resolve().parents[1]


def merge_cmd(
    code: Path, srcs: list[Path], save: Path, export: Path | None = None, *extra: str
) -> list[str]:
    """bench_merge's merge command run with the code of checkout `code` (PYTHONPATH)."""
    cmd = ["env", f"PYTHONPATH={code}", *merge_argv(code, srcs), "--save", str(save)]
    if export is not None:
        cmd += ["--export-hf", str(export)]
    return cmd + list(extra)


def mergekit_cmd(python: str, srcs: list[Path], work: Path) -> list[str]:
    """bench_merge's mergekit-moe command, removing its previous output first."""
    out = shlex.quote(str(work / "out_mk"))
    return ["sh", "-c", f"rm -rf {out} && exec " + shlex.join(mergekit_argv(python, srcs, work))]


def farm_bench(a: list[str], b: list[str], rounds: int, timeout: int) -> dict[str, dict]:
    """farm-bench's figures: {row: {min, median, max}} for A, B and the pairwise A/B ratios."""
    cmd = ["farm-bench", "-n", str(rounds), "--warmup", "1", "--timeout", str(timeout)]
    cmd += ["--vs", shlex.join(b), "--", *a]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(A|B|A/B) ([a-z ]+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line.strip())
        if m:
            rows[f"{m.group(1)} {m.group(2).strip()}"] = {
                "min": float(m.group(3)),
                "median": float(m.group(4)),
                "max": float(m.group(5)),
            }
    return {"rows": rows, "raw": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/btx-bench")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--mk-python", default="/tmp/mk-venv/bin/python")
    ap.add_argument("--before", default=None, help="a checkout of the earlier version")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--only", choices=["hf", "before"], default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    srcs = [work / f"L{a.layers}" / n for n in ("e0", "e1", "e2", "seed")]
    missing = [s for s in srcs if not (s / "done").is_file()]
    if missing:
        print(f"inputs missing ({missing[0]}): make them with benchmarks/bench_merge.py first")
        return 2
    results: dict = {"date": time.strftime("%Y-%m-%d"), "rounds": a.rounds, "comparisons": {}}
    if a.only in (None, "hf"):
        ours = merge_cmd(ROOT, srcs, work / "out_a", work / "out_a_hf")
        mk = mergekit_cmd(a.mk_python, srcs, work)
        results["comparisons"]["ours --export-hf vs mergekit-moe (both write HF)"] = farm_bench(
            ours, mk, a.rounds, a.timeout
        )
    if a.before and a.only in (None, "before"):
        new = merge_cmd(ROOT, srcs, work / "out_a")
        old = merge_cmd(Path(a.before).resolve(), srcs, work / "out_b")
        results["comparisons"]["this version vs --before (torch_dist)"] = farm_bench(
            new, old, a.rounds, a.timeout
        )
        # the same without the sha256 of every written file (issue 12's integrity manifest,
        # which the earlier version does not compute): the layout change alone
        unhashed = merge_cmd(ROOT, srcs, work / "out_a", None, "--no-hash-output")
        results["comparisons"]["this version --no-hash-output vs --before"] = farm_bench(
            unhashed, old, a.rounds, a.timeout
        )
    print(
        f"{'comparison':58s} {'A wall s':>10s} {'B wall s':>10s} {'A/B wall (min/median/max)':>28s}"
    )
    for name, c in results["comparisons"].items():
        r = c["rows"]
        ratio = r.get("A/B wall", {})
        print(
            f"{name:58s} {r['A wall s']['median']:10.2f} {r['B wall s']['median']:10.2f} "
            f"{ratio.get('min', 0):8.3f} / {ratio.get('median', 0):.3f} / {ratio.get('max', 0):.3f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
