"""Under torchrun: load a merged MoE checkpoint at EP=world size (and optional TP) and write the
logits of a fixed batch. Args: CKPT BATCH_PT OUT_PT [TP]."""

import json
import sys
from pathlib import Path

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred


def main() -> None:
    ckpt, batch, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    tp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    import os

    import torch.distributed as dist

    from megatron_btx import runtime
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, read_variant
    from megatron_btx.models.llama import build_for_checkpoint

    world = int(os.environ["WORLD_SIZE"])
    ep = world // tp
    runtime.init(tp=tp, ep=ep, device="cpu")
    args = read_args(ckpt)
    model = build_for_checkpoint(args, torch.float32, read_variant(ckpt))
    load_model(model, ckpt)
    model.eval()
    ids = torch.load(batch, weights_only=True)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        logits = model(ids, pos, None)
    if tp > 1:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
    if dist.get_rank() == 0:
        torch.save(logits[..., : args.vocab_size].contiguous(), out)
        (out.parent / (out.name + ".json")).write_text(json.dumps({"tp": tp, "ep": ep}))
    runtime.teardown()


if __name__ == "__main__":
    main()
