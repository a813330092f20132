"""Configs and model descriptions cannot exhaust resources or carry nonsense (issue 12, items 5
and 6): YAML aliases and deep nesting are refused, a manifest claiming more layers than its
checkpoint holds fails at once, and non-finite or out-of-range numbers are errors naming the
key, in training configs, run configs, merge flags and HF config.json files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx import config as train_config
from megatron_btx.checkpoint.families import read_plain_args
from megatron_btx.errors import BTXError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"run_dir": "runs/x", "data": {"path": "data/small"}}

#: 3 levels of 10 aliases: 1,000 leaves (a billion with 9 levels); small enough that a loader
#: which expands it does no harm here
LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
)


# ---- YAML ---------------------------------------------------------------------------------------
def test_yaml_aliases_are_refused_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(BASE) + "model:\n  rope_scaling:\n    " + LAUGHS.replace("\n", "\n    ")
    )
    with pytest.raises(BTXError, match=r"alias \*a: YAML aliases are not allowed"):
        train_config.load(path)
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(BTXError, match="override --model.rope_scaling: alias"):
        train_config.load(path, ["--model.rope_scaling", "{" + LAUGHS.replace("\n", ", ") + "}"])
    run_cfg = tmp_path / "btx.yaml"
    run_cfg.write_text("run_dir: r\ndomains: {code: builtin}\n" + LAUGHS)
    one_error(btx("run", str(run_cfg), "--dry-run"), "YAML aliases are not allowed")
    one_error(btx("train", str(path), "--model.rope_scaling", "[&x 1, *x]"), "alias *x")


def test_deep_nesting_and_bad_bytes_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rope_scaling: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(BTXError, match="nested deeper than 50 levels"):
        train_config.read_yaml(path)
    one_error(btx("train", str(path)), "nested deeper than 50 levels")
    path.write_bytes(b"run_dir: caf\xe9\n")
    one_error(btx("train", str(path)), "not UTF-8")
    one_error(btx("run", str(path)), "not UTF-8")
    assert train_config.parse_overrides(["--a.b", "{unclosed"]) == [("a.b", "{unclosed")]


# ---- numbers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        (["--train.lr", "nan"], "train.lr"),
        (["--train.lr", "inf"], "train.lr"),
        (["--train.lr", "-1e-3"], "train.lr"),
        (["--optimizer.clip_grad", "nan"], "optimizer.clip_grad"),
        (["--optimizer.adam_beta1", "7"], "optimizer.adam_beta1"),
        (["--optimizer.adam_beta2", "1.0"], "optimizer.adam_beta2"),
        (["--optimizer.adam_eps", "0"], "optimizer.adam_eps"),
        (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay"),
        (["--moe.aux_loss_coeff", "-inf"], "moe.aux_loss_coeff"),
        (["--moe.capacity_factor", "0"], "moe.capacity_factor"),
        (["--model.init_method_std", "nan"], "model.init_method_std"),
        (["--model.rms_norm_eps", "abc"], "model.rms_norm_eps"),
        (["--data.domains", "{code: .nan}"], "data.domains.code"),
    ],
)
def test_training_numbers_out_of_range_name_the_key(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(BTXError, match=key.replace(".", r"\.")):
        train_config.load(path, override)


def test_run_config_numbers_are_checked(tmp_path):
    from megatron_btx.pipeline import config as run_config

    raw = {"run_dir": "r", "domains": {"code": "builtin"}, "seed": {"pretrain": {"steps": 1}}}
    for section, key, value in (
        ("experts", "lr", float("nan")),
        ("domains", "code", {"source": "builtin", "weight": float("inf")}),
        ("data", "max_mb", float("nan")),
    ):
        bad = json.loads(json.dumps(raw))
        bad.setdefault(section, {})[key] = value
        with pytest.raises(BTXError, match="finite"):
            run_config.load(bad)


def test_merge_flags_out_of_range(mg_llama, tmp_path):
    out = tmp_path / "moe"
    src = str(mg_llama)
    for flags, name in (
        (["--average-weights", "nan", "1"], "--average-weights"),
        (["--average-weights", "-1", "2"], "--average-weights"),
        (["--router-std", "nan"], "--router-std"),
        (["--router-std", "-1"], "--router-std"),
        (["--tp", "0"], "--tp"),
    ):
        one_error(btx("merge", "--experts", src, src, "--save", str(out), *flags), name)
        assert not out.exists()


# ---- HF config.json and manifests ---------------------------------------------------------------
CONFIG_CASES = [
    ({"num_attention_heads": 0}, "num_attention_heads=0"),
    ({"hidden_size": -64}, "hidden_size=-64"),
    ({"intermediate_size": "96"}, "intermediate_size='96'"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps='abc'"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan"),
    ({"rope_theta": "abc"}, ""),
    ({"rope_scaling": {"rope_type": "llama3"}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4}}, "high_freq"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
]


@pytest.mark.parametrize("change, needle", CONFIG_CASES)
def test_hf_config_values_are_checked(hf_llama, tmp_path, change, needle):
    path = tmp_path / "config.json"
    config = json.loads((hf_llama / "config.json").read_text())
    path.write_text(json.dumps({**config, **change}))
    with pytest.raises(BTXError) as e:
        read_plain_args(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_import_of_bad_config_json_is_one_line(hf_llama, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(hf_llama, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rms_norm_eps": "abc"}))
    one_error(btx("import-hf", "--load", str(src), "--save", str(tmp_path / "o")), "rms_norm_eps")
    (src / "config.json").write_text(json.dumps([config]))
    one_error(btx("import-hf", "--load", str(src), "--save", str(tmp_path / "o")), "top level")
    assert not (tmp_path / "o").exists()


def test_manifest_claiming_100000_layers_fails_fast(mg_llama, tmp_path):
    """Today a meta model of 100,000 layers is built (111 s, 4.9 GB) before anything fails;
    the sizes are now checked against the checkpoint's own tensor index first."""
    from megatron_btx.checkpoint.megatron_io import read_args

    src = tmp_path / "big"
    shutil.copytree(mg_llama, src)
    m = json.loads((src / "btx_manifest.json").read_text())
    m["model"]["num_hidden_layers"] = 100_000
    (src / "btx_manifest.json").write_text(json.dumps(m))
    t0 = time.perf_counter()
    with pytest.raises(BTXError, match=r"implies decoder\.layers\.self_attention\.linear_qkv"):
        read_args(src)
    assert time.perf_counter() - t0 < 2.0
    t0 = time.perf_counter()
    one_error(
        btx("merge", "--experts", str(src), str(src), "--save", str(tmp_path / "m")),
        "(100000, 128, 64)",
    )
    one_error(btx("export-hf", "--load", str(src), "--save", str(tmp_path / "h")), "100000")
    assert time.perf_counter() - t0 < 60, "the two commands took longer than their start-up"
    m["model"]["num_hidden_layers"] = 4
    m["model"]["vocab_size"] = 10**9
    (src / "btx_manifest.json").write_text(json.dumps(m))
    with pytest.raises(BTXError, match="embedding.word_embeddings.weight of shape"):
        read_args(src)
