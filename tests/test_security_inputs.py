"""Inputs that used to end in a traceback (exit 1) or be accepted without complaint (issue 23,
item 5 and the "Accepted without complaint" and "Hangs" gaps): each is now one BTXError naming
the key or the file, and through the command line one `error:` line, exit 2, nothing written.

Configs are checked as `btx train` reads them (megatron_btx.config.load); sizes as the trainer
checks them before it builds anything (megatron_btx.training.bounds, given this machine's real
memory); HF folders through import-hf and merge; data through the dataset builder and the batch
loader `btx train` uses, on the prepared corpus of the training tests with one file edited.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_slurm_render import fake_sbatch, tiny_plan  # noqa: F401 - a fixture

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402
from cli_contract import btx, one_error  # noqa: E402

from megatron_btx import config as train_config  # noqa: E402
from megatron_btx.errors import BTXError  # noqa: E402

BASE = {
    "run_dir": "runs/x",
    "model": dict(tc.MODEL),
    "data": {"path": "data", "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 8},
    "train": {"steps": 4},
}


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  steps: 2\n  steps: 3\n", "key 'steps' given twice (the first at line"),
        ("train:\n  steps: '2'\n", "train.steps='2' has the wrong type (expected int"),
        ("train:\n  lr: '3e-4'\n", "train.lr='3e-4' has the wrong type (expected float"),
        ('run_dir: "runs/a\\0b"\n', "run_dir='runs/a\\x00b' contains a NUL byte"),
        ("train:\n  lr: 1e300\n", "train.lr=1e+300 is beyond what a float32 holds"),
        (f"train:\n  seed: {2**70}\n", "train.seed=1180591620717411303424 must be in [0, 2**32"),
    ],
)
def test_config_values_refused(tmp_path, text, message):
    raw = json.loads(json.dumps(BASE))
    raw.pop(text.split(":", 1)[0], None)  # the section under test is the text given
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw) + text)
    with pytest.raises(BTXError) as e:
        train_config.load(path)
    assert message in str(e.value) and str(path) in str(e.value), str(e.value)


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """`3e-4` is a string to YAML 1.1; with quoted numbers refused it must read as a number."""
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.pop("train")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw) + "train:\n  lr: 3e-4\n  steps: 1e3\n")
    cfg = train_config.load(path)
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 1000


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(hidden_size=70, num_attention_heads=10), "num_attention_heads=7 must be even"),
        (dict(max_position_embeddings=10**15), "must be at most 2147483647"),
        (dict(eos_token_id=1024), "eos_token_id=1024 is not a token of the vocabulary"),
    ],
)
def test_model_fields_refused(fields, message):
    from megatron_btx.models.llama import LlamaArgs

    with pytest.raises(BTXError, match=message.replace("(", r"\(")):
        LlamaArgs(**{**tc.MODEL, "vocab_size": 1024, **fields})


def test_eos_token_list_with_a_string_is_refused():
    from megatron_btx.checkpoint.families import parse

    config = {"model_type": "llama", **tc.MODEL, "vocab_size": 1024, "eos_token_id": [2, "x"]}
    with pytest.raises(BTXError, match=r"c.json: eos_token_id=\[2, 'x'\] must be a token id"):
        parse(config, "c.json")


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("data", {"global_batch_size": 2 * 10**12}, "sample index alone needs"),
        ("train", {"steps": 10**18}, "= 8000000000000000000 samples"),
        ("model", {"hidden_size": 10**9, "num_attention_heads": 4}, "for the weights alone"),
        ("model", {"vocab_size": 10**12}, "for the weights alone"),
        ("data", {"seq_length": 2 * 10**9, "micro_batch_size": 8}, "hidden states need"),
    ],
)
def test_impossible_sizes_are_refused_before_anything_is_built(section, values, message):
    """Worked from below against this machine's memory: every count is at least thousands of
    times what any machine has, so the refusal does not depend on where the test runs."""
    from megatron_btx.models.llama import LlamaArgs
    from megatron_btx.training.bounds import check_sizes

    raw = json.loads(json.dumps(BASE))
    raw[section].update(values)
    if section == "model":
        raw["model"].update(values)
    cfg = train_config.Config.from_dict(raw)
    args = LlamaArgs(**{**raw["model"], "vocab_size": raw["model"].get("vocab_size", 1024)})
    with pytest.raises(BTXError, match=message):
        check_sizes(cfg, args, world_size=1, on_gpu=False, itemsize=4)


def test_a_real_run_fits(tmp_path):
    """The bound passes the training tests' run (and a large one on this machine's memory)."""
    from megatron_btx.models.llama import LlamaArgs
    from megatron_btx.training.bounds import check_sizes

    cfg = train_config.Config.from_dict(json.loads(json.dumps(BASE)))
    check_sizes(cfg, LlamaArgs(**tc.MODEL, vocab_size=1024), 1, False, 4)
    cfg.train.steps = 10**6  # 8 million samples: 96 MB of index
    check_sizes(cfg, LlamaArgs(**tc.MODEL, vocab_size=1024), 1, False, 4)


@pytest.mark.slow
def test_train_refuses_at_once_on_the_command_line(tmp_path, data):
    """`train.steps: 1e18` hung for over two minutes; `model.head_dim: 7` was a traceback."""
    cases = [(["--train.steps", "1e18"], "8000000000000000000 samples")]
    cases.append((["--model.head_dim", "7"], "head_dim=7 must be even"))
    for i, (override, message) in enumerate(cases):
        run = tmp_path / f"run{i}"
        cfg = tc.write_config(tmp_path / f"c{i}.yaml", run, data)
        one_error(tc.run(cfg, override, timeout=60), message)
        assert not run.exists()


def test_hf_tensors_of_the_wrong_shape_dtype_or_value(hf_llama, tmp_path):
    """A transposed gate_proj (a traceback in import-hf), an I32 tensor (`KeyError: 'I32'` in
    merge), NaN weights (imported silently): each refused naming the tensor, nothing written."""
    from safetensors.torch import load_file, save_file

    from megatron_btx.checkpoint.convert import hf_to_megatron
    from megatron_btx.checkpoint.sources import open_source

    key = "model.layers.0.mlp.gate_proj.weight"
    edits = {
        "transposed": (lambda t: t.t().contiguous(), "has shape (64, 96), config.json implies"),
        "int32": (lambda t: t.to(torch.int32), "has dtype I32; only F32/BF16/F16"),
        "nan": (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "NaN or infinite"),
    }
    for name, (edit, message) in edits.items():
        hf = tmp_path / name
        shutil.copytree(hf_llama, hf)
        tensors = load_file(hf / "model.safetensors")
        tensors[key] = edit(tensors[key])
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(BTXError, match=re.escape(message)) as e:
            hf_to_megatron(hf, tmp_path / f"{name}_out")
        assert key in str(e.value) and not (tmp_path / f"{name}_out").exists()
        if name != "nan":
            with pytest.raises(BTXError, match=re.escape(message)):
                open_source(hf)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eos_token_id", 10**6, "is not a token of the vocabulary"),
        ("eos_token_id", [2, "x"], "must be a token id or a list of token ids"),
        ("max_position_embeddings", 10**15, "must be at most 2147483647"),
    ],
)
def test_hf_config_values_refused_by_import(hf_llama, tmp_path, field, value, message):
    from megatron_btx.checkpoint.convert import hf_to_megatron

    hf = tmp_path / "hf"
    shutil.copytree(hf_llama, hf)
    config = json.loads((hf / "config.json").read_text())
    config[field] = value
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(BTXError, match=message):
        hf_to_megatron(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_jsonl_line_nested_deeply_is_skipped(tmp_path, data):
    """json.loads of a line nested 100,000 deep raised RecursionError out of prepare-data."""
    from megatron_btx.data.preprocess import preprocess_files

    jsonl = tmp_path / "in.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(20)]
    jsonl.write_text("\n".join([good[0], deep, *good[1:]]) + "\n")
    result = preprocess_files([jsonl], tmp_path / "out", data / "tokenizer.model", "valid=0.0")
    assert result["skipped"] == 1 and sum(result["documents"].values()) == 20


def _copy_split(data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    out.mkdir()
    for path in data.iterdir():
        if path.is_file():
            shutil.copy(path, out / path.name)
    return out


@pytest.mark.parametrize("damage", ["offsets", "count", "truncated_bin"])
def test_a_corrupt_index_is_refused_before_megatron_reads_it(data, tmp_path, damage):
    from megatron_btx.data.blend import build_blend_datasets

    copy = _copy_split(data, tmp_path)
    prefix = copy / "code_train_text_document"
    idx = bytearray((prefix.with_suffix(".idx")).read_bytes())
    if damage == "offsets":  # the second sequence's byte offset moved
        n = int.from_bytes(idx[18:26], "little")
        at = 34 + 4 * n + 8
        idx[at : at + 8] = (int.from_bytes(idx[at : at + 8], "little") + 2).to_bytes(8, "little")
    elif damage == "count":  # a sequence count the file does not hold
        idx[18:26] = (10**12).to_bytes(8, "little")
    else:
        bin_path = prefix.with_suffix(".bin")
        bin_path.write_bytes(bin_path.read_bytes()[:-10])
    prefix.with_suffix(".idx").write_bytes(bytes(idx))
    with pytest.raises(BTXError, match="code_train_text_document.idx: .*corrupt"):
        build_blend_datasets(
            {str(copy / "code"): 1.0}, 64, 1, (16, None, None), copy / "tokenizer.model"
        )


def test_token_ids_beyond_the_vocabulary_fail_with_one_line(data, tmp_path):
    """A `.bin` holding an id the model has no embedding for: an IndexError inside the model
    in the middle of training; now the batch loader names the dataset."""
    from megatron_btx.data.blend import build_blend_datasets
    from megatron_btx.training.data import BatchLoader

    copy = _copy_split(data, tmp_path)
    bin_path = copy / "code_train_text_document.bin"
    tokens = np.fromfile(bin_path, dtype=np.uint16)
    tokens[: len(tokens) // 2 : 7] = 60_000  # uint16: the vocabulary has 1024
    tokens.tofile(bin_path)
    train, _, _ = build_blend_datasets(
        {str(copy / "code"): 1.0}, 64, 1, (16, None, None), copy / "tokenizer.model"
    )
    loader = BatchLoader(train, 2, 8, 0, 1, torch.device("cpu"), vocab_size=1024)
    with pytest.raises(BTXError, match="code_train_text_document: sample .* token id 60000"):
        for _ in range(2):
            loader.next()


def _plan_with_a_later_dependency(run: Path) -> None:
    from megatron_btx.pipeline.stages import Plan, save_plan

    stages = tiny_plan(run)
    stages[1].deps = ["merge"]  # expert_a after the merge, which comes later in the plan
    save_plan(run, Plan(stages, None))


def test_launch_refuses_a_plan_whose_dependency_comes_later(tmp_path, fake_sbatch):  # noqa: F811
    """The first job was submitted, then `KeyError: 'merge'`; now nothing is submitted."""
    from megatron_btx.pipeline.slurm import SlurmOptions, launch

    run = tmp_path / "run"
    run.mkdir()
    _plan_with_a_later_dependency(run)
    proc = btx("launch", str(run), "--executor", "slurm")
    one_error(proc, "stage expert_a depends on 'merge', which is not a stage before it")
    assert not fake_sbatch.exists() and not (run / "slurm").exists()
    stages = tiny_plan(run)
    stages[1].deps = ["merge"]
    with pytest.raises(BTXError, match="depends on 'merge', which comes after it"):
        launch(stages, run, SlurmOptions())
    assert not fake_sbatch.exists()
