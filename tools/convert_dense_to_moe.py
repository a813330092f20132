#!/usr/bin/env python
"""Command-line entry for the BTX merge (also `btx merge`): see megatron_btx.merge."""

import sys

from megatron_btx.merge.cli import main

if __name__ == "__main__":
    sys.exit(main())
