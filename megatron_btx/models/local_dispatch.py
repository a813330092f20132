"""A token dispatcher for MoE layers whose experts are all on this rank (EP = 1, no expert-TP).

megatron-core's all-to-all dispatcher runs its whole machinery even when nothing leaves the
rank: all-to-alls over a group of one, a second sort of the tokens by local expert (a copy of
every routed token in each direction, although the order does not change), and a device-to-host
copy of the token counts with a stream synchronisation. With every expert local, dispatching is
megatron-core's own `permute` (tokens sorted by expert) and combining is its `unpermute`; the
token counts stay on the device, so the grouped experts (`grouped_experts.py`) never wait for
the host. The permutation functions are megatron-core's, so the numbers are those of the
all-to-all dispatcher exactly.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import permute, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_btx.errors import BTXError


def local_dispatch_unsupported(
    config, ep_size: int, expert_tp_size: int, tp_size: int
) -> str | None:
    """Why the local dispatcher cannot stand in for megatron-core's here (None: it can)."""
    checks = (
        (ep_size > 1, f"expert parallel size {ep_size} > 1"),
        (expert_tp_size > 1, f"expert tensor parallel size {expert_tp_size} > 1"),
        (tp_size > 1, f"tensor parallel size {tp_size} > 1 (sequence-parallel tokens)"),
        (config.moe_pad_expert_input_to_capacity, "moe_pad_expert_input_to_capacity"),
        (config.moe_router_padding_for_quantization, "moe_router_padding_for_quantization"),
        (config.moe_shared_expert_overlap, "moe_shared_expert_overlap"),
        (config.moe_permute_fusion, "moe_permute_fusion"),
        (config.moe_latent_size is not None, "moe_latent_size"),
    )
    reasons = [why for failed, why in checks if failed]
    return ", ".join(reasons) or None


class LocalTokenDispatcher(MoETokenDispatcher):
    """Sort the routed copies of the tokens by expert; put the expert outputs back, weighted
    sums per token. No communication, no host synchronisation."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        problem = local_dispatch_unsupported(config, self.ep_size, self.tp_size, 1)
        if problem:
            raise BTXError(f"moe.local_dispatch: cannot be used with {problem}")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_shape = tokens.shape
        self.routing_map = routing_map
        self.tokens_per_expert = routing_map.sum(dim=0).long()  # stays on the device
        # megatron-core 0.17+ sorts with a fixed-size argsort and needs the number of routed
        # copies (0.16 ignores it); it returns five values where 0.16 returned three
        permuted, permuted_probs, self.sorted_indices = permute(
            tokens, routing_map, probs=probs, num_out_tokens=self._routed_copies(routing_map)
        )[:3]
        return permuted, permuted_probs

    def _routed_copies(self, routing_map):
        """How many (token, expert) pairs `routing_map` holds: top-k per token without token
        dropping (a Python int, no host sync), else its sum (a device scalar), as megatron-core's
        all-to-all dispatcher counts them."""
        if self.config.moe_expert_capacity_factor is None:
            return routing_map.shape[0] * self.config.moe_router_topk
        return routing_map.sum()

    def token_dispatch(self, hidden_states, probs):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states, probs):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states):
        return hidden_states

    def token_combine(self, hidden_states):
        return hidden_states

    def combine_postprocess(self, hidden_states):
        output = unpermute(
            hidden_states,
            self.sorted_indices,
            restore_shape=self.tokens_shape,
            routing_map=self.routing_map,
        )
        return output.view(self.hidden_shape)


def install_local_dispatch(model: torch.nn.Module) -> int:
    """Give every MoE layer of `model` the local dispatcher (after the build, before training;
    it holds no parameters, so checkpoints are unchanged). Returns how many layers got it."""
    from types import SimpleNamespace

    count = 0
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        old = layer.token_dispatcher
        problem = local_dispatch_unsupported(
            layer.config, old.ep_size, old.tp_size, layer.tp_group.size()
        )
        if problem:
            raise BTXError(f"moe.local_dispatch is true but the model has {problem}; set it false")
        groups = SimpleNamespace(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
        layer.token_dispatcher = LocalTokenDispatcher(
            layer.num_local_experts, layer.local_expert_indices, layer.config, groups
        )
        count += 1
    return count
