"""GroupedExperts (torch's grouped matmul) against megatron-core's SequentialMLP, on CPU, fp32.

The reference is megatron-core's own per-expert loop, plus a formula written out by hand
(SwiGLU per expert, times the routing probability). Tolerance 1e-6: both compute each token's
product with the same expert weights in fp32; only the GEMM kernel differs (measured: equal to
the bit on this machine, torch 2.13), and a wrong expert, offset or gate/up half changes
outputs at 1e-1.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from megatron_btx.models.grouped_experts import (
    GROUPED_MM,
    LOOP,
    GroupedExperts,
    grouped_mm_unavailable,
)

TOL = dict(rtol=1e-6, atol=1e-6)
H, FFN, E = 64, 96, 4

needs_grouped_mm = pytest.mark.skipif(
    grouped_mm_unavailable("cpu", torch.float32) is not None,
    reason=f"this torch's _grouped_mm cannot run on CPU: {grouped_mm_unavailable('cpu', torch.float32)}",
)


@pytest.fixture(scope="module", autouse=True)
def rt(cpu_runtime):
    return cpu_runtime


def moe_args(ffn: int = FFN, hidden: int = H):
    from megatron_btx.models.llama import LlamaArgs

    return LlamaArgs(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        num_local_experts=E,
        num_experts_per_tok=2,
    )


def expert_pair(ffn: int = FFN, hidden: int = H, fused: bool = False):
    """A SequentialMLP and a GroupedExperts holding the same weights; `fused`: megatron-core's
    fused weighted SwiGLU (bias_activation_fusion, what a GPU run uses)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_btx.models.llama import transformer_config

    cfg = transformer_config(moe_args(ffn, hidden), fused=fused)
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    torch.manual_seed(0)
    seq = SequentialMLP(E, cfg, sub, pg_collection=get_default_pg_collection())
    grp = GroupedExperts(E, cfg, sub, pg_collection=get_default_pg_collection())
    # strict: the same state-dict keys and shapes
    grp.load_state_dict(seq.state_dict(), strict=True)
    return seq, grp


def run(module, x, counts, probs, grad_out):
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, bias = module(x, counts, probs)
    assert bias is None
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def by_hand(seq, x, counts, probs) -> torch.Tensor:
    """sum over an expert's rows: (silu(x Wg^T) * (x Wu^T) * p) W2^T, written out per expert."""
    rows = []
    start = 0
    for expert, n in zip(seq.local_experts, counts.tolist()):
        w1, w2 = expert.linear_fc1.weight, expert.linear_fc2.weight
        gate, up = w1[:FFN], w1[FFN:]
        xe, pe = x[start : start + n], probs[start : start + n, None]
        rows.append(((F.silu(xe @ gate.T) * (xe @ up.T)) * pe) @ w2.T)
        start += n
    return torch.cat(rows)


@needs_grouped_mm
@pytest.mark.parametrize(
    "counts, fused",
    [([5, 0, 9, 2], False), ([16, 0, 0, 0], False), ([0, 3, 0, 1], False), ([5, 0, 9, 2], True)],
)
def test_grouped_equals_sequential_forward_and_backward(counts, fused):
    seq, grp = expert_pair(fused=fused)
    assert seq.config.bias_activation_fusion is fused
    counts = torch.tensor(counts)
    n = int(counts.sum())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, H, generator=g)
    probs = torch.rand(n, generator=g)
    grad_out = torch.randn(n, H, generator=g)

    out_s, dx_s, grads_s = run(seq, x, counts, probs, grad_out)
    out_g, dx_g, grads_g = run(grp, x, counts, probs, grad_out)
    assert grp.last_kernel == GROUPED_MM
    with torch.no_grad():
        torch.testing.assert_close(out_s, by_hand(seq, x, counts, probs), **TOL)
    torch.testing.assert_close(out_g, out_s, **TOL)
    torch.testing.assert_close(dx_g, dx_s, **TOL)
    assert grads_g.keys() == grads_s.keys() and len(grads_g) == 2 * E
    for name, grad in grads_s.items():
        torch.testing.assert_close(grads_g[name], grad, **TOL)
    # an expert without tokens gets an exact-zero gradient (not a missing one)
    for e, c in enumerate(counts.tolist()):
        if c == 0:
            assert grads_g[f"local_experts.{e}.linear_fc1.weight"].abs().max() == 0


