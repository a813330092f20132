#!/usr/bin/env python
"""Command-line entry: see megatron_btx.checkpoint.convert.megatron_to_hf."""

import sys


def _main() -> int:
    from megatron_btx import lazy_compile

    lazy_compile.install()  # as `btx` does first: megatron-core's import-time compiles deferred
    from megatron_btx.convert.cli import megatron_to_hf_main

    return megatron_to_hf_main()


if __name__ == "__main__":
    sys.exit(_main())
