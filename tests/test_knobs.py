"""Every config key acts: docs/CONFIG.md lists each key of the training config (`btx train`) and
of the run config (`btx run`) with the test that shows changing it changes what it should; this
module holds those tests that no other module has, and checks the table itself (every key listed,
every test it names exists).

Training keys are checked on the trainer `btx train` builds, in this process (megatron-core on
the CPU, the tiny model of tests/dist/train_common.py, a few steps where only a run shows the
effect): the built model's shapes and modules, the optimizer's parameter groups, the learning
rate schedule, the batches, the run's events. Each expectation comes from outside the code under
test: shapes counted by hand, the learning-rate formulas written out, transformers' RoPE. Run
keys are checked on the plan `btx run` builds (stage command lines and per-stage training
configs) and, for the evaluation keys, on a real `btx evaluate` of a tiny run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import typing
from pathlib import Path

import pytest
import torch
import yaml

from megatron_btx.errors import BTXError

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "CONFIG.md"


# =============================================================================================
# The table: every key is listed, every test it names exists
# =============================================================================================
def _field_paths(cls: type, prefix: str, stage_cls: type | None = None) -> list[str]:
    """Dotted paths of a config dataclass's fields; a field holding a train stage (StageTrain)
    is one `<stage>.` path per key, as the table lists them once for every stage."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        nested = [a for a in (typ, *typing.get_args(typ)) if dataclasses.is_dataclass(a)]
        if nested and stage_cls is not None and issubclass(nested[0], stage_cls):
            out += [f"<stage>.{k}" for k in _field_paths(stage_cls, "")]
            extra = {g.name for g in dataclasses.fields(nested[0])} - {
                g.name for g in dataclasses.fields(stage_cls)
            }
            out += [f"{prefix}{f.name}.{k}" for k in sorted(extra)]
        elif nested:
            out += _field_paths(nested[0], f"{prefix}{f.name}.", stage_cls)
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _table_keys(section: str) -> tuple[set[str], list[str]]:
    """(keys in the first column of the tables under the `## section` heading, every
    `tests/...::name` the section names)."""
    text = DOC.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    body = next(p for p in parts if p.startswith(section))
    keys = set()
    for line in body.splitlines():
        cell = re.match(r"\|\s*`([^`]+)`", line)
        if cell:
            keys.add(cell.group(1))
    return keys, re.findall(r"tests/[\w/]+\.py::\w+", body)


def test_config_md_lists_every_key():
    """Every field of the training config (megatron_btx/config.py), of the BTX router's settings
    (moe.router.*) and of the run config (megatron_btx/pipeline/config.py) has a row in
    docs/CONFIG.md, and every row is a real key; every test the table names exists."""
    from megatron_btx import config as train_config
    from megatron_btx.models import router_types
    from megatron_btx.models.router_settings import COMMON
    from megatron_btx.pipeline import config as run_config

    training = set(_field_paths(train_config.Config, ""))
    options = {k for name in router_types.names() for k in router_types.get(name).options}
    training |= {f"moe.router.{k}" for k in [*COMMON, *options]}
    listed, tests = _table_keys("The training config")
    assert training - listed == set(), "training keys missing from docs/CONFIG.md"
    assert listed - training == set(), "rows of docs/CONFIG.md that are no training key"

    from megatron_btx.merge.settings import run_keys
    from megatron_btx.pipeline import baselines

    run = set(_field_paths(run_config.BTXConfig, "", run_config.StageTrain)) - {"source"}
    run -= {
        "domains",
        "merge.settings",
        "baselines.enabled",
        "baselines.train",
        "baselines.options",
    }
    run |= {f"merge.{k}" for k in run_keys()}  # the merge's schema: MergeSettings
    for name in baselines.names():  # the baselines' registry
        run.add(f"baselines.{name}")
        if baselines.get(name).trains:
            run.add(f"baselines.{name}_train")
        run |= {f"baselines.{name}.{option}" for option in baselines.get(name).options}
    run |= {f"domains.<name>.{k}" for k in _field_paths(run_config.DomainConfig, "")}
    run_listed, run_tests = _table_keys("The run config")
    assert run - run_listed == set(), "run keys missing from docs/CONFIG.md"
    assert run_listed - run == set(), "rows of docs/CONFIG.md that are no run key"

    assert len(tests) > 40 and len(run_tests) > 30
    for ref in sorted(set(tests + run_tests)):
        path, name = ref.split("::")
        assert (ROOT / path).is_file(), ref
        source = (ROOT / path).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, flags=re.M), f"{ref}: no such test"


# =============================================================================================
# The training config: the trainer `btx train` builds, in this process
# =============================================================================================
DEFAULT_MODEL = dict(tc.MODEL)  # hidden 64, FFN 128, 2 layers, 4 heads, context 128
MOE_MODEL = dict(tc.MODEL, **tc.MOE)  # 4 experts, top-2


