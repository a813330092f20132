"""The ``btx prepare-data`` command line (also ``tools/preprocess_data.py`` and
``python -m megatron_btx.data.cli``): the argument parser and the dispatch to its three modes.

It sits above the data library it drives: :mod:`megatron_btx.data.preprocess` (one dataset from
``--input``), :mod:`megatron_btx.data.domains` (several domains sharing one tokenizer, from
``--domain``) and :mod:`megatron_btx.data.corpora` (``--builtin-domains``). Keeping it out of
those modules lets them import each other in one direction only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from megatron_btx.data.domains import prepare_domains, sample_domain_sentences
from megatron_btx.data.preprocess import preprocess_files
from megatron_btx.data.splits import parse_split
from megatron_btx.data.spm_tokenizer import train_sentencepiece
from megatron_btx.data.staging import output_lock
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="btx prepare-data",
        description=(
            "Tokenise text into megatron-core indexed datasets (one per train/valid/test split). "
            "Three modes: --input FILES --output-prefix P (one dataset); --domain NAME=PATHS ... "
            "--output-dir D (several domains, shared tokenizer, manifest.json); --builtin-domains "
            "all --output-dir D (fetch the built-in code/math/prose/legal corpora first)."
        ),
    )
    mode = parser.add_argument_group("what to prepare (choose one)")
    mode.add_argument(
        "--input",
        nargs="+",
        action="extend",
        metavar="FILE|DIR",
        help=".jsonl (text field) or text files (one document each); folders are scanned for .txt/.jsonl",
    )
    mode.add_argument(
        "--domain",
        action="append",
        metavar="NAME=PATH[,PATH]",
        help="a domain and its inputs (repeatable); NAME=builtin takes the built-in corpus NAME "
        "(fetched here, with --max-mb and --cache-dir)",
    )
    mode.add_argument(
        "--builtin-domains",
        metavar="all|code,math,prose,legal",
        help="fetch and prepare built-in corpora",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--output-prefix",
        help="with --input: writes PREFIX_{train,valid,test}_text_document.{bin,idx}",
    )
    out.add_argument(
        "--output-dir",
        help="with --domain/--builtin-domains: tokenizer.model, datasets, manifest.json",
    )
    tk = parser.add_argument_group("tokenizer")
    tk.add_argument(
        "--tokenizer",
        metavar="MODEL|HF_DIR",
        help="an existing SentencePiece .model, or an HF seed's folder with tokenizer.json "
        "(BOS/EOS from its config.json, else generation_config.json, else tokenizer_config.json)",
    )
    tk.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="with --input: train one on the inputs, saved as PREFIX_tokenizer.model",
    )
    tk.add_argument(
        "--vocab-size", type=int, default=8000, help="vocabulary size when training (default 8000)"
    )
    parser.add_argument(
        "--split",
        default="test=0.02,valid=0.02",
        help="document fractions by key hash (default test=0.02,valid=0.02)",
    )
    parser.add_argument(
        "--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="tokenizer threads"
    )
    parser.add_argument(
        "--txt-separator",
        default=None,
        metavar="STR",
        help="a line equal to STR separates documents inside text files (default: one document per file)",
    )
    parser.add_argument(
        "--mixed-tokens",
        type=int,
        default=0,
        help="with --output-dir: also write about this many tokens of held-out mixed documents "
        "(paragraphs from different domains' test documents; 0 = none)",
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=4.0,
        help="with --builtin-domains: MB kept per domain (0 = all)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="with --builtin-domains: download cache (default $BTX_DATA_CACHE, else the user cache: $BTX_CACHE or $XDG_CACHE_HOME/megatron_btx)",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo work even if outputs are up to date"
    )
    return parser


def _parse_domain_args(items: Sequence[str]) -> dict[str, list[str]]:
    domains: dict[str, list[str]] = {}
    for item in items:
        name, sep, paths = item.partition("=")
        if not sep or not name or not paths:
            raise BTXError(
                f"--domain {item!r}: write NAME=PATH[,PATH...], e.g. --domain code=data/code.jsonl"
            )
        domains.setdefault(name, []).extend(p for p in paths.split(",") if p)
    return domains


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute parsed arguments; raises BTXError on user errors (``main`` prints them)."""
    modes = [m for m in ("input", "domain", "builtin_domains") if getattr(args, m)]
    if len(modes) != 1:
        raise BTXError("give exactly one of --input, --domain or --builtin-domains (see --help)")
    if args.workers < 1:
        raise BTXError(f"--workers {args.workers}: must be at least 1")
    if modes[0] == "input":
        if not args.output_prefix:
            raise BTXError(
                "--input needs --output-prefix PREFIX (outputs are PREFIX_{train,valid,test}_text_document)"
            )
        if bool(args.tokenizer) == bool(args.train_tokenizer):
            raise BTXError(
                "--input needs exactly one of --tokenizer MODEL or --train-tokenizer --vocab-size N"
            )
        tokenizer: Tokenizer | str = args.tokenizer
        if args.train_tokenizer:
            fractions = parse_split(args.split)
            sentences = sample_domain_sentences(
                {"input": args.input}, fractions, 300_000, args.txt_separator, 200.0
            )
            tokenizer = train_sentencepiece(
                sentences, f"{args.output_prefix}_tokenizer", args.vocab_size
            )
        return preprocess_files(
            args.input, args.output_prefix, tokenizer, args.split, args.workers, args.txt_separator
        )
    if not args.output_dir:
        raise BTXError(f"--{modes[0].replace('_', '-')} needs --output-dir DIR")
    if modes[0] == "domain":
        domains: dict[str, list[Any]] = _parse_domain_args(args.domain)
        builtin = [name for name, paths in domains.items() if paths == ["builtin"]]
        if builtin:
            from megatron_btx.data.corpora import fetch_corpora, parse_domains

            fetched = fetch_corpora(
                parse_domains(builtin), None, args.max_mb, args.cache_dir, args.split, args.force
            )
            domains.update({name: [path] for name, path in fetched.items()})
    else:
        from megatron_btx.data.corpora import fetch_corpora, parse_domains

        paths = fetch_corpora(
            parse_domains(args.builtin_domains),
            None,
            args.max_mb,
            args.cache_dir,
            args.split,
            args.force,
        )
        domains = {name: [path] for name, path in paths.items()}
    return prepare_domains(
        domains,
        args.output_dir,
        args.vocab_size,
        tokenizer=args.tokenizer,
        split=args.split,
        workers=args.workers,
        txt_separator=args.txt_separator,
        force=args.force,
        mixed_tokens=args.mixed_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``btx prepare-data`` and ``tools/preprocess_data.py``; returns the exit code.

    User errors (BTXError, a full disk) are printed as one ``error:`` line and give exit code 2;
    the output is locked while it is written.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command(_run_locked, args)


def _run_locked(args: argparse.Namespace) -> int:
    with output_lock(args.output_dir, args.output_prefix):  # one writer per output
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
