"""The BTX routers: each router's defining property, checked with real numbers.

Hand-made batches: token t is the unit vector e_t, so the router logits of token t are the
column W[:, t] of the router weight, which the tests set to chosen values.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_btx.errors import BTXError
from megatron_btx.models import router_types, routers

H, E, V = 64, 4, 1000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def rt(cpu_runtime):
    return cpu_runtime


@pytest.fixture(autouse=True)
def _aux_loss_scale():
    # megatron's MoEAuxLossAutoScaler keeps a class-wide backward scale; pin it to 1.
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


def llama_args(k: int = 2, layers: int = 2):
    from megatron_btx.models.llama import LlamaArgs

    return LlamaArgs(
        hidden_size=H,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        num_local_experts=E,
        num_experts_per_tok=k,
    )


def build(router_cfg: dict, k: int = 2, dispatcher: str = "alltoall", layers: int = 2):
    """The training loop's order: overrides at build, install after build."""
    from megatron_btx.models.llama import MoEOptions, build_model, transformer_config

    torch.manual_seed(0)
    args = llama_args(k, layers)
    config = transformer_config(
        args,
        moe=MoEOptions(dispatcher=dispatcher),
        **routers.config_overrides(router_cfg, num_experts=E),
    )
    model = build_model(args, config)
    routers.install(model, router_cfg, config)
    return model


def unit_tokens(T: int) -> torch.Tensor:
    """[T, 1, H]: token t is e_t, so its router logits are W[:, t]."""
    return torch.eye(H)[:T].unsqueeze(1).contiguous()


def set_logits(router, logits: torch.Tensor) -> None:
    """Make token t's logits equal logits[t] (for unit-vector tokens)."""
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, : logits.shape[0]] = logits.T


def expert_token_counts(moe_layer) -> list:
    """A hook recording how many tokens each expert actually processes."""
    seen: list = []

    def hook(module, args):
        seen.append(args[1].tolist())

    moe_layer.experts.register_forward_pre_hook(hook)
    return seen


HAND_LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0, -1.0],
        [0.5, 2.5, 0.0, 0.0],
        [0.0, 0.0, 3.0, 1.0],
        [1.0, 0.7, 1.5, -2.0],
        [-1.0, 0.4, 0.0, 2.0],
        [3.0, -1.0, 2.0, 0.0],
        [0.0, 1.0, 0.0, 1.5],
        [0.2, 0.1, 0.0, 0.3],
    ]
)


def hand_lb_loss(logits: torch.Tensor, k: int, alpha: float) -> float:
    """alpha * N * sum_i u_i p_i computed with plain Python math (the paper's definitions)."""
    T, N = logits.shape
    u, p = [0.0] * N, [0.0] * N
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        for i in range(N):
            p[i] += math.exp(row[i]) / z / T
        top = sorted(range(N), key=lambda i: -row[i])[:k]
        zk = sum(math.exp(row[i]) for i in top)
        for i in top:
            u[i] += math.exp(row[i]) / zk / T
    return alpha * N * sum(ui * pi for ui, pi in zip(u, p))


# --------------------------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------------------------
def test_topk_weights_sum_to_one_and_only_k_experts_get_each_token():
    model = build({"type": "topk"}, k=2)
    layer = model.decoder.layers[0].mlp
    counts = expert_token_counts(layer)
    T = 8
    set_logits(layer.router, HAND_LOGITS)
    probs, rmap = layer.router(unit_tokens(T))
    assert torch.equal(rmap.sum(dim=1), torch.full((T,), 2))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(T))
    assert torch.all(probs[~rmap] == 0)
    # The chosen experts are the two largest logits, weighted by the softmax over those two.
    top = HAND_LOGITS.topk(2, dim=1)
    torch.testing.assert_close(probs.gather(1, top.indices), torch.softmax(top.values, dim=1))
    layer(unit_tokens(T))
    assert sum(counts[-1]) == 2 * T  # the experts process exactly T*k token copies
    assert counts[-1] == rmap.sum(dim=0).tolist()


