#!/usr/bin/env python
"""Command-line entry: see megatron_btx.checkpoint.convert.hf_to_megatron."""

import sys

from megatron_btx.convert.cli import hf_to_megatron_main

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
