"""The BTX plan and the local executor, without training anything: stage graph, per-stage
configs, compute matching, done markers, failure isolation and retry, `btx status`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import TINY_MODEL

from megatron_btx.errors import BTXError
from megatron_btx.eval.cli import expert_labels
from megatron_btx.pipeline import config as btx_config
from megatron_btx.pipeline import local, plan


def _text_domains(root: Path, names=("alpha", "beta", "gamma")) -> dict[str, str]:
    out = {}
    for n in names:
        d = root / "text" / n
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"doc{i}.txt").write_text(f"{n} document {i}\n" * 20)
        out[n] = str(d)
    return out


def _config(tmp_path: Path, **over) -> dict:
    doms = _text_domains(tmp_path)
    d = {
        "run_dir": str(tmp_path / "run"),
        "data": {"vocab_size": 300, "seq_length": 64},
        "domains": {n: {"source": p} for n, p in doms.items()},
        "model": dict(TINY_MODEL),
        "seed": {"pretrain": {"steps": 10, "global_batch_size": 4, "micro_batch_size": 4}},
        "experts": {"steps": 8, "global_batch_size": 4, "micro_batch_size": 4},
        "finetune": {"steps": 6, "global_batch_size": 4, "micro_batch_size": 4},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def test_plan_stages_and_configs(tmp_path):
    stages = plan.build_plan(_config(tmp_path))
    names = [s.name for s in stages]
    assert names == [
        "prepare_data",
        "seed",
        "expert_alpha",
        "expert_beta",
        "expert_gamma",
        "merge",
        "finetune",
        "baseline_dense",
        "upcycle_merge",
        "baseline_sparse_upcycling",
        "evaluate",
    ]
    by = {s.name: s for s in stages}
    run = tmp_path / "run"
    # arbitrary folders of text go to prepare-data as --domain NAME=PATH
    argv = by["prepare_data"].argv
    assert argv[0] == "prepare-data" and f"alpha={tmp_path / 'text' / 'alpha'}" in argv
    # experts branch from the seed's final checkpoint and train on their own domain only
    for n in ("alpha", "beta", "gamma"):
        s = by[f"expert_{n}"]
        assert s.deps == ["seed"] and s.resumable and s.kind == "train"
        tc = yaml.safe_load(Path(s.argv[1]).read_text())
        assert tc["model"]["init_from"] == str(run / "seed" / "checkpoints" / "iter_0000010")
        assert tc["data"]["domains"] == [n]
        assert s.outputs == [
            str(run / "experts" / n / "checkpoints" / "iter_0000008" / "metadata.json")
        ]
    # the merge keeps the seed as the generalist (last) expert, top-2 (the merge's default)
    from megatron_btx.merge.settings import MergeSettings, build_parser

    def settings(stage):
        return MergeSettings.from_args(build_parser().parse_args(stage.argv[1:]))

    m = settings(by["merge"])
    assert m.seed.endswith("seed/checkpoints/iter_0000010") and m.top_k is None
    ft = yaml.safe_load(Path(by["finetune"].argv[1]).read_text())
    assert ft["model"]["init_from"] == str(run / "merged")
    assert ft["moe"]["aux_loss_coeff"] == 0.01 and ft["moe"]["router"] == {"type": "topk"}
    assert set(ft["data"]["domains"]) == {"alpha", "beta", "gamma"}
    # sparse upcycling: 4 copies of the seed (same MoE shape as BTX), random router
    u = settings(by["upcycle_merge"])
    seed = str(run / "seed" / "checkpoints" / "iter_0000010")
    assert u.experts == [seed] * 3 and u.seed == seed and u.router_init == "random"
    # with the BTX merge's settings beside the sources: one architecture
    sources = ("experts", "seed", "save")
    assert {k: v for k, v in vars(u).items() if k not in sources} == {
        k: v for k, v in vars(m).items() if k not in sources
    }
    # and the finetune's router and load balancing
    up = yaml.safe_load(Path(by["baseline_sparse_upcycling"].argv[1]).read_text())
    assert up["moe"] == ft["moe"]
    # every train config is a valid `btx train` config
    from megatron_btx import config as train_config

    for s in stages:
        if s.kind == "train":
            train_config.load(s.argv[1])
    assert (run / "plan.json").is_file() and (run / "btx.yaml").is_file()
    assert [s.name for s in plan.read_plan(run)] == names


def test_compute_matching(tmp_path):
    stages = {s.name: s for s in plan.build_plan(_config(tmp_path))}
    btx = sum(stages[f"expert_{n}"].flops for n in ("alpha", "beta", "gamma"))
    btx += stages["finetune"].flops
    for b in ("baseline_dense", "baseline_sparse_upcycling"):
        s = stages[b]
        per_step = s.flops / s.steps
        assert abs(s.flops - btx) <= per_step / 2 + 1, (b, s.flops, btx)
    # the MoE is active on 2 of 4 experts' FFNs: more active params than the dense model
    assert stages["finetune"].active_params > stages["expert_alpha"].active_params
    assert stages["baseline_dense"].steps > stages["baseline_sparse_upcycling"].steps
    # 6 x active x tokens
    e = stages["expert_alpha"]
    assert e.flops == 6 * e.active_params * 8 * 4 * 64


@pytest.mark.parametrize(
    "router,tied,finetune_active",
    [
        # hand counts for the small run (hidden 64, FFN 256, 4 layers, vocab 2048, 4 domains +
        # the seed = 5 experts): per layer attention 16,384, one SwiGLU 49,152, router 320;
        # output projection 131,072
        ("topk", False, 4 * (16_384 + 2 * 49_152 + 320) + 131_072),  # 591,104
        ("switch", False, 4 * (16_384 + 49_152 + 320) + 131_072),  # 394,496
        ("soft", False, 4 * (16_384 + 5 * 49_152 + 320) + 131_072),  # 1,180,928
        ("topk", True, 591_104),  # tied: the output projection still counts
    ],
)
def test_small_run_active_params_by_router(router, tied, finetune_active):
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "examples" / "small_btx.yaml").read_text())
    raw["finetune"]["router"] = {"type": router}
    raw["model"]["tie_word_embeddings"] = tied
    stages = {s.name: s for s in plan.build_plan(raw, "/tmp/unused", write=False)}
    assert stages["finetune"].active_params == finetune_active
    assert stages["baseline_sparse_upcycling"].active_params == finetune_active
    assert stages["expert_code"].active_params == 4 * (16_384 + 49_152) + 131_072  # 393,216
    # compute matching uses them: the dense baseline's FLOPs buy the BTX budget
    btx = sum(s.flops for s in stages.values() if s.group == "btx")
    dense = stages["baseline_dense"]
    assert abs(dense.flops - btx) <= dense.flops / dense.steps / 2 + 1


def test_general_domain_seed_data_and_mixed_documents(tmp_path):
    """A domain with expert: false gets no expert but is prepared, blended and evaluated; the
    seed pretrains on seed.domains; mixed held-out documents are prepared."""
    raw = _config(tmp_path)
    raw["domains"]["gamma"] = {**raw["domains"]["gamma"], "expert": False, "weight": 0.2}
    raw["domains"]["alpha"]["weight"] = 0.4
    raw["domains"]["beta"]["weight"] = 0.4
    raw["seed"]["domains"] = ["gamma"]
    raw["data"]["mixed_tokens"] = 5000
    stages = {s.name: s for s in plan.build_plan(raw)}
    assert "expert_gamma" not in stages and {"expert_alpha", "expert_beta"} <= set(stages)
    data = stages["prepare_data"].argv
    assert any(a.startswith("gamma=") for a in data)
    assert data[data.index("--mixed-tokens") + 1] == "5000"
    seed = yaml.safe_load(Path(stages["seed"].argv[1]).read_text())
    assert seed["data"]["domains"] == {"gamma": 1.0}
    finetune = yaml.safe_load(Path(stages["finetune"].argv[1]).read_text())
    assert finetune["data"]["domains"] == {"alpha": 0.4, "beta": 0.4, "gamma": 0.2}
    from megatron_btx.merge.settings import MergeSettings, build_parser

    merge = MergeSettings.from_args(build_parser().parse_args(stages["merge"].argv[1:]))
    experts = merge.experts
    assert [Path(e).parts[-3] for e in experts] == ["alpha", "beta"]  # runs/experts/<name>/...
    # the evaluator labels the MoE's routed experts in the merge's order, the seed last; gamma
    # (no expert) is not one of them (it once was: routing tables and the routing claim were
    # read against shifted labels)
    labels, owners = expert_labels(btx_config.load(raw), None, "seed")
    assert labels == owners == ["alpha", "beta", "seed"]
    with pytest.raises(BTXError, match="seed.domains"):
        plan.build_plan({**raw, "seed": {**raw["seed"], "domains": ["nope"]}}, write=False)


def test_merge_variants_change_the_planned_moe(tmp_path):
    """The merged MoE's shape comes from the merge's own settings: split chunks double the
    experts at half the size (top-k doubles by the merge's default, so a token's FFN compute is
    unchanged), a shared expert adds the seed's FFN."""
    base = plan.build_plan(_config(tmp_path / "a"), write=False)
    split = plan.build_plan(_config(tmp_path / "b", merge={"split_chunks": 2}), write=False)
    shared = plan.build_plan(
        _config(tmp_path / "c", merge={"seed_as_shared_expert": True}), write=False
    )
    active = {
        name: {s.name: s.active_params for s in stages}["finetune"]
        for name, stages in (("base", base), ("split", split), ("shared", shared))
    }
    # hidden 32, FFN 64, 2 layers, vocab 300; 3 domains + seed: attention 4,096, output 9,600
    assert active["base"] == 2 * (4_096 + 2 * 3 * 32 * 64 + 32 * 4) + 9_600
    # 8 experts of FFN 32, top-4
    assert active["split"] == 2 * (4_096 + 4 * 3 * 32 * 32 + 32 * 8) + 9_600
    # 3 routed experts (top-2) + the seed's FFN as the shared expert
    assert active["shared"] == 2 * (4_096 + 3 * 3 * 32 * 64 + 32 * 3) + 9_600
    merge = {s.name: s for s in split}["merge"]
    assert merge.argv[merge.argv.index("--split-chunks") + 1] == "2"


