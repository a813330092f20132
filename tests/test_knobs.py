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
    from megatron_btx.models.router_settings import RouterSettings
    from megatron_btx.pipeline import config as run_config

    training = set(_field_paths(train_config.Config, ""))
    training |= {f"moe.router.{k}" for k in _field_paths(RouterSettings, "")}
    listed, tests = _table_keys("The training config")
    assert training - listed == set(), "training keys missing from docs/CONFIG.md"
    assert listed - training == set(), "rows of docs/CONFIG.md that are no training key"

    run = set(_field_paths(run_config.BTXConfig, "", run_config.StageTrain)) - {"source"}
    run -= {"domains"}
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


def _raw(run_dir: Path, data: Path, model: dict | None = None, **sections) -> dict:
    """The training config of the tests: train_common's tiny run, `sections` merged in."""
    raw = {
        "run_dir": str(run_dir),
        "model": dict(model or DEFAULT_MODEL),
        "data": {
            "path": str(data),
            "domains": ["code"],
            "seq_length": 64,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "cache_dir": str(data / "index_cache"),
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


def _build(tmp_path: Path, data: Path, name: str = "run", **kw):
    with built(_raw(tmp_path / name, data, **kw)) as trainer:
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
