"""`btx merge --export-hf`: the merged model streamed into an HF checkpoint as it is made.

The same merged tensors that go into the torch_dist checkpoint go, through the adapter of the HF
family that computes the merged model's function (checkpoint.families.export_family: Mixtral for a
plain BTX MoE of Llama or Mistral seeds, Qwen2-MoE for a shared expert, dense layers or Qwen2
seeds, Qwen3-MoE for Qwen3 seeds), into safetensors shards whose headers are planned up front, so
the export costs no extra memory and no second pass over the sources.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from megatron_btx.checkpoint import integrity, manifest
from megatron_btx.checkpoint.families import LlamaAdapter, export_adapter
from megatron_btx.checkpoint.hf import StreamingSafetensorsWriter, copy_tokenizer, write_hf_config
from megatron_btx.checkpoint.mapping import EMB, OUT
from megatron_btx.checkpoint.megatron_io import atomic_folder
from megatron_btx.checkpoint.sources import TokenizerInfo
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, MoEVariant


def check_exportable(args: LlamaArgs, variant: MoEVariant) -> LlamaAdapter:
    """The adapter of the export, chosen before anything is written; a merge with no exact HF
    form (a shared expert with Qwen3 attention) is refused here, saying why."""
    try:
        return export_adapter(args, variant)
    except BTXError as e:
        raise BTXError(f"--export-hf: {e}") from e


class HFExport:
    """An HF export written beside the merge: `add_global` / `add_layer` in the merge's order,
    then `finish`. Lives in a temporary folder renamed into place when the merge commits."""

    def __init__(
        self,
        folder: str | Path,
        args: LlamaArgs,
        dtype: torch.dtype,
        shard_gb: float,
        overwrite: bool,
        stack: contextlib.ExitStack,
        variant: MoEVariant | None = None,
        hash_files: bool = True,
    ):
        self.args = args
        self.hash_files = hash_files
        self.dtype = dtype
        self.adapter = check_exportable(args, variant or MoEVariant())
        self.tmp = stack.enter_context(atomic_folder(folder, overwrite))
        plan = [(name, shape, dtype) for name, shape in self.adapter.hf_shapes()]
        self.writer = StreamingSafetensorsWriter(
            self.tmp, plan, int(shard_gb * 1024**3), sha256=hash_files
        )

    def add_global(self, name: str, tensor: torch.Tensor) -> None:
        """A global tensor in megatron form (embedding and output padded)."""
        if name in (EMB, OUT):
            tensor = tensor[: self.args.vocab_size]
        self.writer.add(self.adapter.global_names()[name], tensor.to(self.dtype))

    def add_layer(self, layer: int, merged: dict[str, torch.Tensor]) -> None:
        """Layer `layer` of the merge; a shared expert's down projection is doubled in the
        output dtype (exact: see checkpoint.families.moe)."""
        merged = {name: tensor.to(self.dtype) for name, tensor in merged.items()}
        for name, tensor in self.adapter.layer_to_hf(layer, merged):
            self.writer.add(name, tensor)

    def finish(self, tokenizer: TokenizerInfo | None, record: manifest.Manifest) -> None:
        """Close the shards, write config.json, the tokenizer and the manifest (`record`, the
        merge's, as this folder's kind)."""
        self.writer.close()
        write_hf_config(self.tmp, self.adapter.hf_config(), self.dtype)
        if tokenizer is not None and tokenizer.folder is not None:
            copy_tokenizer(tokenizer.folder, self.tmp)
        files = integrity.hash_tree(self.tmp) if self.hash_files else None
        kind = f"hf_{self.adapter.family}"
        manifest.write(self.tmp, dataclasses.replace(record, kind=kind, files=files))
