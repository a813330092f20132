"""Under torchrun with 2 processes (TP=2 with sequence parallelism, expert-TP=1, EP=1): whole
experts on both ranks, an expert-data-parallel group of 2 beside a dense data-parallel group of 1.
Arg: `megatron` (the model as megatron-core builds it) or `ours` (after
``mcore_layouts.route_expert_grads``, as training does).

The model is wrapped in megatron-core's DDP and run forward/backward on one batch; each rank's
experts see only its sequence-parallel half of the tokens, so the gradients it accumulates
(read before the reduction) are partial. After ``finish_grad_sync`` each expert gradient should be
the sum of both ranks' partial gradients (a plain all-reduce of the copies read before, DDP's
gradient scale being 1 at data parallel 1) on both ranks. Prints one JSON line per rank:
{"rank", "experts", "expert_dp", "dense_dp", "marked_by_megatron", "marked_by_us",
"partial_differs", "reduced_err", "unreduced_err"} (how many expert weights megatron-core's build
and route_expert_grads marked expert-parallel; the largest absolute differences of the expert
gradients after the sync from the expected sums and from the partial gradients).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron_btx import runtime  # noqa: E402
from megatron_btx.models.llama import LlamaArgs, build_model, transformer_config  # noqa: E402
from megatron_btx.training.mcore_layouts import route_expert_grads  # noqa: E402

ARGS = LlamaArgs(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    num_local_experts=4,
    num_experts_per_tok=2,
)


def main() -> None:
    mode = sys.argv[1]
    rt = runtime.init(tp=2, etp=1, ep=1, device="cpu")
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = transformer_config(ARGS, tp=2, etp=1)
    model = build_model(ARGS, config)
    built = [p for n, p in model.named_parameters() if ".experts." in n]
    marked_by_megatron = sum(not getattr(p, "allreduce", True) for p in built)
    marked_by_us = route_expert_grads([model], ep=1, etp=1, tp=2) if mode == "ours" else 0
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    ddp.broadcast_params()
    experts = {n: p for n, p in ddp.module.named_parameters() if ".experts." in n}
    # Start both replicas of every expert from the same weights (the build draws per TP rank).
    for param in experts.values():
        dist.broadcast(param.data, src=0)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    ddp.zero_grad_buffer()
    per_token = ddp(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
    per_token.float().mean().backward()
    partial = {n: p.main_grad.detach().clone() for n, p in experts.items()}
    expected = {n: g.clone() for n, g in partial.items()}
    for grad in expected.values():
        dist.all_reduce(grad)  # the world is the expert-data-parallel group here
    ddp.finish_grad_sync()
    differs = 0.0
    for grad in partial.values():
        both = [torch.empty_like(grad) for _ in range(2)]
        dist.all_gather(both, grad)
        differs = max(differs, float((both[0] - both[1]).abs().max()))
    result = {
        "rank": rt.rank,
        "experts": len(experts),
        "expert_dp": ps.get_expert_data_parallel_world_size(),
        "dense_dp": ps.get_data_parallel_world_size(),
        "marked_by_megatron": marked_by_megatron,
        "marked_by_us": marked_by_us,
        "partial_differs": differs,
        "reduced_err": max(
            float((p.main_grad - expected[n]).abs().max()) for n, p in experts.items()
        ),
        "unreduced_err": max(
            float((p.main_grad - partial[n]).abs().max()) for n, p in experts.items()
        ),
    }
    # one write() per line: under torchrun both ranks share the pipe, and print's separate
    # writes of text and newline can interleave with the other rank's line
    os.write(1, (json.dumps(result) + "\n").encode())
    runtime.teardown()


if __name__ == "__main__":
    main()
