"""EP=2 equals EP=1 for every BTX router and both token dispatchers (torchrun, 2 processes).

Phase 1 (EP=1, DP=2): rank 0's model is broadcast so both ranks hold the same weights; each
rank runs its own batch forward+backward (train mode, Gumbel noise seeded per rank) and keeps
the logits, the router gradients and the routing statistics. Phase 2 (EP=2): the same weights,
each rank holding 2 of the 4 experts, the same batches: everything must match.
Phase 3 (TP=2, sequence parallel): each rank routes half of a hand-made batch; the load-balancing
loss and its gradient summed over the TP group must be the formula's over the whole batch.
"""

from __future__ import annotations

import warnings

import torch

from megatron_btx import lazy_compile  # noqa: E402

lazy_compile.install()  # as every btx command does: megatron-core's compile calls deferred
import torch.distributed as dist

warnings.filterwarnings("ignore")

from megatron_btx import runtime  # noqa: E402
from megatron_btx.models import router_types, routers  # noqa: E402
from megatron_btx.models.llama import (  # noqa: E402
    LlamaArgs,
    MoEOptions,
    build_model,
    transformer_config,
)

E = 4
ARGS = LlamaArgs(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                 num_local_experts=E, num_experts_per_tok=2)
CASES = [(d, t) for d in ("alltoall", "allgather") for t in router_types.names()]


def run(model, rank: int):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    routers.set_step(model, 10)
    routers.routing_stats(model)
    torch.manual_seed(1000 + rank)  # the Gumbel noise
    logits = model(ids, pos, None)
    logits.float().pow(2).mean().backward()
    grads = [r.weight.grad.clone() for r in routers.btx_routers(model)]
    return logits.detach(), grads, routers.routing_stats(model)


def build(dispatcher: str, router_cfg: dict, ep: int):
    config = transformer_config(ARGS, ep=ep, moe=MoEOptions(dispatcher=dispatcher),
                                **routers.config_overrides(router_cfg, num_experts=E))
    model = build_model(ARGS, config)
    routers.install(model, router_cfg, config)
    return model


def main() -> None:
    rt = runtime.init(ep=1, device="cpu")
    rank = rt.rank
    refs, states = {}, {}
    for disp, kind in CASES:
        cfg = {"type": kind, **({"capacity_factor": 1.0} if kind == "switch" else {})}
        model = build(disp, cfg, ep=1)
        for t in model.state_dict().values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                dist.broadcast(t, src=0)
        states[(disp, kind)] = {k: v.clone() for k, v in model.state_dict().items()
                                if isinstance(v, torch.Tensor)}
        refs[(disp, kind)] = run(model, rank)
    # Re-initialising torch.distributed under torchrun's agent store hangs: keep the process
    # group and rebuild only megatron-core's parallel state with EP=2.
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    assert ps.get_expert_model_parallel_world_size() == 2
    n_local = E // 2
    for disp, kind in CASES:
        cfg = {"type": kind, **({"capacity_factor": 1.0} if kind == "switch" else {})}
        model = build(disp, cfg, ep=2)
        full = states[(disp, kind)]
        mine = {}
        for name in model.state_dict():
            src = name
            if ".experts.local_experts." in name:
                head, tail = name.split(".experts.local_experts.")
                j, rest = tail.split(".", 1)
                src = f"{head}.experts.local_experts.{rank * n_local + int(j)}.{rest}"
            if src in full:
                mine[name] = full[src]
        missing = [k for k in model.state_dict() if k not in mine and "_extra_state" not in k]
        assert not missing, missing
        model.load_state_dict(mine, strict=False)
        logits, grads, stats = run(model, rank)
        ref_logits, ref_grads, ref_stats = refs[(disp, kind)]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert sorted(stats) == sorted(ref_stats) == [0, 1]
        for layer, st in stats.items():
            for key in ("load", "dropped", "tokens"):
                assert st[key] == ref_stats[layer][key], (layer, key)
        print(f"EP-OK rank={rank} {disp} {kind} dropped={stats[1]['dropped']:.3f}", flush=True)

    # TP=2 with sequence parallelism: each rank routes half of the tokens. The load-balancing
    # loss must still be the formula over all tokens, and its gradient summed over the TP group
    # (megatron all-reduces sequence-parallel grads) the formula's gradient.
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    tp_group = ps.get_tensor_model_parallel_group()
    alpha, T = 0.1, 8
    logits_full = torch.randn(T, E, generator=torch.Generator().manual_seed(7))
    for kind in ("topk", "soft"):
        cfg = {"type": kind, "alpha": alpha}
        config = transformer_config(ARGS, tp=2, **routers.config_overrides(cfg, num_experts=E))
        assert config.sequence_parallel
        model = build_model(ARGS, config)
        routers.install(model, cfg, config)
        router = model.decoder.layers[0].mlp.router
        with torch.no_grad():
            router.weight.zero_()
            router.weight[:, :T] = logits_full.T
        x_full = torch.eye(64)[:T]
        x_local = x_full[rank * T // 2 : (rank + 1) * T // 2].unsqueeze(1).contiguous()
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        routers.routing_stats(model)
        probs, _ = router(x_local)
        (probs * 0).sum().backward()
        grad = router.weight.grad.clone()
        dist.all_reduce(grad, group=tp_group)

        w = router.weight.detach().clone().requires_grad_(True)
        lg = x_full @ w.T
        p = torch.softmax(lg, dim=1)
        if kind == "topk":
            top = lg.topk(2, dim=1)
            g = torch.zeros_like(lg).scatter(1, top.indices, torch.softmax(top.values, dim=1))
        else:
            g = p
        loss = alpha * E * (g.mean(0) * p.mean(0)).sum()
        loss.backward()
        torch.testing.assert_close(grad, w.grad, rtol=1e-5, atol=1e-8)
        stats = routers.routing_stats(model, group=tp_group)[0]
        # every TP rank records the full-batch L; the mean over the group is L
        assert abs(stats["lb_loss"] - float(loss)) < 1e-6, (stats["lb_loss"], float(loss))
        assert abs(sum(stats["load"]) - 1.0) < 1e-9
        assert stats["tokens"] == T
        print(f"TP-OK rank={rank} {kind} L={float(loss):.6f}", flush=True)
    runtime.teardown()


if __name__ == "__main__":
    main()
