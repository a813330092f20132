"""`btx merge --verify`: re-read the written checkpoint and check it against the sources.

- every expert's FFN is bit-identical to its source's (or the chunk of it);
- every averaged tensor equals an fp32 recomputation of the average from the sources, cast once;
- attention experts (BAM) are bit-identical to their source's attention (shared-KV: its query
  rows; the shared key/value rows are averaged);
- random / zero routers equal their reproducible init; every router is finite;
- every checkpoint key is a key of the MoE model and vice versa, and every source key is
  accounted for (expert, shared expert, averaged, or not a model weight);
- for models up to 300M parameters, the MoE loads into megatron-core with finite logits, and N
  copies of one source reproduce that source's logits (sparse upcycling as the special case).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_btx import progress
from megatron_btx.checkpoint import template as tpl
from megatron_btx.checkpoint.dcp_stream import PartialReader
from megatron_btx.checkpoint.families import LlamaAdapter
from megatron_btx.checkpoint.hf import HFReader, PreadSafetensors
from megatron_btx.checkpoint.mapping import (
    EMB,
    FINAL_LN,
    OUT,
    ROUTER,
)
from megatron_btx.checkpoint.sources import Source
from megatron_btx.errors import BTXError
from megatron_btx.merge import attention
from megatron_btx.merge.layer import merge_layer
from megatron_btx.merge.plan import MergePlan, ReadPlan
from megatron_btx.models.llama import LlamaArgs, MoEVariant, build_for_checkpoint, to_dtype

log = logging.getLogger(__name__)

#: logits are compared for models up to this size (a forward pass of the whole model in fp32)
LOGITS_CHECK_MAX_PARAMS = 300_000_000


def _fail(folder: Path, what: str) -> BTXError:
    return BTXError(f"--verify failed: {what} (output {folder})")


def _same(folder: Path, name: str, got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    want = want.to(got.dtype)
    if got.shape != want.shape or not torch.equal(got, want):
        diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else None
        raise _fail(folder, f"{name} differs from {kind} (max abs diff {diff})")


def _fp32_average(
    sources: list[Source], reads: ReadPlan, name: str, dtype: torch.dtype
) -> torch.Tensor:
    """A global tensor's weighted average recomputed plainly (no buffers), cast once."""
    weights = reads.plan.weights
    acc = None
    for read in reads.reads:
        if weights[read] == 0:
            continue
        x = sources[reads.first[read]].global_tensor(name).to(torch.float32)
        x = x * weights[read] if weights[read] != 1.0 else x
        acc = x.clone() if acc is None else acc.add_(x)
    if sum(weights) != 1.0:
        acc.div_(sum(weights))
    return acc.to(dtype)


def _check_layer(
    folder, layer, got, sources, reads: ReadPlan, plan: MergePlan, dtype, counts, expected_router
):
    args = sources[0].args
    want = merge_layer(
        reads.plan,
        lambda read: sources[reads.first[read]].layer(layer),
        layer,
        reads.reads,
        args=args,
    )
    averaged = attention.averaged_names(plan.attention, args)
    for name in averaged:
        _same(folder, f"layer {layer} {name}", got[name], want[name].to(dtype), "the fp32 average")
        counts["averaged_equal_fp32"] += 1
    transformed = plan.drop_ratio > 0 or plan.expert_scale != 1.0
    for name, tensor in want.items():
        if name in averaged:
            continue
        if name.startswith("self_attention.experts."):
            _same(folder, f"layer {layer} {name}", got[name], tensor.to(dtype), "its source")
            if tensor.dtype == dtype:
                counts["attention_experts_bit_identical"] += 1
            continue
        kind = "its source FFN" if "experts" in name else "the dense FFN"
        if transformed and "local_experts" in name:
            kind += " (Drop-Upcycled / scaled as planned)"
        _same(folder, f"layer {layer} {name}", got[name], tensor.to(dtype), kind)
        if "experts" in name and tensor.dtype == dtype:
            counts["experts_bit_identical"] += 1
    if plan.attention_sources:
        router = got[attention.ATTENTION_ROUTER]
        if not torch.isfinite(router.float()).all():
            raise _fail(folder, f"layer {layer} attention router has non-finite values")
        init = expected_router(layer, tuple(router.shape), "attention")
        if init is not None:  # an init that needs no data: made again, bit for bit
            _same(folder, f"layer {layer} attention router", router, init.to(dtype), "its init")
        counts["routers"] += 1
    if plan.is_moe_layer(layer):
        router = got[ROUTER]
        if not torch.isfinite(router.float()).all():
            raise _fail(folder, f"layer {layer} router has non-finite values")
        init = expected_router(layer, tuple(router.shape))
        if init is not None:  # an init that needs no data: made again, bit for bit
            _same(folder, f"layer {layer} router", router, init.to(dtype), "its init")
        counts["routers"] += 1


