"""Optional speed-ups of the model, each behind one config key, all in one settings object.

- `moe_experts` (`model.moe_experts`): which module computes the experts of an MoE layer:
  `sequential` (megatron-core's per-expert loop), `grouped` (torch's grouped matmul,
  `grouped_experts.py`; Transformer Engine's grouped GEMM with the TE spec) or `auto` (grouped
  where it helps: TE present, or a CUDA run in bf16 on a GPU where torch's grouped matmul has
  its fused kernel). Chosen in `specs.layer_spec`.
- `local_dispatch` (`moe.local_dispatch`): with every expert on this rank (EP = 1, TP = 1),
  route tokens with `local_dispatch.LocalTokenDispatcher` instead of the all-to-all machinery.
- `kernels` (`model.kernels`): `torch` (megatron-core's own kernels) or `liger` (liger-kernel's
  Triton RMSNorm, SwiGLU and cross-entropy, through its megatron-core adapter; a GPU run with
  `pip install megatron-btx[liger]`), or `auto` (liger where it imports on a GPU run).
- `compile` (`model.compile`): `torch.compile` each transformer layer after the build.

The module decisions are logged once per process, so a run's log says what it used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from megatron_btx.errors import BTXError

if TYPE_CHECKING:  # torch is not imported here: config validation imports this module
    import torch

log = logging.getLogger(__name__)

MOE_EXPERTS = ("auto", "sequential", "grouped")
KERNELS = ("torch", "liger", "auto")


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    moe_experts: str = "auto"
    local_dispatch: bool = False
    kernels: str = "torch"
    compile: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> SpeedOptions:
        """From a megatron_btx.config.Config (model.moe_experts, model.kernels,
        model.compile, moe.local_dispatch)."""
        return cls(
            moe_experts=cfg.model.moe_experts,
            local_dispatch=cfg.moe.local_dispatch,
            kernels=cfg.model.kernels,
            compile=cfg.model.compile,
        )


_LOGGED: set[str] = set()


def log_once(message: str, *args: Any) -> None:
    text = message % args
    if text not in _LOGGED:
        _LOGGED.add(text)
        log.info(text)


# ---- fused kernels (liger-kernel) --------------------------------------------------------------
def liger_unavailable(on_gpu: bool) -> str | None:
    """Why liger-kernel's megatron-core adapter cannot be used in this run (None: it can)."""
    if not on_gpu:
        return "its kernels are Triton GPU kernels and this run is on the CPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'megatron-btx[liger]')"
    try:
        from liger_kernel.megatron import apply_liger_kernel_to_megatron  # noqa: F401
    except Exception as e:  # old versions lack the adapter; a broken install must not crash
        return f"liger_kernel.megatron does not import ({str(e).splitlines()[0]}); need >= 0.8.5"
    return None


def resolve_kernels(requested: str, on_gpu: bool) -> str:
    """`torch` or `liger` for this run; asking for liger where it cannot run is an error."""
    if requested not in KERNELS:
        raise BTXError(f"model.kernels={requested!r} must be one of {', '.join(KERNELS)}")
    if requested == "torch":
        return "torch"
    problem = liger_unavailable(on_gpu)
    if problem and requested == "liger":
        raise BTXError(f"model.kernels=liger: {problem}; set model.kernels: torch (or auto)")
    if problem:
        log_once("fused kernels: torch (liger-kernel not used: %s)", problem)
        return "torch"
    log_once("fused kernels: liger-kernel RMSNorm, SwiGLU and cross-entropy")
    return "liger"


def apply_liger() -> None:
    """Patch megatron-core (process-wide, idempotent) so models built from now on use
    liger-kernel's RMSNorm (local spec), SwiGLU (dense MLP with bias_activation_fusion) and
    vocab-parallel cross-entropy. Must run before the model is built."""
    from liger_kernel.megatron import apply_liger_kernel_to_megatron

    apply_liger_kernel_to_megatron(rms_norm=True, cross_entropy=True, swiglu=True)


# ---- after the build ----------------------------------------------------------------------------
def after_build(model: torch.nn.Module, speed: SpeedOptions | None) -> None:
    """The speed-ups applied to a built model (before DDP): the local MoE dispatcher."""
    if speed is not None and speed.local_dispatch:
        from megatron_btx.models.local_dispatch import install_local_dispatch

        log_once("MoE dispatcher: local on %d layer(s)", install_local_dispatch(model))


# ---- torch.compile ----------------------------------------------------------------------------
#: The dispatcher steps megatron-core's MoE layer calls; its all-to-all and all-gather
#: dispatchers use CUDA side streams and host copies there, which dynamo cannot trace.
DISPATCH_STEPS = (
    "dispatch_preprocess",
    "token_dispatch",
    "dispatch_postprocess",
    "combine_preprocess",
    "token_combine",
    "combine_postprocess",
)


def compile_layers(chunks: list[torch.nn.Module]) -> int:
    """`torch.compile` every TransformerLayer in place (`nn.Module.compile`: parameter names,
    state dicts and checkpoints are unchanged). Returns how many layers were compiled.

    In MoE layers, megatron-core's communicating dispatchers run eagerly (a graph break at each
    step); the attention, norms, router and experts are compiled. The local dispatcher
    (`moe.local_dispatch`) has nothing dynamo cannot trace and is compiled with the layer."""
    import torch
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_btx.models.local_dispatch import LocalTokenDispatcher

    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer) and not isinstance(
                module.token_dispatcher, LocalTokenDispatcher
            ):
                dispatcher = module.token_dispatcher
                for step in DISPATCH_STEPS:
                    setattr(dispatcher, step, torch.compiler.disable(getattr(dispatcher, step)))
            if isinstance(module, TransformerLayer):
                module.compile()
                count += 1
    log_once("torch.compile: %d transformer layer(s)", count)
    return count
