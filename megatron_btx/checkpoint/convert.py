"""HF Llama/Mixtral <-> megatron-core torch_dist checkpoints, as one process without a GPU.

megatron-core's distributed checkpoints hold global tensors and reshard on load, so one
conversion serves every TP/PP/EP layout: `--tp/--pp/--ep` are checked against the model (heads,
layers, experts) and recorded in the manifest as the intended layout. The model is held once;
source tensors are read one at a time from memory-mapped safetensors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_btx import progress, runtime
from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.hf import HFReader, copy_tokenizer
from megatron_btx.checkpoint.mapping import check_hf_keys, hf_to_mcore, mcore_to_hf
from megatron_btx.checkpoint.megatron_io import (
    atomic_folder,
    check_target,
    is_checkpoint,
    read_args,
)
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, check_parallel, to_dtype

log = logging.getLogger(__name__)

_ST_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
TOKENIZER_DIR = "tokenizer"


def _progress(total: int, desc: str):
    return progress.bar(total, desc, unit="layer")


def stream_to_torch_dist(
    tensors: Iterator[tuple[str, torch.Tensor]],
    args: LlamaArgs,
    dtype: torch.dtype,
    folder: Path,
    source: str,
) -> int:
    """Write (megatron name, tensor) pairs of an unsharded model as a torch_dist checkpoint,
    one layer at a time: the keys, shapes and chunks come from megatron-core's own sharded state
    dict of the model built on the meta device (no memory), so megatron-core loads the result at
    any layout, and memory holds one layer, not the model. Returns the number of tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_btx.checkpoint.dcp_stream import StreamingDCPWriter
    from megatron_btx.checkpoint.merge import _fill, _flat_template, build_gpt

    template = _flat_template(build_gpt(args, dtype, meta=True))
    with StreamingDCPWriter(folder) as writer:
        done: set[str] = set()
        group: dict[str, torch.Tensor] = {}
        group_id: str | None = None
        bar = _progress(args.num_hidden_layers + 2, f"import {Path(source).name}")

        def group_of(name: str) -> str:
            parts = name.split(".")
            return ".".join(parts[:3]) if name.startswith("decoder.layers.") else "globals"

        def flush() -> None:
            if not group:
                return
            prefix = group_id + "." if group_id != "globals" else ""
            entries = {
                k: v
                for k, v in template.items()
                if (k.startswith(prefix) if prefix else k in group)
            }
            short = {k[len(prefix) :]: t for k, t in group.items()}
            for k, v in entries.items():
                t = group.get(k)
                if (
                    not isinstance(v, ShardedObject)
                    and t is not None
                    and tuple(t.shape) != tuple(v.data.shape)
                ):
                    raise BTXError(
                        f"{source}: tensor for {k} has shape {tuple(t.shape)}, the model expects "
                        f"{tuple(v.data.shape)}; config.json does not match the weights"
                    )
            writer.write(_fill(entries, prefix, short, source))
            done.update(entries)
            group.clear()
            if bar:
                bar.update(1)

        n = 0
        for name, t in tensors:
            if name not in template:
                raise BTXError(f"{source}: no place for {name} in the model; config.json mismatch")
            g = group_of(name)
            if g != group_id:
                flush()
                group_id = g
            group[name] = t.to(dtype)
            n += 1
        flush()
        rest = {k: v for k, v in template.items() if k not in done}
        if any(not isinstance(v, ShardedObject) for v in rest.values()):
            missing = next(k for k, v in rest.items() if not isinstance(v, ShardedObject))
            raise BTXError(f"{source}: nothing was converted into {missing}")
        if rest:  # extra state of modules outside the layers
            writer.write(rest)
        writer.finish()
        if bar:
            bar.close()
    return n


