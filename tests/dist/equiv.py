"""Run one training step of a converted checkpoint at a given layout; write loss, grad norm and
logits. Started by tests/test_parallel_equivalence.py, under torchrun or as one process.

The same fixed batch, the same weights: every layout must give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", required=True, help=".pt file with tokens [B, S+1] (weights_only)")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--etp", type=int, default=None)
    p.add_argument("--dispatcher", default="alltoall")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    p.add_argument("--experts", default=None, help="model.moe_experts: auto | sequential | grouped")
    p.add_argument("--local-dispatch", action="store_true", help="moe.local_dispatch")
    a = p.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import MoEOptions, build_model
    from megatron_btx.models.speedups import SpeedOptions

    rt = runtime.init(tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, device=a.device)
    args = read_args(a.ckpt)
    moe = MoEOptions(dispatcher=a.dispatcher, load_balancing="none")
    speed = SpeedOptions(moe_experts=a.experts or "auto", local_dispatch=a.local_dispatch)
    model = build_model(args, tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, moe=moe, dtype=a.dtype,
                        perform_initialization=False, speed=speed,
                        variant=read_variant(a.ckpt)).to(rt.device)
    load_model(model, a.ckpt)
    config = model.config
    ddp = DDP(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=a.distributed_optimizer
        ),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=0.0, weight_decay=0.0,
                        bf16=a.dtype == "bf16", params_dtype=model.config.params_dtype,
                        use_distributed_optimizer=a.distributed_optimizer),
        [ddp],
    )

    data = torch.load(a.batch, weights_only=True).to(rt.device)
    B, S = data.shape[0], data.shape[1] - 1
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    local = data[dp_rank * (B // dp) : (dp_rank + 1) * (B // dp)]
    n_micro = local.shape[0] // a.micro
    micro = [(local[i * a.micro : (i + 1) * a.micro]) for i in range(n_micro)]
    pos = torch.arange(S, device=rt.device).unsqueeze(0).expand(a.micro, -1)
    logits_out: list[torch.Tensor] = []

    def forward_step(it, m):
        batch = next(it)
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        out = m(tokens, pos, None, labels=labels)

        def loss_func(losses):
            loss = losses.float().mean()
            return loss, {"lm": loss.detach().clone()}

        return out, loss_func

    def logits_step(it, m):
        batch = next(it)
        out = m(batch[:, :-1].contiguous(), pos, None)

        def keep(logits):
            logits_out.append(gather_from_tensor_model_parallel_region(logits).detach())
            return logits.sum() * 0, {}

        return out, keep

    fb = get_forward_backward_func()
    # Logits first, with the loaded weights (the training step below moves them).
    ddp.eval()
    fb(forward_step_func=logits_step, data_iterator=iter(micro), model=[ddp],
       num_microbatches=n_micro, seq_length=S, micro_batch_size=a.micro, forward_only=True)
    ddp.train()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    losses = fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                num_microbatches=n_micro, seq_length=S, micro_batch_size=a.micro,
                forward_only=False)
    ok, grad_norm, _ = opt.step()

    res = {"grad_norm": float(grad_norm), "layout": vars(a)}
    # which kernel the experts ran (GroupedExperts records it), and the dispatcher used
    res["experts"] = sorted({type(m).__name__ + ":" + str(getattr(m, "last_kernel", None))
                             for m in model.modules() if hasattr(m, "local_experts")})
    res["dispatchers"] = sorted({type(m.token_dispatcher).__name__ for m in model.modules()
                                 if hasattr(m, "token_dispatcher")})
    if ps.is_pipeline_last_stage():
        loss = torch.stack([x["lm"] for x in losses]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= dp
        res["loss"] = float(loss)
        logits = torch.cat(logits_out)[..., : args.vocab_size].float().contiguous()
        # Gather the DP shards of the batch so every layout returns the whole batch's logits.
        parts = [torch.empty_like(logits) for _ in range(dp)]
        torch.distributed.all_gather(parts, logits, group=ps.get_data_parallel_group())
        logits = torch.cat(parts)
        if ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
            res["rank"] = rt.rank
            torch.save(logits.cpu(), a.out + ".logits.pt")
            with open(a.out, "w") as f:
                json.dump(res, f)
    torch.distributed.barrier()
    runtime.teardown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
