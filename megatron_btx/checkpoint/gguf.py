"""GGUF files (llama.cpp's format) as a source of `btx import-hf`: an HF config, tensors under HF
names, dequantized to fp32, and a ``tokenizer.json`` built from the GGUF vocabulary.

The file is read with the ``gguf`` package's reader (a memory map: a tensor's bytes are read when
it is asked for) and its dequantizers, one tensor at a time, so the importer holds one layer, as
it does for safetensors. Everything after this module (the family's adapter, the torch_dist
writer, the manifest) is the HF import path unchanged.

Two layouts differ from HF's:

- GGUF lists a tensor's dimensions innermost first (ggml's ``ne``): HF's shape is the reverse.
- RoPE. HF's Llama rotates the pair (i, i + d/2) of each head's d dimensions ("rotate half");
  ggml's Llama rope (its NORM mode) rotates the adjacent pair (2i, 2i + 1). So a Llama GGUF
  holds each q and k head's rows reordered: its row 2i + j is HF's row j * d/2 + i (j = 0, 1;
  i < d/2), i.e. the head's rows as a [2, d/2] array, transposed to [d/2, 2]. HF's order is
  that transposition undone: the GGUF head's rows as [d/2, 2], transposed back to [2, d/2]
  (:func:`unpermute_rope_rows`). The same permutation is applied to q and k, so q.k is
  unchanged within a head; the logits test against transformers checks the direction. Qwen2 and
  Qwen3 use ggml's NEOX rope (rotate half, as HF): no reordering.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from megatron_btx.checkpoint import manifest
from megatron_btx.errors import BTXError

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
#: GGUF general.architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
#: architectures whose q/k rows llama.cpp reorders for ggml's NORM rope
ROPE_REORDERED = ("llama", "mistral")
#: ggml tensor types the importer dequantizes (with the gguf package's dequantizers); others
#: (the i-quants, ternary and FP4 types) are refused with the tensor's name
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
#: GGUF tensor names -> HF names (globals; per layer under blk.N. -> model.layers.N.)
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def is_gguf(path: str | Path) -> bool:
    """A regular file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Llama GGUF's q or k rows (or bias) in HF's order (see the module's docstring): each
    head's d rows, viewed as [d/2, 2], transposed to [2, d/2]."""
    rows = weight.shape[0]
    dim = rows // heads
    if rows % heads or dim % 2:
        raise BTXError(f"{rows} rows do not split into {heads} heads of an even size")
    tail = weight.shape[1:]
    return weight.reshape(heads, dim // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail).clone()


def _import_gguf():
    try:
        import gguf  # noqa: F401
        from gguf import GGUFReader, quants
    except ImportError as e:
        raise BTXError(
            "reading a GGUF file needs the gguf package: pip install 'megatron-btx[gguf]' "
            "(or pip install gguf)"
        ) from e
    return GGUFReader, quants


class GGUFSource:
    """One GGUF file, read as an HF checkpoint: :attr:`config` (an HF config.json), tensors under
    HF names (:meth:`keys`, :meth:`shape`, :meth:`get`, fp32), the tokenizer
    (:meth:`write_tokenizer`) and the manifest's source record (:meth:`record`). Every
    problem with the file is one BTXError naming it, before any tensor is dequantized."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader_cls, self._quants = _import_gguf()
        try:
            self._reader = reader_cls(str(self.path), "r")
        except Exception as e:  # noqa: BLE001 - the gguf reader raises whatever numpy does
            raise BTXError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})"
            ) from e
        try:
            self.meta = {name: _contents(field) for name, field in self._reader.fields.items()}
        except Exception as e:  # noqa: BLE001
            raise BTXError(f"{self.path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from e
        self.arch = self._str("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise BTXError(
                f"{self.path}: general.architecture is {self.arch!r}; supported GGUF "
                f"architectures: {', '.join(ARCHITECTURES)} (Llama-family dense models)"
            )
        self._tensors = self._map_tensors()
        self.config = self._hf_config()
        self.config_name = f"{self.path} (GGUF metadata)"
        self._check_shapes()
        from megatron_btx.checkpoint.gguf_tokenizer import build_tokenizer

        self._tokenizer = build_tokenizer(self.meta, str(self.path))  # refused before a write

    # ---- metadata ------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def _str(self, key: str, default: str | None = None) -> str | None:
        value = self.meta.get(key, default)
        if value is not None and not isinstance(value, str):
            raise BTXError(f"{self.path}: metadata {key} is {value!r}, not a string")
        return value

    def _int(self, key: str, default: int | None = None) -> int | None:
        value = self.meta.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BTXError(f"{self.path}: metadata {key} is {value!r}, not a count")
        return value

    def _float(self, key: str, default: float) -> float:
        value = self.meta.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise BTXError(f"{self.path}: metadata {key} is {value!r}, not a number")
        return float(value)

    def _need(self, name: str) -> int:
        value = self._int(self._key(name))
        if value is None:
            raise BTXError(f"{self.path}: metadata {self._key(name)} is missing")
        return value

    def _hf_config(self) -> dict[str, Any]:
        """The HF config.json of the model the metadata describes; what has no HF Llama-family
        form is a one-line error naming the key."""
        if self._int(self._key("expert_count"), 0):
            raise BTXError(
                f"{self.path}: {self._key('expert_count')} is set: an MoE GGUF is not supported "
                f"(import a dense seed)"
            )
        hidden = self._need("embedding_length")
        heads = self._need("attention.head_count")
        kv_heads = self._int(self._key("attention.head_count_kv"), heads)
        if not heads or not kv_heads or heads % kv_heads:
            raise BTXError(
                f"{self.path}: {heads} attention heads do not split into {kv_heads} KV heads"
            )
        head_dim = self._int(self._key("attention.key_length"), hidden // heads)
        value_dim = self._int(self._key("attention.value_length"), head_dim)
        rope_dim = self._int(self._key("rope.dimension_count"), head_dim)
        if value_dim != head_dim or rope_dim != head_dim:
            raise BTXError(
                f"{self.path}: key_length {head_dim}, value_length {value_dim} and "
                f"rope.dimension_count {rope_dim} differ; only full RoPE over equal q/k/v heads "
                f"is supported"
            )
        scaling = self._str(self._key("rope.scaling.type"), "none")
        if scaling != "none" or "rope_freqs.weight" in self._raw_names:
            what = f"rope.scaling.type {scaling!r}" if scaling != "none" else "rope_freqs.weight"
            raise BTXError(
                f"{self.path}: {what}: RoPE scaling from a GGUF is not supported (import the "
                f"model's HF checkpoint instead)"
            )
        if self._int(self._key("attention.sliding_window"), 0):
            raise BTXError(f"{self.path}: sliding-window attention is not supported")
        tokens = self.meta.get("tokenizer.ggml.tokens")
        vocab = self._int(self._key("vocab_size"), len(tokens) if tokens else None)
        if vocab is None:
            vocab = self._raw_shape("token_embd.weight")[0]
        if tokens and len(tokens) > vocab:
            raise BTXError(
                f"{self.path}: {len(tokens)} tokens for a vocabulary of {vocab} "
                f"({self._key('vocab_size')}); the file is inconsistent"
            )
        special = {
            f"{name}_token_id": self._int(f"tokenizer.ggml.{key}_token_id")
            for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        }
        model_type = ARCHITECTURES[self.arch]
        config = {
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._need("feed_forward_length"),
            "num_hidden_layers": self._need("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "rms_norm_eps": self._float(self._key("attention.layer_norm_rms_epsilon"), 1e-5),
            "rope_theta": self._float(self._key("rope.freq_base"), 10000.0),
            "max_position_embeddings": self._int(self._key("context_length"), 2048),
            "tie_word_embeddings": "output.weight" not in self._raw_names,
            "hidden_act": "silu",
            **special,
        }
        if model_type in ("qwen2", "qwen3"):
            config["use_sliding_window"] = False
        return config

    # ---- tensors -------------------------------------------------------------------------
    def _map_tensors(self) -> dict[str, Any]:
        """{HF name: the reader's tensor}; an unknown tensor name is an error (nothing of the
        file is silently left out)."""
        self._raw_names = {t.name for t in self._reader.tensors}
        mapped: dict[str, Any] = {}
        for tensor in self._reader.tensors:
            name = tensor.name
            if name == "rope_freqs.weight":
                continue  # refused with its metadata in _hf_config
            hf = GLOBAL_NAMES.get(name)
            parts = name.split(".", 2)
            if hf is None and parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
                short = LAYER_NAMES.get(parts[2])
                hf = f"model.layers.{int(parts[1])}.{short}" if short else None
            if hf is None:
                raise BTXError(
                    f"{self.path}: tensor {name!r} has no place in an HF {self.arch} model; the "
                    f"file has modules this importer does not know"
                )
            mapped[hf] = tensor
        return mapped

    def _raw_shape(self, name: str) -> list[int]:
        for tensor in self._reader.tensors:
            if tensor.name == name:
                return [int(d) for d in reversed(tensor.shape.tolist())]
        raise BTXError(f"{self.path}: tensor {name!r} is missing")

    def _check_shapes(self) -> None:
        """Each tensor's type is supported and its bytes are as many as its shape needs."""
        sizes = self._quants.GGML_QUANT_SIZES
        for tensor in self._tensors.values():
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise BTXError(
                    f"{self.path}: tensor {tensor.name!r} is {kind}, a quantization this importer "
                    f"does not dequantize (supported: {', '.join(SUPPORTED_TYPES)}); use a GGUF "
                    f"quantized to one of those"
                )
            block, block_bytes = sizes[tensor.tensor_type]
            inner = int(tensor.shape[0]) if len(tensor.shape) else 1
            count = int(tensor.n_elements)
            if inner % block or tensor.data.nbytes != count // block * block_bytes:
                raise BTXError(
                    f"{self.path}: tensor {tensor.name!r} holds {tensor.data.nbytes} bytes, its "
                    f"{kind} shape {tensor.shape.tolist()} needs {count // block * block_bytes}; "
                    f"the file is corrupt or truncated"
                )

    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> list[int]:
        return [int(d) for d in reversed(self._tensors[key].shape.tolist())]

    def dtype(self, key: str) -> str:
        """Every tensor is handed out dequantized to fp32 (the safetensors dtype name)."""
        return "F32"

    def quant_type(self, key: str) -> str:
        return self._tensors[key].tensor_type.name

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key` (an HF name), dequantized to fp32 in HF's shape and layout."""
        tensor = self._tensors.get(key)
        if tensor is None:
            raise BTXError(f"{self.path}: tensor {key!r} is missing from the GGUF file")
        values = self._quants.dequantize(tensor.data, tensor.tensor_type)
        result = torch.from_numpy(values.astype("float32", copy=True)).reshape(self.shape(key))
        if self.arch in ROPE_REORDERED and key.endswith(("q_proj.weight", "q_proj.bias")):
            result = unpermute_rope_rows(result, self.config["num_attention_heads"])
        elif self.arch in ROPE_REORDERED and key.endswith(("k_proj.weight", "k_proj.bias")):
            result = unpermute_rope_rows(result, self.config["num_key_value_heads"])
        if out is not None:
            return out.copy_(result)
        return result

    def close(self) -> None:
        """Drop the reader's memory map."""
        self._tensors = {}
        with contextlib.suppress(AttributeError):
            del self._reader

    # ---- provenance ----------------------------------------------------------------------
    def quantization(self) -> dict[str, Any]:
        """What the manifest records of the quantization: the file type llama.cpp wrote and
        how many tensors each ggml type holds."""
        counts = collections.Counter(t.tensor_type.name for t in self._tensors.values())
        file_type = self._int("general.file_type")
        return {
            "file_type": file_type,
            "tensor_types": dict(sorted(counts.items())),
            "quantization_version": self._int("general.quantization_version"),
        }

    def record(self, model_type: str, expert_layout: str | None = None) -> dict[str, Any]:
        """The manifest's ``sources`` entry of this file (a dense model: no expert layout)."""
        return {
            "path": str(self.path.resolve()),
            "format": "gguf",
            "model_type": model_type,
            "gguf_architecture": self.arch,
            "name": self._str("general.name"),
            "quantization": self.quantization(),
            "dequantized_to": "fp32",
            "sha256": {self.path.name: manifest.sha256_file(self.path)},
        }

    def write_tokenizer(self, folder: Path) -> list[str]:
        """tokenizer.json, tokenizer_config.json and config.json (the special ids) from the GGUF
        vocabulary into `folder`; returns the names written."""
        from megatron_btx.checkpoint.gguf_tokenizer import write_tokenizer

        folder.mkdir(parents=True, exist_ok=True)
        names = write_tokenizer(self._tokenizer, self.meta, folder)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        return [*names, "config.json"]


def _contents(field: Any) -> Any:
    """A metadata field's value (numbers, strings, lists of them), as the reader decodes it."""
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
