"""`btx merge --into MOE --experts NEW...`: dense experts branched from the same seed become
experts N+1, N+2, ... of a trained MoE (BTX's asynchrony one step further: a domain added after
the finetune, without training the others again).

- The MoE's experts, shared expert and router rows are kept bit for bit; new expert N+j is the
  FFN of the j-th new source (the seed last, when given), Drop-Upcycled with ``--drop-ratio``.
- Everything outside the experts (attention, norms, embeddings, the dense layers' FFNs) is the
  MoE's (``--shared keep``, the default) or the fp32 average of the MoE's and the new sources'
  with weights n/(n+k) for the MoE and 1/(n+k) for each new source (``--shared average``).
- The new experts' router rows come from ``--router-init`` (zero, random, centroid, ...): a
  centroid row is computed through the extended model's earlier layers, the MoE's own rows in
  place.
- Any layout: the MoE is read at whatever TP/PP/EP it was saved, and written for any EP that
  divides the new expert count.

The streaming merge (:mod:`megatron_btx.merge.run`) does the reading and writing; this module
plans the extended model (:class:`IntoJob`), merges each layer (:func:`extend_layer`) and
re-derives the output for ``--verify`` (:func:`verify_into`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_btx.checkpoint import template as tpl
from megatron_btx.checkpoint.dcp_stream import PartialReader
from megatron_btx.checkpoint.mapping import (
    EMB,
    FC1,
    FC2,
    FINAL_LN,
    OUT,
    ROUTER,
    expert_fc1,
    expert_fc2,
)
from megatron_btx.checkpoint.megatron_io import check_target
from megatron_btx.checkpoint.sources import DTYPE_NAMES, Source, check_sources, open_source
from megatron_btx.errors import BTXError
from megatron_btx.merge.layer import Averager
from megatron_btx.merge.plan import MergePlan, ReadPlan, make_plan
from megatron_btx.merge.run import LayerStream, MergeJob
from megatron_btx.merge.settings import MergeSettings
from megatron_btx.merge.upcycling import transform_expert
from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_for_checkpoint, to_dtype

log = logging.getLogger(__name__)

#: LlamaArgs fields in which an MoE differs from the dense models it was merged from
MOE_FIELDS = (
    "num_local_experts",
    "num_experts_per_tok",
    "router_aux_loss_coef",
    "norm_topk_prob",
    "intermediate_size",
)


def merge_into(settings: MergeSettings) -> dict[str, Any]:
    """Add the dense sources' FFNs to the MoE ``settings.into`` as new experts; returns the
    manifest written (see the module docstring)."""
    t0 = time.time()
    settings.validate()
    given = [*settings.source_paths, Path(settings.into)]
    check_target(settings.save, settings.overwrite, given)
    if settings.export_hf is not None:
        check_target(settings.export_hf, settings.overwrite, given)
    sources: list[Source] = []
    moe = None
    try:
        moe = open_source(settings.into, moe=True)
        for path in settings.source_paths:
            sources.append(open_source(path))
        check_sources(sources)
        check_sources([moe, *sources], ignore=MOE_FIELDS)
        _check_widths(settings, moe, sources[0].args)
        job = IntoJob(settings, sources, moe)
        with job.hashing():
            result = job.write()
    finally:
        for source in [*sources, *([moe] if moe is not None else [])]:
            source.close()
    log.info(
        "added %d experts to %s -> %s (%d experts, top-%d) in %.1fs",
        job.plan.num_experts,
        settings.into,
        settings.save,
        job.out_args.num_local_experts,
        job.out_args.num_experts_per_tok,
        time.time() - t0,
    )
    return result


def _check_widths(settings: MergeSettings, moe: Source, dense: LlamaArgs) -> None:
    expert = moe.args.intermediate_size
    if dense.intermediate_size != expert:
        raise BTXError(
            f"{settings.name('into')} {settings.into}: its experts are {expert} wide, the new "
            f"sources' FFNs {dense.intermediate_size}; new experts must have the MoE's expert "
            f"width (an MoE of split FFNs takes sources of that width)"
        )
    width = moe.variant.dense_ffn_hidden_size
    if settings.shared == "average" and width is not None and width != dense.intermediate_size:
        raise BTXError(
            f"{settings.name('shared')} average: the MoE's dense layers are {width} wide, the "
            f"new sources' FFNs {dense.intermediate_size}; use {settings.name('shared')} keep"
        )


class IntoJob(MergeJob):
    """A merge whose output is the MoE `moe` with the sources' FFNs as experts N+1, N+2, ...:
    its plan is the plan of the new experts alone (``plan.num_experts`` = k), laid out in the
    MoE's layers."""

    def __init__(self, settings: MergeSettings, sources: list[Source], moe: Source):
        self.moe = moe
        #: the MoE's own routed experts (n)
        self.n_old = moe.args.num_local_experts
        super().__init__(settings, sources)

    def _plan(self) -> MergePlan:
        planning = copy.copy(self.settings)
        planning.top_k = None  # the top-k is the extended model's, checked below
        plan = make_plan(self.sources, planning)
        moe_dtype = DTYPE_NAMES[self.moe.dtype]
        if self.settings.dtype is None and moe_dtype != plan.dtype:
            raise BTXError(
                f"{self.settings.name('into')} {self.settings.into} is {moe_dtype}, the new "
                f"sources {plan.dtype}; set {self.settings.name('dtype')}"
            )
        freq = self.moe.variant.layer_freq
        plan.moe_layers = None if freq is None else [i for i, f in enumerate(freq) if f]
        experts = self.n_old + plan.num_experts
        top_k = self.settings.top_k or self.moe.args.num_experts_per_tok
        if not 1 <= top_k <= experts:
            raise BTXError(
                f"{self.settings.name('top_k')} {top_k} must be between 1 and the number of "
                f"experts ({experts})"
            )
        plan.top_k = top_k
        return plan

    def _output_shape(self) -> tuple[LlamaArgs, MoEVariant]:
        fields = self.moe.args.to_dict()
        fields.update(
            num_local_experts=self.n_old + self.plan.num_experts,
            num_experts_per_tok=self.plan.top_k,
        )
        return LlamaArgs.from_dict(fields), self.moe.variant

    def _hashed_files(self):
        return {**super()._hashed_files(), "moe": self.moe.hash_files}

    def _stream(self, template, writer, export) -> LayerStream:
        return IntoStream(self, template, writer, export)

    @property
    def new_experts(self) -> list[int]:
        return list(range(self.n_old, self.out_args.num_local_experts))

    def _verify(self, tmp: Path) -> dict[str, Any]:
        return verify_into(self, tmp)

    def _manifest(self, tmp, tok_files, lineage):
        record = super()._manifest(tmp, tok_files, lineage)
        settings, moe = self.settings, self.moe
        sha = self.hash_jobs["moe"].result()
        if settings.verify_hashes:
            from megatron_btx.checkpoint import integrity

            integrity.check_source(moe.folder, sha)
        new = self.plan.num_experts
        record.merge.update(
            num_experts=self.out_args.num_local_experts,
            top_k=self.out_args.num_experts_per_tok,
            into={
                "moe": str(moe.given),
                "old_experts": self.n_old,
                "new_experts": self.new_experts,
                "shared": settings.shared,
                "weights": (
                    {"moe": self.n_old / (self.n_old + new), "new": new / (self.n_old + new)}
                    if settings.shared == "average"
                    else {"moe": 1.0, "new": 0.0}
                ),
            },
        )
        record.sources.insert(
            0,
            {
                "path": str(moe.given.resolve()),
                "checkpoint": str(moe.folder.resolve()),
                "format": "megatron_torch_dist",
                "role": f"moe (experts 0..{self.n_old - 1}, their router rows)",
                "step": moe.step,
                "sha256": sha,
                "tokenizer_sha256": moe.tokenizer.sha256,
            },
        )
        return record


