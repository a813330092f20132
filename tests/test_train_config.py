"""Config schema, overrides and validation; the pieces of the loop that need no process group
(data loader position, checkpoint pointer/pruning, metrics sinks, router hook, CLI errors)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from megatron_btx import config as C
from megatron_btx.errors import BTXError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"run_dir": "runs/x", "data": {"path": "data/small"}}


def load(overrides: list[str] | None = None, **sections) -> C.Config:
    d = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return C.load(None, overrides, base=d)


# ---- schema and overrides -------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = load()
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.min_lr_ratio) == (1e-4, 100, 0.1)
    assert cfg.train.lr_decay_style == "cosine"
    assert (cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (0.1, 1.0)
    assert cfg.moe.aux_loss_coeff == 0.01 and cfg.moe.router is None


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load(
        [
            "--train.lr",
            "3e-4",
            "--parallel.tp=2",
            "--train.steps",
            "50",
            "--moe.router.type",
            "switch",
            "--moe.router.capacity_factor",
            "1.5",
            "--data.domains",
            "{code: 0.7, math: 0.3}",
            "--parallel.sequence_parallel",
            "true",
            "--optimizer.clip_grad",
            "0",
        ]
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads a str
    assert cfg.parallel.tp == 2 and cfg.train.steps == 50
    assert cfg.moe.router == {"type": "switch", "capacity_factor": 1.5}
    assert cfg.data.domains == {"code": 0.7, "math": 0.3}
    assert cfg.parallel.sequence_parallel is True and cfg.optimizer.clip_grad == 0.0
    assert load(["--data.domains", "[code, math]"]).data.domains == ["code", "math"]


@pytest.mark.parametrize(
    "args, key",
    [
        (["--train.lrr", "1e-3"], "'train.lrr'"),
        (["--trian.lr", "1e-3"], "'trian'"),
        (["--model.hiden_size", "64"], "'model.hiden_size'"),
    ],
)
def test_unknown_keys_are_named(args, key):
    with pytest.raises(BTXError, match=f"unknown key {key}"):
        load(args)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"lrr": 0.1}}))
    with pytest.raises(
        BTXError, match=r"c.yaml: unknown key 'train.lrr' \(did you mean train.lr\?\)"
    ):
        C.load(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.steps", "many"], "train.steps='many' has the wrong type"),
        (["--parallel.tp", "1.5"], "parallel.tp=1.5 has the wrong type"),
        (["--train.lr", "-1"], "train.lr=-1.0 must be positive"),
        (["--train.dtype", "fp8"], "train.dtype='fp8' must be one of"),
        (
            ["--data.global_batch_size", "6", "--data.micro_batch_size", "4"],
            "data.global_batch_size=6 is not a multiple of data.micro_batch_size=4",
        ),
        (["--parallel.vpp", "2"], "parallel.vpp=2 needs parallel.pp >= 2"),
        (["--train.lr"], "override --train.lr has no value"),
        (["train.lr", "1"], "must look like --section.key VALUE"),
        (["--train.lr.x", "1"], "train.lr={'x': 1} has the wrong type"),
        (["--moe.router", "topk"], "moe.router='topk' has the wrong type"),
        (["--moe.router.capacity_factor", "2"], "moe.router must be a mapping with a 'type'"),
    ],
)
def test_bad_values_name_the_key(args, message):
    with pytest.raises(BTXError, match=re.escape(message)):
        load(args)


def test_world_size_and_model_consistency():
    cfg = load(["--parallel.tp", "2", "--parallel.pp", "2"])
    with pytest.raises(
        BTXError,
        match=r"parallel.tp x parallel.pp = 2x2 does not divide the "
        r"world size 6",
    ):
        cfg.validate_world(6)
    cfg.validate_world(8)
    with pytest.raises(
        BTXError,
        match=r"global_batch_size=8 is not a multiple of "
        r"data.micro_batch_size x data-parallel size = 4x4",
    ):
        load(["--data.micro_batch_size", "4"]).validate_world(4)

    from megatron_btx.models.llama import LlamaArgs

    args = LlamaArgs(
        hidden_size=96, num_attention_heads=6, num_hidden_layers=3, intermediate_size=128
    )
    with pytest.raises(BTXError, match="parallel.tp=4 does not divide model.num_attention_heads=6"):
        load(["--parallel.tp", "4"]).validate_model(args)
    with pytest.raises(
        BTXError, match="parallel.pp x parallel.vpp = 2 does not divide model.num_hidden_layers=3"
    ):
        load(["--parallel.pp", "2"]).validate_model(args)
    with pytest.raises(BTXError, match="parallel.ep=2 needs an MoE"):
        load(["--parallel.ep", "2"]).validate_model(args)
    with pytest.raises(BTXError, match="moe.router is set but the model is dense"):
        load(["--moe.router.type", "topk"]).validate_model(args)
    # megatron's router at top-1 with renormalised gates: every gate is 1, no router gradient
    moe = LlamaArgs(
        hidden_size=96,
        num_attention_heads=6,
        num_hidden_layers=2,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=1,
    )
    with pytest.raises(BTXError, match="num_experts_per_tok=1 with model.norm_topk_prob=true"):
        load().validate_model(moe)
    load().validate_model(dataclasses.replace(moe, norm_topk_prob=False))
    load(["--moe.router.type", "switch"]).validate_model(moe)


def test_yaml_round_trip_and_examples(tmp_path):
    cfg = load(["--train.lr", "3e-4", "--moe.router.type", "soft"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert C.load(path) == cfg
    for name in ("small_dense.yaml", "small_moe.yaml"):
        ex = C.load(ROOT / "examples" / name)
        ex.validate_world(1)
        ex.validate_world(2)
    moe = C.load(ROOT / "examples" / "small_moe.yaml")
    assert moe.model.num_local_experts == 4 and moe.model.num_experts_per_tok == 2


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_errors_and_print_config(tmp_path, capsys):
    from megatron_btx.training.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main([str(path), "--train.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unknown key 'train.lrr'" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main([str(path), "--print-config", "--train.lr", "2e-4", "--resume"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 2e-4 and printed["train"]["resume"] is True


# ---- data sources and the loader ---------------------------------------------------------------
def _fake_prepared(root: Path) -> Path:
    root.mkdir()
    (root / "tokenizer.model").write_bytes(b"x")
    domains = {n: {"tokens": {"train": t}} for n, t in (("code", 300), ("math", 100))}
    (root / "manifest.json").write_text(json.dumps({"domains": domains}))
    return root


def test_resolve_sources(tmp_path):
    from megatron_btx.training.data import resolve_sources

    data = _fake_prepared(tmp_path / "d")
    src = resolve_sources(load(data={"path": str(data)}))
    assert src.blend == [(str(data / "code"), 300.0), (str(data / "math"), 100.0)]
    assert set(src.valid) == {"code", "math"} and src.tokenizer == str(data / "tokenizer.model")
    src = resolve_sources(
        load(data={"path": str(data), "domains": {"math": 1.0}, "valid_domains": ["code"]})
    )
    assert src.blend == [(str(data / "math"), 1.0)] and list(src.valid) == ["code"]
    with pytest.raises(BTXError, match="data.domains: 'prose' is not a domain of"):
        resolve_sources(load(data={"path": str(data), "domains": ["prose"]}))
    with pytest.raises(BTXError, match="no manifest.json"):
        resolve_sources(load(data={"path": str(tmp_path / "nothing")}))


class _Numbers:
    """A dataset whose sample i is recognisable."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> dict:
        import torch

        t = torch.full((4,), i, dtype=torch.int64)
        return {
            "tokens": t,
            "labels": t,
            "loss_mask": torch.ones(4),
            "position_ids": torch.arange(4),
        }


