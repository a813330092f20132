"""The streaming merge: N dense sources -> one megatron-core MoE torch_dist checkpoint, a layer
at a time.

Memory is bounded by one layer, not the model: the output's layout comes from megatron-core
itself (the MoE GPTModel built on the `meta` device names every checkpoint key, global shape and
chunk); each layer's entries are filled with the merged tensors and written by
:class:`~megatron_btx.checkpoint.dcp_stream.StreamingDCPWriter`, then dropped. Everything a user
can get wrong is checked before the first byte is written; the output folder is written under a
temporary name, verified if asked, and renamed into place only when complete. The sources'
sha256 is computed on a second core while the merge runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_btx import progress, runtime
from megatron_btx.checkpoint import integrity, manifest
from megatron_btx.checkpoint import template as tpl
from megatron_btx.checkpoint.dcp_stream import StreamingDCPWriter
from megatron_btx.checkpoint.families import to_hf
from megatron_btx.checkpoint.hf import copy_tokenizer
from megatron_btx.checkpoint.mapping import (
    EMB,
    FC1,
    FC2,
    FINAL_LN,
    OUT,
    ROUTER,
)
from megatron_btx.checkpoint.megatron_io import atomic_folder, check_target
from megatron_btx.checkpoint.sources import (
    DTYPE_NAMES,
    TOKENIZER_DIR,
    BufferPool,
    Source,
    TokenizerInfo,
    check_sources,
    open_source,
)
from megatron_btx.errors import BTXError
from megatron_btx.merge import attention, router_inits
from megatron_btx.merge.hf_export import HFExport, check_exportable
from megatron_btx.merge.layer import accumulate, merge_layer
from megatron_btx.merge.plan import MergePlan, ReadPlan, make_plan
from megatron_btx.merge.settings import MergeSettings
from megatron_btx.merge.verify import verify_checkpoint, verify_hf_export
from megatron_btx.models.llama import (
    LlamaArgs,
    MoEVariant,
    build_for_checkpoint,
    check_parallel,
    to_dtype,
)

log = logging.getLogger(__name__)


def merge(settings: MergeSettings) -> dict[str, Any]:
    """Merge dense sources into one MoE torch_dist checkpoint; returns the manifest written."""
    t0 = time.time()
    settings.validate()
    if settings.into is not None:
        raise ValueError("experts added to an MoE: megatron_btx.merge.into.merge_into")
    check_target(settings.save, settings.overwrite, settings.source_paths)
    if settings.export_hf is not None:
        check_target(settings.export_hf, settings.overwrite, settings.source_paths)
    sources: list[Source] = []
    try:
        for path in settings.source_paths:
            sources.append(open_source(path))
        check_sources(sources)
        job = MergeJob(settings, sources)
        with job.hashing():
            result = job.write()
    finally:
        for source in sources:
            source.close()
    log.info(
        "merged %d sources into %s (%d experts, top-%d) in %.1fs",
        len(sources),
        settings.save,
        job.plan.num_experts,
        job.plan.top_k,
        time.time() - t0,
    )
    return result


class MergeJob:
    """One merge, planned and checked from its settings and opened sources (no tensor read)."""

    def __init__(self, settings: MergeSettings, sources: list[Source]):
        self.settings = settings
        self.sources = sources
        self.dense = sources[0].args
        self.plan: MergePlan = self._plan()
        self.out_args: LlamaArgs
        self.variant: MoEVariant
        self.out_args, self.variant = self._output_shape()
        self.dtype = to_dtype(self.plan.dtype)
        self.etp = settings.tp if settings.etp is None else settings.etp
        check_parallel(self.out_args, settings.tp, settings.pp, settings.ep)
        if self.out_args.intermediate_size % self.etp:
            raise BTXError(
                f"expert-TP {self.etp} does not divide the expert FFN size "
                f"{self.out_args.intermediate_size}"
            )
        if settings.export_hf is not None:
            check_exportable(self.out_args, self.variant)
        self.tokenizer: TokenizerInfo | None = next(
            (s.tokenizer for s in sources if s.tokenizer.folder is not None), None
        )
        self.router_init = router_inits.get(settings.router_init)
        #: the router rows, layer by layer (data-driven inits load their data now)
        self.routers = self.router_init.start(self)
        self.reads = ReadPlan.of(sources, self.plan)
        self.hash_jobs: dict[Any, concurrent.futures.Future] = {}

    def _plan(self) -> MergePlan:
        return make_plan(self.sources, self.settings)

    def _output_shape(self) -> tuple[LlamaArgs, MoEVariant]:
        """The merged MoE's hyper-parameters and variant."""
        return self.plan.output_args(self.dense), self.plan.variant(self.dense)

    def _hashed_files(self) -> dict[Any, list[Path]]:
        """The files whose sha256 the manifest records, by read."""
        return {read: self.sources[first].hash_files for read, first in self.reads.first.items()}

    @contextlib.contextmanager
    def hashing(self) -> Iterator[None]:
        """sha256 of the sources' files on a second core while the merge runs."""
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.hash_jobs = {
            key: pool.submit(_sha256_files, files) for key, files in self._hashed_files().items()
        }
        try:
            yield
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def hashing_runs(self) -> bool:
        """The sources' sha256 is still being computed on the second thread."""
        return not all(job.done() for job in self.hash_jobs.values())

    # ---- the write --------------------------------------------------------------------------
    def write(self) -> dict[str, Any]:
        """Write the checkpoint (and HF export) under temporary names, verify, commit."""
        settings = self.settings
        with runtime.single_process(), atomic_folder(settings.save, settings.overwrite) as tmp:
            for source in self.sources:
                if source.fmt == "megatron":
                    source.template  # noqa: B018 - built and checked against the checkpoint now
            template = tpl.flat_template(
                build_for_checkpoint(self.out_args, self.dtype, self.variant, meta=True)
            )
            with contextlib.ExitStack() as stack:
                writer = stack.enter_context(StreamingDCPWriter(tmp, sha256=settings.hash_output))
                export = None
                if settings.export_hf is not None:
                    export = HFExport(
                        settings.export_hf,
                        self.out_args,
                        self.dtype,
                        settings.hf_shard_gb,
                        settings.overwrite,
                        stack,
                        self.variant,
                        settings.hash_output,
                    )
                stream = self._stream(template, writer, export)
                with runtime.threads_beside(self.hashing_runs):
                    lineage = stream.run()
                stream.check_complete()
                writer.finish()
                return self._finish(tmp, export, lineage)

    def _stream(self, template, writer: StreamingDCPWriter, export) -> LayerStream:
        return LayerStream(self, template, writer, export)

    def _finish(self, tmp: Path, export: HFExport | None, lineage: list[float]) -> dict[str, Any]:
        tok_files = []
        if self.tokenizer is not None:
            tok_files = copy_tokenizer(self.tokenizer.folder, tmp / TOKENIZER_DIR)
        if self.variant.is_plain:
            (tmp / "hf_config.json").write_text(json.dumps(to_hf(self.out_args), indent=2))
        record = self._manifest(tmp, tok_files, lineage)
        written = manifest.write(tmp, record)
        if export is not None:
            export.finish(
                self.tokenizer,
                dataclasses.replace(
                    record, moe=None, layout=None, padded_vocab_size=None, files=None
                ),
            )
        if self.settings.verify:
            report = self._verify(tmp)
            if export is not None:
                report["hf_export_tensors_equal"] = verify_hf_export(
                    export.tmp, tmp, export.adapter, self.variant, self.dtype
                )
            written = manifest.write(tmp, dataclasses.replace(record, verify=report))
        return written

    def _verify(self, tmp: Path) -> dict[str, Any]:
        return verify_checkpoint(
            tmp,
            self.sources,
            self.reads,
            self.plan,
            self.out_args,
            self.variant,
            lambda layer, shape, part="ffn": self.router_init.expected(
                self.settings, layer, shape, part
            ),
            self.settings.progress,
        )

    def _manifest(self, tmp: Path, tok_files: list[str], lineage) -> manifest.Manifest:
        settings, plan = self.settings, self.plan
        hashes = {read: job.result() for read, job in self.hash_jobs.items()}
        for read, first in self.reads.first.items():
            if settings.verify_hashes:  # sources with a manifest that records hashes
                integrity.check_source(self.sources[first].folder, hashes[read])
        record = {
            "settings": dataclasses.asdict(settings),
            "router": self.router_init.record(settings),
            "experts": [str(s.given) for s in self.sources[: len(settings.experts)]],
            "seed": str(self.sources[-1].given) if settings.has_seed else None,
            "expert_sources": plan.expert_sources,
            "average_weights": plan.weights,
            "split_chunks": plan.split_chunks,
            "blend": plan.blend,
            "shared_expert_source": plan.shared_source,
            "moe_layers": plan.moe_layers,
            "dense_ffn": plan.dense_ffn if plan.moe_layers is not None else None,
            "top_k": plan.top_k,
            "num_experts": plan.num_experts,
            "attention": plan.attention,
            "attention_sources": plan.attention_sources or None,
            "averaging": "fp32 weighted mean, cast to output dtype",
            "lineage_cosine": lineage,
        }
        return manifest.Manifest(
            kind="megatron_torch_dist",
            model=self.out_args.to_dict(),
            moe=self.variant.to_manifest(),
            dtype=plan.dtype,
            layout={"tp": settings.tp, "pp": settings.pp, "ep": settings.ep, "etp": self.etp},
            padded_vocab_size=self.out_args.padded_vocab_size,
            sources=[
                self._source_entry(index, hashes[self.reads.alias[index]])
                for index in range(len(self.sources))
            ],
            merge=record,
            files=integrity.hash_tree(tmp) if settings.hash_output else None,
            tokenizer={
                "files": tok_files,
                "sha256": manifest.sha256_folder(tmp / TOKENIZER_DIR) if tok_files else {},
                "model_sha256": self.tokenizer.sha256 if self.tokenizer else None,
            },
        )

    def _source_entry(self, index: int, sha: dict[str, str]) -> dict[str, Any]:
        source, plan = self.sources[index], self.plan
        is_seed = self.settings.has_seed and index == plan.n_sources - 1
        return {
            "path": str(source.given.resolve()),
            "checkpoint": str(source.folder.resolve()),
            "format": "hf_safetensors" if source.fmt == "hf" else "megatron_torch_dist",
            "role": "seed" if is_seed else f"expert {index}",
            "routed_experts": [j for j, src in enumerate(plan.expert_sources) if src == index],
            "shared_expert": plan.shared_source == index,
            "average_weight": plan.weights[index],
            "step": source.step,
            "dtype": DTYPE_NAMES[source.dtype],
            "sha256": sha,
            "tokenizer_sha256": source.tokenizer.sha256,
        }


