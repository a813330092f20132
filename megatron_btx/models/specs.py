"""Layer-spec choice: Transformer Engine on a GPU when TE imports, megatron-core's local otherwise.

Chosen once per process and logged, so a run's log says which implementation it used.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from typing import Any

import torch

from megatron_btx.errors import BTXError

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


def grouped_mm_fast_path(device: torch.device, dtype: torch.dtype) -> bool:
    """True where `torch._grouped_mm` runs its fused kernel rather than a per-group loop:
    CUDA devices of compute capability 9.x or 10.x with bf16 operands (torch's own dispatch
    rule in `_grouped_mm_cuda`). Elsewhere torch falls back to one `mm` per group. Here, not in
    models/grouped_experts.py, so that choosing the experts module does not import that module
    (its torch.compiler.disable decorators import torch._dynamo: 0.45 s per process)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major in (9, 10)


def experts_module(config, te: bool, requested: str = "auto") -> str:
    """Which module computes the MoE experts: `te_grouped` (TE's TEGroupedMLP), `grouped`
    (ours, torch's grouped matmul), `sequential` (megatron-core's per-expert loop).

    `auto` picks a grouped GEMM where it is faster: with TE, always (TE's grouped GEMM); without
    TE, on a GPU run in bf16 where torch's grouped matmul has its fused kernel (elsewhere torch
    loops over the experts itself, so it would be the sequential loop under another name)."""
    from megatron_btx.models.speedups import MOE_EXPERTS

    if requested not in MOE_EXPERTS:
        raise BTXError(f"model.moe_experts={requested!r} must be one of {', '.join(MOE_EXPERTS)}")
    if requested == "sequential":
        return "sequential"
    if te:
        return "te_grouped"
    if requested == "grouped":
        return "grouped"
    on_gpu = fused_kernels_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return "grouped" if grouped_mm_fast_path(device, config.params_dtype) else "sequential"