def test_batch_loader_splits_global_batch_and_resumes_exactly():
    import torch

    from megatron_btx.training.data import BatchLoader

    def ids(batch):
        return [int(mb["tokens"][j, 0]) for mb in batch for j in range(mb["tokens"].shape[0])]

    loaders = [BatchLoader(_Numbers(), 2, 8, r, 2, torch.device("cpu")) for r in range(2)]
    assert loaders[0].num_microbatches == 2
    first = [ids(ld.next()) for ld in loaders]
    # megatron's pretraining sampler order: microbatch m of rank r = consumed + m*mbs*dp + r*mbs
    assert first == [[0, 1, 4, 5], [2, 3, 6, 7]]
    second = [ids(ld.next()) for ld in loaders]
    assert sorted(second[0] + second[1]) == list(range(8, 16))
    state = loaders[0].state_dict()
    again = BatchLoader(_Numbers(), 2, 8, 0, 2, torch.device("cpu"))
    again.load_state_dict(state)
    assert ids(again.next()) == ids(loaders[0].next())
    with pytest.raises(BTXError, match="not a multiple"):
        BatchLoader(_Numbers(), 3, 8, 0, 1, torch.device("cpu"))


# ---- checkpoint pointer, pruning, stale temporaries ----------------------------------------------
def _fake_ckpt(run: Path, step: int) -> Path:
    from megatron_btx.rundir import iter_name

    p = run / "checkpoints" / iter_name(step)
    p.mkdir(parents=True)
    (p / "metadata.json").write_text("{}")
    return p


def test_latest_pointer_prune_and_stale_cleanup(tmp_path):
    from megatron_btx import rundir as ck

    run = tmp_path / "run"
    assert ck.read_latest(run) is None
    for s in (10, 20, 30):
        _fake_ckpt(run, s)
    ck.write_latest(run, "iter_0000030")
    assert ck.read_latest(run) == run / "checkpoints" / "iter_0000030"
    ck.prune(run, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(run)] == [20, 30]
    # `latest` is never pruned, even when newer (e.g. abandoned) folders exist
    ck.write_latest(run, "iter_0000020")
    _fake_ckpt(run, 40)
    _fake_ckpt(run, 50)
    ck.prune(run, keep_last=1)
    assert [s for s, _ in ck.list_checkpoints(run)] == [20, 50]
    (run / "checkpoints" / ".iter_0000060.tmp").mkdir()
    (run / "checkpoints" / ".latest.tmp4242").write_text("iter_0000060")
    ck.clean_stale(run)
    assert not (run / "checkpoints" / ".iter_0000060.tmp").exists()
    assert not (run / "checkpoints" / ".latest.tmp4242").exists()
    ck.write_latest(run, "iter_0000099")
    with pytest.raises(BTXError, match="not a complete checkpoint"):
        ck.read_latest(run)


