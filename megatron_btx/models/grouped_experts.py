"""All local experts' SwiGLU FFNs in two grouped matmuls, for megatron-core's local spec.

Without Transformer Engine (or the grouped_gemm package) megatron-core runs the experts of an MoE
layer one after the other (`SequentialMLP`): for E local experts, 2E small GEMMs per forward
and a host sync for the token counts. On an H100 that made our MoE finetune 0.67x the speed of
`transformers`' Mixtral (issue 15). `torch._grouped_mm` computes a list of GEMMs that share
their shapes but not their row counts in one kernel (CUTLASS on Hopper, bf16), with the
row counts given as device-side offsets, so no host sync is needed.

`GroupedExperts` *is* a `SequentialMLP`: the same `local_experts.{e}.linear_fc1/linear_fc2`
parameters, attributes and sharded state dict (keys, global shapes and EP / expert-TP offsets
are megatron-core's own code), so checkpoints and optimizer states load interchangeably in
both directions. Only `forward` differs: it stacks the experts' weights (a copy of a few
percent of the expert GEMMs' time) and calls the grouped matmul; where the kernel is missing
or cannot take the inputs, it runs SequentialMLP's own per-expert loop and says so in the log.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

log = logging.getLogger(__name__)

#: The kernel that computes the grouped FFNs: torch's grouped matmul, or SequentialMLP's loop.
GROUPED_MM = "grouped_mm"
LOOP = "loop"


@functools.cache
def grouped_mm_unavailable(device_type: str, dtype: torch.dtype) -> str | None:
    """Why `torch._grouped_mm` cannot run a 2D x 3D product with offsets on this device type
    and dtype, or None when it can. Decided by running it once on a tiny problem, because its
    availability depends on the torch build (CPU support came with a fallback kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        rows = torch.arange(16 * 8, dtype=torch.float32, device=device_type).reshape(16, 8)
        weights = torch.ones(2, 8, 8, dtype=dtype, device=device_type)
        offsets = torch.tensor([8, 16], dtype=torch.int32, device=device_type)
        out = torch._grouped_mm(rows.to(dtype), weights, offs=offsets)
        expected = rows.sum(dim=1, keepdim=True).expand(16, 8)
        if not torch.allclose(out.float(), expected, rtol=1e-2):
            return f"torch._grouped_mm gave wrong results on {device_type}/{dtype}"
    except Exception as e:  # an unsupported device/dtype raises; fall back and say why
        return f"torch._grouped_mm fails on {device_type}/{dtype}: {str(e).splitlines()[0]}"
    return None


class GroupedExperts(SequentialMLP):
    """SequentialMLP's parameters and checkpoint layout, with one grouped matmul per linear.

    `kernel` (class or instance attribute) may force `grouped_mm` or `loop`; by default
    (None) the first forward decides from the inputs' device, dtype and shapes.
    """

    kernel: str | None = None

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # kwargs: what newer megatron-core releases pass SequentialMLP besides (0.17+: `name`)
        super().__init__(
            num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs
        )
        self._unsupported = self._unsupported_config()
        self._logged: set[str] = set()
        self.last_kernel: str | None = None  # what the latest forward used (tests, benchmarks)

    def _unsupported_config(self) -> str | None:
        """What in the config the grouped path does not implement (None: nothing)."""
        cfg = self.config
        checks = (
            (not cfg.gated_linear_unit or cfg.activation_func is not F.silu, "not SwiGLU"),
            (cfg.add_bias_linear, "linear biases"),
            (cfg.fp8 or cfg.fp4, "fp8/fp4"),
            (cfg.use_te_activation_func, "TE activation"),
            (cfg.moe_apply_probs_on_input, "moe_apply_probs_on_input"),
            (cfg.activation_func_clamp_value is not None, "activation clamp"),
            (cfg.glu_linear_offset != 0.0, "glu_linear_offset"),
            (cfg.gradient_accumulation_fusion, "gradient_accumulation_fusion"),
            (self.num_local_experts < 2, "one local expert (already a single GEMM)"),
        )
        reasons = [why for failed, why in checks if failed]
        return ", ".join(reasons) or None

    @torch.compiler.disable  # probes and logs: plain Python, not part of a compiled graph
    def _choose(self, hidden: torch.Tensor) -> tuple[str, str]:
        """(kernel, reason) for these inputs; logged the first time each kernel is chosen."""
        kernel, why = self._decide(hidden)
        if kernel not in self._logged:
            self._logged.add(kernel)
            log.info("MoE experts: %s (%s)", kernel, why)
        self.last_kernel = kernel
        return kernel, why

    def _decide(self, hidden: torch.Tensor) -> tuple[str, str]:
        if self.kernel is not None:
            return self.kernel, "forced"
        if self._unsupported:
            return LOOP, self._unsupported
        problem = grouped_mm_unavailable(hidden.device.type, hidden.dtype)
        if problem:
            return LOOP, problem
        weight_rows = self.local_experts[0].linear_fc2.weight.shape[1]  # ffn / expert-TP
        if any((n * hidden.element_size()) % 16 for n in (hidden.shape[1], weight_rows)):
            return LOOP, f"hidden {hidden.shape[1]} / ffn {weight_rows} rows not 16-byte aligned"
        return GROUPED_MM, f"{hidden.device.type} {hidden.dtype}"

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
    ):
        """Same contract as SequentialMLP.forward: tokens sorted by local expert, their counts,
        and their routing probabilities; returns (output, None)."""
        hidden = permuted_local_hidden_states
        kernel, _ = self._choose(hidden)
        if kernel == LOOP or hidden.shape[0] == 0:
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        # torch.compile's shape rules for _grouped_mm accept bf16 only: other dtypes run eagerly
        ffn = self._grouped_ffn if hidden.dtype == torch.bfloat16 else self._grouped_ffn_eager
        return ffn(hidden, tokens_per_expert, permuted_probs), None

    def _grouped_ffn(
        self, hidden: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> torch.Tensor:
        counts = torch.as_tensor(tokens_per_expert).to(hidden.device, non_blocking=True)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, 2f, h]
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, h, f]
        gate_up = torch._grouped_mm(hidden, fc1.transpose(1, 2), offs=offsets)
        intermediate = self._swiglu_times_probs(gate_up, probs)
        return torch._grouped_mm(intermediate, fc2.transpose(1, 2), offs=offsets)

    _grouped_ffn_eager = torch.compiler.disable(_grouped_ffn)

    def _swiglu_times_probs(self, gate_up: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron-core MLP's activation with a per-token scale, in the same order of
        operations (so fp32 results match SequentialMLP's to the last bits)."""
        cfg = self.config
        if cfg.bias_activation_fusion:
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            return weighted_bias_swiglu_impl(
                gate_up, None, probs.unsqueeze(-1), cfg.activation_func_fp8_input_store
            )
        gate, up = torch.chunk(gate_up, 2, dim=-1)
        intermediate = cfg.activation_func(gate) * up
        return (intermediate * probs.unsqueeze(-1)).to(intermediate.dtype)