def _raw(run_dir: Path, data_dir: Path, model: dict | None = None, **sections) -> dict:
    """The training config of the tests: train_common's tiny run, `sections` merged in."""
    raw = {
        "run_dir": str(run_dir),
        "model": dict(model or DEFAULT_MODEL),
        "data": {
            "path": str(data_dir),
            "domains": ["code"],
            "seq_length": 64,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "cache_dir": str(data_dir / "index_cache"),
        },
        "train": {"steps": 8, "lr": 3e-3, "warmup_steps": 3, "eval_iters": 1},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


class built:
    """``with built(raw) as trainer``: a Trainer after `setup()` (model, optimizer, scheduler,
    data, all as `btx train` builds them), its runtime torn down on exit; the objects stay."""

    def __init__(self, raw: dict) -> None:
        from megatron_btx.config import Config

        self.cfg = Config.from_dict(raw)
        self.cfg.validate()

    def __enter__(self):
        from megatron_btx.training.loop import Trainer

        self.trainer = Trainer(self.cfg)
        try:
            self.trainer.setup()
        except BaseException:
            self.__exit__()
            raise
        return self.trainer

    def __exit__(self, *exc) -> None:
        from megatron_btx import runtime

        if runtime._RUNTIME is not None:
            runtime.teardown()


def _build(tmp_path: Path, data_dir: Path, name: str = "run", **kw):
    with built(_raw(tmp_path / name, data_dir, **kw)) as trainer:
        return trainer


def gpt(trainer):
    """The GPTModel inside the trainer's DDP (and, in bf16, Float16Module) wrappers."""
    module = trainer.model[0].module
    return getattr(module, "module", module)


@pytest.fixture(scope="module")
def dense_default(tmp_path_factory, data):
    return _build(tmp_path_factory.mktemp("dense_default"), data)


@pytest.fixture(scope="module")
def moe_default(tmp_path_factory, data):
    return _build(tmp_path_factory.mktemp("moe_default"), data, model=MOE_MODEL)


def _qkv_rows(model) -> int:
    return model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# (model section, what to measure on the built GPTModel, default value, changed value): the
# values counted by hand for hidden 64, FFN 128, 2 layers, 4 heads of 16, vocabulary 1024.
ARCHITECTURE = {
    "hidden_size": (
        {"hidden_size": 96},
        lambda m: m.embedding.word_embeddings.weight.shape[1],
        64,
        96,
    ),
    # SwiGLU: gate and up projections in one weight of 2 x FFN rows
    "intermediate_size": (
        {"intermediate_size": 160},
        lambda m: m.decoder.layers[0].mlp.linear_fc1.weight.shape[0],
        256,
        320,
    ),
    "num_hidden_layers": ({"num_hidden_layers": 4}, lambda m: len(m.decoder.layers), 2, 4),
    "num_attention_heads": (
        {"num_attention_heads": 8},
        lambda m: m.decoder.layers[0].self_attention.num_attention_heads_per_partition,
        4,
        8,
    ),
    # q, k, v rows: (heads + 2 x key-value heads) x head_dim
    "num_key_value_heads": ({"num_key_value_heads": 2}, _qkv_rows, (4 + 8) * 16, (4 + 4) * 16),
    "head_dim": ({"head_dim": 32}, _qkv_rows, (4 + 8) * 16, (4 + 8) * 32),
    # padded to a multiple of 128
    "vocab_size": (
        {"vocab_size": 1100},
        lambda m: m.embedding.word_embeddings.weight.shape[0],
        1024,
        1152,
    ),
    "rms_norm_eps": (
        {"rms_norm_eps": 1e-3},
        lambda m: m.decoder.layers[0].input_layernorm.eps,
        1e-5,
        1e-3,
    ),
    "max_position_embeddings": (
        {"max_position_embeddings": 256},
        lambda m: m.max_sequence_length,
        128,
        256,
    ),
    # embedding 65,536 + 2 x (qkv 12,288 + proj 4,096 + FFN 24,576 + norms 128) + norm 64 +
    # output 65,536 = 213,312; tied: no output weight of its own
    "tie_word_embeddings": ({"tie_word_embeddings": True}, _n_params, 213_312, 213_312 - 65_536),
    "num_local_experts": (
        {"num_local_experts": 4},
        lambda m: getattr(m.decoder.layers[0].mlp, "num_local_experts", 0),
        0,
        4,
    ),
}


@pytest.mark.parametrize("key", sorted(ARCHITECTURE))
def test_model_keys_shape_the_built_model(tmp_path, data, dense_default, key):
    section, measure, default, changed = ARCHITECTURE[key]
    trainer = _build(tmp_path, data, model=dict(DEFAULT_MODEL, **section))
    assert measure(gpt(dense_default)) == pytest.approx(default)
    assert measure(gpt(trainer)) == pytest.approx(changed)
    assert getattr(trainer.args, key) == section[key]  # and the checkpoint manifest records it


def test_num_experts_per_tok_sets_the_router_top_k(tmp_path, data, moe_default):
    trainer = _build(tmp_path, data, model=dict(MOE_MODEL, num_experts_per_tok=3))
    assert gpt(moe_default).decoder.layers[0].mlp.router.topk == 2
    assert gpt(trainer).decoder.layers[0].mlp.router.topk == 3


def test_max_position_embeddings_bounds_the_sequence_length(tmp_path, data):
    with pytest.raises(
        BTXError, match="data.seq_length=64 exceeds model.max_position_embeddings=32"
    ):
        _build(tmp_path, data, model=dict(DEFAULT_MODEL, max_position_embeddings=32))


def test_rope_keys_set_the_rotary_frequencies(tmp_path, data, dense_default):
    """rope_theta and rope_scaling (Llama 3) give transformers' inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def inverse_frequencies(trainer) -> torch.Tensor:
        return gpt(trainer).rotary_pos_emb.inv_freq.double()

    head_dim = 16
    hand = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(inverse_frequencies(dense_default), hand, rtol=1e-6, atol=0)
    theta = _build(tmp_path, data, "theta", model=dict(DEFAULT_MODEL, rope_theta=500000.0))
    hand = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(inverse_frequencies(theta), hand, rtol=1e-6, atol=0)

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    scaled = _build(
        tmp_path,
        data,
        "scaled",
        model=dict(DEFAULT_MODEL, rope_theta=500000.0, rope_scaling=scaling),
    )
    reference = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=128,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
    assert not torch.allclose(expected.double(), hand)  # the scaling changes some frequencies
    torch.testing.assert_close(inverse_frequencies(scaled), expected.double(), rtol=1e-6, atol=0)


def test_hf_config_gives_the_architecture(tmp_path, data):
    """model.hf_config: the architecture of an HF config.json (written by transformers)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        vocab_size=1024,
        max_position_embeddings=128,
    ).save_pretrained(tmp_path / "hf")
    trainer = _build(tmp_path, data, model={"hf_config": str(tmp_path / "hf")})
    model = gpt(trainer)
    assert len(model.decoder.layers) == 3
    assert model.embedding.word_embeddings.weight.shape == (1024, 48)
    assert _qkv_rows(model) == (3 + 2 * 1) * 16
    assert model.decoder.layers[0].mlp.linear_fc1.weight.shape[0] == 2 * 80


@pytest.mark.parametrize(
    "key, value", [("router_aux_loss_coef", 0.02), ("bos_token_id", 5), ("eos_token_id", 7)]
)
def test_model_keys_training_would_not_read_are_refused(tmp_path, data, key, value):
    from megatron_btx import config as train_config

    raw = _raw(tmp_path / "run", data, model=dict(DEFAULT_MODEL, **{key: value}))
    with pytest.raises(BTXError, match=rf"^model\.{key} has no effect \(.*\); remove it$"):
        train_config.Config.from_dict(raw).validate()
    # null (as every saved config.yaml lists them) is accepted
    train_config.Config.from_dict(
        _raw(tmp_path / "run", data, model=dict(DEFAULT_MODEL, **{key: None}))
    ).validate()


def test_init_method_std_sets_the_spread_of_the_initial_weights(tmp_path, data, dense_default):
    trainer = _build(tmp_path, data, model=dict(DEFAULT_MODEL, init_method_std=0.005))
    # 65,536 normal draws: the sample deviation is within 1% of the true one
    default = gpt(dense_default).embedding.word_embeddings.weight.std().item()
    assert default == pytest.approx(0.02, rel=0.02)
    assert gpt(trainer).embedding.word_embeddings.weight.std().item() == pytest.approx(
        0.005, rel=0.02
    )


def _layer_calls(raw: dict) -> int:
    """How often the first transformer layer runs in one training step (4 microbatches)."""
    calls = []
    with built(raw) as trainer:
        layer = gpt(trainer).decoder.layers[0]
        layer.register_forward_hook(lambda *_: calls.append(1))
        trainer.train_step()
    return len(calls)


def test_recompute_runs_each_layer_again_in_the_backward_pass(tmp_path, data):
    assert _layer_calls(_raw(tmp_path / "a", data)) == 4
    recompute = _raw(tmp_path / "b", data, model=dict(DEFAULT_MODEL, recompute=True))
    assert _layer_calls(recompute) == 8