def test_plan_without_baselines_and_with_existing_seed_dir(tmp_path):
    cfg = _config(
        tmp_path,
        baselines={"dense": False, "sparse_upcycling": False, "btm": False},
        merge={"seed_as_expert": False, "top_k": 1},
    )
    names = [s.name for s in plan.build_plan(cfg)]
    assert "baseline_dense" not in names and "upcycle_merge" not in names
    assert names[-1] == "evaluate"


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["domains"]["alpha"].update(source="/no/such/folder"), "domains.alpha.source"),
        (lambda d: d.update(seed={}), "seed.init_from"),
        (lambda d: d["experts"].update(stepz=3), "experts.stepz"),
        (lambda d: d.update(domains={"new": "builtin"}), "domains.new"),
        (lambda d: d.update(merge={"top_k": 9}), "merge.top_k"),
    ],
)
def test_config_errors_name_the_key(tmp_path, mutate, needle):
    d = _config(tmp_path)
    mutate(d)
    with pytest.raises(BTXError, match=needle.replace(".", r"\.")):
        plan.build_plan(d, write=False)


def test_weights_default_uniform_and_given(tmp_path):
    cfg = btx_config.load(_config(tmp_path))
    assert cfg.weights() == pytest.approx({"alpha": 1 / 3, "beta": 1 / 3, "gamma": 1 / 3})
    d = _config(tmp_path / "b")
    d["domains"]["alpha"]["weight"] = 3
    d["domains"]["beta"]["weight"] = 1
    assert btx_config.load(d).weights() == {"alpha": 0.75, "beta": 0.25, "gamma": 0.0}


