"""The optional speed-ups other than the grouped experts: the local MoE dispatcher (EP = 1),
torch.compile of the transformer layers, and liger-kernel's fused kernels (GPU only: here, that
asking for them on a CPU run is refused or falls back, and says so).

The local dispatcher is compared with megatron-core's all-to-all dispatcher, the compiled model
with the eager one: fp32, the same weights, the same batch. Tolerance 1e-6 relative: the local
dispatcher calls the same permute/unpermute functions (measured: equal to the bit), and
inductor's generated CPU code may reorder a sum (measured: 3e-8 on gradients here).
"""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_btx.errors import BTXError
from megatron_btx.models.speedups import SpeedOptions

TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module", autouse=True)
def rt(cpu_runtime):
    return cpu_runtime


def tiny_args(experts: int = 4):
    import dataclasses

    from test_grouped_experts import moe_args

    return dataclasses.replace(moe_args(), num_local_experts=experts)


def build(speed: SpeedOptions, experts: int = 4, seed: int = 0):
    from megatron_btx.models.llama import build_model

    torch.manual_seed(seed)
    return build_model(tiny_args(experts), speed=speed)


def loss_and_grads(model, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (2, 24), generator=g)
    labels = torch.randint(0, 300, (2, 24), generator=g)
    model.zero_grad(set_to_none=True)
    positions = torch.arange(24).expand(2, -1)
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_training_step(a, b):
    loss_a, grads_a = loss_and_grads(a)
    loss_b, grads_b = loss_and_grads(b)
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ---- the local dispatcher -----------------------------------------------------------------------
@pytest.mark.parametrize("experts", ["sequential", "grouped"])
def test_local_dispatch_equals_alltoall_forward_and_backward(experts):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_btx.models.local_dispatch import LocalTokenDispatcher

    reference = build(SpeedOptions(moe_experts=experts))
    local = build(SpeedOptions(moe_experts=experts, local_dispatch=True))
    layers = local.decoder.layers
    assert all(isinstance(x.mlp.token_dispatcher, LocalTokenDispatcher) for x in layers)
    assert all(
        isinstance(x.mlp.token_dispatcher, MoEAlltoAllTokenDispatcher)
        for x in reference.decoder.layers
    )
    assert_same_training_step(reference, local)


def test_local_dispatch_hands_device_counts_to_the_experts():
    """No host copy: the experts get the token counts as the router's tensor, and they count
    the routed copies of the tokens (tokens x top-k)."""
    model = build(SpeedOptions(local_dispatch=True))
    seen = []
    experts = model.decoder.layers[0].mlp.experts
    experts.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[1]))
    loss_and_grads(model)
    (counts,) = seen
    assert counts.dtype == torch.long and counts.shape == (4,)
    assert int(counts.sum()) == 2 * 24 * 2


def test_local_dispatch_equals_alltoall_when_tokens_are_dropped():
    """With a capacity factor (0.5: each expert takes at most half its even share) the router
    drops routed copies, so the dispatcher must count the copies that remain rather than
    tokens x top-k; the local dispatcher still gives the all-to-all dispatcher's step."""
    from megatron_btx.models.llama import MoEOptions, build_model

    dropping = MoEOptions(capacity_factor=0.5)

    def build_dropping(local: bool):
        torch.manual_seed(0)
        speed = SpeedOptions(moe_experts="sequential", local_dispatch=local)
        return build_model(tiny_args(), speed=speed, moe=dropping)

    reference, local = build_dropping(False), build_dropping(True)
    seen = []
    experts = local.decoder.layers[0].mlp.experts
    experts.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[1]))
    assert_same_training_step(reference, local)
    # 2 x 24 tokens x top-2 = 96 copies; capacity 0.5 x 96 / 4 experts = 12 per expert at most
    (counts,) = seen
    assert int(counts.max()) <= 12 and int(counts.sum()) < 96, counts


def test_local_dispatch_key_is_validated_against_the_layout(tmp_path):
    from megatron_btx.config import Config

    for parallel in ({"ep": 2}, {"tp": 2}, {"etp": 2}):
        cfg = Config.from_dict(
            {"data": {"path": str(tmp_path)}, "moe": {"local_dispatch": True}, "parallel": parallel}
        )
        with pytest.raises(BTXError, match="moe.local_dispatch needs every expert on its rank"):
            cfg.validate()
    Config.from_dict({"data": {"path": str(tmp_path)}, "moe": {"local_dispatch": True}}).validate()