def test_load_balancing_loss_equals_paper_formula_on_hand_made_batch():
    alpha = 0.05
    model = build({"type": "topk", "alpha": alpha}, k=2)
    router = model.decoder.layers[0].mlp.router
    set_logits(router, HAND_LOGITS)
    routers.routing_stats(model)  # reset
    router(unit_tokens(8))
    st = routers.routing_stats(model)[0]
    expected = hand_lb_loss(HAND_LOGITS, k=2, alpha=alpha)
    assert st["lb_loss"] == pytest.approx(expected, rel=1e-5)
    # a value sanity check of the hand formula: uniform logits give exactly alpha
    assert hand_lb_loss(torch.zeros(8, E), k=2, alpha=alpha) == pytest.approx(alpha)


def test_load_balancing_gradient_is_the_gradient_of_the_formula():
    model = build({"type": "topk", "alpha": 0.1}, k=2)
    router = model.decoder.layers[0].mlp.router
    set_logits(router, HAND_LOGITS)
    x = unit_tokens(8)
    probs, _ = router(x)
    (probs * 0).sum().backward()  # only the attached load-balancing loss has a gradient
    got = router.weight.grad.clone()

    w = router.weight.detach().clone().requires_grad_(True)
    logits = x.reshape(8, H) @ w.T
    p = torch.softmax(logits, dim=1)
    top = logits.topk(2, dim=1)
    g = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, dim=1))
    loss = 0.1 * E * (g.mean(0) * p.mean(0)).sum()
    loss.backward()
    torch.testing.assert_close(got, w.grad)
    assert got.abs().sum() > 0


def test_load_balancing_off_adds_no_loss():
    model = build({"type": "topk", "load_balancing": False}, k=2)
    router = model.decoder.layers[0].mlp.router
    set_logits(router, HAND_LOGITS)
    probs, _ = router(unit_tokens(8))
    (probs * 0).sum().backward()
    assert router.weight.grad is None or torch.all(router.weight.grad == 0)
    assert "lb_loss" not in routers.routing_stats(model)[0]


