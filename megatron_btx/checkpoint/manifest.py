"""The provenance manifest every checkpoint we write carries (`btx_manifest.json`).

It is what makes checkpoints the interface between stages: a later stage reads the model config,
the layout it was written at and where it came from without loading a tensor.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import megatron_btx
from megatron_btx.errors import BTXError
from megatron_btx.inputs import sha256_file  # noqa: F401  (checkpoint.manifest.sha256_file)

MANIFEST = "btx_manifest.json"
#: the dtype names a manifest may record (ours, and the torch names)
DTYPE_NAMES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
FORMAT_VERSION = 1
#: the largest manifest we read (kilobytes in practice; a file hash per checkpoint file)
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def sha256_folder(folder: str | Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every regular file in `folder` matching `pattern` (not recursive); a link out
    of the folder is refused (:func:`megatron_btx.inputs.inside`), never hashed."""
    from megatron_btx.inputs import inside

    found = sorted(p for p in Path(folder).glob(pattern) if p.is_file() or p.is_symlink())
    return {p.name: sha256_file(inside(folder, p)) for p in found if inside(folder, p).is_file()}


@dataclass(kw_only=True)
class Manifest:
    """What a checkpoint's ``btx_manifest.json`` records. Every writer (training, the merge, the
    converters and exporters) fills one of these; :func:`write` adds the format and tool
    versions and the date. Fields left None are not written."""

    #: megatron_torch_dist, or hf_<family> for an HF export
    kind: str
    #: the model's hyper-parameters (LlamaArgs.to_dict())
    model: dict[str, Any]
    #: the stored dtype (fp32, bf16, fp16)
    dtype: str
    #: the MoE shape beyond Mixtral's (MoEVariant.to_manifest()); None for a plain model
    moe: dict[str, Any] | None = None
    #: the parallel layout it was written for (tp, pp, ep, ...)
    layout: dict[str, Any] | None = None
    padded_vocab_size: int | None = None
    #: the tokenizer files beside it, their sha256, the tokenizer's kind
    tokenizer: dict[str, Any] | None = None
    #: what it was made from (each: path, format, sha256, ...)
    sources: list[dict[str, Any]] | None = None
    #: an import's origin (format, quantization, ...)
    source: dict[str, Any] | None = None
    #: a merge's record (its settings, plan and router init)
    merge: dict[str, Any] | None = None
    #: a training checkpoint's record (run, step, data, router)
    training: dict[str, Any] | None = None
    #: an HF export's router (the HF routing it was written with)
    router: str | None = None
    step: int | None = None
    consumed_samples: int | None = None
    num_tensors: int | None = None
    #: sha256 of every file (btx verify; checked when a later stage reads it)
    files: dict[str, str] | None = None
    #: a merge's --verify report
    verify: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def write(folder: str | Path, manifest: Manifest) -> dict[str, Any]:
    """Write `manifest` into `folder` (atomically): format version, tool version, date, and its
    fields. Returns what was written."""
    m = {
        "format_version": FORMAT_VERSION,
        "tool": "megatron_btx",
        "tool_version": megatron_btx.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **manifest.to_dict(),
    }
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return m


def rewrite(folder: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write a manifest read back from a checkpoint (`record`, as :func:`read` returns it) into
    `folder` again, as a Manifest: e.g. a resaved copy of a checkpoint at another layout."""
    known = {f.name for f in dataclasses.fields(Manifest)}
    return write(folder, Manifest(**{k: v for k, v in record.items() if k in known}))


def read(folder: str | Path) -> dict[str, Any]:
    from megatron_btx.inputs import inside, read_small

    path = Path(folder) / MANIFEST
    if not (path.is_file() or path.is_symlink()):
        raise BTXError(f"{folder}: no {MANIFEST}; not a checkpoint written by megatron_btx")
    raw = read_small(inside(folder, path, "manifest"), "manifest", MAX_MANIFEST_BYTES)
    try:
        m = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise BTXError(f"{path}: cannot be read ({e}); the checkpoint's manifest is corrupt") from e
    if not isinstance(m, dict):
        raise BTXError(f"{path}: holds a {type(m).__name__}, not a manifest; it is corrupt")
    version = m.get("format_version", 0)
    if not isinstance(version, int):
        raise BTXError(f"{path}: format_version {version!r} is not a number; it is corrupt")
    if version > FORMAT_VERSION:
        raise BTXError(
            f"{path}: format version {m['format_version']} is newer than this megatron_btx "
            f"understands ({FORMAT_VERSION}); upgrade megatron_btx"
        )
    check_fields(m, str(path))
    return m


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_fields(m: dict[str, Any], where: str) -> None:
    """The manifest entries later stages act on have the types they are read as (a corrupt or
    hand-edited manifest is one line naming the entry, not a traceback where it is used)."""

    def bad(key: str, value: Any, what: str) -> BTXError:
        return BTXError(f"{where}: {key}={_short(value)} {what}; the manifest is corrupt")

    for key in ("model", "layout", "moe", "files"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise bad(key, m[key], "is not a mapping")
    if m.get("dtype") is not None and m["dtype"] not in DTYPE_NAMES:
        raise bad("dtype", m["dtype"], f"is not one of {', '.join(DTYPE_NAMES)}")
    for key in ("step", "consumed_samples"):
        if m.get(key) is not None and not _natural(m[key]):
            raise bad(key, m[key], "is not a count")
    moe = m.get("moe") or {}
    freq = moe.get("layer_freq")
    layers = (m.get("model") or {}).get("num_hidden_layers")
    if freq is not None and not (
        isinstance(freq, list)
        and all(x in (0, 1) for x in freq)
        and (not _natural(layers) or len(freq) == layers)
    ):
        raise bad("moe.layer_freq", freq, "is not a list of 0/1 per layer")
    for key in ("shared_expert_intermediate_size", "dense_ffn_hidden_size", "attention_experts"):
        if moe.get(key) is not None and not _natural(moe[key]):
            raise bad(f"moe.{key}", moe[key], "is not a size")
    if moe.get("attention_shared_kv") is not None and not isinstance(
        moe["attention_shared_kv"], bool
    ):
        raise bad("moe.attention_shared_kv", moe["attention_shared_kv"], "is not true or false")
    files = m.get("files") or {}
    if any(not (isinstance(k, str) and isinstance(v, str)) for k, v in files.items()):
        raise bad("files", "...", "is not a map of file names to sha256 digests")
