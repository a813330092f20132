"""Dense source checkpoints, read a layer at a time: HF safetensors folders and megatron-core
torch_dist checkpoints saved at any TP/PP (or a training run through its `latest` pointer).

Everything a user can get wrong about a set of sources is checked before a tensor is read: the
config matches the weights (names and shapes), the sources share architecture, vocabulary and
tokenizer. HF tensors are read with plain `pread`s (not mmap, whose touched pages would count as
resident memory for as long as the file stays open); megatron tensors through the checkpoint's own
chunk index (:class:`~megatron_btx.checkpoint.dcp_stream.PartialReader`), only the chunks a layer
needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_btx import rundir
from megatron_btx.checkpoint import manifest, template
from megatron_btx.checkpoint.dcp_stream import PartialReader, read_metadata
from megatron_btx.checkpoint.families import LlamaAdapter, export_adapter
from megatron_btx.checkpoint.families import parse as parse_hf_config
from megatron_btx.checkpoint.hf import ST_DTYPES, HFReader, PreadSafetensors, tokenizer_files
from megatron_btx.checkpoint.mapping import (
    EMB,
    FC1,
    FC2,
    FINAL_LN,
    LN1,
    LN2,
    PROJ,
    QKV,
    pad_vocab,
    qkv_to_mcore,
)
from megatron_btx.errors import BTXError
from megatron_btx.inputs import inside, read_json
from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_for_checkpoint, to_dtype

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
#: Fields of LlamaArgs that must agree across sources (everything that defines the function).
ARCH_FIELDS = [f.name for f in dataclasses.fields(LlamaArgs) if f.name != "extra"]


class BufferPool:
    """Tensors reused from one layer to the next, by name: every layer has the same shapes, so
    each buffer's memory is mapped once. Writing into mapped memory is several times faster than
    into a fresh allocation, whose page faults (the kernel zeroing every page) dominated the
    merge's time. A buffer is valid until the next `get` of its name."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(tuple(shape), dtype=dtype)
        return buf

    def drop(self, *names: str) -> None:
        """Free these buffers (the memory goes back to the system when nothing else holds it)."""
        for name in names:
            self._buffers.pop(name, None)

    def cast(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t.to(dtype)` into buffer `name` (t itself when it already has that dtype)."""
        if t.dtype == dtype:
            return t
        return self.get(name, t.shape, dtype).copy_(t)


@dataclasses.dataclass
class TokenizerInfo:
    folder: Path | None = None
    sha256: str | None = None  # of the defining file (tokenizer.model or tokenizer.json)
    files: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, folder: Path | None) -> TokenizerInfo:
        if folder is None or not folder.is_dir():
            return cls()
        files = tokenizer_files(folder)  # regular files inside the folder, links refused
        for main_file in ("tokenizer.model", "tokenizer.json"):
            if main_file in files:
                return cls(folder, manifest.sha256_file(folder / main_file), files)
        return cls(folder if files else None, None, files)


@dataclasses.dataclass
class Source:
    """One dense input checkpoint: HF safetensors folder or megatron torch_dist checkpoint."""

    given: Path
    folder: Path
    fmt: str  # "hf" | "megatron"
    args: LlamaArgs
    dtype: torch.dtype
    step: int | None
    tokenizer: TokenizerInfo
    #: the files whose sha256 the merge records
    hash_files: list[Path]
    source_manifest: dict[str, Any] | None = None
    #: HF: {tensor name: shape}; megatron: the checkpoint's DCP metadata
    hf_shapes: dict[str, list[int]] | None = None
    metadata: Any = None
    _safetensors: PreadSafetensors | None = None
    _template: dict[str, Any] | None = None
    _reader: PartialReader | None = None
    _pool: BufferPool | None = None
    _saved_dtypes: dict[str, torch.dtype] | None = None
    #: an MoE source's shape beyond Mixtral's (:func:`open_source` with ``moe=True``)
    variant: MoEVariant | None = None

    @property
    def name(self) -> str:
        return str(self.given)

    @property
    def adapter(self) -> LlamaAdapter:
        return export_adapter(self.args)

    @property
    def template(self) -> dict[str, Any]:
        """The megatron model's flat sharded-state-dict template (megatron sources; built on the
        meta device on first use, inside a runtime)."""
        if self._template is None:
            self._template = template.flat_template(
                build_for_checkpoint(self.args, self.dtype, self.variant, meta=True)
            )
            _check_megatron_keys(self)
        return self._template

    # ---- reading (megatron names, unsharded) ----------------------------------------------
    @contextlib.contextmanager
    def reused_buffers(self) -> Iterator[None]:
        """Within this, `layer(i)` of an HF source returns the same buffers for every layer,
        overwritten by the next call: the caller must be done with layer i (written, averaged)
        before it asks for layer i+1. Every layer has the same shapes, so the memory is mapped
        once; a fresh allocation per tensor cost more in page faults than the read itself."""
        self._pool = BufferPool()
        try:
            yield
        finally:
            self._pool = None

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors by short megatron name (mapping.DENSE_LAYER, plus the
        family's attention extras: mapping.attention_and_norms; an MoE source's experts, router
        and shared expert instead of the FFN)."""
        if self.fmt == "megatron":
            prefix = template.layer_prefix(layer)
            return template.read_prefix(
                self._partial_reader(), self.template, prefix, self._dtypes()
            )
        return self._hf_layer(layer)

    def _hf_layer(self, layer: int) -> dict[str, torch.Tensor]:
        names, pool, safetensors = self.adapter.layer_names(layer), self._pool, self._safetensors

        def read(role: str, out: torch.Tensor | None = None) -> torch.Tensor:
            key = names[role]
            if out is None and pool is not None and key in safetensors:
                out = pool.get(role, safetensors.shape(key), ST_DTYPES[safetensors.dtype(key)])
            return self._hf_get(key, out)

        gate, up = names["gate"], names["up"]
        gate_shape = safetensors.shape(gate) if gate in safetensors else None
        if (
            pool is not None
            and gate_shape
            and up in safetensors
            and gate_shape == safetensors.shape(up)
        ):
            # gate and up read straight into the two halves of the fused fc1
            fc1 = pool.get(
                FC1, [2 * gate_shape[0], gate_shape[1]], ST_DTYPES[safetensors.dtype(gate)]
            )
            read("gate", fc1[: gate_shape[0]])
            read("up", fc1[gate_shape[0] :])
        else:
            fc1 = torch.cat([read("gate"), read("up")])
        q, k, v = read("q"), read("k"), read("v")
        qkv_rows = q.shape[0] + k.shape[0] + v.shape[0]
        qkv_out = None if pool is None else pool.get(QKV, [qkv_rows, q.shape[1]], q.dtype)
        tensors = {
            LN1: read("ln1"),
            QKV: qkv_to_mcore(q, k, v, self.args, out=qkv_out),
            PROJ: read("o"),
            LN2: read("ln2"),
            FC1: fc1,
            FC2: read("down"),
        }
        # the family's attention extras (q/k/v biases, QK-norm): a few vectors, read plainly
        tensors.update(self.adapter.attention_extras_from_hf(names, self._hf_get))
        return tensors

    def global_tensor(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """EMB / FINAL_LN / OUT (embedding and output padded to the padded vocabulary). With
        `pool`, an HF tensor is read into its buffer "read.global" (valid until the next call)."""
        if self.fmt == "megatron":
            return template.read_prefix(
                self._partial_reader(), self.template, name, self._dtypes()
            )[name]
        key = self.adapter.global_names()[name]
        safetensors = self._safetensors
        out = None
        if pool is not None and key in safetensors:
            out = pool.get("read.global", safetensors.shape(key), ST_DTYPES[safetensors.dtype(key)])
        tensor = self._hf_get(key, out)
        return tensor if name == FINAL_LN else pad_vocab(tensor, self.args)

    def _hf_get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._safetensors.get(key, out)
        except KeyError as e:
            raise BTXError(f"{self.folder}: tensor {key!r} is missing") from e

    def _partial_reader(self) -> PartialReader:
        if self._reader is None:
            self._reader = PartialReader(self.folder)
        return self._reader

    def _dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each tensor was saved in (read as saved, cast by the caller)."""
        if self._saved_dtypes is None:
            self._saved_dtypes = {
                key: md.properties.dtype
                for key, md in self.metadata.state_dict_metadata.items()
                if hasattr(md, "properties")
            }
        return self._saved_dtypes

    def model_keys(self) -> list[str]:
        """Every model tensor of this source: HF names, or megatron checkpoint keys."""
        if self.fmt == "hf":
            return sorted(self.hf_shapes)
        md = self.metadata.state_dict_metadata
        return sorted(
            {
                entry.key
                for entry in self.template.values()
                if hasattr(entry, "key") and hasattr(md.get(entry.key, None), "size")
            }
        )

    def other_keys(self) -> list[str]:
        """Tensors of a megatron checkpoint that are not model weights (optimizer state)."""
        if self.fmt == "hf":
            return []
        model = set(self.model_keys())
        md = self.metadata.state_dict_metadata
        return sorted(k for k, v in md.items() if hasattr(v, "size") and k not in model)

    def close(self) -> None:
        if self._safetensors is not None:
            self._safetensors.close()
        if self._reader is not None:
            self._reader.close()


def open_source(path: str | Path, moe: bool = False) -> Source:
    """Open and validate one source (no tensor is read): a dense model, or with `moe` an MoE
    megatron checkpoint (the one `btx merge --into` adds experts to)."""
    given = Path(path)
    if not given.exists():
        raise BTXError(f"{given}: source checkpoint does not exist")
    folder = rundir.resolve_checkpoint(given)
    if folder is not None:
        return _open_megatron(given, folder, moe)
    if moe:
        raise BTXError(
            f"{given}: not a megatron MoE checkpoint (no metadata.json, no checkpoints/latest); "
            f"import an HF MoE first with `btx import-hf`"
        )
    if not given.is_dir():
        raise BTXError(f"{given}: not a folder")
    if not (given / "config.json").is_file():
        raise BTXError(
            f"{given}: neither an HF checkpoint (no config.json) nor a megatron torch_dist "
            f"checkpoint (no metadata.json, no checkpoints/latest)"
        )
    return _open_hf(given)


def _open_megatron(given: Path, folder: Path, moe: bool = False) -> Source:
    from megatron_btx.checkpoint.megatron_io import read_args

    source_manifest = manifest.read(folder)
    metadata = read_metadata(folder)
    args = read_args(folder, metadata)  # checked against the metadata: before any model is built
    if moe and not args.is_moe:
        raise BTXError(f"{given}: is a dense model; experts are added to an MoE checkpoint")
    if args.is_moe and not moe:
        raise BTXError(
            f"{given}: is already an MoE ({args.num_local_experts} experts); every source must "
            f"be a dense model"
        )
    step = source_manifest.get("step")
    if step is None:
        match = re.match(r"iter_(\d+)$", folder.name)
        step = int(match.group(1)) if match else None
    emb = metadata.state_dict_metadata.get(EMB)
    dtype = (
        emb.properties.dtype if emb is not None else to_dtype(source_manifest.get("dtype", "fp32"))
    )
    files = sorted(
        p
        for p in folder.iterdir()
        if p.name != manifest.MANIFEST and inside(folder, p).is_file()  # links out refused
    )
    return Source(
        given,
        folder,
        "megatron",
        args,
        dtype,
        step,
        TokenizerInfo.of(inside(folder, folder / TOKENIZER_DIR, "tokenizer folder")),
        files,
        source_manifest=source_manifest,
        metadata=metadata,
        variant=MoEVariant.from_manifest(source_manifest.get("moe")) if moe else None,
    )


def _open_hf(given: Path) -> Source:
    config_path = given / "config.json"
    config = read_json(inside(given, config_path, "config.json"), "config.json")
    hf_model = parse_hf_config(config, str(config_path))
    args = hf_model.args
    if args.is_moe:
        raise BTXError(
            f"{given}: is already an MoE (model_type {hf_model.model_type}); every source must be "
            f"a dense model (llama, mistral, qwen2 or qwen3)"
        )
    reader = HFReader(given)  # validates every shard (truncation, index) before anything is read
    keys = reader.keys()
    adapter = export_adapter(args)
    adapter.check_hf_keys(keys, str(given))
    check_hf_tensors(reader, adapter.hf_shapes(), given)
    emb_key = adapter.global_names()[EMB]
    dtype = ST_DTYPES.get(reader.dtype(emb_key))
    if dtype is None:
        raise BTXError(
            f"{given}: embedding dtype {reader.dtype(emb_key)} is not supported (use fp32, bf16 "
            f"or fp16)"
        )
    step = None
    trainer_state = given / "trainer_state.json"
    if trainer_state.is_file():
        with contextlib.suppress(Exception):
            step = int(read_json(inside(given, trainer_state), limit=1 << 20).get("global_step"))
    source = Source(
        given,
        given,
        "hf",
        args,
        dtype,
        step,
        TokenizerInfo.of(given),
        list(reader.files),
        hf_shapes={k: reader.shape(k) for k in keys},
    )
    source._safetensors = PreadSafetensors(reader.files)
    return source


def check_hf_tensors(reader: HFReader, shapes, folder: Path) -> None:
    """Every tensor the config implies has its shape and a dtype we read (F32, BF16, F16)."""
    for key, shape in shapes:
        got = tuple(reader.shape(key))
        if got != tuple(shape):
            raise BTXError(
                f"{folder}: tensor {key!r} has shape {got}, config.json implies {tuple(shape)}; "
                f"the weights do not match the config"
            )
        if reader.dtype(key) not in ST_DTYPES:
            raise BTXError(
                f"{reader.file_of(key)}: tensor {key!r} has dtype {reader.dtype(key)}; only "
                f"F32/BF16/F16 are supported"
            )


def check_sources(sources: Sequence[Source], ignore: Sequence[str] = ()) -> None:
    """Same architecture, vocabulary and tokenizer everywhere; else name the sources and key
    (`ignore`: LlamaArgs fields allowed to differ, e.g. an MoE's expert fields)."""
    ref = sources[0]
    for source in sources[1:]:
        for field in (f for f in ARCH_FIELDS if f not in ignore):
            mine, theirs = getattr(ref.args, field), getattr(source.args, field)
            if mine != theirs:
                what = "vocabularies differ" if field == "vocab_size" else "architectures differ"
                raise BTXError(
                    f"sources {ref.name} and {source.name}: {what}: {field} = {mine!r} vs "
                    f"{theirs!r}; every source must be a copy of the same seed model (same config "
                    f"and tokenizer)"
                )
    with_tok = [s for s in sources if s.tokenizer.sha256]
    for source in with_tok[1:]:
        if source.tokenizer.sha256 != with_tok[0].tokenizer.sha256:
            raise BTXError(
                f"sources {with_tok[0].name} and {source.name}: tokenizers differ (sha256 "
                f"{with_tok[0].tokenizer.sha256[:12]} vs {source.tokenizer.sha256[:12]}); the "
                f"experts must share one vocabulary"
            )
    missing = [s.name for s in sources if not s.tokenizer.sha256]
    if missing and with_tok:
        log.warning(
            "no tokenizer in %s: cannot check that it matches the others", ", ".join(missing)
        )


def _check_megatron_keys(source: Source) -> None:
    """Every model tensor the config implies is in the checkpoint with the right global shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    md = source.metadata.state_dict_metadata
    seen = set()
    for entry in source._template.values():
        if isinstance(entry, ShardedObject) or entry.key in seen:
            continue
        seen.add(entry.key)
        got = md.get(entry.key)
        if got is None or not hasattr(got, "size"):
            raise BTXError(
                f"{source.folder}: tensor {entry.key!r} is missing; the checkpoint does not match "
                f"its manifest (layers={source.args.num_hidden_layers})"
            )
        if isinstance(entry, ShardedTensorFactory):
            continue  # factories reshape on load; their shapes are checked by megatron-core
        if tuple(got.size) != tuple(entry.global_shape):
            raise BTXError(
                f"{source.folder}: tensor {entry.key!r} has global shape {tuple(got.size)}, the "
                f"manifest implies {tuple(entry.global_shape)}"
            )
