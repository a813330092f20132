#!/usr/bin/env python
"""Command-line entry for the BTX merge (also `btx merge`): see megatron_btx.merge."""

import sys


def _main() -> int:
    from megatron_btx import lazy_compile

    lazy_compile.install()  # as `btx` does first: megatron-core's import-time compiles deferred
    from megatron_btx.merge.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())
