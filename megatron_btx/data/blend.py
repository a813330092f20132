"""Weighted domain blends as megatron-core ``GPTDataset``/``BlendedDataset`` objects.

Everything that decides which tokens a model sees (document shuffling, packing into
``seq_length + 1`` windows, weighted blending, index caching shared between ranks) is megatron-core's
``BlendedMegatronDatasetBuilder``; this module only maps our on-disk layout
(``<prefix>_{train,valid,test}_text_document``, already split by document) onto it through
``blend_per_split`` and supplies the tokenizer object it expects.

Written against megatron-core 0.16.1: ``GPTDatasetConfig`` wants a ``MegatronTokenizerBase`` with
``vocab_size``/``eod``/``pad`` and a JSON-able ``unique_identifiers`` (it is hashed into the cache
key), and ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unguarded when it writes its
index cache, so a single process without a process group gets a temporary 1-rank group
(:func:`megatron_btx.runtime.single_process_group`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_btx import runtime
from megatron_btx.data.index_cache import guarded
from megatron_btx.data.indexed_check import check_indexed
from megatron_btx.data.preprocess import split_prefix
from megatron_btx.data.splits import SPLITS
from megatron_btx.data.tokenizer import load_tokenizer
from megatron_btx.data.tokenizer_base import Tokenizer
from megatron_btx.errors import BTXError

logger = logging.getLogger(__name__)

TESTED_MEGATRON_CORE = "0.16.1"


class MegatronTokenizerAdapter(MegatronTokenizerBase):
    """Our SentencePiece :class:`Tokenizer` in the shape megatron-core datasets expect."""

    def __init__(self, tokenizer: Tokenizer | str | os.PathLike[str]) -> None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        super().__init__(tok.path, {})
        self._tok = tok
        # Hashed into megatron's dataset cache key: content hash, not path, so moving the data
        # directory keeps cache hits while a different tokenizer never reuses stale indices.
        self.unique_identifiers = {
            "class": "SentencePieceTokenizer",
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
        }

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    def tokenize(self, text: str) -> list[int]:  # type: ignore[override]
        return self._tok.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:  # type: ignore[override]
        return self._tok.decode(ids)

    @property
    def vocab(self) -> dict[str, int]:  # type: ignore[override]
        return {self._tok.id_to_piece(i): i for i in range(self._tok.vocab_size)}

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self._tok.vocab_size

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise NotImplementedError("BTX pre-training data has no chat template")

    @property
    def eod(self) -> int:
        return self._tok.eos_id

    @property
    def eos(self) -> int:
        return self._tok.eos_id

    @property
    def bos(self) -> int:
        return self._tok.bos_id

    @property
    def pad(self) -> int:
        return self._tok.pad_id


def as_megatron_tokenizer(tokenizer: Any) -> Any:
    """Wrap a :class:`Tokenizer` or model path; pass through anything megatron-like already."""
    if isinstance(tokenizer, (Tokenizer, str, os.PathLike)):
        return MegatronTokenizerAdapter(tokenizer)
    if not hasattr(tokenizer, "eod") or not hasattr(tokenizer, "vocab_size"):
        raise BTXError(
            f"tokenizer {tokenizer!r} has no eod/vocab_size; pass the tokenizer.model path"
        )
    return tokenizer


def _check_prefix(prefix: str, what: str) -> int:
    """Number of documents in an indexed dataset, or BTXError naming the missing file."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise BTXError(
                f"{what}: dataset file {prefix + ext} not found; create it with `btx prepare-data` "
                "(outputs are <prefix>_{train,valid,test}_text_document.{bin,idx}) or fix the prefix"
            )
    count = check_indexed(prefix)  # the index matches its data before megatron-core reads it
    if os.path.getsize(prefix + ".bin") == 0:  # an empty split: megatron cannot mmap it
        return 0
    return count


def _normalise_blend(
    prefixes_with_weights: Sequence[tuple[str, float]] | Mapping[str, float],
) -> list[tuple[str, float]]:
    items = (
        list(prefixes_with_weights.items())
        if isinstance(prefixes_with_weights, Mapping)
        else list(prefixes_with_weights)
    )
    if not items:
        raise BTXError("empty data blend: give at least one (prefix, weight)")
    out = []
    for prefix, weight in items:
        if not float(weight) >= 0.0:
            raise BTXError(f"data blend weight for {prefix} is {weight}; weights must be >= 0")
        if float(weight) > 0:
            out.append((os.fspath(prefix), float(weight)))
    if not out:
        raise BTXError("every data blend weight is 0; give at least one positive weight")
    return out


