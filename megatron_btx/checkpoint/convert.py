"""HF checkpoints (Llama, Mistral, Qwen2, Qwen3; Mixtral, Qwen2-MoE, Qwen3-MoE) <-> megatron-core
torch_dist checkpoints, as one process without a GPU.

megatron-core's distributed checkpoints hold global tensors and reshard on load, so one
conversion serves every TP/PP/EP layout: `--tp/--pp/--ep` are checked against the model (heads,
layers, experts) and recorded in the manifest as the intended layout. Both directions stream a
layer at a time (source tensors are read one by one with plain file reads), so memory holds a
layer, not the model. Names and layouts come from the family's adapter (checkpoint.mapping and
checkpoint.families). An imported MoE's shape beyond Mixtral's (shared expert, dense layers) is
recorded in the manifest's ``moe`` entry, from which training and export build the model; the
export writes the HF family whose function is the checkpoint's, routed as its manifest's
``training.router`` says (checkpoint.families.export_family).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_btx import progress, runtime
from megatron_btx.checkpoint import gguf, integrity, manifest, seeds
from megatron_btx.checkpoint import template as tpl
from megatron_btx.checkpoint.dcp_stream import PartialReader, StreamingDCPWriter
from megatron_btx.checkpoint.families import export_adapter, import_adapter, parse
from megatron_btx.checkpoint.hf import (
    HFReader,
    StreamingSafetensorsWriter,
    copy_tokenizer,
    write_hf_config,
)
from megatron_btx.checkpoint.mapping import EMB
from megatron_btx.checkpoint.megatron_io import atomic_folder, check_target, read_args
from megatron_btx.checkpoint.sources import DTYPE_NAMES, TOKENIZER_DIR, check_hf_tensors
from megatron_btx.errors import BTXError
from megatron_btx.inputs import inside, read_json
from megatron_btx.models.llama import (
    LlamaArgs,
    MoEVariant,
    build_for_checkpoint,
    check_parallel,
    to_dtype,
)
from megatron_btx.models.router_settings import router_note
from megatron_btx.rundir import is_checkpoint

log = logging.getLogger(__name__)

ST_DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def stream_to_torch_dist(
    tensors: Iterator[tuple[str, torch.Tensor]],
    args: LlamaArgs,
    dtype: torch.dtype,
    folder: Path,
    source: str,
    variant: MoEVariant | None = None,
) -> int:
    """Write (megatron name, tensor) pairs of an unsharded model as a torch_dist checkpoint,
    one layer at a time: the keys, shapes and chunks come from megatron-core's own sharded state
    dict of the model built on the meta device (no memory), so megatron-core loads the result at
    any layout, and memory holds one layer, not the model. Returns the number of tensors."""
    template = tpl.flat_template(build_for_checkpoint(args, dtype, variant, meta=True))
    bar = progress.bar(args.num_hidden_layers + 2, f"import {Path(source).name}", unit="layer")
    with StreamingDCPWriter(folder) as writer:
        group = _PartWriter(template, writer, source, bar)
        count = 0
        for name, tensor in tensors:
            if name not in template:
                raise BTXError(f"{source}: no place for {name} in the model; config.json mismatch")
            group.add(name, tensor.to(dtype))
            count += 1
        group.flush()
        rest = {k: v for k, v in template.items() if k not in group.done}
        untouched = [k for k in tpl.tensor_entries(rest)]
        if untouched:
            raise BTXError(f"{source}: nothing was converted into {untouched[0]}")
        if rest:  # extra state of modules outside the layers
            writer.write(rest)
        writer.finish()
    if bar:
        bar.close()
    return count


class _PartWriter:
    """Groups a model's tensors by layer (and the globals) and writes each group as one part."""

    def __init__(self, template: dict[str, Any], writer, source: str, bar):
        self.template, self.writer, self.source, self.bar = template, writer, source, bar
        self.group: dict[str, torch.Tensor] = {}
        self.group_id: str | None = None
        self.done: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        parts = name.split(".")
        group_id = ".".join(parts[:3]) + "." if name.startswith("decoder.layers.") else ""
        if group_id != self.group_id:
            self.flush()
            self.group_id = group_id
        self.group[name] = tensor

    def flush(self) -> None:
        if not self.group:
            return
        prefix = self.group_id
        if prefix:
            entries = tpl.entries_under(self.template, prefix)
        else:
            entries = {k: v for k, v in self.template.items() if k in self.group}
        for key, entry in tpl.tensor_entries(entries).items():
            tensor = self.group.get(key)
            if tensor is not None and tuple(tensor.shape) != tuple(entry.data.shape):
                raise BTXError(
                    f"{self.source}: tensor for {key} has shape {tuple(tensor.shape)}, the model "
                    f"expects {tuple(entry.data.shape)}; config.json does not match the weights"
                )
        short = {k[len(prefix) :]: t for k, t in self.group.items()}
        self.writer.write(tpl.fill(entries, prefix, short, self.source))
        self.done.update(entries)
        self.group.clear()
        if self.bar:
            self.bar.update(1)


