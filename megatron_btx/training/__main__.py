"""``python -m megatron_btx.training CONFIG [...]``: the same as ``btx train`` (torchrun-friendly)."""

import sys

from megatron_btx import lazy_compile

if __name__ == "__main__":
    lazy_compile.install()  # megatron-core's import-time torch.compile calls, deferred
    from megatron_btx.training.cli import main

    sys.exit(main())
