"""The conversion commands: `btx import-hf`, `btx export-hf` (also tools/convert_hf_to_megatron.py
and tools/convert_megatron_to_hf.py) and `btx verify`. The conversions themselves are
checkpoint I/O (:mod:`megatron_btx.checkpoint.convert`, :mod:`megatron_btx.checkpoint.integrity`);
this module is their command line."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from megatron_btx.checkpoint import integrity
from megatron_btx.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_btx.errors import BTXError, run_command


def _parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument(
        "--load", required=True, help="source checkpoint folder (import-hf: or a .gguf file)"
    )
    p.add_argument("--save", required=True, help="output folder (written atomically)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check and record")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check and record")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size to check and record")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="output dtype (default: the source's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def run_cli(fn, argv: list[str] | None, desc: str, extra=None) -> int:
    p = _parser(desc)
    if extra:
        extra(p)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = {k: v for k, v in vars(ns).items()}
    for flag in ("tp", "pp", "ep"):
        if kwargs[flag] < 1:
            print(f"error: --{flag} {kwargs[flag]} must be >= 1", file=sys.stderr)
            return 2
    if "max_shard_gb" in kwargs:
        gb = kwargs.pop("max_shard_gb")
        if not math.isfinite(gb) or gb <= 0:
            print(f"error: --max-shard-gb {gb} must be a number > 0", file=sys.stderr)
            return 2
        kwargs["max_shard_bytes"] = max(1, int(gb * 1024**3))

    def convert() -> int:
        fn(**kwargs)
        return 0

    return run_command(convert)


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    return run_cli(
        hf_to_megatron,
        argv,
        "Convert an HF checkpoint (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) "
        "or a dense Llama-family GGUF file (dequantized) to megatron-core torch_dist (loads at "
        "any TP/PP/EP).",
    )


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
        p.add_argument(
            "--no-verify-hashes",
            dest="verify_hashes",
            action="store_false",
            help="do not check the source's files against its manifest's sha256 (faster)",
        )

    return run_cli(
        megatron_to_hf,
        argv,
        "Export a megatron-core torch_dist checkpoint (dense or MoE, any merge variant) to HF "
        "safetensors of the family that computes the same function.",
        extra,
    )


def verify_main(argv: list[str] | None = None) -> int:
    """`btx verify CKPT [CKPT ...]`."""
    p = argparse.ArgumentParser(
        prog="btx verify",
        description="Re-hash every file of megatron_btx checkpoints (torch_dist or HF exports) "
        "and compare with the sha256 their manifests record: one line per changed, missing or "
        "unrecorded file; exit code 2 when there is one.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    args = p.parse_args(argv)
    return run_command(_verify, args.checkpoints)


def _verify(folders: list[str]) -> int:
    bad = 0
    for folder in folders:
        if not Path(folder).is_dir():
            raise BTXError(f"{folder}: not a folder")
        recorded = integrity.recorded_hashes(folder)
        found = integrity.problems(folder, recorded)
        for line in found:
            print(f"error: {line}", file=sys.stderr)
        if not found:
            print(f"ok: {folder}: {len(recorded)} files match their sha256")
        bad += len(found)
    return 2 if bad else 0
