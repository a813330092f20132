"""What the HF MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) share: their tensors in both
expert layouts, and their attention read as the dense family's.

An MoE layer is a router, E experts and (Qwen2-MoE) a shared expert; a merge variant's dense
layers (Qwen's ``mlp_only_layers``) keep a dense FFN under Llama's names. Expert layouts:

- per expert (what transformers 5.24's ``save_pretrained`` writes and 4.x reads):
  ``experts.{e}.gate_proj / up_proj / down_proj`` (Mixtral: ``block_sparse_moe.experts.{e}.w1 /
  w3 / w2``);
- fused (transformers 5's modules, written as is by tools that save the state dict):
  ``mlp.experts.gate_up_proj`` [E, 2 * I, H], whose expert e is megatron's fc1 [gate; up] as is,
  and ``mlp.experts.down_proj`` [E, H, I]; Mixtral's router is then ``mlp.gate``.

Both are read; the per-expert layout is written, which transformers 5.24 converts on load and
every older reader understands.

Qwen2-MoE's shared expert is gated: its output is sigmoid(w_g . x) * shared(x). A merge's shared
expert is ungated (megatron-core's sum of the routed experts and the shared one), so it is written
with w_g = 0 (sigmoid 0 = 1/2, exactly) and its down projection doubled: 1/2 * (2 W) h = W h
exactly, since doubling a float only moves its exponent (no mantissa bit changes, in fp32, bf16
and fp16 alike, short of overflow, which is refused). An imported Qwen2-MoE keeps its gate
(megatron-core's ``moe_shared_expert_gate``), so nothing is scaled and the round trip is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from megatron_btx.checkpoint.families.base import Family, get
from megatron_btx.checkpoint.families.llama import LlamaAdapter
from megatron_btx.checkpoint.mapping import (
    ROUTER,
    SHARED_FC1,
    SHARED_FC2,
    SHARED_GATE,
    expert_fc1,
    expert_fc2,
    split_fc1,
)
from megatron_btx.errors import BTXError

#: roles of one expert's tensors, in export order
_EXPERT_ROLES = ("gate", "up", "down")


def is_fused_layout(keys: Iterable[str]) -> bool:
    """True when an HF checkpoint stores its experts as transformers 5's fused 3-D tensors."""
    return any(key.endswith(".experts.gate_up_proj") for key in keys)


def double_exactly(fc2: torch.Tensor, what: str) -> torch.Tensor:
    """2 * fc2, refusing an overflow (the only way doubling a float is not exact)."""
    doubled = fc2 * 2
    if not torch.isfinite(doubled).all() and torch.isfinite(fc2).all():
        raise BTXError(
            f"{what}: doubling the shared expert's down projection overflows {fc2.dtype}; export "
            f"in a wider dtype (--dtype fp32 or bf16)"
        )
    return doubled


