"""Fixes for megatron-core bugs that hit every device, applied by runtime.init on CPU and GPU.

(CPU-only adjustments live in cpu.py.) Each fix checks that it is still needed, so a
megatron-core release that fixes the bug makes it a no-op; :func:`router_gemm_stale` says so in
words, for the report of adjustments that no longer apply (cpu.py).
"""

from __future__ import annotations

#: Set on moe_utils when *we* defined te_general_gemm, so a later check can tell our fix from
#: megatron-core's own (0.17 and later define it as None without Transformer Engine).
_MARK = "__btx_defined_te_general_gemm__"


def router_gemm_stale() -> str | None:
    """Why the router fix no longer applies to the installed megatron-core, or None if it does."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, _MARK, False):
        return None  # defined by router_gemm_without_te in this process
    if hasattr(moe_utils, "te_general_gemm"):
        return (
            "megatron.core.transformer.moe.moe_utils defines te_general_gemm without Transformer "
            "Engine itself (fixed upstream)"
        )
    return None


def router_gemm_without_te() -> bool:
    """megatron-core 0.16's router refers to `te_general_gemm`, which is only defined when
    Transformer Engine imports: without TE every MoE forward dies with a NameError (seen on CPU
    and on an H100 alike). Define it as None, which selects the plain torch path."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    setattr(moe_utils, _MARK, True)
    return True


def apply() -> list[str]:
    return [name for name, fix in (("router_gemm_without_te", router_gemm_without_te),) if fix()]