# ---- torch.compile --------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_layers_equal_eager():
    """model.compile on a tiny MoE (the local dispatcher and the grouped experts, so the whole
    layer is one graph up to the experts): same loss and gradients as eager."""
    from megatron_btx.config import Config
    from megatron_btx.models.speedups import compile_layers

    cfg = Config.from_dict(
        {
            "data": {"path": "unused"},
            "model": {"compile": True, "moe_experts": "grouped"},
            "moe": {"local_dispatch": True},
        }
    )
    speed = SpeedOptions.from_config(cfg)
    assert speed.compile
    eager = build(speed)
    compiled = build(speed)
    assert compile_layers([compiled]) == 2
    assert all(layer._compiled_call_impl is not None for layer in compiled.decoder.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.decoder.layers)
    assert_same_training_step(eager, compiled)


def test_compile_key_reaches_the_trainer(monkeypatch, tmp_path):
    """model.compile: true makes the training loop call compile_layers on its chunks."""
    import megatron_btx.models.speedups as speedups
    from megatron_btx.config import Config

    assert Config.from_dict({"data": {"path": "x"}}).model.compile is False
    calls = []
    monkeypatch.setattr(speedups, "compile_layers", lambda chunks: calls.append(len(chunks)))
    trainer = _trainer_with_model_only(tmp_path, {"compile": True})
    assert calls == [1]
    trainer = _trainer_with_model_only(tmp_path, {"compile": False})
    assert calls == [1] and trainer.model


def _trainer_with_model_only(tmp_path, model_section):
    """A Trainer up to its model build (what `_build_model` needs of set-up)."""
    from megatron_btx import runtime
    from megatron_btx.config import Config
    from megatron_btx.models.llama import MoEVariant
    from megatron_btx.training.loop import Trainer

    cfg = Config.from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": "unused"},
            "model": model_section,
        }
    )
    trainer = Trainer(cfg)
    trainer.args = tiny_args(0)
    trainer.variant = MoEVariant()
    trainer.router_cfg = None
    trainer.rt = runtime.get()
    trainer.dtype_name = "fp32"
    trainer.resume_from = None
    trainer._build_model()
    return trainer


# ---- liger-kernel -----------------------------------------------------------------------------------
def test_liger_is_refused_on_a_cpu_run():
    from megatron_btx.models.speedups import resolve_kernels

    with pytest.raises(BTXError, match="model.kernels=liger: its kernels are Triton GPU kernels"):
        resolve_kernels("liger", on_gpu=False)


def test_liger_auto_falls_back_to_torch_and_says_why(caplog):
    from megatron.core.models import backends
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_btx.models import speedups

    speedups._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="megatron_btx.models.speedups"):
        model = build(SpeedOptions(kernels="auto"), experts=0)
    assert "fused kernels: torch (liger-kernel not used: its kernels are Triton GPU kernels" in (
        caplog.text
    )
    # nothing was patched: megatron-core's own torch RMSNorm is in the model
    assert not hasattr(backends.LocalSpecProvider.layer_norm, "__liger_patched__")
    assert isinstance(model.decoder.layers[0].input_layernorm, torch.nn.RMSNorm)
    assert backends.LocalSpecProvider().layer_norm(rms_norm=True) is WrappedTorchNorm


def test_liger_without_the_package_names_the_extra(monkeypatch):
    import importlib.util

    from megatron_btx.models.speedups import liger_unavailable

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name)
    )
    assert "pip install 'megatron-btx[liger]'" in liger_unavailable(on_gpu=True)


def test_kernels_key_is_validated(tmp_path):
    from megatron_btx.config import Config

    cfg = Config.from_dict({"data": {"path": str(tmp_path)}, "model": {"kernels": "triton"}})
    with pytest.raises(BTXError, match="model.kernels='triton' must be one of torch, liger, auto"):
        cfg.validate()
    with pytest.raises(BTXError, match="model.kernels=liger"):
        build(SpeedOptions(kernels="liger"), experts=0)
