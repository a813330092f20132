"""`btx merge` (also tools/convert_dense_to_moe.py): the Branch-Train-MiX merge from the command
line. The parser is generated from :class:`MergeSettings` (one argument per field); the parsed
flags become one MergeSettings, which :func:`merge` runs."""

from __future__ import annotations

import argparse
import logging

from megatron_btx.errors import run_command
from megatron_btx.merge import merge
from megatron_btx.merge.settings import MergeSettings, build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(_merge, ns)


def _merge(ns: argparse.Namespace) -> int:
    settings = MergeSettings.from_args(ns)
    written = merge(settings)
    record = written["merge"]
    print(
        f"wrote {settings.save}: {record['num_experts']} experts (top-{record['top_k']}), "
        f"router {settings.router_init}" + (", verified" if settings.verify else "")
    )
    return 0