def verify_checkpoint(
    folder: Path,
    sources: list[Source],
    reads: ReadPlan,
    plan: MergePlan,
    out_args: LlamaArgs,
    variant: MoEVariant,
    expected_router: Callable[..., torch.Tensor | None],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Re-read the written checkpoint layer by layer and check it against the sources (and each
    router against `expected_router(layer, shape)`, the rows its init makes without data, when
    not None); raises BTXError on the first disagreement. Returns a report."""
    t0 = time.time()
    dtype = to_dtype(plan.dtype)
    template = tpl.flat_template(build_for_checkpoint(out_args, dtype, variant, meta=True))
    reader = PartialReader(folder)
    counts = {"experts_bit_identical": 0, "averaged_equal_fp32": 0, "routers": 0}
    if plan.attention_sources:
        counts["attention_experts_bit_identical"] = 0
    try:
        for name in [EMB, FINAL_LN] + ([] if out_args.tie_word_embeddings else [OUT]):
            got = tpl.read_prefix(reader, template, name)[name]
            want = _fp32_average(sources, reads, name, dtype)
            _same(folder, name, got, want, "the fp32 average of the sources")
            counts["averaged_equal_fp32"] += 1
        layers = out_args.num_hidden_layers
        bar = progress.bar(layers, "verify", unit="layer", enabled=show_progress)
        for layer in range(layers):
            got = tpl.read_prefix(reader, template, tpl.layer_prefix(layer))
            _check_layer(folder, layer, got, sources, reads, plan, dtype, counts, expected_router)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        template_keys = {v.key for v in tpl.tensor_entries(template).values()}
        md = reader.md.state_dict_metadata
        checkpoint_keys = {k for k, v in md.items() if hasattr(v, "size")}
    finally:
        reader.close()
    if template_keys != checkpoint_keys:
        extra = sorted(checkpoint_keys - template_keys)[:1]
        missing = sorted(template_keys - checkpoint_keys)[:1]
        raise _fail(
            folder,
            f"checkpoint keys differ from the MoE model's (extra {extra}, missing {missing})",
        )
    report = {
        **counts,
        "checkpoint_tensors": len(checkpoint_keys),
        "source_keys": source_coverage(sources, plan),
    }
    if out_args.num_params() <= LOGITS_CHECK_MAX_PARAMS:
        report["logits"] = _verify_logits(folder, sources, plan, out_args, variant)
    else:
        report["logits"] = "skipped (model larger than 300M parameters)"
    report["seconds"] = round(time.time() - t0, 2)
    log.info("verify: %s", {k: v for k, v in report.items() if k != "source_keys"})
    return report


def source_coverage(sources: list[Source], plan: MergePlan) -> list[dict[str, Any]]:
    """Where every source key went: routed expert(s), shared expert, averaged, or not a model
    weight (optimizer/RNG state in training checkpoints)."""
    out = []
    for index, source in enumerate(sources):
        keys = source.model_keys()
        ffn = [k for k in keys if ".mlp." in k]
        others = source.other_keys()
        averaged = len(keys) - len(ffn)
        out.append(
            {
                "source": source.name,
                "keys": len(keys),
                "ffn_keys": len(ffn),
                "ffn_to": _ffn_destination(index, plan),
                **(
                    {"attention_to": _attention_destination(index, plan)}
                    if plan.attention_sources
                    else {}
                ),
                "averaged": averaged if plan.weights[index] else 0,
                "unused": 0 if plan.weights[index] else averaged,
                "not_model_weights": others[:20]
                + ([f"... {len(others) - 20} more"] if len(others) > 20 else []),
            }
        )
    return out


def _attention_destination(index: int, plan: MergePlan) -> str:
    experts = ",".join(str(e) for e, s in enumerate(plan.attention_sources) if s == index)
    if plan.attention == "experts_shared_kv":
        return f"attention experts {experts} (queries, output); keys and values averaged"
    return f"attention experts {experts}"


def _ffn_destination(index: int, plan: MergePlan) -> str:
    experts = [j for j, src in enumerate(plan.expert_sources) if src == index]
    chunks = plan.split_chunks
    parts = []
    if experts:
        if plan.blend:
            parts.append(f"chunk of every blended expert 0..{chunks - 1}")
        elif chunks > 1:
            parts.append(
                "experts " + ",".join(str(j * chunks + c) for j in experts for c in range(chunks))
            )
        else:
            parts.append("experts " + ",".join(map(str, experts)))
    if plan.shared_source == index:
        parts.append("shared expert")
    if plan.moe_layers is not None:
        if plan.dense_ffn == "average" and plan.weights[index]:
            parts.append("averaged into dense layers")
        if plan.dense_ffn == "seed" and index == plan.n_sources - 1:
            parts.append("dense layers")
    return "; ".join(parts) or "unused (not an expert)"


def _dense_reference(source: Source, ids, positions):
    """Source 0 as a dense model: its state dict and its logits."""
    args = source.args
    dense = build_for_checkpoint(args, torch.float32)
    state = dense.state_dict()
    for key in (EMB, FINAL_LN, OUT):
        if key in state:
            state[key] = source.global_tensor(key).to(torch.float32)
    layers = [source.layer(i) for i in range(args.num_hidden_layers)]
    for layer, tensors in enumerate(layers):
        for name, tensor in tensors.items():
            state[f"{tpl.layer_prefix(layer)}{name}"] = tensor.to(torch.float32)
    dense.load_state_dict(state, strict=False)
    dense.eval()
    return state, layers, dense(ids, positions, None)[..., : args.vocab_size]


@torch.no_grad()
def _verify_logits(folder, sources, plan: MergePlan, out_args, variant) -> dict[str, Any]:
    """(1) the written MoE loads into megatron-core and gives finite logits; (2) sparse upcycling
    as the special case: an MoE whose experts are all source 0's FFN and whose other tensors are
    source 0's (its attention experts all source 0's attention) gives source 0's logits (fp32)
    whatever the routers."""
    from megatron_btx.checkpoint.megatron_io import load_model

    args = sources[0].args
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (2, 16))
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    moe = build_for_checkpoint(out_args, torch.float32, variant)
    load_model(moe, folder)
    moe.eval()
    if not torch.isfinite(moe(ids, positions, None)[..., : args.vocab_size]).all():
        raise BTXError(f"--verify failed: the merged model's logits are not finite ({folder})")
    dense_state, layers, reference = _dense_reference(sources[0], ids, positions)
    upcycled = dataclasses.replace(
        plan,
        n_sources=1,
        weights=[1.0],
        expert_sources=[0] * len(plan.expert_sources),
        shared_source=None if plan.shared_source is None else 0,
        attention_sources=[0] * len(plan.attention_sources),
    )
    state = moe.state_dict()
    for key in (EMB, FINAL_LN, OUT):
        if key in state:
            state[key] = dense_state[key]
    for layer in range(args.num_hidden_layers):
        merged = merge_layer(upcycled, lambda _, i=layer: layers[i], layer, [0], args=args)
        for name, tensor in merged.items():
            state[f"{tpl.layer_prefix(layer)}{name}"] = tensor.to(torch.float32)
        if plan.is_moe_layer(layer):
            shape = (out_args.num_local_experts, args.hidden_size)
            # any router: N copies of one FFN give the dense FFN whatever the routing
            generator = torch.Generator().manual_seed(layer)
            router = torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02
            state[f"{tpl.layer_prefix(layer)}{ROUTER}"] = router
    moe.load_state_dict(state, strict=False)
    diff = (moe(ids, positions, None)[..., : args.vocab_size] - reference).abs().max().item()
    # shared expert / splitting / blending / dropping / scaling change the function by
    # construction
    exact_case = plan.shared_source is None and plan.split_chunks == 1 and not plan.blend
    exact_case = exact_case and plan.drop_ratio == 0 and plan.expert_scale == 1.0
    if exact_case and diff > 1e-4 * max(1.0, reference.abs().max().item()):
        raise BTXError(
            f"--verify failed: an MoE of N copies of {sources[0].name} does not reproduce its "
            f"logits (max abs diff {diff:.3g}); the MoE layout is wrong"
        )
    return {
        "merged_logits_finite": True,
        "upcycled_vs_dense_max_abs_diff": diff if exact_case else None,
        "upcycled_check": "passed" if exact_case else "not applicable to this variant",
    }


def verify_hf_export(
    hf_folder: Path, mcore_folder: Path, adapter: LlamaAdapter, variant: MoEVariant, dtype
) -> int:
    """Every tensor of the HF export equals the megatron checkpoint's, through the family's
    adapter (layer by layer); returns the number of tensors compared."""
    template = tpl.flat_template(build_for_checkpoint(adapter.args, dtype, variant, meta=True))
    reader = PartialReader(mcore_folder)
    exported = PreadSafetensors(HFReader(hf_folder).files)
    compared = 0
    try:
        tensors = adapter.export_tensors(
            lambda layer: tpl.read_prefix(reader, template, tpl.layer_prefix(layer)),
            lambda name: tpl.read_prefix(reader, template, name)[name],
        )
        for name, want in tensors:
            if name not in exported:
                raise BTXError(f"--verify failed: HF export lacks {name!r} ({hf_folder})")
            if not torch.equal(exported.get(name), want.to(dtype).contiguous()):
                raise BTXError(
                    f"--verify failed: HF export tensor {name!r} differs from the megatron "
                    f"checkpoint ({hf_folder})"
                )
            compared += 1
        extra = set(exported.keys()) - {name for name, _ in adapter.hf_shapes()}
        if extra:
            raise BTXError(f"--verify failed: HF export has unexpected tensor {min(extra)!r}")
    finally:
        exported.close()
        reader.close()
    return compared