def test_empty_input_and_forced_loop_match_sequential():
    seq, grp = expert_pair()
    grp.kernel = LOOP
    counts = torch.tensor([2, 3, 0, 1])
    g = torch.Generator().manual_seed(2)
    x, probs, grad_out = torch.randn(6, H, generator=g), torch.rand(6, generator=g), None
    grad_out = torch.randn(6, H, generator=g)
    torch.testing.assert_close(
        run(grp, x, counts, probs, grad_out)[0], run(seq, x, counts, probs, grad_out)[0], **TOL
    )
    assert grp.last_kernel == LOOP
    grp.kernel = None
    empty = run(
        grp, torch.zeros(0, H), torch.zeros(E, dtype=torch.long), torch.zeros(0), torch.zeros(0, H)
    )
    assert empty[0].shape == (0, H)


def test_unaligned_shapes_fall_back_to_the_loop_and_say_so(caplog):
    # fp32 rows of 90 values are 360 bytes: not a multiple of 16, which _grouped_mm requires
    seq, grp = expert_pair(ffn=90)
    counts = torch.tensor([1, 2, 3, 4])
    g = torch.Generator().manual_seed(3)
    x, probs = torch.randn(10, H, generator=g), torch.rand(10, generator=g)
    with caplog.at_level(logging.INFO, logger="megatron_btx.models.grouped_experts"):
        out_g, _ = grp(x, counts, probs)
    assert grp.last_kernel == LOOP
    assert "MoE experts: loop" in caplog.text and "16-byte aligned" in caplog.text
    torch.testing.assert_close(out_g, seq(x, counts, probs)[0], **TOL)


def experts_of(model):
    return model.decoder.layers[0].mlp.experts


@pytest.mark.parametrize(
    "key, expected",
    [("sequential", "SequentialMLP"), ("grouped", "GroupedExperts"), ("auto", "SequentialMLP")],
)
def test_moe_experts_key_chooses_the_module(tmp_path, key, expected):
    """model.moe_experts -> SpeedOptions -> the experts module of every MoE layer. On a CPU
    run `auto` keeps the sequential loop: torch's CPU grouped matmul loops over the groups
    itself, so it would not be faster."""
    from megatron_btx.config import Config
    from megatron_btx.models.llama import build_model
    from megatron_btx.models.speedups import SpeedOptions

    cfg = Config.from_dict({"data": {"path": str(tmp_path)}, "model": {"moe_experts": key}})
    cfg.validate()
    model = build_model(moe_args(), speed=SpeedOptions.from_config(cfg))
    assert all(type(layer.mlp.experts).__name__ == expected for layer in model.decoder.layers)


def test_moe_experts_key_reaches_the_moe_layers_of_a_partial_moe():
    """With MoE in some layers only (a per-layer moe_layer_freq: megatron-core's decoder block
    spec), `grouped` builds GroupedExperts in the MoE layers and leaves the dense MLPs alone."""
    from megatron_btx.models.llama import MoEVariant, build_model
    from megatron_btx.models.speedups import SpeedOptions

    variant = MoEVariant(layer_freq=(1, 0), dense_ffn_hidden_size=FFN)
    model = build_model(moe_args(), speed=SpeedOptions(moe_experts="grouped"), variant=variant)
    moe, dense = (layer.mlp for layer in model.decoder.layers)
    assert type(moe.experts) is GroupedExperts and len(moe.experts.local_experts) == E
    assert type(dense).__name__ == "MLP" and not hasattr(dense, "experts")


