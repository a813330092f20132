"""The BTX merge: N dense Llama checkpoints -> one megatron-core MoE checkpoint, layer by layer.

Semantics (Branch-Train-MiX, arXiv 2403.07816): in every layer, source i's SwiGLU FFN becomes MoE
expert i unchanged (bit for bit); every other tensor (attention, norms, embeddings, output layer)
is the average of the sources' tensors, computed in fp32 (optionally weighted) and cast to the
output dtype; each layer gets a new router (random, zero, or per-expert centroids of domain
data). Variants: each FFN split into C chunks (N*C experts), blending (expert c made of chunk c of
every source), the seed's FFN as a megatron-core shared expert, and MoE in only some layers
(megatron-core `moe_layer_freq`; the other layers keep a dense FFN).

Memory is bounded by one layer, not the model:
- the output's layout comes from megatron-core itself: the MoE GPTModel is built on the `meta`
  device (no storage) and its `sharded_state_dict()` names every checkpoint key, global shape and
  chunk; each layer's entries are filled with the merged tensors and written by
  :class:`~megatron_btx.checkpoint.dcp_stream.StreamingDCPWriter`, then dropped;
- HF sources are read one tensor at a time with plain `pread`s (not mmap, whose touched pages
  would count as resident memory for as long as the file stays open); megatron sources are read
  one layer at a time with megatron-core's own load strategy (any TP/PP they were saved at);
- `--export-hf` streams the same merged tensors into safetensors shards whose headers are
  planned up front, so nothing is buffered.

Everything a user can get wrong is checked before the first byte is written (same architecture,
vocabulary, tokenizer, key set and shapes; layout); the output folder is written under a
temporary name, verified if asked, and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_btx import progress, runtime
from megatron_btx.checkpoint import manifest
from megatron_btx.checkpoint.dcp_stream import PartialReader, StreamingDCPWriter, read_metadata
from megatron_btx.checkpoint.direct_io import DirectWriter
from megatron_btx.checkpoint.hf import (
    INDEX_NAME,
    SINGLE_NAME,
    ST_DTYPES,
    TOKENIZER_FILES,
    HFReader,
    PreadSafetensors,
    copy_tokenizer,
)
from megatron_btx.checkpoint.mapping import (
    check_hf_keys,
    hf_layer_names,
    pad_vocab,
    qkv_from_mcore,
    qkv_to_mcore,
)
from megatron_btx.checkpoint.megatron_io import atomic_folder, check_target, is_checkpoint
from megatron_btx.errors import BTXError
from megatron_btx.models.llama import LlamaArgs, check_parallel, to_dtype

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_ST_DTYPES = ST_DTYPES
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# Per-layer tensors of a dense source, by megatron-core (local spec, unsharded) name.
LN1 = "input_layernorm.weight"
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
LN2 = "pre_mlp_layernorm.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
DENSE_LAYER = (LN1, QKV, PROJ, LN2, FC1, FC2)
AVERAGED_LAYER = (LN1, QKV, PROJ, LN2)
EMB = "embedding.word_embeddings.weight"
FINAL_LN = "decoder.final_layernorm.weight"
OUT = "output_layer.weight"

#: Fields of LlamaArgs that must agree across sources (everything that defines the function).
_ARCH_FIELDS = [f.name for f in dataclasses.fields(LlamaArgs) if f.name != "extra"]


# =============================================================================================
# Sources
# =============================================================================================
def _tokenizer_info(folder: Path | None) -> tuple[Path | None, str | None, list[str]]:
    """(folder, sha256 of the tokenizer's defining file, files present)."""
    if folder is None or not folder.is_dir():
        return None, None, []
    files = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    for main_file in ("tokenizer.model", "tokenizer.json"):
        if (folder / main_file).is_file():
            return folder, manifest.sha256_file(folder / main_file), files
    return (folder if files else None), None, files


@dataclasses.dataclass
class Source:
    """One dense input checkpoint: HF safetensors folder or megatron torch_dist checkpoint."""

    given: Path
    folder: Path
    fmt: str  # "hf" | "megatron"
    args: LlamaArgs
    dtype: torch.dtype
    step: int | None
    tokenizer_dir: Path | None
    tokenizer_sha256: str | None
    tokenizer_files: list[str]
    hash_files: list[Path]
    source_manifest: dict[str, Any] | None = None
    # runtime handles
    _st: PreadSafetensors | None = None
    _hf_keys: dict[str, list[int]] | None = None
    _template: dict[str, Any] | None = None
    _ckpt_md: Any = None
    _reader: PartialReader | None = None
    #: per-layer read buffers, reused from one layer to the next (see `reused_buffers`)
    _pool: BufferPool | None = None

    @property
    def name(self) -> str:
        return str(self.given)

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

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors by short megatron name (see DENSE_LAYER)."""
        if self.fmt == "hf":
            a, n, pool = self.args, hf_layer_names(self.args, i), self._pool

            def g(role: str, out: torch.Tensor | None = None) -> torch.Tensor:
                key = n[role]
                if out is None and pool is not None and key in self._st:
                    out = pool.get(role, self._st.shape(key), ST_DTYPES[self._st.dtype(key)])
                return self._hf_get(key, out)

            gate_shape = self._st.shape(n["gate"]) if n["gate"] in self._st else None
            up_shape = self._st.shape(n["up"]) if n["up"] in self._st else None
            if gate_shape and gate_shape == up_shape and pool is not None:
                # gate and up read straight into the two halves of the fused fc1
                dt = ST_DTYPES[self._st.dtype(n["gate"])]
                fc1 = pool.get(FC1, [2 * gate_shape[0], gate_shape[1]], dt)
                g("gate", fc1[: gate_shape[0]])
                g("up", fc1[gate_shape[0] :])
            else:
                fc1 = torch.cat([g("gate"), g("up")])
            q, k, v = g("q"), g("k"), g("v")
            qkv_out = (
                None
                if pool is None
                else pool.get(QKV, [q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]], q.dtype)
            )
            qkv = qkv_to_mcore(q, k, v, a, out=qkv_out)
            return {
                LN1: g("ln1"),
                QKV: qkv,
                PROJ: g("o"),
                LN2: g("ln2"),
                FC1: fc1,
                FC2: g("down"),
            }
        prefix = f"decoder.layers.{i}."
        got = self._mcore_load(prefix)
        return {k[len(prefix) :]: v for k, v in got.items()}

    def globals_(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """EMB / FINAL_LN / OUT (embedding and output padded to the padded vocabulary). With
        `pool`, an HF tensor is read into its buffer "read.global" (valid until the next call)."""
        if self.fmt == "hf":
            a = self.args
            key = {
                EMB: "model.embed_tokens.weight",
                FINAL_LN: "model.norm.weight",
                OUT: "lm_head.weight",
            }[name]
            out = None
            if pool is not None and key in self._st:
                out = pool.get("read.global", self._st.shape(key), ST_DTYPES[self._st.dtype(key)])
            t = self._hf_get(key, out)
            return t if name == FINAL_LN else pad_vocab(t, a)
        return self._mcore_load(name)[name]

    def _hf_get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._st.get(key, out)
        except KeyError as e:
            raise BTXError(f"{self.folder}: tensor {key!r} is missing") from e

    def _mcore_load(self, prefix: str) -> dict[str, torch.Tensor]:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        sub = {}
        for k, v in self._template.items():
            if (k == prefix or k.startswith(prefix)) and not isinstance(v, ShardedObject):
                dt = self._ckpt_md.state_dict_metadata[v.key].properties.dtype
                sub[k] = dataclasses.replace(v, data=torch.empty(v.data.shape, dtype=dt))
        if not sub:
            raise BTXError(f"{self.folder}: no tensors under {prefix!r}")
        if self._reader is None:
            self._reader = PartialReader(self.folder)
        return self._reader.load(sub)

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        if self._reader is not None:
            self._reader.close()


def resolve_megatron_folder(path: Path) -> Path | None:
    """A checkpoint folder, or a run / checkpoints folder whose `latest` names one."""
    if is_checkpoint(path):
        return path
    for cand in (path, path / "checkpoints"):
        latest = cand / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            target = cand / name
            if not is_checkpoint(target):
                raise BTXError(
                    f"{latest} names {name!r}, but {target} is not a complete torch_dist "
                    f"checkpoint (no metadata.json)"
                )
            return target
    return None


def _hf_expected_shapes(a: LlamaArgs) -> dict[str, tuple[int, ...]]:
    H, F, V = a.hidden_size, a.intermediate_size, a.vocab_size
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(a.num_hidden_layers):
        n = hf_layer_names(a, i)
        out.update(
            {
                n["ln1"]: (H,),
                n["q"]: (q, H),
                n["k"]: (kv, H),
                n["v"]: (kv, H),
                n["o"]: (H, q),
                n["ln2"]: (H,),
                n["gate"]: (F, H),
                n["up"]: (F, H),
                n["down"]: (H, F),
            }
        )
    return out


def open_source(path: str | Path) -> Source:
    """Open and validate one source (no tensor is read)."""
    given = Path(path)
    if not given.exists():
        raise BTXError(f"{given}: source checkpoint does not exist")
    mfolder = resolve_megatron_folder(given)
    if mfolder is not None:
        from megatron_btx.checkpoint.megatron_io import read_args

        m = manifest.read(mfolder)
        args = read_args(mfolder)
        if args.is_moe:
            raise BTXError(
                f"{given}: is already an MoE ({args.num_local_experts} experts); "
                f"every source must be a dense Llama"
            )
        md = read_metadata(mfolder)
        step = m.get("step")
        if step is None:
            mm = re.match(r"iter_(\d+)$", mfolder.name)
            step = int(mm.group(1)) if mm else None
        tok_dir, tok_sha, tok_files = _tokenizer_info(mfolder / TOKENIZER_DIR)
        emb = md.state_dict_metadata.get(EMB)
        dtype = emb.properties.dtype if emb is not None else to_dtype(m.get("dtype", "fp32"))
        files = sorted(p for p in mfolder.iterdir() if p.is_file() and p.name != manifest.MANIFEST)
        return Source(
            given,
            mfolder,
            "megatron",
            args,
            dtype,
            step,
            tok_dir,
            tok_sha,
            tok_files,
            files,
            source_manifest=m,
            _ckpt_md=md,
        )
    if not given.is_dir():
        raise BTXError(f"{given}: not a folder")
    if not (given / "config.json").is_file():
        raise BTXError(
            f"{given}: neither an HF checkpoint (no config.json) nor a megatron torch_dist "
            f"checkpoint (no metadata.json, no checkpoints/latest)"
        )
    args = LlamaArgs.from_hf_config_file(given / "config.json")
    if args.is_moe:
        raise BTXError(
            f"{given}: is already an MoE (model_type mixtral); every source must be a dense Llama"
        )
    reader = HFReader(given)  # validates every shard (truncation, index) before anything is read
    keys = reader.keys()
    try:
        check_hf_keys(keys, args, str(given))
    except BTXError as e:
        raise BTXError(str(e)) from None
    want = _hf_expected_shapes(args)
    for k, shape in want.items():
        got = tuple(reader.shape(k))
        if got != shape:
            raise BTXError(
                f"{given}: tensor {k!r} has shape {got}, config.json implies {shape}; the weights "
                f"do not match the config"
            )
    dt = _ST_DTYPES.get(reader.dtype("model.embed_tokens.weight"))
    if dt is None:
        raise BTXError(
            f"{given}: embedding dtype {reader.dtype('model.embed_tokens.weight')} is "
            f"not supported (use fp32, bf16 or fp16)"
        )
    step = None
    ts = given / "trainer_state.json"
    if ts.is_file():
        with contextlib.suppress(Exception):
            step = int(json.loads(ts.read_text()).get("global_step"))
    tok_dir, tok_sha, tok_files = _tokenizer_info(given)
    src = Source(
        given, given, "hf", args, dt, step, tok_dir, tok_sha, tok_files, list(reader.files)
    )
    src._st = PreadSafetensors(reader.files)
    src._hf_keys = {k: reader.shape(k) for k in keys}
    return src


def check_sources(sources: Sequence[Source]) -> None:
    """Same architecture, vocabulary and tokenizer everywhere; else name the sources and key."""
    ref = sources[0]
    for s in sources[1:]:
        for f in _ARCH_FIELDS:
            a, b = getattr(ref.args, f), getattr(s.args, f)
            if a != b:
                what = "vocabularies differ" if f == "vocab_size" else "architectures differ"
                raise BTXError(
                    f"sources {ref.name} and {s.name}: {what}: {f} = {a!r} vs {b!r}; every source "
                    f"must be a copy of the same seed model (same config and tokenizer)"
                )
    with_tok = [s for s in sources if s.tokenizer_sha256]
    for s in with_tok[1:]:
        if s.tokenizer_sha256 != with_tok[0].tokenizer_sha256:
            raise BTXError(
                f"sources {with_tok[0].name} and {s.name}: tokenizers differ (sha256 "
                f"{with_tok[0].tokenizer_sha256[:12]} vs {s.tokenizer_sha256[:12]}); the experts "
                f"must share one vocabulary"
            )
    missing = [s.name for s in sources if not s.tokenizer_sha256]
    if missing and with_tok:
        log.warning(
            "no tokenizer in %s: cannot check that it matches the others", ", ".join(missing)
        )


# =============================================================================================
# The plan: what each output tensor is made of
# =============================================================================================
@dataclasses.dataclass
class MergePlan:
    """Everything that decides the output, recorded in the manifest."""

    n_sources: int
    expert_sources: list[int]  # routed expert j (before splitting) <- source index
    weights: list[float]  # per source, for the averages
    split_chunks: int = 1
    blend: bool = False
    shared_source: int | None = None  # source whose FFN is the shared expert
    moe_layers: list[int] | None = None  # None: every layer
    dense_ffn: str = "average"  # FFN of non-MoE layers: average | seed (last source)
    router_init: str = "random"
    router_std: float = 0.02
    router_seed: int = 1234
    top_k: int = 2
    dtype: str = "bf16"

    @property
    def num_experts(self) -> int:
        if self.blend:
            return self.split_chunks
        return len(self.expert_sources) * self.split_chunks

    def expert_size(self, F: int) -> int:
        if self.blend:
            return F * len(self.expert_sources) // self.split_chunks
        return F // self.split_chunks

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_layers is None or i in self.moe_layers

    def layer_freq(self, L: int) -> list[int] | None:
        if self.moe_layers is None:
            return None
        return [1 if i in self.moe_layers else 0 for i in range(L)]


def output_args(src: LlamaArgs, plan: MergePlan) -> LlamaArgs:
    d = src.to_dict()
    d.update(
        num_local_experts=plan.num_experts,
        num_experts_per_tok=plan.top_k,
        intermediate_size=plan.expert_size(src.intermediate_size),
    )
    return LlamaArgs.from_dict(d)


def moe_overrides(src: LlamaArgs, plan: MergePlan) -> dict[str, Any]:
    """TransformerConfig fields beyond LlamaArgs that the variants need."""
    kw: dict[str, Any] = {}
    if plan.shared_source is not None:
        kw["moe_shared_expert_intermediate_size"] = src.intermediate_size
    if plan.moe_layers is not None:
        kw["moe_layer_freq"] = plan.layer_freq(src.num_hidden_layers)
        kw["ffn_hidden_size"] = src.intermediate_size  # dense layers keep the full FFN
    return kw


def moe_extra_fields(src: LlamaArgs, plan: MergePlan) -> dict[str, Any]:
    """The manifest's `moe` entry: what a loader must pass to megatron-core beyond LlamaArgs."""
    return {
        "shared_expert_intermediate_size": (
            src.intermediate_size if plan.shared_source is not None else None
        ),
        "layer_freq": plan.layer_freq(src.num_hidden_layers),
        "dense_ffn_hidden_size": src.intermediate_size if plan.moe_layers is not None else None,
    }


def overrides_from_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """TransformerConfig overrides a loader needs for a merged checkpoint's variants (from the
    manifest's `moe` entry; empty for a plain Mixtral-shaped MoE)."""
    moe = m.get("moe") or {}
    kw: dict[str, Any] = {}
    if moe.get("shared_expert_intermediate_size"):
        kw["moe_shared_expert_intermediate_size"] = moe["shared_expert_intermediate_size"]
    if moe.get("layer_freq"):
        kw["moe_layer_freq"] = list(moe["layer_freq"])
        kw["ffn_hidden_size"] = moe["dense_ffn_hidden_size"]
    return kw


def build_gpt(
    args: LlamaArgs,
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
    meta: bool = False,
    **kw: Any,
):
    """megatron-core GPTModel for `args` plus variant overrides (shared expert: a TransformerConfig
    field; MoE in some layers: megatron-core's decoder-block spec). Call after runtime.init."""
    from megatron_btx.models.llama import build_model, llama3_inv_freq, transformer_config

    overrides = dict(overrides or {})
    kw.setdefault("spec", "local")
    kw.setdefault("fused", False)

    def make():
        if "moe_layer_freq" not in overrides:
            return build_model(args, dtype=dtype, perform_initialization=False, **kw, **overrides)
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        kw.pop("spec", None)
        pre = kw.pop("pre_process", None)
        post = kw.pop("post_process", None)
        config = transformer_config(
            args, dtype=dtype, perform_initialization=False, **kw, **overrides
        )
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_decoder_block_spec(
                config, use_transformer_engine=False, normalization="RMSNorm"
            ),
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage() if pre is None else pre,
            post_process=ps.is_pipeline_last_stage() if post is None else post,
            share_embeddings_and_output_weights=args.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(args.rope_theta)
            if float(args.rope_theta).is_integer()
            else args.rope_theta,
            rotary_percent=1.0,
        )
        if args.rope_scaling:
            rope = model.rotary_pos_emb
            rope.inv_freq = llama3_inv_freq(args).to(rope.inv_freq.device, rope.inv_freq.dtype)
        return model

    if not meta:
        return make()
    with _meta_device():
        model = make()
    on = {p.device.type for p in model.parameters()}
    if on != {"meta"}:
        log.warning("template model not on the meta device (%s); it costs memory", on)
    return model


