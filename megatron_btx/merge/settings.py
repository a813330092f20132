"""Everything a user chooses about a merge, in one object built once (by the command line or
the pipeline) and passed whole to :func:`megatron_btx.merge.run.merge`."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_btx.errors import BTXError

ROUTER_INITS = ("random", "zero", "centroid")
DENSE_FFN = ("average", "seed")
#: the attention: averaged (BTX) or kept as attention experts (BAM; merge.attention)
ATTENTION = ("average", "experts", "experts_shared_kv")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class MergeSettings:
    """The BTX merge's inputs and choices (see `btx merge --help` for each)."""

    experts: list[str]
    save: str
    #: the seed, kept as the last expert (the paper's generalist) or as the shared expert
    seed: str | None = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    router_init: str = "random"
    router_std: float = 0.02
    router_seed: int = 1234
    #: per source (experts in order, then the seed): an indexed-dataset prefix or a text file
    centroid_data: list[str] | None = None
    centroid_tokens: int = 2048
    centroid_seq_len: int = 256
    tokenizer: str | None = None
    top_k: int | None = None
    expert_map: list[int] | None = None
    average_weights: list[float] | None = None
    split_chunks: int = 1
    blend: bool = False
    seed_as_shared_expert: bool = False
    moe_layers: str | None = None
    dense_ffn: str = "average"
    #: average (BTX) | experts | experts_shared_kv: each source's attention an attention expert
    attention: str = "average"
    dtype: str | None = None
    export_hf: str | None = None
    hf_shard_gb: float = 1.0
    verify: bool = False
    #: check each source's files against the sha256 its manifest records
    verify_hashes: bool = True
    #: record the sha256 of every output file (hashed as written: ~1 s of CPU per 2 GB)
    hash_output: bool = True
    overwrite: bool = False
    progress: bool = True

    @property
    def source_paths(self) -> list[Path]:
        """Every source in merge order: the experts, then the seed."""
        return [Path(p) for p in self.experts] + ([Path(self.seed)] if self.seed else [])

    @property
    def has_seed(self) -> bool:
        return self.seed is not None

    def validate(self) -> None:
        """The checks that need no checkpoint: each names the flag at fault."""
        if not self.experts:
            raise BTXError("--experts needs at least one source checkpoint")
        if self.router_init not in ROUTER_INITS:
            raise BTXError(f"--router-init {self.router_init!r}: use {', '.join(ROUTER_INITS)}")
        if self.dense_ffn not in DENSE_FFN:
            raise BTXError(f"--dense-ffn {self.dense_ffn!r}: use average or seed")
        if self.attention not in ATTENTION:
            raise BTXError(f"--attention {self.attention!r}: use {', '.join(ATTENTION)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BTXError(f"--dtype {self.dtype!r}: use {', '.join(DTYPES)}")
        for flag, value in (("--tp", self.tp), ("--pp", self.pp), ("--ep", self.ep)):
            if value < 1:
                raise BTXError(f"{flag} {value} must be >= 1")
        if self.etp is not None and self.etp < 1:
            raise BTXError(f"--etp {self.etp} must be >= 1")
        if self.split_chunks < 1:
            raise BTXError("--split-chunks must be >= 1")
        if not math.isfinite(self.router_std) or self.router_std < 0:
            raise BTXError(f"--router-std {self.router_std} must be a finite number >= 0")
        if not math.isfinite(self.hf_shard_gb) or self.hf_shard_gb <= 0:
            raise BTXError(f"--hf-shard-gb {self.hf_shard_gb} must be a finite number > 0")
        for flag, value in (
            ("--centroid-tokens", self.centroid_tokens),
            ("--centroid-seq-len", self.centroid_seq_len),
        ):
            if value < 1:
                raise BTXError(f"{flag} {value} must be >= 1")
        if self.seed_as_shared_expert and self.seed is None:
            raise BTXError("--seed-as-shared-expert needs --seed")
        if self.export_hf is not None:
            export, save = Path(self.export_hf).resolve(), Path(self.save).resolve()
            if export == save or save in export.parents or export in save.parents:
                raise BTXError("--export-hf must be a folder apart from --save (not in it)")

    def recorded(self) -> dict:
        """The settings as the output manifest records them (paths as given)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> MergeSettings:
        """From `btx merge`'s parsed command line (megatron_btx.merge.cli)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(ns).items() if k in fields}
        values["progress"] = not getattr(ns, "no_progress", False)
        return cls(**values)
