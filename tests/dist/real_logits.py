"""Logits of a torch_dist checkpoint at a given TP x PP layout, forward only (no DDP, no
optimizer: the real seed's test loads it in 3 processes on 2 cores). Started by
tests/test_real_seed.py under torchrun or as one process; rank 0 of the last stage saves the
logits over the real vocabulary."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--batch", required=True, help=".pt file with tokens [B, S] (weights_only)")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    a = p.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_model

    rt = runtime.init(tp=a.tp, pp=a.pp, device="cpu")
    args = read_args(a.ckpt)
    model = build_model(
        args, tp=a.tp, pp=a.pp, perform_initialization=False, variant=read_variant(a.ckpt)
    )
    load_model(model, a.ckpt)
    model.eval()
    tokens = torch.load(a.batch, weights_only=True)
    batch, seq = tokens.shape
    pos = torch.arange(seq).unsqueeze(0).expand(1, -1)
    out: list[torch.Tensor] = []

    def step(it, m):
        ids = next(it)
        logits = m(ids, pos, None)

        def keep(x):
            out.append(gather_from_tensor_model_parallel_region(x).detach())
            return x.sum() * 0, {}

        return logits, keep

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter([tokens[i : i + 1] for i in range(batch)]),
            model=[model],
            num_microbatches=batch,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(torch.cat(out)[..., : args.vocab_size].contiguous(), a.out)
    torch.distributed.barrier()
    runtime.teardown()
    del rt


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