@contextlib.contextmanager
def _meta_device():
    """`with torch.device('meta')` that also sees through megatron_btx.runtime.cpu's wrappers of
    torch factories (the device context only intercepts the functions it knew when first used;
    the wrappers call the originals, which it must also know)."""
    import torch.utils._device as tud

    cons = tud._device_constructors()
    for name in dir(torch):
        f = getattr(torch, name, None)
        w = getattr(f, "__wrapped__", None)
        if w is not None and getattr(f, "__btx_wrapped__", False):
            cons.add(w)
    with torch.device("meta"):
        yield


def _flat_template(model) -> dict[str, Any]:
    """The model's sharded state dict: {state-dict name: ShardedTensor / factory / object}."""
    return dict(model.sharded_state_dict())


# =============================================================================================
# Per-layer merge
# =============================================================================================
def _chunk_fc(
    fc1: torch.Tensor, fc2: torch.Tensor, c: int, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    F = fc2.shape[1]
    f = F // C
    gate, up = fc1[:F], fc1[F:]
    return (
        torch.cat([gate[c * f : (c + 1) * f], up[c * f : (c + 1) * f]]),
        fc2[:, c * f : (c + 1) * f].contiguous(),
    )


def expert_tensors(
    plan: MergePlan, ffn: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fc1, fc2) of each routed expert, from the sources' (fc1=[gate; up], fc2=down)."""
    C = plan.split_chunks
    out = []
    if plan.blend:
        for c in range(C):
            parts = [_chunk_fc(*ffn[s], c, C) for s in plan.expert_sources]
            F = parts[0][1].shape[1]
            gate = torch.cat([p[0][:F] for p in parts])
            up = torch.cat([p[0][F:] for p in parts])
            out.append((torch.cat([gate, up]), torch.cat([p[1] for p in parts], dim=1)))
        return out
    for s in plan.expert_sources:
        if C == 1:
            out.append(ffn[s])
        else:
            out.extend(_chunk_fc(*ffn[s], c, C) for c in range(C))
    return out


def random_router(plan: MergePlan, layer: int, shape: tuple[int, int]) -> torch.Tensor:
    """Reproducible per layer (so --verify and re-runs regenerate it exactly)."""
    if plan.router_init == "zero":
        return torch.zeros(shape, dtype=torch.float32)
    g = torch.Generator().manual_seed(plan.router_seed * 100003 + layer)
    return torch.randn(shape, generator=g, dtype=torch.float32) * plan.router_std


class BufferPool:
    """Tensors reused from one layer to the next, by name: every layer has the same shapes, so
    each buffer's memory is mapped once. Writing into mapped memory is several times faster than
    into a fresh allocation, whose page faults (the kernel zeroing every page) dominated the
    merge's time. A buffer is valid until the next `get` of its name."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        b = self._bufs.get(name)
        if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dtype:
            b = self._bufs[name] = torch.empty(tuple(shape), dtype=dtype)
        return b

    def drop(self, *names: str) -> None:
        """Free these buffers (the memory goes back to the system when nothing else holds it)."""
        for n in names:
            self._bufs.pop(n, None)

    def cast(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t.to(dtype)` into buffer `name` (t itself when it already has that dtype)."""
        if t.dtype == dtype:
            return t
        return self.get(name, t.shape, dtype).copy_(t)


def _accumulate(
    acc: torch.Tensor | None,
    t: torch.Tensor,
    w: float,
    pool: BufferPool | None = None,
    name: str = "",
) -> torch.Tensor:
    """acc + w * fp32(t), in place; a new accumulator (from `pool` when given) when acc is None.
    Same bits as `acc += t.float() * w` (bf16/fp16 -> fp32 is exact)."""
    if acc is None:
        if pool is None:
            x = t.to(torch.float32)
            x = x.clone() if x is t else x
        else:
            x = pool.get("acc." + name, t.shape, torch.float32).copy_(t)
        return x.mul_(w) if w != 1.0 else x
    if pool is None or t.dtype == torch.float32:
        x = t.to(torch.float32)
    else:
        x = pool.get("cast." + name, t.shape, torch.float32).copy_(t)
    if w == 1.0:
        return acc.add_(x)
    return acc.add_(x * w if x is t else x.mul_(w))


class _Averager:
    """Weighted fp32 average of the same tensor across sources, accumulated one at a time."""

    def __init__(self, weights: Sequence[float], pool: BufferPool | None = None):
        self.weights = list(weights)
        self.total = float(sum(w for w in weights))
        self.acc: dict[str, torch.Tensor] = {}
        self.pool = pool

    def add(self, s: int, name: str, t: torch.Tensor) -> None:
        w = self.weights[s]
        if w == 0:
            return
        self.acc[name] = _accumulate(self.acc.get(name), t, w, self.pool, name)

    def result(self, name: str) -> torch.Tensor:
        a = self.acc.pop(name)
        return a.div_(self.total) if self.total != 1.0 else a


def merge_layer(
    plan: MergePlan,
    layer_of: Callable[[int], dict[str, torch.Tensor]],
    i: int,
    sources_order: Sequence[int],
    pool: BufferPool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Layer i of the MoE (fp32 averages, native-dtype experts; router not included) and the
    fp32 averaged FFN of a dense layer. `layer_of(s)` reads source s's layer i. With `pool`, the
    averages live in its buffers (valid until the next layer's merge)."""
    avg = _Averager(plan.weights, pool)
    ffn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    moe = plan.is_moe_layer(i)
    need_ffn = set(plan.expert_sources) | ({plan.shared_source} - {None})
    for s in sources_order:
        t = layer_of(s)
        for n in AVERAGED_LAYER:
            avg.add(s, n, t[n])
        if not moe and plan.dense_ffn == "average":
            avg.add(s, FC1, t[FC1])
            avg.add(s, FC2, t[FC2])
        if (moe and s in need_ffn) or (
            not moe and plan.dense_ffn == "seed" and s == plan.n_sources - 1
        ):
            ffn[s] = (t[FC1], t[FC2])
        del t
    out = {n: avg.result(n) for n in AVERAGED_LAYER}
    if not moe:
        if plan.dense_ffn == "average":
            out[FC1], out[FC2] = avg.result(FC1), avg.result(FC2)
        else:
            out[FC1], out[FC2] = ffn[plan.n_sources - 1]
        return out, {}
    for e, (f1, f2) in enumerate(expert_tensors(plan, ffn)):
        out[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = f1
        out[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = f2
    if plan.shared_source is not None:
        f1, f2 = ffn[plan.shared_source]
        out["mlp.shared_experts.linear_fc1.weight"] = f1
        out["mlp.shared_experts.linear_fc2.weight"] = f2
    return out, {}


# =============================================================================================
# HF Mixtral export, streamed
# =============================================================================================
class StreamingSafetensorsWriter:
    """Safetensors shards whose headers are written before their data: every tensor's name, shape
    and dtype is known up front, so each tensor goes to disk as it arrives and nothing is held."""

    def __init__(
        self,
        folder: Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int,
    ):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dt in plan:
            nb = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
            if self.shards[-1] and size + nb > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dt))
            size += nb
        self.total = sum(
            math.prod(s) * torch.tensor([], dtype=d).element_size() for _, s, d in plan
        )
        self._order = [n for n, _, _ in plan]
        self._pos = 0
        self._shard = -1
        self._fh = None
        self._left: list[str] = []
        n = len(self.shards)
        self.names = (
            [SINGLE_NAME]
            if n == 1
            else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )

    def _open_next(self) -> None:
        self._shard += 1
        items = self.shards[self._shard]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shape, dt in items:
            nb = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
            header[name] = {
                "dtype": _ST_NAMES[dt],
                "shape": list(shape),
                "data_offsets": [off, off + nb],
            }
            off += nb
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._fh = DirectWriter(self.folder / (self.names[self._shard] + ".tmp"))
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._left = [n for n, _, _ in items]

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            want = self._order[self._pos] if self._pos < len(self._order) else None
            raise RuntimeError(f"safetensors writer: got {name!r}, expected {want!r}")
        if not self._left:
            self._close_current()
            self._open_next()
        shard_items = self.shards[self._shard]
        _, shape, dt = shard_items[len(shard_items) - len(self._left)]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise RuntimeError(
                f"safetensors writer: {name} is {tuple(t.shape)} {t.dtype}, planned {shape} {dt}"
            )
        t = t.detach().contiguous().reshape(-1)
        if t.numel():
            self._fh.write(memoryview(t.view(torch.uint8).numpy()))
        self._left.pop(0)
        self._pos += 1

    def _close_current(self) -> None:
        if self._fh is not None:
            self._fh.close()  # fsync'd in close(), once
            self._fh = None

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(
                f"safetensors writer closed after {self._pos} of {len(self._order)} tensors"
            )
        self._close_current()
        for nm in self.names:
            fd = os.open(self.folder / (nm + ".tmp"), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.folder / (nm + ".tmp"), self.folder / nm)
        if len(self.names) > 1:
            wm = {
                name: self.names[k] for k, items in enumerate(self.shards) for name, _, _ in items
            }
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wm.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def hf_export_plan(a: LlamaArgs, dt: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """HF Mixtral tensors in the order the merge produces them."""
    H, F, V = a.hidden_size, a.intermediate_size, a.vocab_size
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    out = [("model.embed_tokens.weight", (V, H), dt)]
    for i in range(a.num_hidden_layers):
        n = hf_layer_names(a, i)
        out += [
            (n["ln1"], (H,), dt),
            (n["q"], (q, H), dt),
            (n["k"], (kv, H), dt),
            (n["v"], (kv, H), dt),
            (n["o"], (H, q), dt),
            (n["ln2"], (H,), dt),
            (n["router"], (a.num_local_experts, H), dt),
        ]
        for e in range(a.num_local_experts):
            out += [
                (n[f"e{e}.w1"], (F, H), dt),
                (n[f"e{e}.w3"], (F, H), dt),
                (n[f"e{e}.w2"], (H, F), dt),
            ]
    out.append(("model.norm.weight", (H,), dt))
    if not a.tie_word_embeddings:
        out.append(("lm_head.weight", (V, H), dt))
    return out


def hf_layer_tensors(
    a: LlamaArgs, i: int, t: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF Mixtral names and tensors of merged layer i (short megatron names in `t`)."""
    n = hf_layer_names(a, i)
    F = a.intermediate_size
    yield n["ln1"], t[LN1]
    q, k, v = qkv_from_mcore(t[QKV], a)
    yield n["q"], q
    yield n["k"], k
    yield n["v"], v
    yield n["o"], t[PROJ]
    yield n["ln2"], t[LN2]
    yield n["router"], t["mlp.router.weight"]
    for e in range(a.num_local_experts):
        fc1 = t[f"mlp.experts.local_experts.{e}.linear_fc1.weight"]
        yield n[f"e{e}.w1"], fc1[:F]
        yield n[f"e{e}.w3"], fc1[F:]
        yield n[f"e{e}.w2"], t[f"mlp.experts.local_experts.{e}.linear_fc2.weight"]


# =============================================================================================
# Centroid router
# =============================================================================================
def _load_centroid_tokens(
    spec: str, tokenizer_path: Path | None, n_tokens: int, seq_len: int
) -> torch.Tensor:
    """[num_seqs, seq_len] token ids from an indexed dataset prefix or a text / jsonl file."""
    p = Path(spec)
    ids: list[int] = []
    if Path(spec + ".idx").is_file() and Path(spec + ".bin").is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(spec, mmap=True)
        n_docs = len(ds)
        if n_docs == 0:
            raise BTXError(f"{spec}: the indexed dataset has no documents")
        stride = max(1, n_docs // max(1, n_tokens // max(1, seq_len)))
        d = 0
        while len(ids) < n_tokens and d < n_docs:
            ids.extend(int(x) for x in ds[d])
            d += stride
        if len(ids) < n_tokens:
            d = 1
            while len(ids) < n_tokens and d < n_docs:
                ids.extend(int(x) for x in ds[d])
                d += stride
    elif p.is_file():
        if tokenizer_path is None:
            raise BTXError(
                f"{spec}: a text file needs a tokenizer.model (SentencePiece) in the "
                f"sources or --tokenizer"
            )
        from megatron_btx.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer_path)
        lines = p.read_text(encoding="utf-8", errors="replace")
        if p.suffix == ".jsonl":
            texts = []
            for line in lines.splitlines():
                with contextlib.suppress(Exception):
                    texts.append(json.loads(line)["text"])
        else:
            texts = [lines]
        for text in texts:
            ids.extend(tok.encode(text))
            ids.append(tok.eos_id)
            if len(ids) >= n_tokens:
                break
    else:
        raise BTXError(
            f"--centroid-data {spec}: neither an indexed dataset prefix ({spec}.bin/.idx) "
            f"nor a text/jsonl file"
        )
    if len(ids) < seq_len:
        raise BTXError(f"--centroid-data {spec}: only {len(ids)} tokens; need at least {seq_len}")
    n = min(len(ids), n_tokens) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


class CentroidRouter:
    """Router rows = normalised mean router input (the hidden state after attention and the
    pre-MLP norm, i.e. exactly what the router sees) over each expert's domain sample, computed
    through the merged model's earlier layers (with their routers already set), one layer at a
    time with megatron-core's own TransformerLayer."""

    def __init__(
        self,
        args_dense: LlamaArgs,
        out_args: LlamaArgs,
        plan: MergePlan,
        tokens: dict[int, torch.Tensor],
        overrides: dict[str, Any],
    ):
        self.args_dense = args_dense
        self.out_args = out_args
        self.plan = plan
        self.tokens = tokens  # per source index: [n, S]
        self.overrides = overrides
        self.h: dict[int, torch.Tensor] = {}

    def embed(self, emb: torch.Tensor) -> None:
        for s, ids in self.tokens.items():
            self.h[s] = emb.to(torch.float32)[ids].transpose(0, 1).contiguous()  # [S, B, H]

    def _layer_model(self, moe: bool):
        a = dataclasses.replace(self.out_args if moe else self.args_dense, num_hidden_layers=1)
        ov = {k: v for k, v in self.overrides.items() if k not in ("moe_layer_freq",)}
        if not moe:
            ov = {}
        return build_gpt(a, torch.float32, ov, pre_process=False, post_process=False)

    @torch.no_grad()
    def run_layer(self, i: int, merged: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Set this layer's router (MoE layers) and advance every domain's hidden states."""
        moe = self.plan.is_moe_layer(i)
        model = self._layer_model(moe)
        model.eval()
        sd = model.state_dict()
        router = None
        for k in list(sd):
            if k.endswith("_extra_state"):
                continue
            short = k[len("decoder.layers.0.") :]
            if short == "mlp.router.weight":
                continue
            sd[k] = merged[short].to(torch.float32)
        if moe:
            E = self.out_args.num_local_experts
            sd["decoder.layers.0.mlp.router.weight"] = torch.zeros(E, self.out_args.hidden_size)
        model.load_state_dict(sd, strict=False)
        layer = model.decoder.layers[0]
        if moe:
            captured: dict[str, torch.Tensor] = {}
            hook = layer.mlp.router.register_forward_pre_hook(
                lambda mod, inp: captured.__setitem__("x", inp[0].detach().clone())
            )
            means = {}
            for s, h in self.h.items():
                layer(
                    hidden_states=h,
                    attention_mask=None,
                    rotary_pos_emb=model.rotary_pos_emb(h.shape[0]),
                )
                x = captured["x"].reshape(-1, h.shape[-1]).to(torch.float32)
                means[s] = x.mean(0)
            hook.remove()
            rows = []
            for s in _routed_expert_sources(self.plan):
                m = means[s]
                rows.append(m / m.norm().clamp_min(1e-12))
            router = torch.stack(rows)
            layer.mlp.router.weight.copy_(router)
        for s, h in self.h.items():
            out = layer(
                hidden_states=h,
                attention_mask=None,
                rotary_pos_emb=model.rotary_pos_emb(h.shape[0]),
            )
            self.h[s] = (out[0] if isinstance(out, tuple) else out).detach()
        return router


def _routed_expert_sources(plan: MergePlan) -> list[int]:
    """The source each routed expert comes from (after splitting)."""
    if plan.blend:
        raise BTXError(
            "--router-init centroid is not defined with --blend (every expert mixes "
            "all domains); use random or zero"
        )
    return [s for s in plan.expert_sources for _ in range(plan.split_chunks)]


# =============================================================================================
# The merge
# =============================================================================================
def _progress(total: int, desc: str, enabled: bool):
    return progress.bar(total, desc, unit="layer", enabled=enabled)


def _parse_layers(spec: str | None, L: int) -> list[int] | None:
    """`all` | `0,2,5` | `every:2` (layers 0,2,4,..) | `last:4`."""
    if spec is None or spec == "all":
        return None
    try:
        if spec.startswith("every:"):
            k = int(spec.split(":", 1)[1])
            layers = list(range(0, L, k))
        elif spec.startswith("last:"):
            k = int(spec.split(":", 1)[1])
            layers = list(range(max(0, L - k), L))
        else:
            layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as e:
        raise BTXError(f"--moe-layers {spec!r}: use all, 0,2,5, every:K or last:K") from e
    bad = [i for i in layers if not 0 <= i < L]
    if bad:
        raise BTXError(f"--moe-layers {spec!r}: layer {bad[0]} outside 0..{L - 1}")
    if not layers:
        raise BTXError(f"--moe-layers {spec!r} selects no layer")
    return None if len(layers) == L else layers


@contextlib.contextmanager
def _threads_beside_hashing(hash_jobs: dict[int, concurrent.futures.Future]) -> Iterator[None]:
    """torch's intra-op threads limited to the cores the sources' hashing leaves free, while it
    runs. On 2 cores, torch's second thread spin-waited between the loop's many small ops on the
    core the hashing needs: 3 s of CPU and 1.5 s of a 10 s merge."""
    old = torch.get_num_threads()
    if all(j.done() for j in hash_jobs.values()):
        yield
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, min(old, (cores or 1) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sha256_files(files: Sequence[Path]) -> dict[str, str]:
    return {p.name: manifest.sha256_file(p) for p in files}


def _layer_entries(template: dict[str, Any], i: int) -> dict[str, Any]:
    prefix = f"decoder.layers.{i}."
    return {k: v for k, v in template.items() if k.startswith(prefix)}


def _fill(
    entries: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor], what: str
) -> dict[str, Any]:
    """Template entries with their data replaced by the merged tensors (cast to the template's
    dtype); ShardedObjects (extra state) pass through."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for k, v in entries.items():
        if isinstance(v, ShardedObject):
            out[k] = v
            continue
        short = k[len(prefix) :]
        t = tensors.get(short)
        if t is None:
            raise RuntimeError(f"merge produced no tensor for {k} ({what})")
        if tuple(t.shape) != tuple(v.data.shape):
            raise RuntimeError(f"{k}: merged shape {tuple(t.shape)} != model {tuple(v.data.shape)}")
        out[k] = dataclasses.replace(v, data=t.to(v.data.dtype).contiguous())
    return out


def merge(
    experts: Sequence[str | Path],
    save: str | Path,
    seed: str | Path | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    router_init: str = "random",
    router_std: float = 0.02,
    router_seed: int = 1234,
    top_k: int | None = None,
    expert_map: Sequence[int] | None = None,
    average_weights: Sequence[float] | None = None,
    split_chunks: int = 1,
    blend: bool = False,
    seed_as_shared_expert: bool = False,
    moe_layers: str | None = None,
    dense_ffn: str = "average",
    centroid_data: Sequence[str] | None = None,
    centroid_tokens: int = 2048,
    centroid_seq_len: int = 256,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    export_hf: str | Path | None = None,
    hf_shard_gb: float = 1.0,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Merge dense sources into one MoE torch_dist checkpoint (see the module docstring).
    Returns the manifest written."""
    t0 = time.time()
    save = Path(save)
    paths = [Path(p) for p in experts] + ([Path(seed)] if seed is not None else [])
    if not experts:
        raise BTXError("--experts needs at least one source checkpoint")
    if router_init not in ("random", "zero", "centroid"):
        raise BTXError(f"--router-init {router_init!r}: use random, zero or centroid")
    if dense_ffn not in ("average", "seed"):
        raise BTXError(f"--dense-ffn {dense_ffn!r}: use average or seed")
    check_target(save, overwrite)
    if export_hf is not None:
        check_target(export_hf, overwrite)
        if Path(export_hf).resolve() == save.resolve():
            raise BTXError("--export-hf must be a different folder from --save")
    sources: list[Source] = []
    try:
        for p in paths:
            sources.append(open_source(p))
        return _merge(sources, save, **{k: v for k, v in locals().items() if k in _MERGE_KW})
    finally:
        for s in sources:
            s.close()
        log.debug("merge finished in %.1fs", time.time() - t0)


_MERGE_KW = {
    "seed",
    "tp",
    "pp",
    "ep",
    "etp",
    "router_init",
    "router_std",
    "router_seed",
    "top_k",
    "expert_map",
    "average_weights",
    "split_chunks",
    "blend",
    "seed_as_shared_expert",
    "moe_layers",
    "dense_ffn",
    "centroid_data",
    "centroid_tokens",
    "centroid_seq_len",
    "tokenizer",
    "dtype",
    "export_hf",
    "hf_shard_gb",
    "verify",
    "overwrite",
    "progress",
    "t0",
}


def make_plan(
    sources: Sequence[Source],
    *,
    seed,
    router_init,
    router_std,
    router_seed,
    top_k,
    expert_map,
    average_weights,
    split_chunks,
    blend,
    seed_as_shared_expert,
    moe_layers,
    dense_ffn,
    dtype,
) -> MergePlan:
    n = len(sources)
    a = sources[0].args
    if average_weights is not None:
        w = [float(x) for x in average_weights]
        if len(w) != n:
            raise BTXError(
                f"--average-weights has {len(w)} values for {n} sources (experts, then the seed)"
            )
        if any(x < 0 for x in w) or sum(w) <= 0:
            raise BTXError("--average-weights must be non-negative with a positive sum")
    else:
        w = [1.0] * n
    shared = None
    if seed_as_shared_expert:
        if seed is None:
            raise BTXError("--seed-as-shared-expert needs --seed")
        shared = n - 1
    if expert_map is not None:
        emap = [int(x) for x in expert_map]
        bad = [x for x in emap if not 0 <= x < n]
        if bad or not emap:
            raise BTXError(
                f"--expert-map {list(expert_map)}: indices must be in 0..{n - 1} "
                f"(experts in order, then the seed)"
            )
    else:
        emap = list(range(n - 1 if shared is not None else n))
    if split_chunks < 1:
        raise BTXError("--split-chunks must be >= 1")
    F = a.intermediate_size
    if F % split_chunks:
        raise BTXError(f"--split-chunks {split_chunks} does not divide intermediate_size {F}")
    if blend and split_chunks == 1:
        split_chunks = len(emap)
        if F % split_chunks:
            raise BTXError(
                f"--blend uses {split_chunks} chunks, which does not divide "
                f"intermediate_size {F}; pass --split-chunks"
            )
    plan = MergePlan(
        n_sources=n,
        expert_sources=emap,
        weights=w,
        split_chunks=split_chunks,
        blend=blend,
        shared_source=shared,
        moe_layers=_parse_layers(moe_layers, a.num_hidden_layers),
        dense_ffn=dense_ffn,
        router_init=router_init,
        router_std=router_std,
        router_seed=router_seed,
        top_k=0,
        dtype="",
    )
    if dense_ffn == "seed" and seed is None and plan.moe_layers is not None:
        raise BTXError("--dense-ffn seed needs --seed")
    E = plan.num_experts
    k = top_k if top_k is not None else min(E, 2 * (1 if blend else split_chunks))
    if not 1 <= k <= E:
        raise BTXError(f"--top-k {k} must be between 1 and the number of experts ({E})")
    plan.top_k = k
    dts = {s.dtype for s in sources}
    if dtype is None:
        if len(dts) > 1:
            raise BTXError(f"sources have different dtypes ({sorted(map(str, dts))}); pass --dtype")
        plan.dtype = _DTYPE_NAMES[dts.pop()]
    else:
        plan.dtype = _DTYPE_NAMES[to_dtype(dtype)]
    return plan


def _merge(
    sources: list[Source],
    save: Path,
    *,
    seed,
    tp,
    pp,
    ep,
    etp,
    router_init,
    router_std,
    router_seed,
    top_k,
    expert_map,
    average_weights,
    split_chunks,
    blend,
    seed_as_shared_expert,
    moe_layers,
    dense_ffn,
    centroid_data,
    centroid_tokens,
    centroid_seq_len,
    tokenizer,
    dtype,
    export_hf,
    hf_shard_gb,
    verify,
    overwrite,
    progress,
    t0,
) -> dict[str, Any]:
    check_sources(sources)
    plan = make_plan(
        sources,
        seed=seed,
        router_init=router_init,
        router_std=router_std,
        router_seed=router_seed,
        top_k=top_k,
        expert_map=expert_map,
        average_weights=average_weights,
        split_chunks=split_chunks,
        blend=blend,
        seed_as_shared_expert=seed_as_shared_expert,
        moe_layers=moe_layers,
        dense_ffn=dense_ffn,
        dtype=dtype,
    )
    a = sources[0].args
    out_args = output_args(a, plan)
    overrides = moe_overrides(a, plan)
    variant = bool(overrides)
    etp = tp if etp is None else etp
    check_parallel(out_args, tp, pp, ep)
    if out_args.intermediate_size % etp:
        raise BTXError(
            f"expert-TP {etp} does not divide the expert FFN size {out_args.intermediate_size}"
        )
    if export_hf is not None and variant:
        raise BTXError(
            "--export-hf writes HF Mixtral, which has no shared expert and no dense "
            "layers; drop --seed-as-shared-expert / --moe-layers to export"
        )
    out_dt = to_dtype(plan.dtype)
    tok_src = next((s for s in sources if s.tokenizer_dir is not None), None)
    centroid_tokens_by_src: dict[int, torch.Tensor] = {}
    if router_init == "centroid":
        routed = _routed_expert_sources(plan)
        need = sorted(set(routed))
        if not centroid_data or len(centroid_data) != len(sources):
            raise BTXError(
                f"--router-init centroid needs --centroid-data with one entry per "
                f"source ({len(sources)}: the experts in order, then the seed), each an "
                f"indexed-dataset prefix or a text/jsonl file"
            )
        tok_path = (
            Path(tokenizer)
            if tokenizer
            else (
                tok_src.tokenizer_dir / "tokenizer.model"
                if tok_src and (tok_src.tokenizer_dir / "tokenizer.model").is_file()
                else None
            )
        )
        for s in need:
            centroid_tokens_by_src[s] = _load_centroid_tokens(
                centroid_data[s], tok_path, centroid_tokens, centroid_seq_len
            )
            if int(centroid_tokens_by_src[s].max()) >= a.vocab_size:
                raise BTXError(
                    f"--centroid-data {centroid_data[s]}: token id "
                    f"{int(centroid_tokens_by_src[s].max())} >= vocab_size "
                    f"{a.vocab_size}; data tokenized with another tokenizer?"
                )

    # sources given twice (e.g. upcycling: N copies of one checkpoint) are read once
    uniq: dict[Path, int] = {}
    alias = []
    for s in sources:
        key = s.folder.resolve()
        alias.append(uniq.setdefault(key, len(uniq)))
    first_of = {u: alias.index(u) for u in set(alias)}

    # sha256 of the sources on a second core while the merge runs
    hash_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    hash_jobs = {
        u: hash_pool.submit(_sha256_files, sources[i].hash_files) for u, i in first_of.items()
    }
    try:
        return _merge_write(
            sources,
            save,
            plan,
            a,
            out_args,
            overrides,
            variant,
            out_dt,
            alias,
            first_of,
            hash_jobs,
            tok_src,
            centroid_tokens_by_src,
            seed=seed,
            tp=tp,
            pp=pp,
            ep=ep,
            etp=etp,
            router_init=router_init,
            centroid_data=centroid_data,
            centroid_tokens=centroid_tokens,
            export_hf=export_hf,
            hf_shard_gb=hf_shard_gb,
            verify=verify,
            overwrite=overwrite,
            progress=progress,
            t0=t0,
        )
    finally:
        hash_pool.shutdown(wait=False, cancel_futures=True)


def _merge_write(
    sources,
    save,
    plan,
    a,
    out_args,
    overrides,
    variant,
    out_dt,
    alias,
    first_of,
    hash_jobs,
    tok_src,
    centroid_tokens_by_src,
    *,
    seed,
    tp,
    pp,
    ep,
    etp,
    router_init,
    centroid_data,
    centroid_tokens,
    export_hf,
    hf_shard_gb,
    verify,
    overwrite,
    progress,
    t0,
) -> dict[str, Any]:
    """Write the checkpoint (and HF export) under temporary names, verify, commit."""
    with runtime.single_process(), atomic_folder(save, overwrite) as tmp:
        for s in sources:
            if s.fmt == "megatron" and s._template is None:
                s._template = _flat_template(build_gpt(s.args, s.dtype, meta=True))
                _check_megatron_keys(s)
        template = _flat_template(build_gpt(out_args, out_dt, overrides, meta=True))
        written: set[str] = set()
        hf_tmp = None
        hfw = None
        hf_ctx = contextlib.ExitStack()
        writer = hf_ctx.enter_context(StreamingDCPWriter(tmp))
        if export_hf is not None:
            hf_tmp = hf_ctx.enter_context(atomic_folder(export_hf, overwrite))
            hfw = StreamingSafetensorsWriter(
                hf_tmp, hf_export_plan(out_args, out_dt), int(hf_shard_gb * 1024**3)
            )
        with hf_ctx:
            centroid = None
            if router_init == "centroid":
                centroid = CentroidRouter(a, out_args, plan, centroid_tokens_by_src, overrides)
            with _threads_beside_hashing(hash_jobs):
                lineage = _merge_globals_and_layers(
                    sources,
                    alias,
                    first_of,
                    plan,
                    out_args,
                    template,
                    writer,
                    written,
                    hfw,
                    centroid,
                    progress,
                )
            missing = [k for k in template if k not in written]
            if missing:
                raise RuntimeError(f"merge wrote no data for {missing[0]} ({len(missing)} missing)")
            writer.check_complete(
                allow_partial=_partial_keys(template) if plan.moe_layers is not None else ()
            )
            writer.finish()
            if hfw is not None:
                hfw.close()
                cfg = out_args.to_hf_dict()
                cfg["torch_dtype"] = cfg["dtype"] = {
                    "fp32": "float32",
                    "bf16": "bfloat16",
                    "fp16": "float16",
                }[plan.dtype]
                (hf_tmp / "config.json").write_text(json.dumps(cfg, indent=2))
                if tok_src is not None:
                    copy_tokenizer(tok_src.tokenizer_dir, hf_tmp)
            tok_files = []
            if tok_src is not None:
                tok_files = copy_tokenizer(tok_src.tokenizer_dir, tmp / TOKENIZER_DIR)
            if not variant:
                (tmp / "hf_config.json").write_text(json.dumps(out_args.to_hf_dict(), indent=2))
            hashes = {u: j.result() for u, j in hash_jobs.items()}
            merge_settings = {
                "experts": [str(p.given) for p in sources[: len(sources) - (seed is not None)]],
                "seed": str(sources[-1].given) if seed is not None else None,
                "expert_sources": plan.expert_sources,
                "average_weights": plan.weights,
                "split_chunks": plan.split_chunks,
                "blend": plan.blend,
                "shared_expert_source": plan.shared_source,
                "moe_layers": plan.moe_layers,
                "dense_ffn": plan.dense_ffn if plan.moe_layers is not None else None,
                "router_init": plan.router_init,
                "router_std": plan.router_std if plan.router_init == "random" else None,
                "router_seed": plan.router_seed if plan.router_init == "random" else None,
                "centroid_data": list(centroid_data) if router_init == "centroid" else None,
                "centroid_tokens": centroid_tokens if router_init == "centroid" else None,
                "top_k": plan.top_k,
                "num_experts": plan.num_experts,
                "averaging": "fp32 weighted mean, cast to output dtype",
                "lineage_cosine": lineage,
            }
            tok_sha = manifest.sha256_folder(tmp / TOKENIZER_DIR) if tok_files else {}
            fields = {
                "kind": "megatron_torch_dist",
                "model": out_args.to_dict(),
                "moe": moe_extra_fields(a, plan),
                "dtype": plan.dtype,
                "layout": {"tp": tp, "pp": pp, "ep": ep, "etp": etp},
                "padded_vocab_size": out_args.padded_vocab_size,
                "sources": [
                    _source_entry(s, i, plan, hashes[alias[i]], seed is not None)
                    for i, s in enumerate(sources)
                ],
                "merge": merge_settings,
                "tokenizer": {
                    "files": tok_files,
                    "sha256": tok_sha,
                    "model_sha256": tok_src.tokenizer_sha256 if tok_src else None,
                },
            }
            m = manifest.write(tmp, **fields)
            if hf_tmp is not None:
                manifest.write(
                    hf_tmp,
                    kind="hf_mixtral",
                    model=out_args.to_dict(),
                    dtype=plan.dtype,
                    sources=fields["sources"],
                    merge=merge_settings,
                    tokenizer=fields["tokenizer"],
                )
            if verify:
                report = verify_checkpoint(
                    tmp, sources, alias, first_of, plan, out_args, overrides, progress
                )
                if hf_tmp is not None:
                    report["hf_export_tensors_equal"] = verify_hf_export(
                        hf_tmp, tmp, out_args, out_dt
                    )
                m = manifest.write(tmp, **fields, verify=report)
    log.info(
        "merged %d sources into %s (%d experts, top-%d) in %.1fs",
        len(sources),
        save,
        plan.num_experts,
        plan.top_k,
        time.time() - t0,
    )
    return m


def _partial_keys(template: dict[str, Any]) -> set[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {
        v.key for v in template.values() if isinstance(v, (ShardedTensor, ShardedTensorFactory))
    }


def _source_entry(s: Source, i: int, plan: MergePlan, sha: dict[str, str], has_seed: bool):
    role = "seed" if has_seed and i == plan.n_sources - 1 else f"expert {i}"
    experts = [j for j, src in enumerate(plan.expert_sources) if src == i]
    return {
        "path": str(s.given.resolve()),
        "checkpoint": str(s.folder.resolve()),
        "format": "hf_safetensors" if s.fmt == "hf" else "megatron_torch_dist",
        "role": role,
        "routed_experts": experts,
        "shared_expert": plan.shared_source == i,
        "average_weight": plan.weights[i],
        "step": s.step,
        "dtype": _DTYPE_NAMES[s.dtype],
        "sha256": sha,
        "tokenizer_sha256": s.tokenizer_sha256,
    }


def _check_megatron_keys(s: Source) -> None:
    """Every model tensor the config implies is in the checkpoint with the right global shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    md = s._ckpt_md.state_dict_metadata
    seen = set()
    for v in s._template.values():
        if isinstance(v, ShardedObject) or v.key in seen:
            continue
        seen.add(v.key)
        got = md.get(v.key)
        if got is None or not hasattr(got, "size"):
            raise BTXError(
                f"{s.folder}: tensor {v.key!r} is missing; the checkpoint does not match "
                f"its manifest (layers={s.args.num_hidden_layers})"
            )
        if isinstance(v, ShardedTensorFactory):
            continue  # factories reshape on load; their shapes are checked by megatron-core
        if tuple(got.size) != tuple(v.global_shape):
            raise BTXError(
                f"{s.folder}: tensor {v.key!r} has global shape {tuple(got.size)}, the "
                f"manifest implies {tuple(v.global_shape)}"
            )


def _lineage(samples: list[torch.Tensor], sources: list[Source]) -> list[float]:
    """Cosine similarity of each source's embedding sample to the first's; warn when low
    (models trained from one seed stay > 0.9; independent inits are ~0)."""
    ref = samples[0].reshape(-1)
    out = []
    for x, s in zip(samples, sources):
        x = x.reshape(-1)
        c = float(torch.dot(ref, x) / (ref.norm() * x.norm()).clamp_min(1e-12))
        out.append(round(c, 6))
        if c < 0.5:
            log.warning(
                "source %s: embedding cosine similarity to %s is %.3f; the sources do not look "
                "like branches of one seed model, and averaging them may destroy both",
                s.name,
                sources[0].name,
                c,
            )
    return out


def _merge_write_layer(
    i,
    sources,
    first_of,
    order,
    plan,
    plan_u,
    a,
    out_args,
    out_dt,
    template,
    writer,
    written,
    hfw,
    centroid,
    pool,
) -> None:
    """Merge layer i of the sources and write it (checkpoint part, and HF export when asked)."""

    def layer_of(u: int):
        return sources[first_of[u]].layer(i)

    merged, _ = merge_layer(plan_u, layer_of, i, order, pool)
    cast = list(AVERAGED_LAYER)
    if not plan.is_moe_layer(i) and plan.dense_ffn == "average":
        cast += [FC1, FC2]
    for n in cast:
        merged[n] = pool.cast("out." + n, merged[n], out_dt)
    if plan.is_moe_layer(i):
        E = plan.num_experts
        if centroid is not None:
            merged["mlp.router.weight"] = centroid.run_layer(i, merged).to(out_dt)
        else:
            merged["mlp.router.weight"] = random_router(plan, i, (E, a.hidden_size)).to(out_dt)
    elif centroid is not None:
        centroid.run_layer(i, merged)
    part = _fill(_layer_entries(template, i), f"decoder.layers.{i}.", merged, f"layer {i}")
    writer.write(part)
    written.update(part)
    del part
    if hfw is not None:
        for name, t in hf_layer_tensors(out_args, i, merged):
            hfw.add(name, t.to(out_dt))


def _merge_globals_and_layers(
    sources, alias, first_of, plan, out_args, template, writer, written, hfw, centroid, progress
) -> list[float]:
    """The streaming loop: embedding, layers 0..L-1, final norm and output layer."""
    a = sources[0].args
    L = a.num_hidden_layers
    order = sorted(set(alias))  # unique reads
    weights_u = [0.0] * len(order)
    for i, u in enumerate(alias):
        weights_u[u] += plan.weights[i]

    pool = BufferPool()

    def avg_global(name: str, lineage: bool = False):
        """fp32 average of a global tensor, in `pool`'s "global" buffer (one at a time)."""
        acc = None
        samples = []
        g = torch.Generator().manual_seed(0)
        rows = None
        for u in order:
            if weights_u[u] == 0 and not lineage:
                continue
            t = sources[first_of[u]].globals_(name, pool)
            if lineage:
                if rows is None:
                    rows = torch.randperm(min(a.vocab_size, t.shape[0]), generator=g)[:1024]
                samples.append(t[rows].to(torch.float32))
            if weights_u[u]:
                acc = _accumulate(acc, t, weights_u[u], pool, "global")
            del t
        tot = sum(weights_u)
        if tot != 1.0:
            acc.div_(tot)
        return acc, samples

    def put(names: dict[str, torch.Tensor]):
        entries = {k: v for k, v in template.items() if k in names}
        part = _fill(entries, "", names, "globals")
        writer.write(part)
        written.update(part)

    out_dt = to_dtype(plan.dtype)
    emb, samples = avg_global(EMB, lineage=len(order) > 1)
    lineage = _lineage(samples, [sources[first_of[u]] for u in order]) if samples else [1.0]
    if centroid is not None:
        centroid.embed(emb[: a.vocab_size].to(out_dt))
    emb = pool.cast("out.emb", emb, out_dt)
    put({EMB: emb})
    if hfw is not None:
        hfw.add("model.embed_tokens.weight", emb[: a.vocab_size])
    del emb
    pool.drop("read.global", "acc.global", "cast.global", "out.emb")  # not held through the layers

    plan_u = dataclasses.replace(
        plan,
        weights=weights_u,
        expert_sources=[alias[s] for s in plan.expert_sources],
        shared_source=None if plan.shared_source is None else alias[plan.shared_source],
        n_sources=len(order),
    )
    # dense_ffn=seed reads the last source: keep it last among the unique reads
    if plan.dense_ffn == "seed" and plan.moe_layers is not None:
        last = alias[plan.n_sources - 1]
        if last != len(order) - 1:
            raise BTXError("--dense-ffn seed: the seed must not also be given as an expert")
    bar = _progress(L, "merge", progress)
    with contextlib.ExitStack() as reuse:
        for u in order:
            reuse.enter_context(sources[first_of[u]].reused_buffers())
        for i in range(L):
            _merge_write_layer(
                i,
                sources,
                first_of,
                order,
                plan,
                plan_u,
                a,
                out_args,
                out_dt,
                template,
                writer,
                written,
                hfw,
                centroid,
                pool,
            )
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    fin, _ = avg_global(FINAL_LN)
    fin = fin.to(out_dt)
    globals_ = {FINAL_LN: fin}
    if not a.tie_word_embeddings:
        out, _ = avg_global(OUT)
        globals_[OUT] = pool.cast("out.emb", out, out_dt)  # the embedding's is written: reuse
        del out
    put(globals_)
    if hfw is not None:
        hfw.add("model.norm.weight", fin)
        if not a.tie_word_embeddings:
            hfw.add("lm_head.weight", globals_[OUT][: a.vocab_size])
    return lineage


# =============================================================================================
# --verify
# =============================================================================================
def verify_checkpoint(
    folder: Path,
    sources,
    alias,
    first_of,
    plan: MergePlan,
    out_args: LlamaArgs,
    overrides: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Re-read the written checkpoint layer by layer with megatron-core's loader and check it
    against the sources; raises BTXError on the first disagreement. Returns a report."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    t0 = time.time()
    a = sources[0].args
    out_dt = to_dtype(plan.dtype)
    template = _flat_template(build_gpt(out_args, out_dt, overrides, meta=True))
    reader = PartialReader(folder)
    md = reader.md

    def read_out(prefix: str) -> dict[str, torch.Tensor]:
        sub = {}
        for k, v in template.items():
            if (k == prefix or k.startswith(prefix)) and not isinstance(v, ShardedObject):
                sub[k] = dataclasses.replace(v, data=torch.empty(v.data.shape, dtype=v.data.dtype))
        got = reader.load(sub)
        return {k[len(prefix) :] if prefix.endswith(".") else k: t for k, t in got.items()}

    order = sorted(set(alias))
    weights_u = [0.0] * len(order)
    for i, u in enumerate(alias):
        weights_u[u] += plan.weights[i]
    plan_u = dataclasses.replace(
        plan,
        weights=weights_u,
        expert_sources=[alias[s] for s in plan.expert_sources],
        shared_source=None if plan.shared_source is None else alias[plan.shared_source],
        n_sources=len(order),
    )
    checked = {"experts_bit_identical": 0, "averaged_equal_fp32": 0, "routers": 0}

    def fail(what: str) -> None:
        raise BTXError(f"--verify failed: {what} (output {folder})")

    def cmp_exact(name: str, got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
        want = want.to(got.dtype)
        if got.shape != want.shape or not torch.equal(got, want):
            diff = (
                (got.float() - want.float()).abs().max().item() if got.shape == want.shape else None
            )
            fail(f"{name} differs from {kind} (max abs diff {diff})")

    # globals
    for name in [EMB, FINAL_LN] + ([] if a.tie_word_embeddings else [OUT]):
        got = read_out(name)[name]
        acc = None
        for u in order:
            if weights_u[u] == 0:
                continue
            x = sources[first_of[u]].globals_(name).to(torch.float32)
            x = x * weights_u[u] if weights_u[u] != 1.0 else x
            acc = x.clone() if acc is None else acc.add_(x)
        if sum(weights_u) != 1.0:
            acc.div_(sum(weights_u))
        cmp_exact(name, got, acc.to(out_dt), "the fp32 average of the sources")
        checked["averaged_equal_fp32"] += 1
    bar = _progress(a.num_hidden_layers, "verify", progress)
    for i in range(a.num_hidden_layers):
        got = read_out(f"decoder.layers.{i}.")
        reads: dict[int, dict[str, torch.Tensor]] = {}
        for u in order:
            reads[u] = sources[first_of[u]].layer(i)
        want, _ = merge_layer(plan_u, reads.__getitem__, i, order)
        for n in AVERAGED_LAYER:
            cmp_exact(f"layer {i} {n}", got[n], want[n].to(out_dt), "the fp32 average")
            checked["averaged_equal_fp32"] += 1
        for n, t in want.items():
            if n in AVERAGED_LAYER:
                continue
            kind = "its source FFN" if "experts" in n else "the dense FFN"
            cmp_exact(f"layer {i} {n}", got[n], t.to(out_dt), kind)
            if "experts" in n and t.dtype == out_dt:
                checked["experts_bit_identical"] += 1
        if plan.is_moe_layer(i):
            r = got["mlp.router.weight"]
            if not torch.isfinite(r.float()).all():
                fail(f"layer {i} router has non-finite values")
            if plan.router_init in ("random", "zero"):
                cmp_exact(
                    f"layer {i} router",
                    r,
                    random_router(plan, i, tuple(r.shape)).to(out_dt),
                    "its init",
                )
            checked["routers"] += 1
        del reads, want, got
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    # coverage: every checkpoint key is a template key and vice versa
    tkeys = {v.key for v in template.values() if not isinstance(v, ShardedObject)}
    ckeys = {k for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
    if tkeys != ckeys:
        extra = sorted(ckeys - tkeys)[:1]
        miss = sorted(tkeys - ckeys)[:1]
        fail(f"checkpoint keys differ from the MoE model's (extra {extra}, missing {miss})")
    coverage = source_coverage(sources, plan)
    report = {
        **checked,
        "checkpoint_tensors": len(ckeys),
        "source_keys": coverage,
        "seconds": None,
    }
    small = out_args.num_params() <= 300_000_000
    if small:
        report["logits"] = _verify_logits(folder, sources, plan, out_args, overrides)
    else:
        report["logits"] = "skipped (model larger than 300M parameters)"
    report["seconds"] = round(time.time() - t0, 2)
    reader.close()
    log.info("verify: %s", {k: v for k, v in report.items() if k != "source_keys"})
    return report


def source_coverage(sources, plan: MergePlan) -> list[dict[str, Any]]:
    """Where every source key went: routed expert(s), shared expert, averaged, or not a model
    weight (optimizer/RNG state in training checkpoints)."""
    out = []
    for i, s in enumerate(sources):
        experts = [j for j, src in enumerate(plan.expert_sources) if src == i]
        if s.fmt == "hf":
            keys = sorted(s._hf_keys)
            ffn = [k for k in keys if ".mlp." in k]
            entry = {
                "source": s.name,
                "keys": len(keys),
                "ffn_keys": len(ffn),
                "ffn_to": _ffn_dest(i, experts, plan),
                "averaged": len(keys) - len(ffn) if plan.weights[i] else 0,
                "unused": (len(keys) - len(ffn)) if not plan.weights[i] else 0,
                "not_model_weights": [],
            }
        else:
            md = s._ckpt_md.state_dict_metadata
            model_keys = {
                v.key
                for v in s._template.values()
                if hasattr(v, "key") and hasattr(md.get(v.key, None), "size")
            }
            other = sorted(k for k, v in md.items() if hasattr(v, "size") and k not in model_keys)
            ffn = [k for k in model_keys if ".mlp." in k]
            entry = {
                "source": s.name,
                "keys": len(model_keys),
                "ffn_keys": len(ffn),
                "ffn_to": _ffn_dest(i, experts, plan),
                "averaged": len(model_keys) - len(ffn) if plan.weights[i] else 0,
                "unused": (len(model_keys) - len(ffn)) if not plan.weights[i] else 0,
                "not_model_weights": other[:20]
                + ([f"... {len(other) - 20} more"] if len(other) > 20 else []),
            }
        out.append(entry)
    return out


def _ffn_dest(i: int, experts: list[int], plan: MergePlan) -> str:
    parts = []
    C = plan.split_chunks
    if experts:
        if plan.blend:
            parts.append(f"chunk of every blended expert 0..{C - 1}")
        elif C > 1:
            parts.append("experts " + ",".join(str(j * C + c) for j in experts for c in range(C)))
        else:
            parts.append("experts " + ",".join(map(str, experts)))
    if plan.shared_source == i:
        parts.append("shared expert")
    if plan.moe_layers is not None and plan.dense_ffn == "average" and plan.weights[i]:
        parts.append("averaged into dense layers")
    if plan.moe_layers is not None and plan.dense_ffn == "seed" and i == plan.n_sources - 1:
        parts.append("dense layers")
    return "; ".join(parts) or "unused (not an expert)"


@torch.no_grad()
def _verify_logits(
    folder: Path, sources, plan: MergePlan, out_args: LlamaArgs, overrides: dict[str, Any]
) -> dict[str, Any]:
    """(1) the written MoE loads into megatron-core and gives finite logits; (2) sparse upcycling
    as the special case: an MoE whose experts are all source 0's FFN and whose other tensors are
    source 0's gives source 0's logits (fp32) whatever the router."""
    from megatron_btx.checkpoint.megatron_io import load_model

    a = sources[0].args
    torch.manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (2, 16))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    moe = build_gpt(out_args, torch.float32, overrides)
    load_model(moe, folder)
    moe.eval()
    out = moe(ids, pos, None)[..., : a.vocab_size]
    if not torch.isfinite(out).all():
        raise BTXError(f"--verify failed: the merged model's logits are not finite ({folder})")
    # upcycling check, from source 0 alone
    dense = build_gpt(a, torch.float32)
    sd = dense.state_dict()
    src = sources[0]
    for k in (EMB, FINAL_LN, OUT):
        if k in sd:
            sd[k] = src.globals_(k).to(torch.float32)
    layers = [src.layer(i) for i in range(a.num_hidden_layers)]
    for i, t in enumerate(layers):
        for n, x in t.items():
            sd[f"decoder.layers.{i}.{n}"] = x.to(torch.float32)
    dense.load_state_dict(sd, strict=False)
    dense.eval()
    ref = dense(ids, pos, None)[..., : a.vocab_size]
    up_plan = dataclasses.replace(
        plan,
        weights=[1.0] * plan.n_sources,
        expert_sources=[0] * len(plan.expert_sources),
        shared_source=None if plan.shared_source is None else 0,
    )
    msd = moe.state_dict()
    for k in (EMB, FINAL_LN, OUT):
        if k in msd:
            msd[k] = sd[k]
    for i in range(a.num_hidden_layers):
        merged, _ = merge_layer(
            dataclasses.replace(up_plan, n_sources=1, weights=[1.0]),
            lambda u, i=i: layers[i],
            i,
            [0],
        )
        for n, x in merged.items():
            msd[f"decoder.layers.{i}.{n}"] = x.to(torch.float32)
        if plan.is_moe_layer(i):
            msd[f"decoder.layers.{i}.mlp.router.weight"] = random_router(
                plan, i, (out_args.num_local_experts, a.hidden_size)
            )
    moe.load_state_dict(msd, strict=False)
    up = moe(ids, pos, None)[..., : a.vocab_size]
    diff = (up - ref).abs().max().item()
    scale = ref.abs().max().item()
    # shared expert / splitting / blending change the function by construction
    exact_case = plan.shared_source is None and plan.split_chunks == 1 and not plan.blend
    if exact_case and diff > 1e-4 * max(1.0, scale):
        raise BTXError(
            f"--verify failed: an MoE of N copies of {src.name} does not reproduce its "
            f"logits (max abs diff {diff:.3g}); the MoE layout is wrong"
        )
    return {
        "merged_logits_finite": True,
        "upcycled_vs_dense_max_abs_diff": diff if exact_case else None,
        "upcycled_check": "passed" if exact_case else "not applicable to this variant",
    }


def verify_hf_export(
    hf_folder: Path, mcore_folder: Path, out_args: LlamaArgs, out_dt: torch.dtype
) -> int:
    """Every tensor of the HF Mixtral export equals the megatron checkpoint's, through the HF
    mapping (layer by layer); returns the number of tensors compared."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    template = _flat_template(build_gpt(out_args, out_dt, meta=True))
    reader = PartialReader(mcore_folder)
    st = PreadSafetensors(HFReader(hf_folder).files)
    a = out_args
    n = 0

    def read_out(prefix: str) -> dict[str, torch.Tensor]:
        sub = {
            k: dataclasses.replace(v, data=torch.empty(v.data.shape, dtype=v.data.dtype))
            for k, v in template.items()
            if (k == prefix or k.startswith(prefix)) and not isinstance(v, ShardedObject)
        }
        got = reader.load(sub)
        return {k[len(prefix) :] if prefix.endswith(".") else k: t for k, t in got.items()}

    def same(name: str, want: torch.Tensor) -> None:
        nonlocal n
        if name not in st._where:
            raise BTXError(f"--verify failed: HF export lacks {name!r} ({hf_folder})")
        if not torch.equal(st.get(name), want.contiguous()):
            raise BTXError(
                f"--verify failed: HF export tensor {name!r} differs from the "
                f"megatron checkpoint ({hf_folder})"
            )
        n += 1

    try:
        same("model.embed_tokens.weight", read_out(EMB)[EMB][: a.vocab_size])
        for i in range(a.num_hidden_layers):
            for name, t in hf_layer_tensors(a, i, read_out(f"decoder.layers.{i}.")):
                same(name, t)
        same("model.norm.weight", read_out(FINAL_LN)[FINAL_LN])
        if not a.tie_word_embeddings:
            same("lm_head.weight", read_out(OUT)[OUT][: a.vocab_size])
        extra = set(st._where) - {nm for nm, _, _ in hf_export_plan(a, out_dt)}
        if extra:
            raise BTXError(f"--verify failed: HF export has unexpected tensor {min(extra)!r}")
    finally:
        st.close()
        reader.close()
    return n


# =============================================================================================
# Command line
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="btx merge",
        description="Branch-Train-MiX merge: N dense Llama checkpoints (HF safetensors or megatron "
        "torch_dist at any TP/PP) -> one megatron-core MoE torch_dist checkpoint. Expert i is "
        "source i's FFN, unchanged; every other tensor is the fp32 average of the sources; each "
        "layer gets a new router. Streams layer by layer: memory is bounded by one layer.",
    )
    p.add_argument(
        "--experts",
        nargs="+",
        required=True,
        metavar="DIR",
        help="dense expert checkpoints (HF folder, megatron checkpoint, or a run / "
        "checkpoints folder with a `latest` file); expert i = i-th source",
    )
    p.add_argument(
        "--seed",
        metavar="DIR",
        help="the seed model, kept as the last expert "
        "(the paper's generalist); or the shared expert with --seed-as-shared-expert",
    )
    p.add_argument("--save", required=True, metavar="DIR", help="output folder (atomic)")
    p.add_argument(
        "--tp", type=int, default=1, help="target tensor-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--ep", type=int, default=1, help="target expert-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--pp", type=int, default=1, help="target pipeline-parallel size (checked, recorded)"
    )
    p.add_argument(
        "--etp", type=int, default=None, help="target expert-tensor-parallel size (default: --tp)"
    )
    p.add_argument("--router-init", choices=["random", "zero", "centroid"], default="random")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the random router")
    p.add_argument("--router-seed", type=int, default=1234, help="RNG seed of the random router")
    p.add_argument(
        "--centroid-data",
        nargs="+",
        metavar="PREFIX_OR_TEXT",
        help="per source (experts in order, then the seed): an indexed-dataset prefix "
        "or a text/jsonl file of that expert's domain, for --router-init centroid",
    )
    p.add_argument(
        "--centroid-tokens",
        type=int,
        default=2048,
        help="tokens of each domain sample for centroids",
    )
    p.add_argument("--centroid-seq-len", type=int, default=256)
    p.add_argument(
        "--tokenizer",
        help="SentencePiece tokenizer.model for text centroid data (default: the sources')",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="experts per token (default 2, times C with --split-chunks)",
    )
    p.add_argument(
        "--expert-map",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        metavar="I,J,...",
        help="routed expert j takes the FFN of source I_j (sources: "
        "experts in order, then the seed); default: one expert per source",
    )
    p.add_argument(
        "--average-weights",
        nargs="+",
        type=float,
        default=None,
        metavar="W",
        help="per-source weights of the averaged tensors (default: uniform)",
    )
    p.add_argument(
        "--split-chunks",
        type=int,
        default=1,
        metavar="C",
        help="split each FFN into C experts along the hidden FFN dimension (N*C experts)",
    )
    p.add_argument(
        "--blend",
        action="store_true",
        help="expert c = chunk c of every source's FFN (C = --split-chunks, default N)",
    )
    p.add_argument(
        "--seed-as-shared-expert",
        action="store_true",
        help="the seed's FFN becomes a shared expert (always active) instead of a routed one",
    )
    p.add_argument(
        "--moe-layers",
        default=None,
        metavar="SPEC",
        help="which layers become MoE: all (default), 0,2,5, every:K, last:K; the "
        "others keep a dense FFN",
    )
    p.add_argument(
        "--dense-ffn",
        choices=["average", "seed"],
        default="average",
        help="the FFN of non-MoE layers",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="output dtype (default: the sources')",
    )
    p.add_argument("--export-hf", metavar="DIR", help="also write an HF Mixtral checkpoint")
    p.add_argument("--hf-shard-gb", type=float, default=1.0, help="HF export shard size")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-read the output and check it against the sources before committing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = merge(
            a.experts,
            a.save,
            seed=a.seed,
            tp=a.tp,
            pp=a.pp,
            ep=a.ep,
            etp=a.etp,
            router_init=a.router_init,
            router_std=a.router_std,
            router_seed=a.router_seed,
            top_k=a.top_k,
            expert_map=a.expert_map,
            average_weights=a.average_weights,
            split_chunks=a.split_chunks,
            blend=a.blend,
            seed_as_shared_expert=a.seed_as_shared_expert,
            moe_layers=a.moe_layers,
            dense_ffn=a.dense_ffn,
            centroid_data=a.centroid_data,
            centroid_tokens=a.centroid_tokens,
            centroid_seq_len=a.centroid_seq_len,
            tokenizer=a.tokenizer,
            dtype=a.dtype,
            export_hf=a.export_hf,
            hf_shard_gb=a.hf_shard_gb,
            verify=a.verify,
            overwrite=a.overwrite,
            progress=not a.no_progress,
        )
    except BTXError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mg = m["merge"]
    print(
        f"wrote {a.save}: {mg['num_experts']} experts (top-{mg['top_k']}), "
        f"router {mg['router_init']}" + (", verified" if a.verify else "")
    )
    return 0


__all__ = ["StreamingSafetensorsWriter", "main", "merge", "open_source", "verify_checkpoint"]