def test_top1_loss_equals_megatron_aux_loss():
    """For k=1 the paper's u_i (mean gate) is megatron's f_i (token fraction)."""
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    model = build({"type": "switch", "capacity_factor": None, "alpha": 0.01})
    router = model.decoder.layers[0].mlp.router
    set_logits(router, HAND_LOGITS)
    routers.routing_stats(model)
    router(unit_tokens(8))
    ours = routers.routing_stats(model)[0]["lb_loss"]
    p = torch.softmax(HAND_LOGITS, dim=1)
    counts = torch.zeros(E).scatter_add(0, HAND_LOGITS.argmax(1), torch.ones(8))
    theirs = switch_load_balancing_loss_func(p, counts, 8, 1, E, 0.01)
    assert ours == pytest.approx(float(theirs), rel=1e-6)
    assert ours == pytest.approx(hand_lb_loss(HAND_LOGITS, k=1, alpha=0.01), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Switch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_switch_drops_tokens_over_capacity(dispatcher):
    model = build({"type": "switch", "capacity_factor": 1.5}, dispatcher=dispatcher)
    layer = model.decoder.layers[0].mlp
    counts = expert_token_counts(layer)
    T = 16
    logits = torch.zeros(T, E)
    logits[:, 0] = 5.0 + 0.1 * torch.arange(T)  # every token prefers expert 0, later ones more
    set_logits(layer.router, logits)
    routers.routing_stats(model)
    out, _ = layer(unit_tokens(T))
    capacity = math.ceil(T / E * 1.5)  # 6
    assert counts[-1] == [capacity, 0, 0, 0]  # only 6 tokens reach an expert
    processed = out.reshape(T, H).abs().sum(dim=1) > 0
    assert processed.sum() == capacity  # dropped tokens contribute nothing (residual only)
    assert processed[T - capacity :].all()  # "probs": the most confident tokens are kept
    st = routers.routing_stats(model)[0]
    assert st["dropped"] == pytest.approx(1 - capacity / T)
    assert st["load"] == [1.0, 0.0, 0.0, 0.0]
    # the gate of a kept token is its softmax probability (Switch Transformer)
    probs, rmap = layer.router(unit_tokens(T))
    torch.testing.assert_close(probs[rmap], torch.softmax(logits, 1)[rmap])


def test_switch_position_policy_keeps_the_first_tokens():
    model = build({"type": "switch", "capacity_factor": 1.0, "drop_policy": "position"})
    layer = model.decoder.layers[0].mlp
    T = 16
    logits = torch.zeros(T, E)
    logits[:, 2] = 4.0
    set_logits(layer.router, logits)
    _, rmap = layer.router(unit_tokens(T))
    assert rmap[:, 2].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_switch_without_overflow_keeps_all_tokens():
    model = build({"type": "switch", "capacity_factor": 1.5})
    layer = model.decoder.layers[0].mlp
    counts = expert_token_counts(layer)
    T = 8
    logits = torch.full((T, E), -1.0)
    logits[torch.arange(T), torch.arange(T) % E] = 2.0  # balanced: 2 tokens per expert
    set_logits(layer.router, logits)
    layer(unit_tokens(T))
    assert counts[-1] == [2, 2, 2, 2]


# --------------------------------------------------------------------------------------------
# Sample Top-1
# --------------------------------------------------------------------------------------------
def test_sample_top1_is_hard_and_deterministic_in_eval():
    model = build({"type": "sample_top1"})
    layer = model.decoder.layers[1].mlp  # layer 0 is soft (paper)
    assert layer.router.mode == "sample_top1"
    T = 8
    set_logits(layer.router, HAND_LOGITS)
    model.eval()
    runs = [layer.router(unit_tokens(T)) for _ in range(3)]
    for probs, rmap in runs:
        assert torch.equal(rmap.sum(dim=1), torch.ones(T, dtype=torch.long))
        assert torch.equal(probs, rmap.float())  # one-hot, weight exactly 1
        assert torch.equal(rmap.float().argmax(1), HAND_LOGITS.argmax(1))  # argmax
        assert torch.equal(rmap, runs[0][1])


def test_sample_top1_samples_and_is_differentiable_in_train():
    model = build({"type": "sample_top1", "load_balancing": False})
    layer = model.decoder.layers[1].mlp
    T = 32
    logits = torch.zeros(T, E)  # uniform: sampling must visit several experts
    set_logits(layer.router, logits)
    model.train()
    torch.manual_seed(1)
    chosen = set()
    for _ in range(5):
        probs, rmap = layer.router(unit_tokens(T))
        assert torch.equal(rmap.sum(dim=1), torch.ones(T, dtype=torch.long))  # top-1
        torch.testing.assert_close(probs[rmap], torch.ones(T))  # hard in the forward
        chosen |= set(rmap.float().argmax(1).tolist())
    assert len(chosen) > 1
    layer.router.weight.grad = None
    out, _ = layer(unit_tokens(T))
    out.pow(2).sum().backward()  # no load-balancing loss: the gradient is straight-through
    grad = layer.router.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_sample_top1_temperature_schedule_and_floor():
    cfg = {"type": "sample_top1", "temperature": 2.0, "temperature_floor": 0.5, "anneal_steps": 100}
    model = build(cfg)
    expect = {0: 2.0, 50: 1.25, 100: 0.5, 1000: 0.5}
    for step, tau in expect.items():
        assert routers.set_step(model, step) == pytest.approx(tau)
        assert all(r.temperature == pytest.approx(tau) for r in routers.btx_routers(model))
    taus = [routers.temperature_at(s, 1.0, 0.5, 1000) for s in range(0, 3000, 7)]
    assert min(taus) == 0.5 and all(a >= b for a, b in zip(taus, taus[1:]))


def test_sample_top1_first_layer_routes_softly():
    model = build({"type": "sample_top1"})
    first = model.decoder.layers[0].mlp
    assert first.router.mode == "soft" and first.router.layer_number == 1
    counts = expert_token_counts(first)
    T = 8
    set_logits(first.router, HAND_LOGITS)
    probs, rmap = first.router(unit_tokens(T))
    assert rmap.all()
    torch.testing.assert_close(probs, torch.softmax(HAND_LOGITS, dim=1))
    first(unit_tokens(T))
    assert counts[-1] == [T] * E


def test_temperature_shapes_the_gradient():
    """The soft sample's gradient is sharper at a lower temperature (it is really used)."""
    model = build(
        {
            "type": "sample_top1",
            "load_balancing": False,
            "anneal_steps": 10,
            "temperature": 5.0,
            "temperature_floor": 0.5,
        }
    )
    layer = model.decoder.layers[1].mlp
    set_logits(layer.router, HAND_LOGITS)
    norms = []
    for step in (0, 10):
        routers.set_step(model, step)
        layer.router.weight.grad = None
        torch.manual_seed(3)
        probs, rmap = layer.router(unit_tokens(8))
        probs[rmap].sum().backward()
        norms.append(layer.router.weight.grad.norm().item())
    assert norms[1] > norms[0] > 0


# --------------------------------------------------------------------------------------------
# Soft
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_soft_routing_uses_every_expert(dispatcher):
    model = build({"type": "soft"}, dispatcher=dispatcher)
    layer = model.decoder.layers[1].mlp
    counts = expert_token_counts(layer)
    T = 8
    set_logits(layer.router, HAND_LOGITS)
    probs, rmap = layer.router(unit_tokens(T))
    assert rmap.all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(T))
    torch.testing.assert_close(probs, torch.softmax(HAND_LOGITS, dim=1))
    out, _ = layer(unit_tokens(T))
    assert counts[-1] == [T] * E
    # the output is the softmax-weighted sum of all experts' outputs
    x = unit_tokens(T).reshape(T, H)
    ref = sum(probs[:, i : i + 1] * layer.experts.local_experts[i](x)[0] for i in range(E))
    torch.testing.assert_close(out.reshape(T, H), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The model-level interface
# --------------------------------------------------------------------------------------------
def lm_step(model, lr: float = 1e-2):
    torch.manual_seed(5)
    ids = torch.randint(0, V, (2, 16))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    out = model(ids, pos, None, labels=ids)
    return out.float().mean()


def test_freeze_experts_keeps_experts_while_router_trains():
    model = build({"type": "topk", "freeze_experts": True})
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    router = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    assert experts and router
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".experts." in n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lm_step(model).backward()
    opt.step()
    now = dict(model.named_parameters())
    for n, before in experts.items():
        assert torch.equal(now[n], before), n
    for n, before in router.items():
        assert not torch.equal(now[n], before), n


def test_install_keeps_weights_names_and_rng():
    from megatron_btx.models.llama import build_model, transformer_config

    torch.manual_seed(0)
    args = llama_args()
    config = transformer_config(args)
    model = build_model(args, config)
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    weight = model.decoder.layers[0].mlp.router.weight
    state = torch.get_rng_state()
    routers.install(model, {"type": "switch"}, config)
    assert torch.equal(torch.get_rng_state(), state)  # install draws no random numbers
    after = {k: v for k, v in model.state_dict().items() if v is not None}
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.decoder.layers[0].mlp.router.weight is weight
    assert "decoder.layers.1.mlp.router.weight" in after
    # install again with another type: still the same parameters
    routers.install(model, {"type": "soft"}, config)
    assert model.decoder.layers[0].mlp.router.weight is weight
    assert model.decoder.layers[0].mlp.router.mode == "soft"


@pytest.mark.parametrize("kind", router_types.names())
def test_every_router_trains_a_model_and_reports_stats(kind):
    model = build({"type": kind})
    routers.routing_stats(model)
    loss = lm_step(model)
    loss.backward()
    for r in routers.btx_routers(model):
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    stats = routers.routing_stats(model)
    assert sorted(stats) == [0, 1]
    for st in stats.values():
        assert len(st["load"]) == E
        assert sum(st["load"]) == pytest.approx(1.0)
        assert 0.0 <= st["entropy"] <= math.log(E) + 1e-9
        assert st["tokens"] == 32
        assert st["lb_loss"] > 0
    assert routers.routing_stats(model) == {}  # reset=True emptied the tracker


def test_routing_stats_values_on_hand_made_batch():
    model = build({"type": "topk", "load_balancing": False})
    router = model.decoder.layers[0].mlp.router
    set_logits(router, HAND_LOGITS)
    routers.routing_stats(model)
    router(unit_tokens(8))
    st = routers.routing_stats(model, reset=False)[0]
    top2 = HAND_LOGITS.topk(2, dim=1).indices
    expected_load = torch.zeros(E).scatter_add(0, top2.flatten(), torch.ones(16)) / 16
    assert st["load"] == pytest.approx(expected_load.tolist())
    p = torch.softmax(HAND_LOGITS, dim=1)
    assert st["entropy"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    assert routers.routing_stats(model)[0] == st  # reset=False kept it


def test_config_overrides_build_valid_configs():
    from megatron_btx.models.llama import transformer_config

    args = llama_args()
    for kind in router_types.names():
        switch = {"capacity_factor": 2.0} if kind == "switch" else {}
        cfg = transformer_config(args, **routers.config_overrides({"type": kind, **switch}, E))
        k = {"topk": 2, "switch": 1, "sample_top1": 1, "soft": E}[kind]
        assert cfg.moe_router_topk == k
    assert routers.config_overrides({"type": "switch"})["moe_expert_capacity_factor"] == 1.5


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"type": "top3"}, "type"),
        ({"type": "topk", "alpa": 0.1}, "alpa"),
        ({"alpha": -1.0}, "alpha"),
        ({"load_balancing": "yes"}, "load_balancing"),
        ({"type": "switch", "capacity_factor": 0}, "capacity_factor"),
        ({"type": "switch", "drop_policy": "random"}, "drop_policy"),
        (
            {"type": "sample_top1", "temperature": 0.4, "temperature_floor": 0.5},
            "temperature_floor",
        ),
        ({"type": "sample_top1", "anneal_steps": -5}, "anneal_steps"),
        ({"drop_policy": "position"}, "drop_policy"),  # a switch key on the default topk
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(BTXError, match=repr(key)):
        routers.RouterSettings.from_dict(cfg)
    with pytest.raises(BTXError, match=repr(key)):
        routers.config_overrides(cfg)


def test_topk_with_k1_and_dense_model_are_refused():
    from megatron_btx.models.llama import LlamaArgs, build_model, transformer_config

    args = llama_args(k=1)
    top1 = build_model(args, transformer_config(args, moe_router_pre_softmax=True))
    with pytest.raises(BTXError, match="switch"):
        routers.install(top1, {"type": "topk"}, None)
    dense = build_model(
        LlamaArgs(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=V,
        )
    )
    with pytest.raises(BTXError, match="no MoE layer"):
        routers.install(dense, {"type": "topk"}, None)


# --------------------------------------------------------------------------------------------
# Expert parallelism: EP=2 equals EP=1 for every router and both dispatchers; and TP=2 with
# sequence parallelism: the load-balancing loss and its gradient are those over all tokens
# --------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_routers_under_expert_parallelism():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(REPO / "tests" / "dist" / "routers_ep.py"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count("EP-OK") == 2 * 2 * len(router_types.names()), res.stdout[-3000:]
    assert res.stdout.count("TP-OK") == 2 * 2, res.stdout[-3000:]