# ---- logging sinks ---------------------------------------------------------------------------------
def test_metrics_jsonl_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    from megatron_btx.training.logger import MetricsLogger, read_metrics

    calls: dict = {"log": []}

    class Run:
        def log(self, d, step):
            calls["log"].append((step, d))

        def finish(self):
            calls["finished"] = True

    def init(**kw):
        calls["init"] = kw
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    off = MetricsLogger(load(logging={"tensorboard": False}), tmp_path / "off", rank=0)
    off.close()  # logging.wandb false: wandb is never started
    assert "init" not in calls and not (tmp_path / "off" / "tensorboard").exists()
    cfg = load(
        logging={
            "tensorboard": True,
            "wandb": True,
            "wandb_mode": "offline",
            "wandb_project": "proj",
            "wandb_name": "name",
        }
    )
    lg = MetricsLogger(cfg, tmp_path / "run", rank=0)
    lg.event("train", 10, loss=2.5, lr=1e-4, router_load_l0=[0.5, 0.5])
    lg.event("eval", 10, loss_code=2.0)
    lg.close()
    recs = read_metrics(tmp_path / "run")
    assert [r["event"] for r in recs] == ["train", "eval"] and recs[0]["loss"] == 2.5
    assert calls["init"]["mode"] == "offline" and calls["finished"]
    assert (calls["init"]["project"], calls["init"]["name"]) == ("proj", "name")
    assert calls["log"][0] == (10, {"train/loss": 2.5, "train/lr": 1e-4})
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    # a second logger (another rank) writes nothing
    MetricsLogger(cfg, tmp_path / "other", rank=1).event("train", 1, loss=1.0)
    assert not (tmp_path / "other").exists()


# ---- the BTX router's settings ---------------------------------------------------------------------
def test_moe_section_reaches_the_btx_router():
    cfg = load(
        [
            "--moe.router.type",
            "sample_top1",
            "--moe.aux_loss_coeff",
            "0.5",
            "--train.steps",
            "70",
        ]
    )
    settings = cfg.moe.router_settings(cfg.train.steps)
    assert settings == {
        "type": "sample_top1",
        "load_balancing": True,
        "alpha": 0.5,
        "anneal_steps": 70,
    }
    off = load(["--moe.router.type", "topk", "--moe.load_balancing", "none"])
    assert off.moe.router_settings(10)["load_balancing"] is False
    keep = load(["--moe.router.type", "sample_top1", "--moe.router.anneal_steps", "5"])
    assert keep.moe.router_settings(100)["anneal_steps"] == 5
    assert load().moe.router_settings(10) is None  # megatron-core's own router


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--moe.router.type", "topk", "--moe.load_balancing", "seq_aux_loss"],
            "moe.load_balancing",
        ),
        (["--moe.router.type", "topk", "--moe.load_balancing", "sinkhorn"], "moe.load_balancing"),
        (["--moe.router.type", "topk", "--moe.router.alpha", "0.1"], "moe.router.alpha"),
        (["--moe.router.type", "topk", "--moe.capacity_factor", "1.5"], "moe.capacity_factor"),
        (["--moe.router.type", "topk", "--moe.router.capacity_factor", "2"], "'capacity_factor'"),
        (["--moe.router.type", "switch", "--moe.router.temperature", "2"], "'temperature'"),
        (["--moe.router.type", "top3"], "'type'"),
        (["--moe.aux_loss_coeff", "nan"], "moe.aux_loss_coeff"),
    ],
)
def test_router_settings_the_router_cannot_honour_are_errors(args, message):
    with pytest.raises(BTXError, match=re.escape(message)):
        load(args)


def test_model_args_from_init_from_conflict(mg_llama):
    from megatron_btx.training.model_args import resolve_model_args

    ck = mg_llama  # hidden 64, 4 heads, vocabulary 300 (padded 384)
    cfg = load(model={"init_from": str(ck)})
    assert resolve_model_args(cfg, 300).hidden_size == 64
    with pytest.raises(BTXError, match="model.hidden_size=128 conflicts with model.init_from"):
        resolve_model_args(load(model={"init_from": str(ck), "hidden_size": 128}), 300)
    with pytest.raises(BTXError, match="the tokenizer has 9000 tokens"):
        resolve_model_args(cfg, 9000)
    inline = resolve_model_args(load(model={"hidden_size": 32, "num_attention_heads": 2}), 1000)
    assert inline.vocab_size == 1000 and inline.padded_vocab_size == 1024