class MoEAdapter(LlamaAdapter):
    """Common to the MoE families: per layer, a dense FFN (a variant's dense layers) or a router,
    E experts (per-expert or fused names) and an optional shared expert."""

    #: names under the layer prefix: the router, the per-expert prefix and each expert's
    #: gate / up / down names
    ROUTER_NAME = "mlp.gate.weight"
    EXPERT_PREFIX = "mlp.experts."
    EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
    #: the fused layout's router and 3-D tensors' prefix
    FUSED_ROUTER_NAME = "mlp.gate.weight"
    FUSED_PREFIX = "mlp.experts."
    #: the family has a (gated) shared expert slot in every MoE layer
    HAS_SHARED_EXPERT = False

    def __init__(self, args, variant=None, routing=None, hf_qkv_bias=None, fused: bool = False):
        super().__init__(args, variant, routing, hf_qkv_bias)
        self.fused = fused
        if self.variant.shared_expert_intermediate_size and not self.HAS_SHARED_EXPERT:
            raise BTXError(f"HF {self.family} has no shared expert; this model has one")

    # ---- names and shapes ---------------------------------------------------------------
    def ffn_names(self, prefix: str, layer: int) -> dict[str, str]:
        if not self.variant.is_moe_layer(layer):
            return super().ffn_names(prefix, layer)
        if self.fused:
            names = {
                "router": prefix + self.FUSED_ROUTER_NAME,
                "experts.gate_up": prefix + self.FUSED_PREFIX + "gate_up_proj",
                "experts.down": prefix + self.FUSED_PREFIX + "down_proj",
            }
        else:
            names = {"router": prefix + self.ROUTER_NAME}
            for expert in range(self.args.num_local_experts):
                for role, name in zip(_EXPERT_ROLES, self.EXPERT_NAMES):
                    names[f"e{expert}.{role}"] = (
                        f"{prefix}{self.EXPERT_PREFIX}{expert}.{name}.weight"
                    )
        if self.HAS_SHARED_EXPERT:
            for role in _EXPERT_ROLES:
                names[f"shared.{role}"] = prefix + f"mlp.shared_expert.{role}_proj.weight"
            names["shared.gate_weight"] = prefix + "mlp.shared_expert_gate.weight"
        return names

    def ffn_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        args = self.args
        hidden, ffn, experts = args.hidden_size, args.intermediate_size, args.num_local_experts
        if not self.variant.is_moe_layer(layer):
            dense = self.variant.dense_ffn_hidden_size
            return {"gate": (dense, hidden), "up": (dense, hidden), "down": (hidden, dense)}
        shapes: dict[str, tuple[int, ...]] = {
            "router": (experts, hidden),
            "experts.gate_up": (experts, 2 * ffn, hidden),
            "experts.down": (experts, hidden, ffn),
        }
        for expert in range(experts):
            shapes[f"e{expert}.gate"] = shapes[f"e{expert}.up"] = (ffn, hidden)
            shapes[f"e{expert}.down"] = (hidden, ffn)
        shared = self.variant.shared_expert_intermediate_size or 0
        shapes.update(
            {
                "shared.gate": (shared, hidden),
                "shared.up": (shared, hidden),
                "shared.down": (hidden, shared),
                "shared.gate_weight": (1, hidden),
            }
        )
        return shapes

    # ---- layouts ------------------------------------------------------------------------
    def ffn_from_hf(self, layer: int, names: dict[str, str], get) -> dict[str, torch.Tensor]:
        if not self.variant.is_moe_layer(layer):
            return super().ffn_from_hf(layer, names, get)
        tensors = {ROUTER: get(names["router"])}
        experts = self.args.num_local_experts
        if self.fused:
            gate_up, down = get(names["experts.gate_up"]), get(names["experts.down"])
            for expert in range(experts):
                tensors[expert_fc1(expert)] = gate_up[expert]
                tensors[expert_fc2(expert)] = down[expert]
        else:
            for expert in range(experts):
                gate, up = get(names[f"e{expert}.gate"]), get(names[f"e{expert}.up"])
                tensors[expert_fc1(expert)] = torch.cat([gate, up])
                tensors[expert_fc2(expert)] = get(names[f"e{expert}.down"])
        if self.variant.shared_expert_intermediate_size:
            gate, up = get(names["shared.gate"]), get(names["shared.up"])
            tensors[SHARED_FC1] = torch.cat([gate, up])
            tensors[SHARED_FC2] = get(names["shared.down"])
            if self.variant.shared_expert_gate:
                tensors[SHARED_GATE] = get(names["shared.gate_weight"])
        return tensors

    def ffn_to_hf(
        self, layer: int, names: dict[str, str], tensors
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.variant.is_moe_layer(layer):
            yield from super().ffn_to_hf(layer, names, tensors)
            return
        if self.fused:
            raise RuntimeError("the fused expert layout is read, never written")
        router = tensors[ROUTER]
        yield names["router"], router
        for expert in range(self.args.num_local_experts):
            gate, up = split_fc1(tensors[expert_fc1(expert)])
            yield names[f"e{expert}.gate"], gate
            yield names[f"e{expert}.up"], up
            yield names[f"e{expert}.down"], tensors[expert_fc2(expert)]
        if self.HAS_SHARED_EXPERT:
            yield from self._shared_to_hf(layer, names, tensors, router)

    def _shared_to_hf(self, layer, names, tensors, router) -> Iterator[tuple[str, torch.Tensor]]:
        """The shared expert slot: the model's (gated as is, or ungated made exact by a zero gate
        and a doubled down projection), or an empty expert (size 0: adds exactly 0)."""
        hidden = self.args.hidden_size
        if not self.variant.shared_expert_intermediate_size:
            empty = router.new_zeros((0, hidden))
            yield names["shared.gate"], empty
            yield names["shared.up"], empty
            yield names["shared.down"], router.new_zeros((hidden, 0))
            yield names["shared.gate_weight"], router.new_zeros((1, hidden))
            return
        gate, up = split_fc1(tensors[SHARED_FC1])
        yield names["shared.gate"], gate
        yield names["shared.up"], up
        if self.variant.shared_expert_gate:
            yield names["shared.down"], tensors[SHARED_FC2]
            yield names["shared.gate_weight"], tensors[SHARED_GATE]
        else:
            down = double_exactly(tensors[SHARED_FC2], f"layer {layer}")
            yield names["shared.down"], down
            yield names["shared.gate_weight"], router.new_zeros((1, hidden))


class MoEFamily(Family):
    """An MoE family: its attention keys are read as its dense attention family's."""

    is_moe = True

    def _attention(self) -> Family:
        return get(self.attention)

    def check(self, cfg, source):
        self._attention().check(cfg, source)

    def qkv_bias(self, cfg):
        return self._attention().qkv_bias(cfg)

    def sliding_window(self, cfg, source):
        return self._attention().sliding_window(cfg, source)


def moe_config_fields(args, routing) -> dict:
    """The routing keys every MoE family's config.json has."""
    return {
        "num_experts_per_tok": routing.top_k,
        "router_aux_loss_coef": args.router_aux_loss_coef,
        "output_router_logits": False,
    }
