#!/usr/bin/env python
"""Command-line entry: see megatron_btx.checkpoint.convert.megatron_to_hf."""

import sys

from megatron_btx.convert.cli import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
