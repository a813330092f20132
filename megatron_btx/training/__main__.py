"""``python -m megatron_btx.training CONFIG [...]``: the same as ``btx train`` (torchrun-friendly)."""

import sys

from megatron_btx.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
