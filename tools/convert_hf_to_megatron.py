#!/usr/bin/env python
"""Command-line entry: see megatron_btx.checkpoint.convert.hf_to_megatron."""

import sys


def _main() -> int:
    from megatron_btx import lazy_compile

    lazy_compile.install()  # as `btx` does first: megatron-core's import-time compiles deferred
    from megatron_btx.convert.cli import hf_to_megatron_main

    return hf_to_megatron_main()


if __name__ == "__main__":
    sys.exit(_main())
