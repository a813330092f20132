"""Everything a user chooses about a merge, in one object built once (by the command line or the
pipeline) and passed whole to :func:`megatron_btx.merge.run.merge`.

:class:`MergeSettings` is the merge's only schema. Each field carries its command-line form in
its metadata: `btx merge`'s argparse parser is generated from it (:func:`build_parser`), the
pipeline builds the object directly and turns it into the stage's command line with
:meth:`MergeSettings.to_argv`, the run config's ``merge:`` section takes the fields marked
``run`` (:func:`run_keys`), and the output manifest records :func:`dataclasses.asdict` of it.
Error messages name a setting as its user gave it: ``--top-k`` on the command line, ``merge.top_k``
in a run config (:meth:`MergeSettings.name`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError

DENSE_FFN = ("average", "seed")
#: the attention: averaged (BTX) or kept as attention experts (BAM; merge.attention)
ATTENTION = ("average", "experts", "experts_shared_kv")
DTYPES = ("fp32", "bf16", "fp16")
#: megatron-core's granular-upcycling weight scale, by how the router normalises (merge.upcycling)
UPCYCLING_SCALES = ("none", "topk", "pre_softmax")
#: what an MoE given to --into keeps outside its FFNs
SHARED = ("keep", "average")


def _expert_map(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated source indices") from e


def _router_inits() -> list[str]:
    from megatron_btx.merge import router_inits

    return list(router_inits.names())


def option(
    default: Any,
    help: str,
    *,
    kind: Any = str,
    flag: str | None = None,
    nargs: str | None = None,
    choices: Any = None,
    metavar: str | None = None,
    required: bool = False,
    run: bool = True,
    group: str = "variants",
) -> Any:
    """A MergeSettings field and its command-line form. `kind`: the value's type (bool: a
    switch, `--no-NAME` when the default is true); `choices`: a tuple or a callable giving one;
    `run`: a run config may set it under ``merge:`` (the others the planner sets)."""
    meta = {
        "help": help,
        "kind": kind,
        "flag": flag,
        "nargs": nargs,
        "choices": choices,
        "metavar": metavar,
        "required": required,
        "run": run,
        "group": group,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MergeSettings:
    """The BTX merge's inputs and choices (see `btx merge --help` for each)."""

    # ---- sources and layout (the planner sets these) ----------------------------------------
    experts: list[str] = option(
        [],
        "dense expert checkpoints (HF folder, megatron checkpoint, or a run / checkpoints folder "
        "with a `latest` file); expert i = i-th source",
        nargs="+",
        metavar="DIR",
        required=True,
        run=False,
        group="sources",
    )
    save: str = option(
        "", "output folder (atomic)", metavar="DIR", required=True, run=False, group="sources"
    )
    #: the seed, kept as the last expert (the paper's generalist) or as the shared expert
    seed: str | None = option(
        None,
        "the seed model, kept as the last expert (the paper's generalist); or the shared expert "
        "with --seed-as-shared-expert",
        metavar="DIR",
        run=False,
        group="sources",
    )
    tp: int = option(1, "target tensor-parallel size", kind=int, run=False, group="sources")
    pp: int = option(1, "target pipeline-parallel size", kind=int, run=False, group="sources")
    ep: int = option(1, "target expert-parallel size", kind=int, run=False, group="sources")
    etp: int | None = option(
        None,
        "target expert-tensor-parallel size (default: --tp)",
        kind=int,
        run=False,
        group="sources",
    )
    #: a trained MoE the sources' FFNs are added to as new experts (megatron_btx.merge.into)
    into: str | None = option(
        None,
        "add the sources' FFNs as new experts to this MoE checkpoint (experts N+1...): its "
        "experts and router rows are kept bit for bit; the new experts' rows come from "
        "--router-init",
        metavar="MOE",
        run=False,
        group="sources",
    )
    shared: str = option(
        "keep",
        "with --into: the MoE's tensors outside its experts (attention, norms, embeddings, dense "
        "FFNs) are kept (keep) or averaged with the new sources' (average: weights n/(n+k) and "
        "k/(n+k) for n old and k new experts)",
        choices=SHARED,
        run=False,
        group="sources",
    )
    # ---- routers ------------------------------------------------------------------------------
    router_init: str = option(
        "random",
        "how the new routers start (megatron_btx.merge.router_inits)",
        choices=_router_inits,
        group="router",
    )
    router_std: float = option(0.02, "std of the random router", kind=float, group="router")
    router_seed: int = option(1234, "RNG seed of the random router", kind=int, group="router")
    #: per source (experts in order, then the seed): an indexed-dataset prefix or a text file
    centroid_data: list[str] | None = option(
        None,
        "per source (experts in order, then the seed): an indexed-dataset prefix, a text/jsonl "
        "file of that expert's domain, or a blend PREFIX@W,PREFIX@W,...; for --router-init "
        "centroid",
        nargs="+",
        metavar="DATA",
        run=False,
        group="router",
    )
    centroid_tokens: int = option(
        2048, "tokens of each domain sample for centroids", kind=int, group="router"
    )
    centroid_seq_len: int = option(
        256, "sequence length of the centroid samples", kind=int, group="router"
    )
    tokenizer: str | None = option(
        None,
        "tokenizer for text centroid data: a SentencePiece .model or an HF tokenizer folder "
        "(default: the sources')",
        run=False,
        group="router",
    )
    top_k: int | None = option(
        None,
        "experts per token (default 2, times C with --split-chunks)",
        kind=int,
        group="router",
    )
    # ---- variants -----------------------------------------------------------------------------
    expert_map: list[int] | None = option(
        None,
        "routed expert j takes the FFN of source I_j (sources: experts in order, then the seed); "
        "default: one expert per source",
        kind=_expert_map,
        metavar="I,J,...",
    )
    average_weights: list[float] | None = option(
        None,
        "per-source weights of the averaged tensors (default: uniform)",
        kind=float,
        nargs="+",
        metavar="W",
    )
    split_chunks: int = option(
        1,
        "split each FFN into C experts along the hidden FFN dimension (N*C experts)",
        kind=int,
        metavar="C",
    )
    blend: bool = option(
        False, "expert c = chunk c of every source's FFN (C = --split-chunks, default N)", kind=bool
    )
    seed_as_shared_expert: bool = option(
        False,
        "the seed's FFN becomes a shared expert (always active) instead of a routed one",
        kind=bool,
    )
    moe_layers: str | None = option(
        None,
        "which layers become MoE: all (default), 0,2,5, every:K, last:K; the others keep a "
        "dense FFN",
        metavar="SPEC",
    )
    dense_ffn: str = option("average", "the FFN of non-MoE layers", choices=DENSE_FFN)
    attention: str = option(
        "average",
        "the attention: averaged (BTX), or each source's kept as an attention expert mixed by a "
        "soft router per layer (experts: BAM), or so with the key/value projections averaged "
        "and shared (experts_shared_kv)",
        choices=ATTENTION,
    )
    drop_ratio: float = option(
        0.0,
        "Drop-Upcycling (arXiv 2502.19261): in every routed expert, re-initialise round(R x F) "
        "of its F intermediate units (rows of gate and up, columns of down) from a normal with "
        "the mean and std of that matrix; each expert its own random subset",
        kind=float,
        metavar="R",
    )
    drop_seed: int = option(
        0, "RNG seed of --drop-ratio's subsets and values (per layer and expert)", kind=int
    )
    upcycling_scale: str = option(
        "none",
        "scale every routed expert's fc1 and fc2 by megatron-core's MoE activation scale ^ 1/3 "
        "(granular upcycling, arXiv 2410.07524; G = --split-chunks, E experts, top-k k): "
        "topk for a router that takes the softmax over the top-k (scale G), pre_softmax for one "
        "that takes it before (scale E x G / k)",
        choices=UPCYCLING_SCALES,
    )
    # ---- outputs ------------------------------------------------------------------------------
    dtype: str | None = option(
        None,
        "output dtype (default: the sources'; the widest of them when they differ, e.g. "
        "experts trained in bf16 beside an fp32 seed give fp32, which holds both exactly)",
        choices=DTYPES,
        group="outputs",
    )
    export_hf: str | None = option(
        None, "also write an HF checkpoint", metavar="DIR", run=False, group="outputs"
    )
    hf_shard_gb: float = option(1.0, "HF export shard size", kind=float, run=False, group="outputs")
    verify: bool = option(
        False,
        "re-read the output and check it against the sources before committing",
        kind=bool,
        group="outputs",
    )
    #: check each source's files against the sha256 its manifest records
    verify_hashes: bool = option(
        True,
        "do not check megatron sources' files against their manifests' sha256",
        kind=bool,
        group="outputs",
    )
    #: record the sha256 of every output file (hashed as written: ~1 s of CPU per 2 GB)
    hash_output: bool = option(
        True,
        "do not record the output files' sha256 in its manifest (saves ~1 s of CPU per 2 GB "
        "written; `btx verify` then has nothing to check)",
        kind=bool,
        group="outputs",
    )
    overwrite: bool = option(
        False, "replace existing output folders", kind=bool, run=False, group="outputs"
    )
    progress: bool = option(True, "no progress bar", kind=bool, run=False, group="outputs")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def source_paths(self) -> list[Path]:
        """Every source in merge order: the experts, then the seed."""
        return [Path(p) for p in self.experts] + ([Path(self.seed)] if self.seed else [])

    @property
    def has_seed(self) -> bool:
        return self.seed is not None

    def name(self, key: str) -> str:
        """How the user gave setting `key`: a flag of `btx merge`, or a run config key."""
        prefix = getattr(self, "_run_prefix", None)
        return f"{prefix}{key}" if prefix else flag_of(key)

    def as_run_settings(self, prefix: str = "merge.") -> MergeSettings:
        """These settings, naming themselves as keys of a run config (``merge.top_k``)."""
        object.__setattr__(self, "_run_prefix", prefix)
        return self

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """The checks that need no checkpoint: each names the setting at fault."""
        from megatron_btx.merge import router_inits

        name = self.name
        if not self.experts:
            raise BTXError(f"{name('experts')} needs at least one source checkpoint")
        if self.router_init not in router_inits.names():
            raise BTXError(
                f"{name('router_init')} {self.router_init!r}: use {', '.join(router_inits.names())}"
            )
        if self.dense_ffn not in DENSE_FFN:
            raise BTXError(f"{name('dense_ffn')} {self.dense_ffn!r}: use average or seed")
        if self.attention not in ATTENTION:
            raise BTXError(f"{name('attention')} {self.attention!r}: use {', '.join(ATTENTION)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BTXError(f"{name('dtype')} {self.dtype!r}: use {', '.join(DTYPES)}")
        for key in ("tp", "pp", "ep", "split_chunks", "centroid_tokens", "centroid_seq_len"):
            if _int(getattr(self, key)) < 1:
                raise BTXError(f"{name(key)} {getattr(self, key)} must be >= 1")
        for key in ("etp", "top_k"):
            if getattr(self, key) is not None and _int(getattr(self, key)) < 1:
                raise BTXError(f"{name(key)} {getattr(self, key)} must be >= 1")
        if not _finite(self.router_std) or self.router_std < 0:
            raise BTXError(f"{name('router_std')} {self.router_std} must be a finite number >= 0")
        if not _finite(self.hf_shard_gb) or self.hf_shard_gb <= 0:
            raise BTXError(f"{name('hf_shard_gb')} {self.hf_shard_gb} must be a finite number > 0")
        if isinstance(self.router_seed, bool) or not isinstance(self.router_seed, int):
            raise BTXError(f"{name('router_seed')} {self.router_seed!r} must be an integer")
        if self.seed_as_shared_expert and self.seed is None:
            raise BTXError(f"{name('seed_as_shared_expert')} needs {name('seed')}")
        self._validate_family()
        router_inits.get(self.router_init).check(self)
        if self.export_hf is not None:
            export, save = Path(self.export_hf).resolve(), Path(self.save).resolve()
            if export == save or save in export.parents or export in save.parents:
                raise BTXError(
                    f"{name('export_hf')} must be a folder apart from {name('save')} (not in it)"
                )

    def _validate_family(self) -> None:
        """Drop-Upcycling, the granular-upcycling scale and --into (merge.upcycling, merge.into)."""
        name = self.name
        if not _finite(self.drop_ratio) or not 0 <= self.drop_ratio <= 1:
            raise BTXError(f"{name('drop_ratio')} {self.drop_ratio} must be a number in [0, 1]")
        if isinstance(self.drop_seed, bool) or not isinstance(self.drop_seed, int):
            raise BTXError(f"{name('drop_seed')} {self.drop_seed!r} must be an integer")
        if self.upcycling_scale not in UPCYCLING_SCALES:
            raise BTXError(
                f"{name('upcycling_scale')} {self.upcycling_scale!r}: use "
                f"{', '.join(UPCYCLING_SCALES)}"
            )
        if self.upcycling_scale != "none" and self.blend:
            raise BTXError(
                f"{name('upcycling_scale')} scales copies of one FFN's shards; it is not defined "
                f"with {name('blend')}"
            )
        if self.shared not in SHARED:
            raise BTXError(f"{name('shared')} {self.shared!r}: use {', '.join(SHARED)}")
        if self.into is None:
            if self.shared != "keep":
                raise BTXError(f"{name('shared')} applies only with {name('into')}")
            return
        fixed = {  # the MoE given to --into decides these
            "split_chunks": 1,
            "blend": False,
            "expert_map": None,
            "average_weights": None,
            "seed_as_shared_expert": False,
            "moe_layers": None,
            "dense_ffn": "average",
            "upcycling_scale": "none",
        }
        for key, default in fixed.items():
            if getattr(self, key) != default:
                raise BTXError(
                    f"{name(key)} does not apply with {name('into')}: the MoE's own experts, "
                    f"layers and shared expert are kept; remove it"
                )

    # ---- the command line -----------------------------------------------------------------
    def to_argv(self) -> list[str]:
        """`btx merge`'s flags for these settings (every value that differs from its default,
        the required ones always): parsing them gives these settings back."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if not meta["required"] and value == _default(f):
                continue
            flag = flag_of(f.name)
            if meta["kind"] is bool:
                argv.append(flag)  # a switch: it is given when it differs from the default
            elif isinstance(value, list):
                text = [str(x) for x in value]
                argv += [flag, ",".join(text)] if meta["nargs"] is None else [flag, *text]
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> MergeSettings:
        """From `btx merge`'s parsed command line (:func:`build_parser`)."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_choices(cls, choices: dict[str, Any], **planned: Any) -> MergeSettings:
        """From a run config's ``merge:`` choices (:func:`run_keys`) and the values the planner
        sets (sources, layout, ...); named as run config keys in errors."""
        settings = cls(**{**choices, **planned}).as_run_settings()
        return settings


def flag_of(key: str) -> str:
    """The `btx merge` flag of MergeSettings field `key`."""
    f = _fields()[key]
    if f.metadata["flag"]:
        return f.metadata["flag"]
    dashed = key.replace("_", "-")
    return f"--no-{dashed}" if f.metadata["kind"] is bool and f.default is True else f"--{dashed}"


def run_keys() -> dict[str, Any]:
    """The settings a run config may choose under ``merge:``, with their defaults."""
    return {name: _default(f) for name, f in _fields().items() if f.metadata["run"]}


def check_run_value(key: str, value: Any, where: str) -> Any:
    """A run config's ``merge.KEY: value`` checked against the field's kind (a number where a
    number belongs, a list where a list does): a BTXError naming the key otherwise."""
    f = _fields()[key]
    kind, many = f.metadata["kind"], f.metadata["nargs"] is not None or key == "expert_map"
    if value is None:
        if _default(f) is not None:
            raise BTXError(f"{where}: merge.{key} must not be null")
        return value
    items = value if many else [value]
    if many and not isinstance(value, list):
        raise BTXError(f"{where}: merge.{key} must be a list")
    item_kind = int if key == "expert_map" else kind
    for item in items:
        if not _is_kind(item, item_kind):
            raise BTXError(f"{where}: merge.{key}={value!r} must be {_kind_name(item_kind)}")
    choices = f.metadata["choices"]
    choices = choices() if callable(choices) else choices
    if choices and value not in choices:
        raise BTXError(f"{where}: merge.{key}={value!r}: use {' | '.join(choices)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """`btx merge`'s parser, one argument per MergeSettings field."""
    p = argparse.ArgumentParser(
        prog="btx merge",
        description="Branch-Train-MiX merge: N dense Llama checkpoints (HF safetensors or megatron "
        "torch_dist at any TP/PP) -> one megatron-core MoE torch_dist checkpoint. Expert i is "
        "source i's FFN, unchanged; every other tensor is the fp32 average of the sources; each "
        "layer gets a new router. Streams layer by layer: memory is bounded by one layer.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in _fields().items():
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(
            meta["group"], p.add_argument_group(meta["group"])
        )
        kwargs: dict[str, Any] = {"dest": name, "help": meta["help"], "default": _default(f)}
        if meta["kind"] is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["type"] = meta["kind"]
            for key in ("nargs", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
            choices = meta["choices"]
            if choices is not None:
                kwargs["choices"] = choices() if callable(choices) else choices
            if meta["required"]:
                kwargs["required"] = True
        group.add_argument(flag_of(name), **kwargs)
    return p


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(MergeSettings)}


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_kind(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return _finite(value)
    return isinstance(value, str)


def _kind_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(kind, "text")