def hf_to_megatron(
    load: str | Path,
    save: str | Path,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert an HF Llama (or Mixtral) folder to a torch_dist checkpoint; return the manifest."""
    t0 = time.time()
    load, save = Path(load), Path(save)
    reader = HFReader(load)
    args = LlamaArgs.from_hf_config_file(reader.config_path())
    check_parallel(args, tp, pp, ep)
    check_hf_keys(reader.keys(), args, str(load))
    src_dtype = _ST_DTYPES.get(reader.dtype("model.embed_tokens.weight"), "fp32")
    dt = to_dtype(dtype or src_dtype)
    check_target(save, overwrite)
    with runtime.single_process():
        with atomic_folder(save, overwrite) as tmp:
            n = stream_to_torch_dist(hf_to_mcore(reader.get, args), args, dt, tmp, str(load))
            tok = copy_tokenizer(load, tmp / TOKENIZER_DIR)
            (tmp / "hf_config.json").write_text(json.dumps(args.to_hf_dict(), indent=2))
            m = manifest.write(
                tmp,
                kind="megatron_torch_dist",
                model=args.to_dict(),
                dtype=_DTYPE_NAMES[dt],
                layout={"tp": tp, "pp": pp, "ep": ep},
                padded_vocab_size=args.padded_vocab_size,
                num_tensors=n,
                sources=[
                    {
                        "path": str(load.resolve()),
                        "format": "hf_safetensors",
                        "sha256": manifest.sha256_folder(load, "*.safetensors"),
                    }
                ],
                tokenizer={
                    "files": tok,
                    "sha256": manifest.sha256_folder(tmp / TOKENIZER_DIR) if tok else {},
                },
            )
    log.info("converted %s -> %s in %.1fs", load, save, time.time() - t0)
    return m


def megatron_to_hf(
    load: str | Path,
    save: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
) -> dict:
    """Export a torch_dist checkpoint (dense Llama or MoE) as an HF Llama / Mixtral folder."""
    t0 = time.time()
    load, save = Path(load), Path(save)
    args = read_args(load)
    check_parallel(args, tp, pp, ep)
    src = manifest.read(load)
    dt = to_dtype(dtype or src.get("dtype", "fp32"))
    check_target(save, overwrite)
    with runtime.single_process():
        from megatron_btx.checkpoint.dcp_stream import PartialReader
        from megatron_btx.checkpoint.merge import StreamingSafetensorsWriter, build_gpt

        # Keys, shapes and chunks from megatron-core's own sharded state dict of the model on
        # the meta device; tensors read one layer at a time from whatever layout was saved.
        template = dict(
            build_gpt(args, to_dtype(src.get("dtype", "fp32")), meta=True).sharded_state_dict()
        )
        if not is_checkpoint(load):
            raise BTXError(f"{load}: not a megatron-core distributed checkpoint (no metadata.json)")
        reader = PartialReader(load)
        cache: dict[str, Any] = {"group": None, "tensors": {}}

        def get(name: str) -> torch.Tensor:
            parts = name.split(".")
            group = ".".join(parts[:3]) + "." if name.startswith("decoder.layers.") else name
            if cache["group"] != group:
                entries = {
                    k: v
                    for k, v in template.items()
                    if (k.startswith(group) if group.endswith(".") else k == group)
                }
                if not entries:
                    raise BTXError(f"{load}: the checkpoint has no {name}")
                cache["tensors"] = {}  # drop the previous layer before reading the next
                cache["tensors"] = reader.load(entries)
                cache["group"] = group
            return cache["tensors"][name]

        def get_meta(name: str) -> torch.Tensor:
            v = template[name]
            return torch.empty(tuple(v.data.shape), dtype=dt, device="meta")

        plan = [(n, tuple(t.shape), dt) for n, t in mcore_to_hf(get_meta, args)]
        try:
            with atomic_folder(save, overwrite) as tmp:
                writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes)
                bar = _progress(len(plan), f"export {load.name}")
                for name, t in mcore_to_hf(get, args):
                    writer.add(name, t.to(dt))
                    if bar:
                        bar.update(1)
                if bar:
                    bar.close()
                writer.close()
                cfg = args.to_hf_dict()
                cfg["torch_dtype"] = cfg["dtype"] = {
                    "fp32": "float32",
                    "bf16": "bfloat16",
                    "fp16": "float16",
                }[_DTYPE_NAMES[dt]]
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
                tok_dir = load / TOKENIZER_DIR
                tok = copy_tokenizer(tok_dir, tmp) if tok_dir.is_dir() else []
                m = manifest.write(
                    tmp,
                    kind="hf_mixtral" if args.is_moe else "hf_llama",
                    model=args.to_dict(),
                    dtype=_DTYPE_NAMES[dt],
                    sources=[
                        {
                            "path": str(load.resolve()),
                            "format": "megatron_torch_dist",
                            "manifest": src,
                        }
                    ],
                    tokenizer={"files": tok},
                )
        finally:
            reader.close()
    log.info("exported %s -> %s in %.1fs", load, save, time.time() - t0)
    return m


# ---- command lines ---------------------------------------------------------------------------
def _parser(desc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--load", required=True, help="source checkpoint folder")
    p.add_argument("--save", required=True, help="output folder (written atomically)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check and record")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check and record")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size to check and record")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="output dtype (default: the source's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def run_cli(fn, argv: list[str] | None, desc: str, extra=None) -> int:
    p = _parser(desc)
    if extra:
        extra(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kwargs = {k: v for k, v in vars(a).items()}
    if "max_shard_gb" in kwargs:
        kwargs["max_shard_bytes"] = int(kwargs.pop("max_shard_gb") * 1024**3)
    try:
        fn(**kwargs)
    except BTXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def hf_to_megatron_main(argv: list[str] | None = None) -> int:
    return run_cli(
        hf_to_megatron,
        argv,
        "Convert an HF Llama/Mixtral checkpoint to megatron-core "
        "torch_dist (loads at any TP/PP/EP).",
    )


def megatron_to_hf_main(argv: list[str] | None = None) -> int:
    def extra(p):
        p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")

    return run_cli(
        megatron_to_hf,
        argv,
        "Export a megatron-core torch_dist checkpoint (dense or "
        "MoE) to HF Llama / Mixtral safetensors.",
        extra,
    )


__all__ = ["hf_to_megatron", "megatron_to_hf"]
