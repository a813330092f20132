"""Training an MoE with attention experts (BAM) at several megatron-core layouts (torchrun,
gloo, 2 processes): TP=2, PP=2 and EP=2 give the one-process loss curve; a TP=2 checkpoint
resumes at PP=2; a run killed with SIGKILL resumes with the same losses.

The model is a BAM merge (`--attention experts`, 4 attention experts and 4 FFN experts per
layer) of three dense checkpoints of the training tests' small Llama: its step-0 init and the
dense reference run's steps 4 and 8 (three branches of one seed), with the step-0 init again as
the seed. Everything is fp32.

Tolerance, as tests/test_train_parallel.py: per-step losses within 2e-5 nats, grad norms within
a relative 1e-4. A layout changes only the order of fp32 sums: TP splits every attention
expert's heads and the FFN into partial sums all-reduced (or reduce-scattered, with the
sequence parallelism megatron requires for MoE), and the attention router then sees a slice of
the tokens, its gradient all-reduced over TP; PP and EP move where gradients are reduced. Each
reordered sum differs by a few ulps, carried forward by five Adam steps. Measured on this
machine: losses agree to 2.4e-7 (TP, PP) and 1.2e-7 (EP), grad norms to 1.0e-6 and 3.0e-7
relative. The attention router's gradient left un-reduced over TP (a real fault) moved the
first step's grad norm by 5.6e-4 relative, five times the tolerance.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LOSS_ATOL = 2e-5
NORM_RTOL = 1e-4


def bam_init(base: Path, data: Path) -> Path:
    """The BAM merge the runs start from, made once per session."""
    from megatron_btx.merge import MergeSettings, merge

    out = base / "bam_init"
    if (out / "btx_manifest.json").is_file():
        return out
    _, ref_dir = tc.reference_run(base, data)
    init = tc.init_checkpoint(base, data)
    ckpts = ref_dir / "checkpoints"
    sources = [init, ckpts / "iter_0000004", ckpts / "iter_0000008"]
    merge(
        MergeSettings(
            experts=[str(s) for s in sources],
            seed=str(init),
            save=str(out),
            attention="experts",
            router_std=0.5,  # routing away from uniform, so the routers matter
            progress=False,
        )
    )
    return out


def bam_config(
    base: Path, data: Path, run_dir: Path, name: str, model: dict | None = None, **train
) -> Path:
    return tc.write_config(
        base / f"{name}.yaml",
        run_dir,
        data,
        model={"init_from": str(bam_init(base, data)), **(model or {})},
        train={"save_interval": 4, "keep_last": 3, **train},
    )


def bam_reference(base: Path, data: Path) -> tuple[Path, Path]:
    """(config, run_dir) of the one-process run of 8 steps from the BAM merge."""
    run_dir = base / "bam_ref"
    cfg = bam_config(base, data, run_dir, "bam_ref")
    if not any(r["event"] == "end" for r in tc.records(run_dir)):
        tc.check(tc.run(cfg))
    return cfg, run_dir


def _compare(ref_dir: Path, run_dir: Path, steps: range) -> None:
    ref, got = tc.losses(ref_dir), tc.losses(run_dir)
    ref_n, got_n = tc.grad_norms(ref_dir), tc.grad_norms(run_dir)
    for s in steps:
        assert abs(got[s] - ref[s]) <= LOSS_ATOL, (s, got[s], ref[s])
        assert got_n[s] == pytest.approx(ref_n[s], rel=NORM_RTOL), (s, got_n[s], ref_n[s])


@pytest.mark.long
def test_tp2_then_resume_at_pp2_and_ep2_match_one_process(tmp_path, base, data):
    """TP=2 (5 steps, saving at step 4) and EP=2 equal the one-process run; the TP=2 checkpoint
    (model and optimizer state resharded from TP=2 to PP=2) continues the same curve."""
    cfg, ref_dir = bam_reference(base, data)
    from megatron_btx.checkpoint import manifest

    saved = manifest.read(ref_dir / "checkpoints" / "iter_0000004")
    assert saved["moe"]["attention_experts"] == 4  # the run's checkpoints keep the variant
    ref = tc.records(ref_dir, "train")
    assert ref[-1]["loss"] < ref[0]["loss"]  # it trains
    # the attention routers' statistics: 4 weights summing to 1, entropy below log 4
    for layer in (0, 1):
        assert sum(ref[0][f"attention_router_weight_l{layer}"]) == pytest.approx(1.0)
    assert 0 < ref[0]["attention_router_entropy"] < math.log(4)
    tokens = ref[0]["attention_router_tokens_l0"]
    assert tokens == 8 * 64  # one step's global batch of 8 sequences of 64

    run_dir = tmp_path / "tp2"
    tc.check(
        tc.run(
            cfg,
            ["--run_dir", str(run_dir), "--train.exit_after", "5", "--parallel.tp", "2"],
            nproc=2,
        )
    )
    _compare(ref_dir, run_dir, range(1, 6))
    # TP ranks route their own slices of the sequence: the statistics count every token once
    first = tc.records(run_dir, "train")[0]
    assert first["attention_router_tokens_l1"] == tokens
    assert first["attention_router_entropy"] == pytest.approx(ref[0]["attention_router_entropy"])
    proc = tc.check(
        tc.run(
            cfg,
            ["--run_dir", str(run_dir), "--train.exit_after", "7", "--parallel.pp", "2"],
            nproc=2,
        )
    )
    assert "resharding model and optimizer state" in proc.stderr
    assert "4 attention experts (experts)" in proc.stdout + proc.stderr
    _compare(ref_dir, run_dir, range(5, 8))

    run_dir = tmp_path / "ep2"
    tc.check(
        tc.run(
            cfg,
            ["--run_dir", str(run_dir), "--train.exit_after", "5", "--parallel.ep", "2"],
            nproc=2,
        )
    )
    _compare(ref_dir, run_dir, range(1, 6))


def test_kill9_then_resume_gives_the_same_losses(tmp_path, base, data):
    """SIGKILL a run of the BAM model (with full activation recompute) just after a checkpoint;
    the resumed run's losses at every step after that checkpoint equal the killed run's."""
    run_dir = tmp_path / "run"
    cfg = bam_config(
        base, data, run_dir, "bam_kill", model={"recompute": True}, steps=1000, save_interval=5
    )

    killed, resumed_from, after = tc.kill_just_after_a_checkpoint(
        cfg, run_dir, tmp_path / "run1.log"
    )
    tc.check(tc.run(cfg, ["--train.exit_after", str(max(killed) + 1)]))
    resumed = tc.losses(run_dir)  # the resumed run's records come last and win
    for s in after:
        assert abs(resumed[s] - killed[s]) <= 1e-6, (s, resumed[s], killed[s])
    # recompute runs each layer's forward twice; the routing statistics count tokens once
    assert tc.records(run_dir, "train")[-1]["attention_router_tokens_l0"] == 8 * 64
