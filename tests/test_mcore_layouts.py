"""The two layouts where megatron-core's defaults give wrong numbers (training/mcore_layouts.py),
shown where they go wrong: the pipeline's point-to-point exchange at PP=2 x VPP=2, and the expert
gradient reduction at TP=2 with expert-TP=1. The end-to-end checks (the same losses as one
process) are tests/test_knobs.py's vpp and etp tests.

Each dist test also asserts what megatron-core does without our setting. If one of those
assertions fails after a megatron-core upgrade, megatron-core has changed that behaviour: check
whether the corresponding setting in mcore_layouts.py is still needed.
"""

from __future__ import annotations

import json

import pytest
from conftest import DIST, run_script

from megatron_btx.training.mcore_layouts import expert_grads_need_expert_dp, p2p_overrides


def test_p2p_overrides_only_for_interleaving_at_pp2():
    assert p2p_overrides(pp=2, vpp=2) == {"batch_p2p_comm": False}
    assert p2p_overrides(pp=2, vpp=3) == {"batch_p2p_comm": False}
    # prev != next stage at PP >= 3, and 1F1B never sends both ways in one exchange
    assert p2p_overrides(pp=4, vpp=2) == {}
    assert p2p_overrides(pp=2, vpp=None) == {}


def test_expert_dp_needed_only_where_groups_differ():
    # expert data parallel = world / (etp * ep * pp), dense data parallel = world / (tp * pp)
    assert expert_grads_need_expert_dp(ep=1, etp=1, tp=2)
    assert expert_grads_need_expert_dp(ep=1, etp=2, tp=1)
    assert not expert_grads_need_expert_dp(ep=1, etp=2, tp=2)  # the same group
    assert not expert_grads_need_expert_dp(ep=2, etp=1, tp=2)  # megatron marks them itself


def _rank_lines(script: str, *args: str) -> list[dict]:
    result = run_script(DIST / script, list(args), nproc=2, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == [0, 1], result.stdout[-3000:]
    return lines


@pytest.mark.dist
def test_interleaved_exchange_at_pp2_delivers_activation_and_gradient():
    """Rank r sends activation 100 + r forward and gradient 200 + r backward; the peer must
    receive them in its activation and gradient buffers respectively (exact: values are copied)."""
    for line in _rank_lines("p2p_pp2.py"):
        peer = 1 - line["rank"]
        assert line["ours"] == [100.0 + peer, 200.0 + peer], line
        # megatron-core's default (batched) operations swap the two messages at PP=2
        assert line["default"] == [200.0 + peer, 100.0 + peer], line


@pytest.mark.dist
def test_whole_experts_beside_tp2_reduce_their_gradients():
    """At TP=2, expert-TP=1 each rank's experts see half the tokens: after DDP's sync every
    expert gradient is the sum of both halves. Tolerance 1e-7: DDP adds the same two fp32
    tensors as the reference all-reduce (gradient scale exactly 1 at data parallel 1), so the
    sums agree to rounding; the partial gradients differ from each other by ~1e-3.

    megatron-core <= 0.16 marks none of the expert weights at EP=1 (they reduce over the dense
    group of 1: nothing summed) and route_expert_grads marks all 8; 0.17+ marks all 8 itself
    (and reduces them right), and route_expert_grads then marks none."""
    for line in _rank_lines("expert_dp_grads.py", "ours"):
        assert line["experts"] == 8 and line["expert_dp"] == 2 and line["dense_dp"] == 1, line
        assert line["partial_differs"] > 1e-4, line  # the halves differ: a lost sum shows
        assert line["reduced_err"] <= 1e-7, line
        assert line["marked_by_megatron"] + line["marked_by_us"] == 8, line
    for line in _rank_lines("expert_dp_grads.py", "megatron"):
        assert line["marked_by_megatron"] in (0, 8), line  # all or none, never some
        if line["marked_by_megatron"] == 0:
            # the experts reduce over the dense group (of 1): nothing summed
            assert line["unreduced_err"] == 0.0 and line["reduced_err"] > 1e-4, line
        else:
            # megatron-core routes them to the expert-data-parallel group itself
            assert line["reduced_err"] <= 1e-7 and line["unreduced_err"] > 1e-4, line