def _layer_specs():
    """One MoE layer spec in each form megatron-core has used: ModuleSpecs all the way down
    (<= 0.16) and the MLP and experts as `functools.partial` builders (0.17+), built here from
    the installed megatron-core's classes whichever version it is."""
    import functools

    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    linears = MLPSubmodules(linear_fc1="fc1", linear_fc2="fc2")
    as_spec = ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP, submodules=linears)),
    )
    as_partial = functools.partial(
        MoELayer,
        submodules=MoESubmodules(experts=functools.partial(SequentialMLP, submodules=linears)),
    )
    dense = ModuleSpec(module=MLP, submodules=linears)
    dense_partial = functools.partial(MLP, submodules=linears)
    return {
        name: ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(mlp=mlp))
        for name, mlp in [
            ("spec", as_spec),
            ("partial", as_partial),
            ("dense", dense),
            ("dense_partial", dense_partial),
        ]
    }, linears


@pytest.mark.parametrize("form", ["spec", "partial"])
def test_experts_module_replaced_in_both_spec_forms(form):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_btx.errors import BTXError
    from megatron_btx.models.specs import with_experts_module

    specs, linears = _layer_specs()
    layer = specs[form]
    before = layer.submodules.mlp
    assert with_experts_module(layer, GroupedExperts)
    mlp = layer.submodules.mlp
    if form == "partial":
        assert mlp.func is MoELayer and mlp is not before
        experts = mlp.keywords["submodules"].experts
        assert experts.func is GroupedExperts and experts.keywords == {"submodules": linears}
        # the original builder is not changed under whoever else holds it
        assert before.keywords["submodules"].experts.func.__name__ == "SequentialMLP"
    else:
        assert mlp.module is MoELayer
        experts = mlp.submodules.experts
        assert experts.module is GroupedExperts and experts.submodules is linears
        assert before.submodules.experts.module.__name__ == "SequentialMLP"
    assert with_experts_module(layer, GroupedExperts)  # again (layer specs may be shared)
    # a dense layer has no experts: nothing to change
    for dense in ("dense", "dense_partial"):
        unchanged = specs[dense].submodules.mlp
        assert not with_experts_module(specs[dense], GroupedExperts)
        assert specs[dense].submodules.mlp is unchanged
    # a module that is not the spec's experts class (nor extends it) is refused by name
    with pytest.raises(BTXError, match="cannot build the MoE experts with Linear"):
        with_experts_module(_layer_specs()[0][form], torch.nn.Linear)


def test_moe_experts_key_is_validated(tmp_path):
    from megatron_btx.config import Config
    from megatron_btx.errors import BTXError

    cfg = Config.from_dict({"data": {"path": str(tmp_path)}, "model": {"moe_experts": "fast"}})
    with pytest.raises(BTXError, match="model.moe_experts='fast' must be one of"):
        cfg.validate()


def logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), None)


@needs_grouped_mm
@pytest.mark.parametrize("saver, loader", [("sequential", "grouped"), ("grouped", "sequential")])
def test_checkpoints_load_both_ways(tmp_path, saver, loader):
    """Save with one experts module through megatron-core's dist_checkpointing, load into a model
    with the other (initialised differently): the logits become the saver's."""
    from megatron_btx.checkpoint.megatron_io import load_model, save_model
    from megatron_btx.models.llama import build_model
    from megatron_btx.models.speedups import SpeedOptions

    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(10)
    source = build_model(moe_args(), speed=SpeedOptions(moe_experts=saver))
    save_model(source, tmp_path)
    torch.manual_seed(11)
    target = build_model(moe_args(), speed=SpeedOptions(moe_experts=loader))
    assert type(experts_of(target)).__name__ != type(experts_of(source)).__name__
    before = logits(target, tokens)
    load_model(target, tmp_path)
    expected = logits(source, tokens)
    assert (before - expected).abs().max() > 1e-2  # the load did something
    torch.testing.assert_close(logits(target, tokens), expected, **TOL)
    if loader == "grouped":
        assert experts_of(target).last_kernel == GROUPED_MM