def test_spec_te_without_transformer_engine_is_refused(tmp_path, data):
    from megatron_btx.models.specs import te_available

    if te_available():
        pytest.skip("Transformer Engine is here: tests/test_te_spec.py covers spec te")
    with pytest.raises(BTXError, match="spec 'te' requested but Transformer Engine"):
        _build(tmp_path, data, model=dict(DEFAULT_MODEL, spec="te"))


# ---- optimizer and learning-rate schedule ----------------------------------------------------
def test_optimizer_keys_reach_adamw(tmp_path, data, dense_default):
    """weight_decay, adam_beta1/2 and adam_eps are the AdamW parameter groups' (megatron's
    groups: decayed weights, and norms without decay); clip_grad is megatron's clipping norm."""
    optimizer = {
        "weight_decay": 0.05,
        "adam_beta1": 0.8,
        "adam_beta2": 0.9,
        "adam_eps": 1e-6,
        "clip_grad": 0.5,
    }
    trainer = _build(tmp_path, data, optimizer=optimizer)

    def groups(t):
        return sorted((g["weight_decay"], g["betas"], g["eps"]) for g in t.optimizer.param_groups)

    assert groups(dense_default) == [(0.0, (0.9, 0.95), 1e-8), (0.1, (0.9, 0.95), 1e-8)]
    assert groups(trainer) == [(0.0, (0.8, 0.9), 1e-6), (0.05, (0.8, 0.9), 1e-6)]
    assert (dense_default.optimizer.config.clip_grad, trainer.optimizer.config.clip_grad) == (
        1,
        0.5,
    )


def _first_update(raw: dict) -> float:
    """Median |change| of the first layer's FFN weights in the first training step."""
    with built(raw) as trainer:
        weight = gpt(trainer).decoder.layers[0].mlp.linear_fc1.weight
        before = weight.detach().clone()
        trainer.train_step()
        return float((weight.detach() - before).abs().median())


def test_clip_grad_scales_the_first_update(tmp_path, data):
    """Adam's first step moves a weight by about lr (g / |g|); clipping the gradient to a norm
    of 1e-12 leaves g ~ 1e-14 per weight, far below adam_eps = 1e-8, so the step shrinks by
    four orders of magnitude. (clip_grad 0: no clipping; weight decay off so only Adam moves
    the weights.)"""
    train = {"lr": 1e-3, "warmup_steps": 0, "lr_decay_style": "constant"}
    free = _first_update(
        _raw(tmp_path / "a", data, train=train, optimizer={"weight_decay": 0.0, "clip_grad": 0.0})
    )
    clipped = _first_update(
        _raw(tmp_path / "b", data, train=train, optimizer={"weight_decay": 0.0, "clip_grad": 1e-12})
    )
    assert free == pytest.approx(1e-3, rel=0.05)
    assert clipped < 1e-3 * free


def _hand_lr(step: int, style: str, decay_steps: int, lr=1e-3, min_lr=2e-4, warmup=4) -> float:
    """megatron-LM's schedule written out: linear warmup from 0, then decay to min_lr."""
    if step <= warmup:
        return lr * step / warmup
    if style == "constant":
        return lr
    if step > decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0) if style == "cosine" else 1.0 - ratio
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize(
    "style, decay_steps", [("cosine", None), ("cosine", 12), ("linear", None), ("constant", None)]
)
def test_schedule_keys_shape_the_learning_rate(tmp_path, data, style, decay_steps):
    """train.lr, min_lr_ratio, warmup_steps, lr_decay_style and lr_decay_steps (default: steps)
    give the learning rate of every step."""
    train = {
        "steps": 20,
        "lr": 1e-3,
        "min_lr_ratio": 0.2,
        "warmup_steps": 4,
        "lr_decay_style": style,
        "lr_decay_steps": decay_steps,
    }
    trainer = _build(tmp_path, data, train=train)
    got = []
    for _ in range(22):
        trainer.scheduler.step(1)  # as train_step does before the optimizer step
        got.append(trainer.optimizer.param_groups[0]["lr"])
    expected = [_hand_lr(s, style, decay_steps or 20) for s in range(1, 23)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


# ---- data ----------------------------------------------------------------------------------------
def _first_batch(trainer) -> list[torch.Tensor]:
    return [micro["tokens"] for micro in trainer.loader.batch_at(0)]


def test_batch_keys_shape_the_batches(tmp_path, data, dense_default):
    """seq_length is every sample's length; micro_batch_size the rows of a microbatch;
    global_batch_size / micro_batch_size the microbatches of a step."""
    assert [tuple(t.shape) for t in _first_batch(dense_default)] == [(2, 64)] * 4
    shorter = _build(tmp_path, data, "seq", data={"seq_length": 32})
    assert [tuple(t.shape) for t in _first_batch(shorter)] == [(2, 32)] * 4
    wider = _build(tmp_path, data, "micro", data={"micro_batch_size": 4})
    assert [tuple(t.shape) for t in _first_batch(wider)] == [(4, 64)] * 2
    larger = _build(tmp_path, data, "global", data={"global_batch_size": 16})
    assert [tuple(t.shape) for t in _first_batch(larger)] == [(2, 64)] * 8


def test_data_domains_weights_set_the_blend(tmp_path, data):
    """{code: 1, toy: 3}: a quarter of the training samples are code's; validation on both."""
    trainer = _build(tmp_path, data, data={"domains": {"code": 1.0, "toy": 3.0}})
    blended = trainer.train_ds  # steps x global batch = 64 samples
    shares = torch.bincount(torch.as_tensor(blended.dataset_index), minlength=2) / 64
    names = [Path(ds.dataset_path).name.split("_")[0] for ds in blended.datasets]
    assert dict(zip(names, shares.tolist())) == {"code": 0.25, "toy": 0.75}
    assert sorted(trainer.valid_ds) == ["code", "toy"]


def test_valid_domains_choose_the_validation_sets(tmp_path, data, dense_default):
    assert sorted(dense_default.valid_ds) == ["code"]  # default: the blend's domains
    trainer = _build(tmp_path, data, data={"valid_domains": ["toy"]})
    assert sorted(trainer.valid_ds) == ["toy"]


def test_blend_and_tokenizer_name_the_data_files(tmp_path, data):
    """data.blend: explicit [prefix, weight] pairs (without data.path, data.tokenizer names the
    tokenizer); the samples are those files' tokens."""
    raw = _raw(tmp_path / "run", data)
    del raw["data"]["path"], raw["data"]["domains"]
    raw["data"]["blend"] = [[str(data / "toy"), 1.0]]
    raw["data"]["tokenizer"] = str(data / "tokenizer.model")
    with built(raw) as trainer:
        assert trainer.sources.blend == [(str(data / "toy"), 1.0)]
        assert trainer.sources.tokenizer == str(data / "tokenizer.model")
        tokens = trainer.loader.batch_at(0)[0]["tokens"][0]
    toy_words = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}
    assert set(trainer.tokenizer.decode(tokens.tolist()).replace(".", " ").split()) <= toy_words


