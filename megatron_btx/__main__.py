"""`python -m megatron_btx` is the `btx` command."""

import sys

from megatron_btx.cli import main

sys.exit(main())