def test_small_example_config_plans():
    root = Path(__file__).resolve().parents[1]
    stages = plan.build_plan(root / "examples" / "small_btx.yaml", "/tmp/unused", write=False)
    assert [s.name for s in stages if s.name.startswith("expert_")] == [
        "expert_code",
        "expert_math",
        "expert_prose",
        "expert_legal",
    ]
    assert "--builtin-domains" in stages[0].argv


# ---------------------------------------------------------------------------------------------
# Executor with stand-in stages (no training): failure isolation, retry, invalidation, status
# ---------------------------------------------------------------------------------------------
def _fake(tmp_path: Path, name: str, deps: list[str], ok: bool = True) -> plan.Stage:
    """A stage that runs `python -m megatron_btx --version` (ok) or an unknown command."""
    return plan.Stage(name, "data", ["--version"] if ok else ["no-such-command"], deps)


def test_executor_failure_isolated_and_retried(tmp_path, capsys):
    run = tmp_path / "run"
    stages = [
        _fake(tmp_path, "a", []),
        _fake(tmp_path, "b1", ["a"], ok=False),
        _fake(tmp_path, "b2", ["a"]),
        _fake(tmp_path, "c", ["b1", "b2"]),
    ]
    rc = local.LocalExecutor(stages, run, parallel=2, quiet=True).execute()
    assert rc == 1
    done = local.done_stages(stages, run)
    assert done == {"a", "b2"}  # the other branch finished; c was skipped
    assert json.loads((run / "stages" / "b1.failed").read_text())["rc"] == 2
    t_a = plan.read_marker("a", run)["finished_ts"]
    # fix b1 and re-run: only b1 and c run
    stages[1] = _fake(tmp_path, "b1", ["a"])
    rc = local.LocalExecutor(stages, run, parallel=2, quiet=True).execute()
    assert rc == 0
    assert plan.read_marker("a", run)["finished_ts"] == t_a
    assert local.done_stages(stages, run) == {"a", "b1", "b2", "c"}
    assert not (run / "stages" / "b1.failed").exists()
    out = capsys.readouterr().out
    assert "already done: a, b2" in out


