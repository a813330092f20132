"""With Transformer Engine on a GPU (the Dockerfile's NGC image): the TE spec is the one chosen,
its MoE experts are TE's grouped GEMM, and its logits equal the local spec's for the same
checkpoint. Skipped where TE does not import or no GPU is visible (this CI machine).

Tolerance, fp32 on the GPU: 1e-4 relative/absolute. TE fuses the RMSNorm into the QKV and FC1
GEMMs and uses its own attention kernels, so sums run in another order than the local spec's;
the GPU check measured 2.4e-7 between our local spec and `transformers` in fp32, and a wrong
weight mapping moves logits by 1e-1.
"""

from __future__ import annotations

import pytest
import torch

from megatron_btx.models.specs import te_available

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and te_available()),
    reason="needs Transformer Engine and a GPU (the NGC image)",
)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def rt():
    from megatron_btx import runtime

    r = runtime.init(device="cuda")
    yield r
    runtime.teardown()


def logits_with(spec: str | None, ckpt, batch_file, experts: str = "auto"):
    from megatron_btx.checkpoint.megatron_io import load_model, read_args
    from megatron_btx.models.llama import build_model
    from megatron_btx.models.speedups import SpeedOptions

    args = read_args(ckpt)
    model = build_model(
        args, spec=spec, speed=SpeedOptions(moe_experts=experts), perform_initialization=False
    ).cuda()
    load_model(model, ckpt)
    tokens = torch.load(batch_file, weights_only=True)[:, :-1].cuda()
    positions = torch.arange(tokens.shape[1], device="cuda").expand(tokens.shape[0], -1)
    model.eval()
    with torch.no_grad():
        out = model(tokens, positions, None)
    return model, out[..., : args.vocab_size].float().cpu()


def test_te_spec_is_chosen_on_a_gpu_with_te(rt):
    from megatron_btx.models.specs import chosen_spec

    assert chosen_spec() == "te"


@pytest.mark.parametrize("ckpt", ["mg_llama", "mg_mixtral"])
def test_te_spec_logits_equal_local_spec(rt, request, ckpt, batch_file):
    path = request.getfixturevalue(ckpt)
    te_model, te_logits = logits_with(None, path, batch_file)
    local_model, local_logits = logits_with("local", path, batch_file)
    if ckpt == "mg_mixtral":
        from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

        assert isinstance(te_model.decoder.layers[0].mlp.experts, TEGroupedMLP)
        assert isinstance(local_model.decoder.layers[0].mlp.experts, SequentialMLP)
    torch.testing.assert_close(te_logits, local_logits, **TOL)


def test_te_sequential_experts_equal_te_grouped(rt, mg_mixtral, batch_file):
    """model.moe_experts: sequential keeps TE's per-expert loop; grouped/auto use TE's grouped
    GEMM; the two checkpoints layouts are megatron-core's interchangeable ones."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    seq_model, seq_logits = logits_with(None, mg_mixtral, batch_file, experts="sequential")
    assert isinstance(seq_model.decoder.layers[0].mlp.experts, SequentialMLP)
    _, grouped_logits = logits_with(None, mg_mixtral, batch_file, experts="grouped")
    torch.testing.assert_close(grouped_logits, seq_logits, **TOL)
