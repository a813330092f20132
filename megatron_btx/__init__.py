"""megatron_btx: Branch-Train-MiX on megatron-core."""

__version__ = "0.1.0"

from megatron_btx import lazy_compile as _lazy_compile

_lazy_compile.install()  # megatron-core's import-time torch.compile calls, deferred to first use