class LayerStream:
    """The streaming loop: embedding, layers 0..L-1, final norm and output layer, each merged,
    written to the checkpoint (and the HF export) and dropped."""

    def __init__(self, job: MergeJob, template, writer: StreamingDCPWriter, export):
        self.job = job
        self.template = template
        self.writer = writer
        self.export = export
        self.written: set[str] = set()
        self.pool = BufferPool()

    def _source(self, read: int) -> Source:
        return self.job.sources[self.job.reads.first[read]]

    def _write(self, entries: dict[str, Any], prefix: str, tensors, what: str) -> None:
        part = tpl.fill(entries, prefix, tensors, what)
        self.writer.write(part)
        self.written.update(part)

    def run(self) -> list[float]:
        job = self.job
        reads = job.reads.reads
        embedding, samples = self._average_global(EMB, lineage=len(reads) > 1)
        lineage = _lineage(samples, [self._source(r) for r in reads]) if samples else [1.0]
        job.routers.embed(embedding[: job.dense.vocab_size].to(job.dtype))
        embedding = self.pool.cast("out.emb", embedding, job.dtype)
        self._write_globals({EMB: embedding})
        del embedding
        # not held through the layers
        self.pool.drop("read.global", "acc.global", "cast.global", "out.emb")
        layers = job.dense.num_hidden_layers
        bar = progress.bar(layers, "merge", unit="layer", enabled=job.settings.progress)
        with contextlib.ExitStack() as reuse:
            for read in reads:
                reuse.enter_context(self._source(read).reused_buffers())
            for layer in range(layers):
                self._merge_layer(layer)
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        final_norm, _ = self._average_global(FINAL_LN)
        finals = {FINAL_LN: final_norm.to(job.dtype)}
        if not job.dense.tie_word_embeddings:
            output, _ = self._average_global(OUT)
            # the embedding is written: its output buffer is reused
            finals[OUT] = self.pool.cast("out.emb", output, job.dtype)
            del output
        self._write_globals(finals)
        return lineage

    def _write_globals(self, tensors: dict[str, torch.Tensor]) -> None:
        entries = {k: v for k, v in self.template.items() if k in tensors}
        self._write(entries, "", tensors, "globals")
        if self.export is not None:
            for name, tensor in tensors.items():
                self.export.add_global(name, tensor)

    def _average_global(self, name: str, lineage: bool = False):
        """fp32 average of a global tensor, in the pool's "global" buffers (one at a time), and
        with `lineage` a sample of rows of every source for the lineage check."""
        job = self.job
        weights = job.reads.plan.weights
        acc = None
        samples = []
        rows = None
        for read in job.reads.reads:
            if weights[read] == 0 and not lineage:
                continue
            tensor = self._source(read).global_tensor(name, self.pool)
            if lineage:
                if rows is None:
                    generator = torch.Generator().manual_seed(0)
                    count = min(job.dense.vocab_size, tensor.shape[0])
                    rows = torch.randperm(count, generator=generator)[:1024]
                samples.append(tensor[rows].to(torch.float32))
            if weights[read]:
                acc = accumulate(acc, tensor, weights[read], self.pool, "global")
            del tensor
        total = sum(weights)
        if total != 1.0:
            acc.div_(total)
        return acc, samples

    def _merge_layer(self, layer: int) -> None:
        """Merge layer `layer` of the sources and write it."""
        job = self.job
        plan = job.plan
        merged = merge_layer(
            job.reads.plan,
            lambda read: self._source(read).layer(layer),
            layer,
            job.reads.reads,
            self.pool,
            job.dense,
        )
        averaged = list(attention.averaged_names(plan.attention, job.dense))
        if not plan.is_moe_layer(layer) and plan.dense_ffn == "average":
            averaged += [FC1, FC2]
        for name in averaged:
            merged[name] = self.pool.cast("out." + name, merged[name], job.dtype)
        if plan.attention_sources:  # attention experts (BAM): their router first
            shape = (len(plan.attention_sources), job.dense.hidden_size)
            rows = job.routers.attention(layer, merged, shape)
            merged[attention.ATTENTION_ROUTER] = rows.to(job.dtype)
        moe = plan.is_moe_layer(layer)
        shape = (plan.num_experts, job.dense.hidden_size) if moe else None
        router = job.routers.layer(layer, merged, shape)
        if moe:
            merged[ROUTER] = router.to(job.dtype)
        prefix = tpl.layer_prefix(layer)
        self._write(tpl.entries_under(self.template, prefix), prefix, merged, f"layer {layer}")
        if self.export is not None:
            self.export.add_layer(layer, merged)

    def check_complete(self) -> None:
        missing = [k for k in self.template if k not in self.written]
        if missing:
            raise RuntimeError(f"merge wrote no data for {missing[0]} ({len(missing)} missing)")
        partial = tpl.partial_keys(self.template) if self.job.plan.moe_layers is not None else ()
        self.writer.check_complete(allow_partial=partial)


def _sha256_files(files: Sequence[Path]) -> dict[str, str]:
    return {p.name: manifest.sha256_file(p) for p in files}


def _lineage(samples: list[torch.Tensor], sources: list[Source]) -> list[float]:
    """Cosine similarity of each source's embedding sample to the first's; warn when low
    (models trained from one seed stay > 0.9; independent inits are ~0)."""
    ref = samples[0].reshape(-1)
    cosines = []
    for sample, source in zip(samples, sources):
        sample = sample.reshape(-1)
        cos = float(torch.dot(ref, sample) / (ref.norm() * sample.norm()).clamp_min(1e-12))
        cosines.append(round(cos, 6))
        if cos < 0.5:
            log.warning(
                "source %s: embedding cosine similarity to %s is %.3f; the sources do not look "
                "like branches of one seed model, and averaging them may destroy both",
                source.name,
                sources[0].name,
                cos,
            )
    return cosines