def layer_spec(config, requested: str | None = None, speed=None):
    """The megatron-core ModuleSpec for one transformer layer of this config; `speed` (a
    models.speedups.SpeedOptions) chooses the experts module and the kernels."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megatron_btx.models import speedups

    speed = speed or speedups.SpeedOptions()
    num_experts = config.num_moe_experts
    te = chosen_spec(requested) == "te"
    experts = experts_module(config, te, speed.moe_experts) if num_experts else None
    if experts:
        speedups.log_once("MoE experts module: %s", experts)
    if speedups.resolve_kernels(speed.kernels, fused_kernels_available()) == "liger":
        speedups.apply_liger()
    if te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=experts == "te_grouped",
            qk_layernorm=config.qk_layernorm,
        )
    else:
        spec = specs.get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=False,
            normalization="RMSNorm",
            qk_layernorm=config.qk_layernorm,
        )
        if config.attention_dropout == 0 and config.context_parallel_size == 1:
            from megatron_btx.models.attention import TorchSDPAttention

            spec.submodules.self_attention.submodules.core_attention = TorchSDPAttention
        if experts == "grouped":
            from megatron_btx.models.grouped_experts import GroupedExperts

            with_experts_module(spec, GroupedExperts)
    return with_attention_experts(spec, config, te)


def decoder_spec(config, requested: str | None = None, speed=None):
    """The spec GPTModel is built from: one layer spec for every layer, or, when
    ``config.moe_layer_freq`` is a per-layer list (MoE in some layers), megatron-core's decoder
    block spec with a dense or an MoE layer spec per layer (the same attention and experts
    modules as :func:`layer_spec` chooses)."""
    if not isinstance(config.moe_layer_freq, list):
        return layer_spec(config, requested, speed)
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from megatron_btx.models import speedups

    speed = speed or speedups.SpeedOptions()
    te = chosen_spec(requested) == "te"
    block = specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=te, normalization="RMSNorm"
    )
    if te:
        for spec in block.layer_specs:
            with_attention_experts(spec, config, te)
        return block
    experts = experts_module(config, te, speed.moe_experts) if config.num_moe_experts else None
    for spec in block.layer_specs:
        if config.attention_dropout == 0 and config.context_parallel_size == 1:
            from megatron_btx.models.attention import TorchSDPAttention

            spec.submodules.self_attention.submodules.core_attention = TorchSDPAttention
        if experts == "grouped":
            from megatron_btx.models.grouped_experts import GroupedExperts

            with_experts_module(spec, GroupedExperts)  # the MoE layers; dense ones unchanged
        with_attention_experts(spec, config, te)
    return block


def _builder_parts(builder) -> tuple[Any, Any]:
    """(module class, submodules) of a megatron-core layer builder: a ``ModuleSpec``
    (megatron-core <= 0.16) or a ``functools.partial`` of the class with a ``submodules``
    keyword (0.17 and later hold builders where 0.16 held specs)."""
    if isinstance(builder, functools.partial):
        return builder.func, builder.keywords.get("submodules")
    return getattr(builder, "module", None), getattr(builder, "submodules", None)


def _with_module(builder, module: type):
    """`builder` building `module` instead of its class (same arguments and submodules)."""
    if isinstance(builder, functools.partial):
        return functools.partial(module, *builder.args, **builder.keywords)
    return dataclasses.replace(builder, module=module)


def with_experts_module(spec, module: type) -> bool:
    """Make the MoE layer of the layer spec `spec` build its experts with `module` (a subclass
    of the experts class megatron-core's spec names: same constructor, same submodules), in
    place. Returns False, changing nothing, when the layer's MLP has no experts (a dense layer).

    The MLP entry is a ``ModuleSpec`` whose ``submodules.experts`` is a ``ModuleSpec`` in
    megatron-core 0.16, and a ``partial(MoELayer, submodules=MoESubmodules(experts=partial(
    SequentialMLP, submodules=...)))`` from 0.17; both are rebuilt rather than mutated, so a
    spec shared with other code is not changed under it."""
    mlp = spec.submodules.mlp
    _, moe = _builder_parts(mlp)
    experts = getattr(moe, "experts", None)
    if experts is None:
        return False
    current, _ = _builder_parts(experts)
    if not (isinstance(current, type) and issubclass(module, current)):
        raise BTXError(
            f"cannot build the MoE experts with {module.__name__}: megatron-core's layer spec "
            f"builds them with {current!r}, which it does not extend; set model.moe_experts: "
            "sequential"
        )
    moe = dataclasses.replace(moe, experts=_with_module(experts, module))
    if isinstance(mlp, functools.partial):
        spec.submodules.mlp = functools.partial(
            mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe}
        )
    else:
        spec.submodules.mlp = dataclasses.replace(mlp, submodules=moe)
    return True


def with_attention_experts(spec, config, te: bool):
    """A layer spec whose attention becomes a mixture of attention experts when the config has
    them (models.attention_experts; `spec` itself otherwise). The experts are megatron-core's
    local attention modules in both specs: with Transformer Engine the layer's input norm,
    fused into TE's QKV projection, becomes the local spec's norm module, saved under the same
    checkpoint key."""
    if not getattr(config, "attention_experts", 0):
        return spec
    from megatron_btx.models.attention_experts import MixtureOfAttention, mixture_spec

    sub = spec.submodules
    attention = sub.self_attention
    if attention.module is MixtureOfAttention:
        return spec  # layer specs may be shared between layers
    if te:
        from megatron.core.models.gpt import gpt_layer_specs as specs

        local = specs.get_gpt_layer_local_spec(
            normalization="RMSNorm", qk_layernorm=config.qk_layernorm
        )
        attention = local.submodules.self_attention
        sub.input_layernorm = local.submodules.input_layernorm
        sub.sharded_state_dict_keys_map = {
            **sub.sharded_state_dict_keys_map,
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        }
    if config.attention_dropout == 0 and config.context_parallel_size == 1:
        from megatron_btx.models.attention import TorchSDPAttention

        if hasattr(attention.submodules, "core_attention"):
            attention.submodules.core_attention = TorchSDPAttention
    sub.self_attention = mixture_spec(attention, config)
    return spec
