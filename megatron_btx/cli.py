"""The `btx` command. Each subcommand lives in its own module and is imported only when used,
so `btx --help` is instant and a broken optional dependency only affects its own subcommand."""

from __future__ import annotations

import importlib
import sys

import megatron_btx
from megatron_btx import lazy_compile
from megatron_btx.errors import run_command

# name -> (module:function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": (
        "megatron_btx.data.cli:main",
        "text/JSONL (or the built-in corpora) -> SentencePiece + indexed datasets",
    ),
    "train": (
        "megatron_btx.training.cli:main",
        "train a dense expert or the MoE from a YAML config (under torchrun)",
    ),
    "merge": (
        "megatron_btx.merge.cli:main",
        "merge N dense checkpoints into one MoE checkpoint (BTX MiX step)",
    ),
    "import-hf": (
        "megatron_btx.convert.cli:hf_to_megatron_main",
        "HF Llama/Mixtral safetensors -> megatron-core torch_dist",
    ),
    "export-hf": (
        "megatron_btx.convert.cli:megatron_to_hf_main",
        "megatron-core torch_dist -> HF Llama/Mixtral safetensors",
    ),
    "verify": (
        "megatron_btx.convert.cli:verify_main",
        "re-hash a checkpoint's files against the sha256 its manifest records",
    ),
    "launch": (
        "megatron_btx.pipeline.launch:main",
        "submit the BTX plan to Slurm as dependent sbatch jobs (srun + torchrun, requeue)",
    ),
    "run": (
        "megatron_btx.pipeline.cli:run_main",
        "run a whole BTX experiment from one config (seed, experts, merge, finetune, "
        "baselines, evaluation); re-run to resume",
    ),
    "status": (
        "megatron_btx.pipeline.cli:status_main",
        "show each stage of a BTX run directory (done/running/failed/pending)",
    ),
    "match-compute": (
        "megatron_btx.pipeline.cli:match_compute_main",
        "time-match a BTX run's baselines to the hardware time of its BTX stages",
    ),
    "evaluate": (
        "megatron_btx.eval.cli:main",
        "per-domain held-out perplexity table and routing analysis of a BTX run",
    ),
}


def usage() -> str:
    lines = [
        f"usage: btx COMMAND [ARGS]   (megatron_btx {megatron_btx.__version__})",
        "",
        "commands:",
    ]
    width = max(len(n) for n in COMMANDS)
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_}")
    lines += ["", "btx COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(megatron_btx.__version__)
        return 0
    name, rest = argv[0], argv[1:]
    lazy_compile.install()  # megatron-core's import-time torch.compile calls, deferred
    if name not in COMMANDS:
        print(f"btx: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    mod, fn = target.split(":")
    try:
        func = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        print(f"btx {name}: not available in this installation ({e})", file=sys.stderr)
        return 2
    return run_command(func, rest)


if __name__ == "__main__":
    sys.exit(main())