def make_gpt_config(
    seq_length: int,
    seed: int,
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None,
    blend_per_split: list[tuple[list[str], list[float] | None] | None],
    *,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = True,
    **extra: Any,
) -> GPTDatasetConfig:
    """A GPTDatasetConfig with our defaults (no EOD loss masking, no position resets)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blend_per_split,
        path_to_cache=os.fspath(cache_dir) if cache_dir else None,
        tokenizer=as_megatron_tokenizer(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        **extra,
    )


def _build(
    config: GPTDatasetConfig, sizes: list[int | None], is_built_on_rank: Callable[[], bool] | None
) -> list[Any]:
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    with runtime.single_process_group() if config.path_to_cache else contextlib.nullcontext():
        with guarded(config.path_to_cache):  # no pickle in the cache megatron-core loads
            return builder.build()


def build_blend_datasets(
    prefixes_with_weights: Sequence[tuple[str, float]] | Mapping[str, float],
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int | None, int | None],
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    is_built_on_rank: Callable[[], bool] | None = None,
    **config_kwargs: Any,
) -> tuple[Any, Any, Any]:
    """(train, valid, test) datasets blending domains by weight.

    ``prefixes_with_weights``: ``[(out_dir/"code", 0.5), ...]`` or ``{prefix: weight}``, where a
    prefix names a prepared domain (``<prefix>_{split}_text_document`` must exist). For a split
    with a sample count the domains are blended by weight; with ``None`` it is one pass over each
    domain's documents in natural proportions (the usual choice for valid/test). A count of 0
    skips the split (returned as None). Each sample has ``seq_length + 1`` tokens (``tokens`` and
    ``labels`` of ``seq_length``); blended samples carry a ``dataset_id`` (index into the blend).
    Domains with an empty valid/test split are left out of that split with a warning.
    """
    blend = _normalise_blend(prefixes_with_weights)
    if seq_length < 1:
        raise BTXError(f"seq_length={seq_length} must be positive")
    if len(num_samples) != 3:
        raise BTXError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    blend_per_split: list[tuple[list[str], list[float] | None] | None] = []
    sizes: list[int | None] = []
    for split, size in zip(SPLITS, num_samples, strict=True):
        if size == 0:
            blend_per_split.append(None)
            sizes.append(None)
            continue
        prefixes, weights = [], []
        for base, weight in blend:
            prefix = split_prefix(base, split)
            if _check_prefix(prefix, f"{split} split of {base}") == 0:
                if split == "train":
                    raise BTXError(
                        f"{prefix}.idx has no documents; the train split of {base} is empty"
                    )
                warnings.warn(
                    f"{prefix} has no documents; {base} is left out of the {split} blend",
                    stacklevel=2,
                )
                continue
            prefixes.append(prefix)
            weights.append(weight)
        if not prefixes:
            raise BTXError(
                f"every domain's {split} split is empty; prepare more data or pass num_samples 0 for {split}"
            )
        blend_per_split.append((prefixes, weights if size is not None else None))
        sizes.append(size)
    config = make_gpt_config(
        seq_length, seed, tokenizer, cache_dir, blend_per_split, **config_kwargs
    )
    train, valid, test = _build(config, sizes, is_built_on_rank)
    return train, valid, test


def build_domain_datasets(
    prefixes: Mapping[str, str | os.PathLike[str]],
    seq_length: int,
    seed: int,
    tokenizer: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    split: str = "valid",
    num_samples: int | None = None,
    *,
    is_built_on_rank: Callable[[], bool] | None = None,
    **config_kwargs: Any,
) -> dict[str, Any]:
    """One dataset per domain for one split, for per-domain validation/test loss.

    ``num_samples=None`` gives one full pass over the domain's documents (each sample
    ``seq_length + 1`` tokens); domains whose split is empty are omitted with a warning.
    """
    if split not in SPLITS:
        raise BTXError(f"split {split!r} must be one of {', '.join(SPLITS)}")
    index = SPLITS.index(split)
    out: dict[str, Any] = {}
    for name, base in prefixes.items():
        prefix = split_prefix(base, split)
        if _check_prefix(prefix, f"domain {name}") == 0:
            warnings.warn(
                f"{prefix} has no documents; no {split} dataset for domain {name}", stacklevel=2
            )
            continue
        blend_per_split: list[tuple[list[str], list[float] | None] | None] = [None, None, None]
        blend_per_split[index] = ([prefix], None)
        sizes: list[int | None] = [None, None, None]
        sizes[index] = num_samples
        config = make_gpt_config(
            seq_length, seed, tokenizer, cache_dir, blend_per_split, **config_kwargs
        )
        out[name] = _build(config, sizes, is_built_on_rank)[index]
    return out


def domain_prefixes_from_manifest(out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``{domain: out_dir/domain}`` for every domain in ``out_dir/manifest.json``."""
    from megatron_btx.data.preprocess import load_manifest

    manifest = load_manifest(out_dir)
    return {name: os.path.join(os.fspath(out_dir), name) for name in manifest.get("domains", {})}