def hf_to_megatron(
    load: str | Path,
    save: str | Path,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert an HF folder of a supported family (dense or MoE, either expert layout), a dense
    GGUF file or a named seed (``gguf:NAME``, :mod:`.seeds`) to a torch_dist checkpoint; return
    the manifest."""
    t0 = time.time()
    load, save = seeds.resolve(load), Path(save)  # gguf:NAME: a seed a wheel ships
    reader = _open_import_source(load)
    model = parse(reader.config, reader.config_name)
    args, variant = model.args, model.variant
    check_parallel(args, tp, pp, ep)
    adapter = import_adapter(model, reader.keys())
    adapter.check_hf_keys(reader.keys(), str(load))
    check_hf_tensors(reader, adapter.hf_shapes(), load)  # shapes and dtypes, before any write
    src_dtype = ST_DTYPE_NAMES.get(reader.dtype(adapter.global_names()[EMB]), "fp32")
    dt = to_dtype(dtype or src_dtype)
    check_target(save, overwrite, sources=[load])
    with runtime.single_process():
        with atomic_folder(save, overwrite) as tmp:
            tensors = adapter.import_tensors(_finite_reader(reader))
            n = stream_to_torch_dist(tensors, args, dt, tmp, str(load), variant)
            tok = reader.write_tokenizer(tmp / TOKENIZER_DIR)
            (tmp / "hf_config.json").write_text(json.dumps(adapter.hf_config(), indent=2))
            record = manifest.Manifest(
                kind="megatron_torch_dist",
                model=args.to_dict(),
                moe=variant.to_manifest(),
                dtype=DTYPE_NAMES[dt],
                layout={"tp": tp, "pp": pp, "ep": ep},
                padded_vocab_size=args.padded_vocab_size,
                num_tensors=n,
                sources=[reader.record(model.model_type, _expert_layout(adapter))],
                tokenizer={
                    "files": tok,
                    "sha256": manifest.sha256_folder(tmp / TOKENIZER_DIR) if tok else {},
                },
                files=integrity.hash_tree(tmp),
            )
            m = manifest.write(tmp, record)
    log.info("converted %s -> %s in %.1fs", load, save, time.time() - t0)
    return m


class _HFFolderSource(HFReader):
    """An HF folder as an import source: its config.json, tokenizer files and provenance."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.config_name = str(self.config_path())
        self.config = _read_config(self.config_path())

    def write_tokenizer(self, dst: Path) -> list[str]:
        tok = copy_tokenizer(self.folder, dst)
        if "tokenizer.json" in tok and self.config_path().is_file():
            # an HF tokenizer's special ids: config.json names the ones the model trained with
            shutil.copy2(self.config_path(), dst / "config.json")
            tok.append("config.json")
        return tok

    def record(self, model_type: str, expert_layout: str | None) -> dict[str, Any]:
        return {
            "path": str(self.folder.resolve()),
            "format": "hf_safetensors",
            "model_type": model_type,
            "expert_layout": expert_layout,
            "sha256": manifest.sha256_folder(self.folder, "*.safetensors"),
        }


def _open_import_source(load: Path):
    """The one place a GGUF file joins the HF import: a GGUF file is read as an HF checkpoint
    (config, tensors under HF names, tokenizer) by checkpoint.gguf; a folder is an HF folder."""
    if gguf.is_gguf(load):
        return gguf.GGUFSource(load)
    if load.is_file():
        raise BTXError(f"{load}: neither an HF checkpoint folder nor a GGUF file")
    return _HFFolderSource(load)


def _read_config(path: Path) -> dict[str, Any]:
    config = read_json(inside(path.parent, path, "config.json"), "config.json")
    if not isinstance(config, dict):
        raise BTXError(f"{path}: the top level is a {type(config).__name__}, not a JSON object")
    return config


def _finite_reader(reader: HFReader):
    """`reader.get` that refuses a tensor holding NaN or infinity (a broken download or
    training run: it would train and export as NaN), naming the file and the tensor."""

    def get(key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = reader.get(key, out)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BTXError(
                f"{reader.file_of(key)}: tensor {key!r} holds NaN or infinite values; the "
                f"checkpoint is broken"
            )
        return tensor

    return get


def _expert_layout(adapter) -> str | None:
    if not adapter.args.is_moe:
        return None
    return "fused" if getattr(adapter, "fused", False) else "per_expert"


def megatron_to_hf(
    load: str | Path,
    save: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    verify_hashes: bool = True,
) -> dict:
    """Export a torch_dist checkpoint (dense, a merge of any variant, an import, a finetuned
    MoE) as an HF folder of the family whose function is the checkpoint's: the model's own for a
    dense one; Mixtral, Qwen2-MoE or Qwen3-MoE for an MoE (checkpoint.families.export_family),
    routed as the manifest's ``training.router`` says. No exact form: a one-line error.
    With `verify_hashes`, the source's files are checked against its manifest's sha256 on a
    second thread while it is read; a mismatch fails the export before anything is committed."""
    t0 = time.time()
    load, save = Path(load), Path(save)
    args = read_args(load)
    check_parallel(args, tp, pp, ep)
    src = manifest.read(load)
    variant = MoEVariant.from_manifest(src.get("moe"))
    router = (src.get("training") or {}).get("router") if args.is_moe else None
    try:
        adapter = export_adapter(args, variant, router)
    except BTXError as e:
        raise BTXError(f"{load}: {e}") from e
    note = router_note(router)
    if note:
        log.warning("%s: %s", load, note)
    dt = to_dtype(dtype or src.get("dtype", "fp32"))
    check_target(save, overwrite, sources=[load])
    if not is_checkpoint(load):
        raise BTXError(f"{load}: not a megatron-core distributed checkpoint (no metadata.json)")
    with runtime.single_process():
        # Keys, shapes and chunks from megatron-core's own sharded state dict of the model on
        # the meta device; tensors read one layer at a time from whatever layout was saved.
        saved_dtype = to_dtype(src.get("dtype", "fp32"))
        template = tpl.flat_template(build_for_checkpoint(args, saved_dtype, variant, meta=True))
        reader = PartialReader(load)
        plan = [(name, shape, dt) for name, shape in adapter.hf_shapes()]
        source_check = integrity.BackgroundCheck(load, verify_hashes)
        try:
            with atomic_folder(save, overwrite) as tmp:
                writer = StreamingSafetensorsWriter(tmp, plan, max_shard_bytes)
                bar = progress.bar(len(plan), f"export {load.name}", unit="tensor")
                # cast before the adapter: a shared expert's doubling happens in the output dtype
                tensors = adapter.export_tensors(
                    lambda layer: {
                        name: tensor.to(dt)
                        for name, tensor in tpl.read_prefix(
                            reader, template, tpl.layer_prefix(layer)
                        ).items()
                    },
                    lambda name: tpl.read_prefix(reader, template, name)[name],
                )
                for name, tensor in tensors:
                    writer.add(name, tensor.to(dt))
                    if bar:
                        bar.update(1)
                if bar:
                    bar.close()
                writer.close()
                write_hf_config(tmp, adapter.hf_config(), dt)
                tok_dir = inside(load, load / TOKENIZER_DIR, "tokenizer folder")
                tok = copy_tokenizer(tok_dir, tmp) if tok_dir.is_dir() else []
                record = manifest.Manifest(
                    kind=f"hf_{adapter.family}",
                    model=args.to_dict(),
                    moe=variant.to_manifest(),
                    router=router,
                    dtype=DTYPE_NAMES[dt],
                    sources=[
                        {
                            "path": str(load.resolve()),
                            "format": "megatron_torch_dist",
                            "manifest": src,
                        }
                    ],
                    tokenizer={"files": tok},
                    files=integrity.hash_tree(tmp),
                )
                m = manifest.write(tmp, record)
                source_check.result()  # a changed source file: nothing is committed
        finally:
            source_check.close()
            reader.close()
    log.info("exported %s -> %s in %.1fs", load, save, time.time() - t0)
    return m


__all__ = ["hf_to_megatron", "megatron_to_hf"]
