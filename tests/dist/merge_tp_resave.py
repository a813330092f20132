"""Under torchrun: load a dense torch_dist checkpoint at TP=world size and save it again, so the
copy's chunks are TP-sharded (what a TP training run writes). Args: SRC DST."""

import shutil
import sys
from pathlib import Path

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    import torch.distributed as dist

    from megatron_btx import runtime
    from megatron_btx.checkpoint import integrity, manifest
    from megatron_btx.checkpoint.megatron_io import load_model, read_args, save_model
    from megatron_btx.models.llama import build_model

    world = int(__import__("os").environ["WORLD_SIZE"])
    runtime.init(tp=world, device="cpu")
    args = read_args(src)
    model = build_model(args, dtype=torch.float32, perform_initialization=False, spec="local",
                        fused=False)
    load_model(model, src)
    if dist.get_rank() == 0:
        dst.mkdir(parents=True)
    dist.barrier()
    save_model(model, dst)
    if dist.get_rank() == 0:
        for name in ("tokenizer", "hf_config.json"):
            p = src / name
            if p.is_dir():
                shutil.copytree(p, dst / name)
            elif p.is_file():
                shutil.copy2(p, dst / name)
        m = manifest.read(src)
        m.pop("format_version", None)
        m["layout"] = {"tp": world, "pp": 1, "ep": 1}
        m["step"] = 7
        m["files"] = integrity.hash_tree(dst)  # this checkpoint's own files
        manifest.rewrite(dst, m)
    runtime.teardown()


if __name__ == "__main__":
    main()
