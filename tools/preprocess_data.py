#!/usr/bin/env python3
"""Command-line wrapper for megatron_btx.data.cli.main (`btx prepare-data`, see --help).

Kept as a script so it runs from a checkout without installing the package.
"""

import os
import sys


def _main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_btx.data.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_main())
