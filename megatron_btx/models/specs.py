"""Layer-spec choice: Transformer Engine on a GPU when TE imports, megatron-core's local otherwise.

Chosen once per process and logged, so a run's log says which implementation it used.
"""

from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)


def te_available() -> bool:
    """True when a GPU is present and used, and Transformer Engine imports."""
    if not fused_kernels_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # a broken TE install must not stop a run: fall back, and say so
        log.warning("Transformer Engine is installed but does not import (%s); using local", e)
        return False
    return True


def fused_kernels_available() -> bool:
    """Fused softmax/bias kernels need a GPU, and the run must be using it (a CPU run on a GPU
    machine must not pick them)."""
    from megatron_btx import runtime

    return runtime.on_gpu()


_LOGGED: set[str] = set()


def chosen_spec(requested: str | None = None) -> str:
    """`te` or `local`; `requested` forces one (asking for te without TE is an error)."""
    from megatron_btx.errors import BTXError

    te = te_available()
    if requested == "te" and not te:
        raise BTXError("spec 'te' requested but Transformer Engine or a GPU is missing")
    spec = requested or ("te" if te else "local")
    if spec not in _LOGGED:
        _LOGGED.add(spec)
        log.info(
            "layer spec: %s (Transformer Engine %s)", spec, "available" if te else "not available"
        )
    return spec


def layer_spec(config, requested: str | None = None):
    """The megatron-core ModuleSpec for one transformer layer of this config."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = config.num_moe_experts
    if chosen_spec(requested) == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm
        )
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    if config.attention_dropout == 0 and config.context_parallel_size == 1:
        from megatron_btx.models.attention import TorchSDPAttention

        spec.submodules.self_attention.submodules.core_attention = TorchSDPAttention
    return spec


def decoder_spec(config, requested: str | None = None):
    """The spec GPTModel is built from: one layer spec for every layer, or, when
    ``config.moe_layer_freq`` is a per-layer list (MoE in some layers), megatron-core's decoder
    block spec with a dense or an MoE layer spec per layer."""
    if not isinstance(config.moe_layer_freq, list):
        return layer_spec(config, requested)
    from megatron.core.models.gpt import gpt_layer_specs as specs

    te = chosen_spec(requested) == "te"
    block = specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=te, normalization="RMSNorm"
    )
    if not te and config.attention_dropout == 0 and config.context_parallel_size == 1:
        from megatron_btx.models.attention import TorchSDPAttention

        for spec in block.layer_specs:
            spec.submodules.self_attention.submodules.core_attention = TorchSDPAttention
    return block