def test_tokenizer_sets_the_vocabulary(tmp_path, data):
    """data.tokenizer: the model's vocabulary (inline models take the tokenizer's size)."""
    from megatron_btx.data.spm_tokenizer import train_sentencepiece

    text = tmp_path / "text.txt"
    text.write_text((data.parent / "toy.jsonl").read_text())
    tokenizer = train_sentencepiece([str(text)], tmp_path / "tok", vocab_size=600)
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=tokenizer.path).get_piece_size()
    assert pieces < 1024  # the eight words of the toy text do not fill 600 pieces
    trainer = _build(tmp_path, data, data={"tokenizer": tokenizer.path})
    assert trainer.args.vocab_size == pieces
    rows = gpt(trainer).embedding.word_embeddings.weight.shape[0]
    assert rows == 128 * math.ceil(pieces / 128)


def test_cache_dir_holds_the_dataset_indices(tmp_path, data):
    raw = _raw(tmp_path / "run", data)
    del raw["data"]["cache_dir"]
    with built(raw):
        pass
    assert list((tmp_path / "run" / "data_cache").rglob("*.npy"))  # default: <run_dir>/data_cache
    _build(tmp_path, data, "other", data={"cache_dir": str(tmp_path / "cache")})
    assert list((tmp_path / "cache").rglob("*.npy"))


# ---- train: a short run in this process -------------------------------------------------------
def _run(raw: dict):
    with built(raw) as trainer:
        return trainer, trainer.run()


def _steps_of(run_dir: Path, event: str) -> list[int]:
    return [r["step"] for r in tc.records(run_dir, event)]


def test_run_length_and_interval_keys(tmp_path, data):
    """steps 6, log every 2, validate every 3, save every 4 and keep 1; a checkpoint also at the
    end. The defaults (log 10, validate 100, save 500, keep 2) would give one of each."""
    train = {
        "steps": 6,
        "log_interval": 2,
        "eval_interval": 3,
        "save_interval": 4,
        "keep_last": 1,
    }
    _, result = _run(_raw(tmp_path / "run", data, train=train, logging={"tensorboard": True}))
    run = tmp_path / "run"
    assert result.step == 6 and result.exit_reason == "finished"
    assert _steps_of(run, "train") == [2, 4, 6]
    assert _steps_of(run, "eval") == [0, 3, 6]
    assert _steps_of(run, "checkpoint") == [4, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_0000006", "latest"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    _, result = _run(_raw(tmp_path / "quiet", data, train={"steps": 3}))  # logging.tensorboard off
    assert _steps_of(tmp_path / "quiet", "train") == [3]
    assert _steps_of(tmp_path / "quiet", "eval") == [0, 3]
    assert not (tmp_path / "quiet" / "tensorboard").exists()


def _validation_schedules(raw: dict) -> list[int]:
    """The microbatches of every schedule one validation runs (the real schedule still runs)."""
    schedules: list[int] = []
    with built(raw) as trainer:
        real = trainer._run_schedule

        def counted(batch, forward_only):
            schedules.append(len(batch))
            return real(batch, forward_only)

        trainer._run_schedule = counted
        trainer.evaluate()
    return schedules


def test_eval_iters_is_the_validation_batches_per_domain(tmp_path, data):
    for iters in (1, 3):
        raw = _raw(tmp_path / f"run{iters}", data, train={"eval_iters": iters})
        assert _validation_schedules(raw) == [4] * iters  # global batches of 4 microbatches


def test_seed_sets_the_initial_weights_and_the_sample_order(tmp_path, data, dense_default):
    same = _build(tmp_path, data, "same", train={"seed": 1234})  # the default seed
    other = _build(tmp_path, data, "other", train={"seed": 99})

    def weights(t):
        return gpt(t).decoder.layers[0].mlp.linear_fc1.weight

    assert torch.equal(weights(same), weights(dense_default))
    assert not torch.equal(weights(other), weights(dense_default))
    assert torch.equal(_first_batch(same)[0], _first_batch(dense_default)[0])
    assert not torch.equal(_first_batch(other)[0], _first_batch(dense_default)[0])


def test_dtype_sets_the_parameter_precision(tmp_path, data, dense_default):
    trainer = _build(tmp_path, data, train={"dtype": "bf16"})
    assert gpt(dense_default).embedding.word_embeddings.weight.dtype == torch.float32  # auto, CPU
    assert gpt(trainer).embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert trainer.tconf.bf16 and not dense_default.tconf.bf16


def test_dtype_auto_on_a_cpu_follows_the_measurement(tmp_path, data, monkeypatch):
    """auto: bf16 on a CPU with bf16 matrix units for a model at least CPU_BF16_MIN_HIDDEN (512)
    wide, where it was measured faster (BENCHMARKS.md); fp32 for narrower models and on a CPU
    without those units."""
    from megatron_btx import runtime

    wide = dict(DEFAULT_MODEL, hidden_size=512, num_attention_heads=8)
    for units, model, expected in (
        (True, wide, torch.bfloat16),
        (True, DEFAULT_MODEL, torch.float32),  # 64 wide
        (False, wide, torch.float32),
    ):
        monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda units=units: units)
        trainer = _build(tmp_path, data, f"run_{units}_{model['hidden_size']}", model=model)
        assert gpt(trainer).embedding.word_embeddings.weight.dtype == expected, (units, model)


