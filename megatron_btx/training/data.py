"""Training and validation data: megatron-core GPT datasets and a loader whose position is one
integer.

The train dataset is megatron-core's blended GPTDataset (built by :mod:`megatron_btx.data.blend`),
which is a deterministic function of (prefixes, weights, seq_length, seed, number of samples).
A step's global batch is therefore fully described by how many samples were consumed before it:
``consumed_samples`` is the whole loader state, and restoring it resumes the exact sample order.
The split of a global batch over data-parallel ranks and microbatches is megatron's pretraining
sampler's: microbatch ``m`` of DP rank ``r`` is samples ``consumed + m*mbs*dp + r*mbs + [0, mbs)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_btx.config import Config
from megatron_btx.errors import BTXError

log = logging.getLogger(__name__)


@dataclass
class DataSources:
    """What the config's data section resolves to on disk."""

    blend: list[tuple[str, float]]  # (prefix, weight), prefix without _{split}_text_document
    valid: dict[str, str]  # domain -> prefix
    tokenizer: str

    def describe(self) -> str:
        total = sum(w for _, w in self.blend)
        return ", ".join(f"{Path(p).name} {w / total:.1%}" for p, w in self.blend)


def resolve_sources(cfg: Config) -> DataSources:
    """Map data.path/domains/blend/tokenizer onto prefixes and weights, or say what is missing."""
    d = cfg.data
    tokenizer = d.tokenizer
    if d.path is not None:
        root = Path(d.path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise BTXError(
                f"data.path={d.path}: no manifest.json there; prepare the data with "
                f"`btx prepare-data --output-dir {d.path} ...` first"
            )
        import json

        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
            raise BTXError(f"{manifest_path}: not valid JSON ({e}); re-run btx prepare-data") from e
        domains = manifest.get("domains") if isinstance(manifest, dict) else None
        if not isinstance(domains, dict):
            raise BTXError(f"{manifest_path}: no 'domains' map; re-run btx prepare-data")
        if tokenizer is None:
            # "tokenizer.model" (SentencePiece) or "tokenizer" (an HF tokenizer folder)
            tokenizer = str(root / manifest.get("tokenizer", {}).get("path", "tokenizer.model"))
    if d.blend is not None:
        blend = [(os.fspath(p), float(w)) for p, w in d.blend]
        valid = {Path(p).name: p for p, _ in blend}
    else:
        if d.domains is None:
            names = list(domains)
            weights = {n: float(domains[n].get("tokens", {}).get("train", 1)) for n in names}
        elif isinstance(d.domains, list):
            names = list(d.domains)
            weights = {
                n: float(domains.get(n, {}).get("tokens", {}).get("train", 1)) for n in names
            }
        else:
            names = list(d.domains)
            weights = {n: float(w) for n, w in d.domains.items()}
        for n in names:
            if n not in domains:
                raise BTXError(
                    f"data.domains: {n!r} is not a domain of {d.path} "
                    f"(it has: {', '.join(domains) or 'none'})"
                )
        blend = [(str(Path(d.path) / n), weights[n]) for n in names if weights[n] > 0]
        valid = {n: str(Path(d.path) / n) for n in names}
    if not blend:
        raise BTXError("data: the blend is empty (every weight is 0)")
    if d.valid_domains is not None:
        known = dict(valid)
        if d.path is not None:
            known.update({n: str(Path(d.path) / n) for n in domains})
        missing = [n for n in d.valid_domains if n not in known]
        if missing:
            raise BTXError(f"data.valid_domains: unknown domain {missing[0]!r}")
        valid = {n: known[n] for n in d.valid_domains}
    if tokenizer is None or not Path(tokenizer).exists():
        raise BTXError(
            f"data.tokenizer: {tokenizer} not found; give a SentencePiece tokenizer.model or an "
            "HF tokenizer folder (tokenizer.json + config.json)"
        )
    return DataSources(blend=blend, valid=valid, tokenizer=str(tokenizer))


def build_datasets(
    cfg: Config, sources: DataSources, cache_dir: str | Path
) -> tuple[Any, dict[str, Any]]:
    """(train dataset with steps x global-batch samples, {domain: one pass of its valid split})."""
    import warnings

    from megatron_btx.data.blend import build_blend_datasets, build_domain_datasets

    d = cfg.data
    n_train = max(cfg.train.steps, 1) * d.global_batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train, _, _ = build_blend_datasets(
            sources.blend,
            d.seq_length,
            cfg.train.seed,
            (n_train, 0, 0),
            sources.tokenizer,
            cache_dir=cache_dir,
            create_attention_mask=False,
        )
        valid = build_domain_datasets(
            sources.valid,
            d.seq_length,
            cfg.train.seed,
            sources.tokenizer,
            cache_dir=cache_dir,
            split="valid",
            create_attention_mask=False,
        )
    valid = {k: v for k, v in valid.items() if v is not None and len(v) > 0}
    for name in sorted(set(sources.valid) - set(valid)):
        log.warning("domain %s: its valid split is empty; validation skips it", name)
    return train, valid


def _collate(samples: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


class BatchLoader:
    """Global batches of a dataset for this DP rank, as lists of microbatches."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        device: torch.device,
        consumed_samples: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise BTXError(
                f"global batch {global_batch_size} is not a multiple of micro batch x DP = "
                f"{micro_batch_size}x{dp_size}"
            )
        self.dataset = dataset
        self.mbs = micro_batch_size
        self.gbs = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.consumed_samples = consumed_samples
        #: token ids must be below this (the model's vocabulary): a dataset written with another
        #: tokenizer, or edited, is one error naming it, not an index error deep in the model
        self.vocab_size = vocab_size

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def batch_at(self, consumed: int) -> list[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        micro = []
        for m in range(self.num_microbatches):
            start = consumed + m * self.mbs * self.dp_size + self.dp_rank * self.mbs
            samples = [self.dataset[(start + j) % n] for j in range(self.mbs)]
            if self.vocab_size is not None:
                self._check_tokens(samples, start)
            micro.append(_collate(samples, self.device))
        return micro

    def _check_tokens(self, samples: list[dict[str, Any]], start: int) -> None:
        for j, sample in enumerate(samples):
            top = max(int(sample["tokens"].max()), int(sample["labels"].max()))
            low = min(int(sample["tokens"].min()), int(sample["labels"].min()))
            if top >= self.vocab_size or low < 0:
                source = getattr(self.dataset, "datasets", None)
                which = sample.get("dataset_id")
                if source is not None and which is not None:
                    where = getattr(source[int(which)].dataset, "path_prefix", "the data")
                else:
                    where = getattr(
                        getattr(self.dataset, "dataset", None), "path_prefix", "the data"
                    )
                bad = top if top >= self.vocab_size else low
                raise BTXError(
                    f"{where}: sample {start + j} holds token id {bad}, outside the model's "
                    f"vocabulary of {self.vocab_size}; the dataset was not written with this "
                    f"tokenizer or has been changed (prepare it again with btx prepare-data)"
                )

    def next(self) -> list[dict[str, torch.Tensor]]:
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.gbs
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
