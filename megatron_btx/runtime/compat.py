"""Fixes for megatron-core bugs that hit every device, applied by runtime.init on CPU and GPU.

(CPU-only adjustments live in cpu.py.) Each fix checks that it is still needed, so a
megatron-core release that fixes the bug makes it a no-op.
"""

from __future__ import annotations


def router_gemm_without_te() -> bool:
    """megatron-core 0.16's router refers to `te_general_gemm`, which is only defined when
    Transformer Engine imports: without TE every MoE forward dies with a NameError (seen on CPU
    and on an H100 alike). Define it as None, which selects the plain torch path."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def apply() -> list[str]:
    return [name for name, fix in (("router_gemm_without_te", router_gemm_without_te),) if fix()]
