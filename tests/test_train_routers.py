"""The BTX routers trained through `btx train`: each type runs and routes; the config's load
balancing reaches the router (alpha scales the logged loss, `none` removes it); Sample Top-1
anneals over the run's length; TP=2 and EP=2 runs with the BTX router and its loss equal TP=1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

STEPS = 4


def _run(tmp_path, base, data, name: str, moe: dict, overrides=(), nproc: int = 1) -> Path:
    init = tc.init_checkpoint(base, data, moe=True)
    run_dir = tmp_path / name
    cfg = tc.write_config(
        tmp_path / f"{name}.yaml",
        run_dir,
        data,
        moe=True,
        model=dict(tc.MODEL, **tc.MOE, init_from=str(init)),
        train={"steps": STEPS},
    )
    written = yaml.safe_load(cfg.read_text())
    written["moe"] = moe  # the MoE section (write_config's `moe` flag only shapes the model)
    cfg.write_text(yaml.safe_dump(written))
    tc.check(tc.run(cfg, list(overrides), nproc=nproc))
    return run_dir


def _lb(record: dict) -> list[float]:
    return [v for k, v in sorted(record.items()) if k.startswith("router_lb_loss_l")]


@pytest.mark.parametrize("router", ["topk", "switch", "sample_top1", "soft"])
def test_each_btx_router_trains_and_routes(tmp_path, base, data, router):
    run_dir = _run(tmp_path, base, data, router, {"router": {"type": router}})
    train = tc.records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        loads = [v for k, v in r.items() if k.startswith("router_load_l")]
        assert len(loads) == tc.MODEL["num_hidden_layers"]
        assert all(sum(layer) == pytest.approx(1.0) for layer in loads)
        assert len(_lb(r)) == tc.MODEL["num_hidden_layers"] and all(v > 0 for v in _lb(r))
    if router == "sample_top1":
        # annealed linearly from 1.0 to the floor 0.5 over the run's own length (train.steps),
        # not a fixed 1000 steps: step s (1-based) trains at 1.0 - 0.5 (s - 1) / STEPS
        temps = [r["router_temperature"] for r in train]
        assert temps == pytest.approx([1.0 - 0.5 * s / STEPS for s in range(STEPS)])


def test_load_balancing_settings_reach_the_router(tmp_path, base, data):
    """alpha 0.5 logs a per-layer balancing loss 50 times alpha 0.01's at the first step (same
    weights, same batch); `load_balancing: none` logs none and changes the gradient."""
    small = _run(tmp_path, base, data, "alpha001", {"router": {"type": "topk"}})
    large = _run(
        tmp_path, base, data, "alpha05", {"router": {"type": "topk"}, "aux_loss_coeff": 0.5}
    )
    off = _run(tmp_path, base, data, "none", {"router": {"type": "topk"}, "load_balancing": "none"})
    first = [tc.records(d, "train")[0] for d in (small, large, off)]
    for a, b in zip(_lb(first[0]), _lb(first[1])):
        assert b == pytest.approx(50 * a, rel=1e-4)
    assert first[1]["load_balancing_loss"] == pytest.approx(
        50 * first[0]["load_balancing_loss"], rel=1e-4
    )
    assert not _lb(first[2]) and "load_balancing_loss" not in first[2]
    # the loss is part of the gradient: same LM loss at step 1, different gradient norm
    assert first[2]["loss"] == first[0]["loss"]
    assert first[2]["grad_norm"] != first[0]["grad_norm"]


@pytest.mark.dist
@pytest.mark.parametrize("layout", [["--parallel.tp", "2"], ["--parallel.ep", "2"]])
def test_btx_router_tp2_and_ep2_equal_tp1(tmp_path, base, data, layout):
    moe = {"router": {"type": "topk"}}
    ref = _run(tmp_path, base, data, "ref", moe)
    got = _run(tmp_path, base, data, "layout", moe, layout, nproc=2)
    ref_train, got_train = tc.records(ref, "train"), tc.records(got, "train")
    for a, b in zip(ref_train, got_train):
        assert b["loss"] == pytest.approx(a["loss"], abs=2e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert _lb(b) == pytest.approx(_lb(a), rel=1e-5)