def _moe_weights(job: IntoJob) -> list[float]:
    """Averaging weights of the reads (the new sources), then the MoE's (n)."""
    return [*job.reads.plan.weights, float(job.n_old)]


def extend_layer(
    plan: MergePlan,
    moe_layer: dict[str, torch.Tensor],
    read_source_layer: Callable[[int], dict[str, torch.Tensor]],
    reads: list[int],
    layer: int,
    n_old: int,
    shared: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Layer `layer` of the extended MoE by short megatron name (averages in fp32, the rest as
    read), and the MoE's router rows (None for a dense layer). `plan`: the plan of the new
    experts over `reads`; `moe_layer`: the MoE's layer; `read_source_layer(read)`: a new
    source's layer."""
    is_moe = ROUTER in moe_layer
    outside = [name for name in moe_layer if not name.startswith("mlp.")]
    averaged = outside + ([] if is_moe else [FC1, FC2])
    avg = Averager([*plan.weights, float(n_old)])
    if shared == "average":
        for name in averaged:
            avg.add(len(plan.weights), name, moe_layer[name])
    ffns = {}
    for read in reads:
        if shared == "keep" and (not is_moe or read not in plan.expert_sources):
            continue
        tensors = read_source_layer(read)
        if shared == "average":
            for name in averaged:
                avg.add(read, name, tensors[name])
        if is_moe and read in plan.expert_sources:
            ffns[read] = (tensors[FC1], tensors[FC2])
        del tensors
    keep = shared == "keep"
    merged = {name: moe_layer[name] if keep else avg.result(name) for name in averaged}
    if not is_moe:
        return merged, None
    for name, tensor in moe_layer.items():
        if name.startswith("mlp.") and name != ROUTER:
            merged[name] = tensor  # the MoE's experts and shared expert
    for j, read in enumerate(plan.expert_sources):
        expert = n_old + j
        fc1, fc2 = transform_expert(plan, layer, expert, *ffns[read])
        merged[expert_fc1(expert)], merged[expert_fc2(expert)] = fc1, fc2
    return merged, moe_layer[ROUTER]


class IntoStream(LayerStream):
    """The streaming loop of :class:`IntoJob`: the MoE's tensors kept or averaged in, the new
    experts appended, the router rows extended."""

    def _average_global(self, name: str, lineage: bool = False):
        job: IntoJob = self.job
        samples = super()._average_global(name, lineage)[1] if lineage else []
        kept = job.moe.global_tensor(name)
        if job.settings.shared == "keep":
            return kept, samples
        return _average_globals(job, name, kept), samples

    def _merge_layer(self, layer: int) -> None:
        job: IntoJob = self.job
        merged, old_rows = extend_layer(
            job.reads.plan,
            job.moe.layer(layer),
            lambda read: self._source(read).layer(layer),
            job.reads.reads,
            layer,
            job.n_old,
            job.settings.shared,
        )
        merged = {name: tensor.to(job.dtype) for name, tensor in merged.items()}
        if old_rows is not None:
            merged[ROUTER] = old_rows  # kept rows first (a centroid init forwards through them)
            shape = (job.plan.num_experts, job.dense.hidden_size)
            new_rows = job.routers.layer(layer, merged, shape)
            merged[ROUTER] = torch.cat([old_rows.to(job.dtype), new_rows.to(job.dtype)])
        else:
            job.routers.layer(layer, merged, None)
        prefix = tpl.layer_prefix(layer)
        self._write(tpl.entries_under(self.template, prefix), prefix, merged, f"layer {layer}")
        if self.export is not None:
            self.export.add_layer(layer, merged)


def _average_globals(job: IntoJob, name: str, kept: torch.Tensor) -> torch.Tensor:
    """A global tensor's fp32 average: the MoE's with weight n, each new source's with its own."""
    weights = _moe_weights(job)
    avg = Averager(weights)
    avg.add(len(weights) - 1, name, kept)
    for read in job.reads.reads:
        avg.add(read, name, job.sources[job.reads.first[read]].global_tensor(name))
    return avg.result(name)


# ---- --verify --------------------------------------------------------------------------------
def _same(folder: Path, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    want = want.to(got.dtype)
    if got.shape != want.shape or not torch.equal(got, want):
        raise BTXError(f"--verify failed: {what} (output {folder})")


def verify_into(job: IntoJob, folder: Path) -> dict[str, Any]:
    """Re-read the extended checkpoint and check it against the MoE and the new sources: the
    MoE's experts and router rows bit for bit, the new experts equal to their sources' FFNs (as
    planned), the rest kept or averaged as asked, the new rows equal to their init when it needs
    no data; every checkpoint key is the extended model's; the model loads with finite logits."""
    t0 = time.time()
    dtype = to_dtype(job.plan.dtype)
    template = tpl.flat_template(build_for_checkpoint(job.out_args, dtype, job.variant, meta=True))
    reader = PartialReader(folder)
    counts = {"old_experts_equal": 0, "new_experts_equal": 0, "old_router_rows_equal": 0}
    reads: ReadPlan = job.reads
    try:
        for name in [EMB, FINAL_LN] + ([] if job.dense.tie_word_embeddings else [OUT]):
            kept = job.moe.global_tensor(name)
            want = kept if job.settings.shared == "keep" else _average_globals(job, name, kept)
            _same(folder, name, tpl.read_prefix(reader, template, name)[name], want.to(dtype))
        for layer in range(job.dense.num_hidden_layers):
            got = tpl.read_prefix(reader, template, tpl.layer_prefix(layer))
            want, old_rows = extend_layer(
                reads.plan,
                job.moe.layer(layer),
                lambda read, i=layer: job.sources[reads.first[read]].layer(i),
                reads.reads,
                layer,
                job.n_old,
                job.settings.shared,
            )
            for name, tensor in want.items():
                _same(folder, f"layer {layer} {name}", got[name], tensor.to(dtype))
                if ".local_experts." in name:
                    old = int(name.split(".local_experts.")[1].split(".")[0]) < job.n_old
                    counts["old_experts_equal" if old else "new_experts_equal"] += 1
            if old_rows is None:
                continue
            router = got[ROUTER]
            if not torch.isfinite(router.float()).all():
                raise BTXError(f"--verify failed: layer {layer} router is not finite ({folder})")
            _same(folder, f"layer {layer} old router rows", router[: job.n_old], old_rows)
            counts["old_router_rows_equal"] += 1
            shape = (job.plan.num_experts, job.dense.hidden_size)
            init = job.router_init.expected(job.settings, layer, shape)
            if init is not None:
                _same(folder, f"layer {layer} new router rows", router[job.n_old :], init)
        md = reader.md.state_dict_metadata
        saved = {k for k, v in md.items() if hasattr(v, "size")}
    finally:
        reader.close()
    wanted = {v.key for v in tpl.tensor_entries(template).values()}
    if saved != wanted:
        raise BTXError(f"--verify failed: checkpoint keys differ from the model's ({folder})")
    report = {**counts, "checkpoint_tensors": len(saved), "logits": _finite_logits(job, folder)}
    report["seconds"] = round(time.time() - t0, 2)
    return report


@torch.no_grad()
def _finite_logits(job: IntoJob, folder: Path) -> str:
    from megatron_btx.checkpoint.megatron_io import load_model
    from megatron_btx.merge.verify import LOGITS_CHECK_MAX_PARAMS

    if job.out_args.num_params() > LOGITS_CHECK_MAX_PARAMS:
        return "skipped (model larger than 300M parameters)"
    model = build_for_checkpoint(job.out_args, torch.float32, job.variant)
    load_model(model, folder)
    model.eval()
    ids = torch.randint(
        0, job.dense.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    if not torch.isfinite(model(ids, positions, None)).all():
        raise BTXError(f"--verify failed: the extended model's logits are not finite ({folder})")
    return "finite"