def test_device_cuda_insists_on_a_gpu(tmp_path, data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: device cuda runs on it (the GPU checks)")
    with pytest.raises(BTXError, match="device 'cuda' was requested but torch sees no GPU"):
        _build(tmp_path, data, train={"device": "cuda"})


# ---- moe -----------------------------------------------------------------------------------------
def _moe_layer(trainer):
    return gpt(trainer).decoder.layers[0].mlp


def test_moe_keys_reach_megatron_core_router_and_dispatcher(tmp_path, data, moe_default):
    """dispatcher: the token dispatcher's class; load_balancing and aux_loss_coeff: the loss
    megatron-core's router adds; capacity_factor: its expert capacity (token dropping)."""
    default = _moe_layer(moe_default)
    assert type(default.token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher"
    assert (default.router.routing_type, default.router.config.moe_aux_loss_coeff) == (
        "aux_loss",
        0.01,
    )
    assert default.config.moe_expert_capacity_factor is None

    changed = _moe_layer(
        _build(
            tmp_path,
            data,
            "changed",
            model=MOE_MODEL,
            moe={"dispatcher": "allgather", "aux_loss_coeff": 0.2, "capacity_factor": 1.0},
        )
    )
    assert type(changed.token_dispatcher).__name__ == "MoEAllGatherTokenDispatcher"
    assert changed.router.config.moe_aux_loss_coeff == 0.2
    assert changed.config.moe_expert_capacity_factor == 1.0
    off = _moe_layer(_build(tmp_path, data, "off", model=MOE_MODEL, moe={"load_balancing": "none"}))
    assert (off.router.routing_type, off.router.config.moe_aux_loss_coeff) == ("none", 0.0)


@pytest.mark.parametrize("balancing", ["sinkhorn", "seq_aux_loss"])
def test_megatron_load_balancing_types_train(tmp_path, data, balancing):
    """moe.load_balancing sinkhorn (no loss: megatron-core's router refuses a coefficient, so
    moe.aux_loss_coeff is not passed) and seq_aux_loss (the per-sequence loss, logged): the
    router's balancing type, and a training step runs."""
    with built(
        _raw(tmp_path / "run", data, model=MOE_MODEL, moe={"load_balancing": balancing})
    ) as trainer:
        assert _moe_layer(trainer).router.routing_type == balancing
        metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"])
    logged = {"sinkhorn": [], "seq_aux_loss": ["seq_load_balancing_loss"]}[balancing]
    assert [k for k in metrics if "balancing" in k] == logged


def test_local_dispatch_replaces_the_dispatcher(tmp_path, data):
    trainer = _build(tmp_path, data, model=MOE_MODEL, moe={"local_dispatch": True})
    assert type(_moe_layer(trainer).token_dispatcher).__name__ == "LocalTokenDispatcher"


def test_moe_router_keys_reach_the_installed_router(tmp_path, data, moe_default):
    """moe.router's keys become the installed BTX router's settings in every MoE layer (what
    each setting does: tests/test_routers.py); moe.aux_loss_coeff is its alpha."""
    from megatron_btx.models import routers

    assert type(_moe_layer(moe_default).router).__name__ == "TopKRouter"  # megatron-core's
    switch = {
        "type": "switch",
        "capacity_factor": 2.0,
        "drop_policy": "position",
        "freeze_experts": True,
    }
    trainer = _build(
        tmp_path, data, "switch", model=MOE_MODEL, moe={"router": switch, "aux_loss_coeff": 0.3}
    )
    for layer in gpt(trainer).decoder.layers:
        settings = layer.mlp.router.settings
        options = settings.options
        assert (settings.type, options["capacity_factor"], options["drop_policy"]) == (
            "switch",
            2.0,
            "position",
        )
        assert settings.alpha == 0.3 and settings.load_balancing
        assert not any(p.requires_grad for p in layer.mlp.experts.parameters())
        assert layer.mlp.router.weight.requires_grad
    sample = {
        "type": "sample_top1",
        "temperature": 2.0,
        "temperature_floor": 0.25,
        "anneal_steps": 10,
    }
    with built(_raw(tmp_path / "sample", data, model=MOE_MODEL, moe={"router": sample})) as trainer:
        routers.set_step(trainer.model, 5)
        # linear from 2.0 to 0.25 over 10 steps: halfway at step 5
        assert [layer.mlp.router.temperature for layer in gpt(trainer).decoder.layers] == [
            1.125
        ] * 2


# =============================================================================================
# The run config: the plan `btx run` builds (stage command lines, per-stage training configs)
# =============================================================================================
def _plan(raw: dict, write: bool = True) -> dict:
    from megatron_btx.pipeline import plan

    return {s.name: s for s in plan.build_plan(raw, write=write)}


def _stage_config(stage) -> dict:
    return yaml.safe_load(Path(stage.argv[1]).read_text())


def _argv_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.fixture
def run_raw(tmp_path):
    from test_pipeline_plan import _config

    return _config(tmp_path)  # three text-file domains alpha, beta, gamma; the tiny model


def test_data_keys_reach_prepare_data_and_every_stage(tmp_path, run_raw):
    base = _plan(run_raw)
    prepare = base["prepare_data"].argv
    assert _argv_value(prepare, "--vocab-size") == "300"
    assert _argv_value(prepare, "--split") == "test=0.08,valid=0.02"
    assert "--txt-separator" not in prepare
    raw = json.loads(json.dumps(run_raw))
    raw["data"].update(
        vocab_size=500, split="test=0.1,valid=0.05", txt_separator="<sep>", seq_length=32
    )
    changed = _plan(raw)
    prepare = changed["prepare_data"].argv
    assert _argv_value(prepare, "--vocab-size") == "500"
    assert _argv_value(prepare, "--split") == "test=0.1,valid=0.05"
    assert _argv_value(prepare, "--txt-separator") == "<sep>"
    for name in ("seed", "expert_alpha", "finetune", "baseline_dense"):
        assert _stage_config(changed[name])["data"]["seq_length"] == 32
        assert changed[name].tokens == changed[name].steps * 4 * 32  # global batch 4
    # the vocabulary is in the model: 200 more embedding and output rows of 32
    assert changed["seed"].active_params - base["seed"].active_params == 200 * 32


def test_builtin_data_keys(tmp_path):
    from test_pipeline_plan import _config

    raw = _config(tmp_path)
    raw["domains"] = {"code": "builtin", "math": "builtin"}
    argv = _plan(raw, write=False)["prepare_data"].argv
    assert _argv_value(argv, "--builtin-domains") == "code,math"
    assert _argv_value(argv, "--max-mb") == "4.0"
    raw["data"]["max_mb"] = 0.5
    assert _argv_value(_plan(raw, write=False)["prepare_data"].argv, "--max-mb") == "0.5"
    raw["data"]["txt_separator"] = "<sep>"  # no text files to separate
    with pytest.raises(BTXError, match=r"data\.txt_separator has no effect"):
        _plan(raw, write=False)


def test_data_tokenizer_and_prepared(tmp_path, run_raw, data):
    """data.tokenizer: prepare-data tokenizes with it (no vocabulary trained) and the model's
    vocabulary is its size; data.prepared: no preparation, every stage reads that folder."""
    raw = json.loads(json.dumps(run_raw))
    raw["data"]["tokenizer"] = str(data / "tokenizer.model")
    stages = _plan(raw)
    argv = stages["prepare_data"].argv
    assert _argv_value(argv, "--tokenizer") == str(data / "tokenizer.model")
    assert "--vocab-size" not in argv
    assert _stage_config(stages["seed"])["model"].get("vocab_size") is None  # the tokenizer's
    assert stages["seed"].active_params == _plan(run_raw)["seed"].active_params + (1024 - 300) * 32

    raw = json.loads(json.dumps(run_raw))
    raw["domains"] = {"code": "builtin", "toy": "builtin"}
    raw["data"] = {"prepared": str(data), "seq_length": 64}
    stages = _plan(raw)
    assert "prepare_data" not in stages
    assert _stage_config(stages["expert_code"])["data"]["path"] == str(data)
    raw["data"]["tokenizer"] = str(data / "tokenizer.model")
    with pytest.raises(BTXError, match=r"data\.tokenizer has no effect \(data\.prepared"):
        _plan(raw, write=False)


def test_model_section_reaches_the_seed_and_options_every_stage(tmp_path, run_raw):
    raw = json.loads(json.dumps(run_raw))
    raw["model"].update(hidden_size=64, spec="local", recompute=True)
    stages = _plan(raw)
    seed = _stage_config(stages["seed"])["model"]
    assert seed["hidden_size"] == 64 and seed["init_from"] is None
    for name in ("expert_alpha", "finetune", "baseline_dense", "baseline_sparse_upcycling"):
        model = _stage_config(stages[name])["model"]
        assert (model["spec"], model["recompute"], model["hidden_size"]) == ("local", True, None)
    # hidden 64 instead of 32: attention 4 x 64^2 and SwiGLU 3 x 64 x 64 per layer, output 300 x 64
    assert stages["seed"].active_params == 2 * (4 * 64 * 64 + 3 * 64 * 64) + 300 * 64


def test_seed_init_from_refuses_keys_it_makes_inert(tmp_path, run_raw, data):
    seed = tc.init_checkpoint(tmp_path, data)
    raw = json.loads(json.dumps(run_raw))
    raw["seed"] = {"init_from": str(seed)}
    for extra, key in (
        ({"seed": {"init_from": str(seed), "pretrain": {"steps": 5}}}, "seed.pretrain"),
        ({"seed": {"init_from": str(seed), "domains": ["alpha"]}}, "seed.domains"),
        ({}, "model.hidden_size"),
    ):
        with pytest.raises(BTXError, match=rf"{re.escape(key)} has no effect \(the seed is"):
            _plan({**raw, **extra}, write=False)
    raw["model"] = {"spec": "local"}  # training options still reach every stage
    stages = _plan(raw)
    assert "seed" not in stages
    assert _stage_config(stages["expert_alpha"])["model"]["init_from"] == str(seed)
    assert _stage_config(stages["expert_alpha"])["model"]["spec"] == "local"


STAGES = {
    "seed.pretrain": ("seed", ("seed", "pretrain")),
    "experts": ("expert_beta", ("experts",)),
    "finetune": ("finetune", ("finetune",)),
    "baselines.dense_train": ("baseline_dense", ("baselines", "dense_train")),
    "baselines.sparse_upcycling_train": (
        "baseline_sparse_upcycling",
        ("baselines", "sparse_upcycling_train"),
    ),
    "baselines.drop_upcycling_train": (
        "baseline_drop_upcycling",
        ("baselines", "drop_upcycling_train"),
    ),
    "baselines.granular_upcycling_train": (
        "baseline_granular_upcycling",
        ("baselines", "granular_upcycling_train"),
    ),
    "extend.finetune": ("finetune_extend", ("extend", "finetune")),
}


def _with_stage(raw: dict, stage: str, tmp_path: Path) -> dict:
    """`raw` with the optional part of the run `stage` belongs to turned on (a baseline that is
    off by default; the extend experiment, with a domain to add)."""
    raw = json.loads(json.dumps(raw))
    name = stage.split(".")[-1].removesuffix("_train")
    if stage.startswith("baselines.") and name in ("drop_upcycling", "granular_upcycling"):
        raw.setdefault("baselines", {})[name] = True
    if stage.startswith("extend."):
        folder = tmp_path / "text" / "delta"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "doc.txt").write_text("delta document\n" * 20)
        raw.setdefault("extend", {})["domains"] = {"delta": {"source": str(folder)}}
    return raw


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_keys_reach_their_stage(tmp_path, run_raw, stage):
    """Each train-stage key lands in that stage's `btx train` config (and nproc in its launch);
    the dense baseline starts from experts' keys, sparse upcycling from finetune's."""
    name, path = STAGES[stage]
    keys = {
        "steps": 20,
        "lr": 5e-4,
        "warmup_steps": 3,
        "min_lr_ratio": 0.3,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "nproc": 2,
        "parallel": {"tp": 2},
        "train": {"log_interval": 7},
    }
    run_raw = _with_stage(run_raw, stage, tmp_path)
    raw = json.loads(json.dumps(run_raw))
    # else compute matching chooses their steps
    raw["baselines"] = {**run_raw.get("baselines", {}), "compute_match": "none"}
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = {**node.get(path[-1], {}), **keys}
    before = _plan(run_raw)[name]
    stage_run = _plan(raw)[name]
    config = _stage_config(stage_run)
    assert (before.steps, stage_run.steps, stage_run.nproc) != (20, 20, 2)
    assert stage_run.steps == 20 and stage_run.nproc == 2
    train = config["train"]
    assert (train["lr"], train["warmup_steps"], train["min_lr_ratio"]) == (5e-4, 3, 0.3)
    assert train["log_interval"] == 7
    assert (config["data"]["micro_batch_size"], config["data"]["global_batch_size"]) == (2, 8)
    assert config["parallel"]["tp"] == 2


def test_warmup_is_at_most_a_fifth_of_a_stage(tmp_path, run_raw):
    raw = json.loads(json.dumps(run_raw))
    raw["experts"].update(steps=10, warmup_steps=5)
    assert _stage_config(_plan(raw)["expert_alpha"])["train"]["warmup_steps"] == 2


def test_run_wide_sections_reach_every_stage(tmp_path, run_raw):
    """train, optimizer and logging: the sections of every stage's training config (a stage's
    own train keys win)."""
    raw = json.loads(json.dumps(run_raw))
    raw["train"] = {"log_interval": 3, "seed": 7}
    raw["optimizer"] = {"weight_decay": 0.0, "adam_beta2": 0.99}
    raw["logging"] = {"tensorboard": True}
    raw["finetune"]["train"] = {"log_interval": 1}
    stages = _plan(raw)
    for name in ("seed", "expert_alpha", "finetune", "baseline_dense", "baseline_sparse_upcycling"):
        config = _stage_config(stages[name])
        assert config["train"]["seed"] == 7
        # sparse upcycling trains with the finetune's keys
        own = name in ("finetune", "baseline_sparse_upcycling")
        assert config["train"]["log_interval"] == (1 if own else 3)
        assert (config["optimizer"]["weight_decay"], config["optimizer"]["adam_beta2"]) == (
            0.0,
            0.99,
        )
        assert config["logging"]["tensorboard"] is True
    raw["train"] = {"steps": 5}
    with pytest.raises(BTXError, match=r"train\.steps has no effect"):
        _plan(raw, write=False)


def _merge_settings(stage):
    """What `btx merge` makes of a planned merge stage's command line."""
    from megatron_btx.merge.settings import MergeSettings, build_parser

    return MergeSettings.from_args(build_parser().parse_args(stage.argv[1:]))


def test_merge_keys_reach_the_merge(tmp_path, run_raw):
    base = _merge_settings(_plan(run_raw)["merge"])
    assert base.router_init == "random" and base.top_k is None  # the merge's default: 2
    assert base.seed is not None and not base.blend and base.moe_layers is None
    raw = json.loads(json.dumps(run_raw))
    raw["merge"] = {
        "seed_as_expert": False,
        "router_init": "zero",
        "top_k": 1,
        "moe_layers": "1",
        "dense_ffn": "average",
        "router_seed": 7,
    }
    raw["finetune"]["router"] = {"type": "switch"}  # top-1
    stages = _plan(raw)
    got = _merge_settings(stages["merge"])
    assert got.seed is None
    assert (got.router_init, got.top_k, got.moe_layers, got.router_seed) == ("zero", 1, "1", 7)
    upcycled = _merge_settings(stages["upcycle_merge"])
    assert (upcycled.top_k, upcycled.moe_layers, upcycled.router_seed) == (1, "1", 7)
    raw["merge"] = {"blend": True, "moe_layers": "0", "dense_ffn": "seed"}  # 4 sources
    got = _merge_settings(_plan(raw)["merge"])
    assert got.blend and got.dense_ffn == "seed"
    raw["merge"] = {"dense_ffn": "seed"}
    with pytest.raises(BTXError, match=r"merge\.dense_ffn has no effect"):
        _plan(raw, write=False)
    raw["merge"] = {"extra_args": ["--router-seed", "7"]}  # every merge setting is a key now
    with pytest.raises(BTXError, match=r"unknown key 'merge\.extra_args'"):
        _plan(raw, write=False)


def test_every_merge_setting_a_run_may_choose_reaches_the_merge(tmp_path, run_raw):
    """Each run key of the merge (MergeSettings' fields marked `run`), set to a value other than
    its default, comes out of the planned stage's command line as that value."""
    from megatron_btx.merge.settings import run_keys

    chosen = {
        "router_init": "zero",
        "router_std": 0.5,
        "router_seed": 99,
        "centroid_tokens": 512,
        "centroid_seq_len": 32,
        "top_k": 3,
        "expert_map": [1, 0, 2, 3],
        "average_weights": [1.0, 2.0, 1.0, 0.5],
        "split_chunks": 2,
        "blend": False,
        "seed_as_shared_expert": False,
        "moe_layers": "0",
        "dense_ffn": "seed",
        "attention": "experts",
        "drop_ratio": 0.5,
        "drop_seed": 7,
        "upcycling_scale": "topk",
        "dtype": "bf16",
        "verify": True,
        "verify_hashes": False,
        "hash_output": False,
    }
    assert set(chosen) == set(run_keys())  # a new run key needs a value here
    for key, value in chosen.items():
        if value == run_keys()[key]:
            continue  # covered by its own variant test (blend, the shared expert)
        raw = json.loads(json.dumps(run_raw))
        raw["merge"] = {key: value, **({"moe_layers": "0"} if key == "dense_ffn" else {})}
        got = _merge_settings(_plan(raw, write=False)["merge"])
        assert getattr(got, key) == value, key


def test_centroid_router_init_gives_the_merge_domain_data(tmp_path, run_raw):
    raw = json.loads(json.dumps(run_raw))
    raw["merge"] = {"router_init": "centroid"}
    data = _merge_settings(_plan(raw)["merge"]).centroid_data
    run = tmp_path / "run"
    assert data[:3] == [f"{run}/data/{n}_train_text_document" for n in ("alpha", "beta", "gamma")]
    # the seed's row: a sample of the whole blend (uniform weights here)
    prefix = f"{run}/data/{{}}_train_text_document"
    assert data[3] == ",".join(f"{prefix.format(n)}@{1 / 3:g}" for n in ("alpha", "beta", "gamma"))


def test_finetune_load_balancing_reaches_the_moe_stages(tmp_path, run_raw):
    raw = json.loads(json.dumps(run_raw))
    raw["finetune"].update(load_balancing="none", aux_loss_coeff=0.5, router={"type": "soft"})
    stages = _plan(raw)
    for name in ("finetune", "baseline_sparse_upcycling"):
        moe = _stage_config(stages[name])["moe"]
        assert (moe["load_balancing"], moe["aux_loss_coeff"], moe["router"]) == (
            "none",
            0.5,
            {"type": "soft"},
        )


def test_baseline_steps_are_refused_under_compute_matching(tmp_path, run_raw):
    raw = json.loads(json.dumps(run_raw))
    raw["baselines"] = {"dense_train": {"steps": 5}}
    with pytest.raises(BTXError, match=r"baselines\.dense_train\.steps has no effect"):
        _plan(raw, write=False)


def test_btm_keys_choose_the_evaluated_ensembles(tmp_path, run_raw):
    from megatron_btx.eval.cli import run_models

    def ensembles(raw) -> list[str]:
        _plan(raw)
        return sorted(m for m in run_models(Path(raw["run_dir"]))[2] if m.startswith("btm"))

    assert ensembles(run_raw) == ["btm_top1", "btm_top2"]
    raw = json.loads(json.dumps(run_raw))
    raw["evaluation"] = {"btm_top_k": [3]}
    assert ensembles(raw) == ["btm_top3"]
    raw["baselines"] = {"btm": False}
    assert ensembles(raw) == []


def test_lm_eval_keys_reach_the_evaluate_stage(tmp_path, run_raw):
    """evaluation.lm_eval: none by default; its tasks, tasks_dir (resolved), limit and
    batch_size become the evaluate stage's --lm-eval flags (what they do there:
    tests/test_lm_eval.py::test_run_config_lm_eval_keys_reach_btx_evaluate); keys without tasks
    and bad values are refused with the key named."""
    assert not any(a.startswith("--lm-eval") for a in _plan(run_raw)["evaluate"].argv)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    raw = json.loads(json.dumps(run_raw))
    lm = {"tasks": ["one", "two"], "tasks_dir": str(tasks), "limit": 7, "batch_size": 4}
    raw["evaluation"] = {"lm_eval": lm}
    argv = _plan(raw)["evaluate"].argv
    assert _argv_value(argv, "--lm-eval") == "one,two"
    assert _argv_value(argv, "--lm-eval-tasks-dir") == str(tasks)
    assert _argv_value(argv, "--lm-eval-limit") == "7"
    assert _argv_value(argv, "--lm-eval-batch-size") == "4"
    raw["evaluation"] = {"lm_eval": {"tasks": ["one"]}}  # lm-eval's own tasks, every document
    argv = _plan(raw)["evaluate"].argv
    assert argv[argv.index("--lm-eval") :] == ["--lm-eval", "one"]
    refused = {
        "evaluation.lm_eval.tasks_dir has no effect": {"tasks_dir": str(tasks)},
        "evaluation.lm_eval.limit has no effect": {"limit": 3},
        "evaluation.lm_eval.batch_size has no effect": {"batch_size": 2},
        r"evaluation.lm_eval.tasks\[0\]='a,b': one lm-eval task name": {"tasks": ["a,b"]},
        "evaluation.lm_eval.limit=0 must be >= 1": {"tasks": ["a"], "limit": 0},
        "evaluation.lm_eval.batch_size=0 must be >= 1": {"tasks": ["a"], "batch_size": 0},
        "evaluation.lm_eval.tasks_dir: .*absent is not a folder": {
            "tasks": ["a"],
            "tasks_dir": str(tmp_path / "absent"),
        },
    }
    for message, section in refused.items():
        raw["evaluation"] = {"lm_eval": section}
        with pytest.raises(BTXError, match=message):
            _plan(raw, write=False)


# ---- evaluation: `btx evaluate` of the seed of a tiny run ---------------------------------------
def _evaluate(tmp_path: Path, data: Path, seed: Path, name: str, **evaluation) -> dict:
    from megatron_btx.eval.cli import evaluate_run

    raw = {
        "run_dir": str(tmp_path / name),
        "data": {"prepared": str(data), "seq_length": 64},
        "domains": {"code": "builtin", "toy": "builtin"},
        "seed": {"init_from": str(seed)},
        "experts": {"steps": 1},
        "finetune": {"steps": 1},
        "evaluation": {"tokens_per_domain": 1024, **evaluation},
    }
    _plan(raw)
    return evaluate_run(tmp_path / name, models_wanted=["seed"], device="cpu")


def test_evaluation_keys_choose_what_is_scored(tmp_path, base, data):
    """split: the held-out split scored; tokens_per_domain: the whole windows of seq_length
    scored per domain; btm_route_tokens: each document's first tokens, kept for BTM's routing
    and scored for no model; micro_batch_size: windows per forward pass (same losses)."""
    seed = tc.init_checkpoint(base, data)
    default = _evaluate(tmp_path, data, seed, "default", btm_route_tokens=16)
    assert default["split"] == "test"
    fewer = _evaluate(tmp_path, data, seed, "fewer", btm_route_tokens=16, tokens_per_domain=512)
    valid = _evaluate(tmp_path, data, seed, "valid", btm_route_tokens=16, split="valid")
    routed = _evaluate(tmp_path, data, seed, "routed", btm_route_tokens=32)
    batched = _evaluate(tmp_path, data, seed, "batched", btm_route_tokens=16, micro_batch_size=1)
    for domain in ("code", "toy"):
        assert default["tokens"][domain] <= 1024 and fewer["tokens"][domain] <= 512
        assert fewer["tokens"][domain] < default["tokens"][domain]
        assert valid["split"] == "valid"
        assert routed["tokens"][domain] < default["tokens"][domain]
        loss = default["models"]["seed"]["loss"][domain]
        assert valid["models"]["seed"]["loss"][domain] != loss
        assert batched["models"]["seed"]["loss"][domain] == pytest.approx(loss, rel=1e-6)


def test_evaluation_routing_writes_the_routing_tables(tmp_path):
    """evaluation.routing (evaluate_run passes it to report.write_all): routing.{json,md} and
    the heatmaps for the MoE models, or none of them."""
    from test_eval_units import _fake_result

    from megatron_btx.eval import report

    result = _fake_result()
    report.write_all(result, tmp_path / "on", routing=True)
    report.write_all(result, tmp_path / "off", routing=False)
    assert (tmp_path / "on" / "routing.md").is_file() and (
        tmp_path / "on" / "routing.json"
    ).is_file()
    assert not list((tmp_path / "off").glob("routing*"))
    assert (tmp_path / "off" / "results.md").is_file()


# ---- parallel: `btx train` at 2 processes ------------------------------------------------------
def _chunk_rows(checkpoint: Path, part: str) -> set[int]:
    """Rows of every chunk the checkpoint stores of the tensors whose key contains `part`."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {
        chunk.sizes[-2]
        for key, meta in metadata.items()
        if part in key and hasattr(meta, "chunks")
        for chunk in meta.chunks
    }


def _four_layer_reference(tmp_path: Path, data: Path) -> tuple[Path, dict[int, float], str]:
    """(config, losses, console) of a 3-step one-process run of a 4-layer model (pp 2 x vpp 2
    stages of one layer) from a step-0 checkpoint every layout loads."""
    model = dict(tc.MODEL, num_hidden_layers=4)
    init = tc.write_config(
        tmp_path / "init.yaml", tmp_path / "init", data, model=model, train={"steps": 0}
    )
    tc.check(tc.run(init))
    start = tmp_path / "init" / "checkpoints" / "iter_0000000"
    cfg = tc.write_config(
        tmp_path / "c.yaml",
        tmp_path / "ref",
        data,
        model=dict(model, init_from=str(start)),
        train={"steps": 3},
    )
    out = tc.check(tc.run(cfg)).stdout
    return cfg, tc.losses(tmp_path / "ref"), out


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, data):
    return _four_layer_reference(tmp_path_factory.mktemp("four_layers"), data)


def _same_losses(run_dir: Path, ref: dict[int, float]) -> None:
    got = tc.losses(run_dir)
    assert sorted(got) == sorted(ref)
    assert all(abs(got[s] - ref[s]) <= 2e-5 for s in ref), (run_dir.name, got, ref)


@pytest.mark.dist
@pytest.mark.slow
def test_parallel_keys_split_the_work_and_keep_the_numbers(tmp_path, four_layers):
    """Each layout key at 2 processes gives the one-process run's losses (2e-5 nats, as in
    tests/test_train_parallel.py) and shows it acted: sequence_parallel is on in the model,
    overlap_grad_reduce runs at DP=2."""
    cfg, ref, ref_out = four_layers
    assert (
        "schedule forward_backward_no_pipelining" in ref_out and "sequence parallel" not in ref_out
    )
    cases = {
        "sp": (
            ["--parallel.tp", "2", "--parallel.sequence_parallel", "true"],
            ", sequence parallel",
        ),
        "overlap": (["--parallel.overlap_grad_reduce", "true"], "DP=2"),
    }
    for name, (flags, shown) in cases.items():
        out = tc.check(tc.run(cfg, ["--run_dir", str(tmp_path / name), *flags], nproc=2)).stdout
        assert shown in out, (name, out[-2000:])
        _same_losses(tmp_path / name, ref)


@pytest.mark.dist
@pytest.mark.slow
def test_vpp_interleaves_and_keeps_the_numbers(tmp_path, four_layers):
    """vpp=2 at pp=2 runs megatron's interleaved schedule and gives the one-process losses
    within 2e-5 nats (fp32 sums in another order; measured: identical to the printed digits).
    Before mcore_layouts.p2p_overrides, megatron's batched p2p swapped activations and gradients
    at PP=2 (tests/test_mcore_layouts.py): 3.8e-3 nats off at step 1, 2.9e-2 at step 3."""
    cfg, ref, _ = four_layers
    flags = ["--run_dir", str(tmp_path / "vpp"), "--parallel.pp", "2", "--parallel.vpp", "2"]
    out = tc.check(tc.run(cfg, flags, nproc=2)).stdout
    assert "schedule forward_backward_pipelining_with_interleaving" in out
    _same_losses(tmp_path / "vpp", ref)


@pytest.mark.dist
@pytest.mark.slow
def test_etp_keeps_experts_whole_and_the_numbers(tmp_path, base, data):
    """etp=1 under tp=2 stores whole experts beside a split attention, and trains as TP=1:
    losses within 2e-5 nats of the one-process run (fp32 sums in another order; measured
    1.2e-7). Before mcore_layouts.route_expert_grads the expert replicas stepped with their
    own half of the gradient (tests/test_mcore_layouts.py): 1.1e-3 nats off at step 2."""
    moe_cfg, moe_ref = tc.reference_run(base, data, moe=True)
    run = tmp_path / "etp1"
    flags = [
        "--run_dir",
        str(run),
        "--train.exit_after",
        "3",
        "--parallel.tp",
        "2",
        "--parallel.etp",
        "1",
    ]
    tc.check(tc.run(moe_cfg, flags, nproc=2))
    saved = run / "checkpoints" / "iter_0000003"
    assert _chunk_rows(saved, "self_attention.linear_qkv.weight") == {(4 + 8) * 16 // 2}  # TP 2
    # whole experts (ETP 1): megatron stores SwiGLU's fc1 as its gate and up halves, each a chunk
    # of the whole FFN (128 rows; ETP 2 would store 64-row chunks)
    assert _chunk_rows(saved, "experts.linear_fc1.weight") == {128}
    _same_losses(run, {s: v for s, v in tc.losses(moe_ref).items() if s <= 3})