def test_redone_dependency_invalidates_dependants(tmp_path):
    run = tmp_path / "run"
    stages = [_fake(tmp_path, "a", []), _fake(tmp_path, "b", ["a"])]
    assert local.LocalExecutor(stages, run, quiet=True).execute() == 0
    # a changes (different command line): a reruns, and so must b
    stages[0] = plan.Stage("a", "data", ["--help"], [])
    assert local.done_stages(stages, run) == set()
    assert local.LocalExecutor(stages, run, quiet=True).execute() == 0
    assert local.done_stages(stages, run) == {"a", "b"}


def test_mark_done_checks_outputs(tmp_path):
    s = plan.Stage("x", "data", ["--version"], [], outputs=[str(tmp_path / "missing")])
    with pytest.raises(BTXError, match="missing"):
        plan.mark_done(s, tmp_path)
    (tmp_path / "missing").write_text("")
    plan.mark_done(s, tmp_path)
    assert plan.stage_done(s, tmp_path)
    os.remove(tmp_path / "missing")
    assert not plan.stage_done(s, tmp_path)


def test_status_reports_states(tmp_path, capsys):
    from megatron_btx.pipeline import cli

    run = tmp_path / "run"
    stages = [
        _fake(tmp_path, "a", []),
        _fake(tmp_path, "b", ["a"], ok=False),
        _fake(tmp_path, "c", ["b"]),
    ]
    run.mkdir()
    plan.save_plan(run, plan.Plan(stages, None))
    local.LocalExecutor(stages, run, quiet=True).execute()
    # a stage that was running when its executor was killed
    (run / "stages" / "c.running").write_text(
        json.dumps(
            {"pid": 2**22 + 12345, "host": os.uname().nodename, "start_time": 0, "started": "t"}
        )
    )
    capsys.readouterr()
    assert cli.status_main([str(run)]) == 0
    out = capsys.readouterr().out
    states = {ln.split()[0]: ln.split()[2] for ln in out.splitlines()[1:-1]}
    assert states == {"a": "done", "b": "failed", "c": "interrupted"}
    assert cli.status_main([str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["done", "failed", "interrupted"]


def test_run_dry_run_prints_plan(tmp_path, capsys):
    from megatron_btx.pipeline import cli

    p = tmp_path / "btx.yaml"
    p.write_text(yaml.safe_dump(_config(tmp_path)))
    assert cli.run_main([str(p), "--dry-run", "--experts.steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "expert_gamma" in out and "btx train" in out and "5 steps" in out
    assert not (tmp_path / "run" / "stages").exists()  # a dry run runs nothing


def test_plan_with_an_hf_seed_imports_it_first(tmp_path):
    from megatron_btx.checkpoint.families import to_hf
    from megatron_btx.models.llama import LlamaArgs

    hf = tmp_path / "hf_seed"
    hf.mkdir()
    args = LlamaArgs(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
    )
    (hf / "config.json").write_text(json.dumps(to_hf(args)))
    d = _config(tmp_path)
    d["seed"] = {"init_from": str(hf)}
    del d["model"]  # the HF seed's architecture
    stages = {s.name: s for s in plan.build_plan(d)}
    imp = stages["import_seed"]
    assert imp.kind == "convert" and imp.argv[:3] == ["import-hf", "--load", str(hf)]
    assert "seed" not in stages
    assert stages["expert_alpha"].deps == ["prepare_data", "import_seed"]
    tc = yaml.safe_load(open(stages["expert_alpha"].argv[1]))
    assert tc["model"]["init_from"] == str(tmp_path / "run" / "seed_import")
    # compute is counted with the HF model's architecture: 2 layers x (attention 4 x 32 x 32
    # + SwiGLU 3 x 32 x 64) + output 300 x 32
    assert stages["expert_alpha"].active_params == 2 * (4 * 32 * 32 + 3 * 32 * 64) + 300 * 32
