"""Downstream evaluation with lm-evaluation-harness on the project's HF exports, offline, on
tasks the test writes (YAML + JSONL). Expected scores come from transformers directly: the
log-likelihood of each choice for multiple choice, greedy `generate` for exact match."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_llama, make_hf_mixtral
from hf_tokenizers import make_hf_tokenizer

from megatron_btx.errors import BTXError
from megatron_btx.eval import lm_eval as btx_lm_eval

pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")

QUESTIONS = [
    ("The capital of France is", ["Paris", "Rome", "a cat"], 0),
    ("Two plus two equals", ["four", "five", "seven"], 0),
    ("def add(a, b): return", ["a + b", "a - b", "None"], 0),
    ("Water freezes at", ["zero degrees", "boiling", "noon"], 0),
    ("The sky is", ["blue", "green", "made of cheese"], 1),
    ("import numpy as", ["np", "pd", "torch"], 0),
    ("for i in", ["range(10):", "list:", "x"], 2),
    ("The opposite of hot is", ["cold", "warm", "tepid"], 0),
]
PROMPTS = ["Once upon a", "def main(", "The quick brown", "x = 1 +", "Hello", "import"]
MAX_GEN = 5
# One model's row of the perplexity results (eval/cli.py), for the report around the scores.
ROW = {
    "perplexity": {"code": 9.0},
    "mean": 9.0,
    "loss": {"code": 2.2},
    "active_params": 1000,
    "train_flops": 0.0,
    "train_tokens": 0,
    "train_seconds": 0.0,
}


def _task_yaml(name: str, data: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}"
    )


def _write_mc_task(folder: Path, relative: bool = False) -> None:
    """The multiple-choice task; `relative`: its YAML names the data file relative to the tasks
    folder, as examples/smol_mc/ does."""
    data = folder / "mc.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "label": label}) + "\n"
            for q, c, label in QUESTIONS
        )
    )
    body = (
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "btx_mc.yaml").write_text(
        _task_yaml("btx_mc", Path(data.name) if relative else data, body)
    )


def _write_gen_task(folder: Path, answers: list[str]) -> None:
    data = folder / "gen.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(PROMPTS, answers))
    )
    body = (
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n"
        '  until: ["\\n"]\n'
        f"  max_gen_toks: {MAX_GEN}\n"
        "  do_sample: false\n"
        "metric_list:\n"
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
    )
    (folder / "btx_gen.yaml").write_text(_task_yaml("btx_gen", data, body))


def _with_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    return model_dir


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    corpus = [q + " " + " ".join(c) for q, c, _ in QUESTIONS] + PROMPTS
    corpus += ["def f(x):\n    return x + 1\n", "The cat sat on the mat. " * 3]
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tok", corpus * 20, "llama3", 320)


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    cfg = json.loads((tokenizer_dir / "config.json").read_text())
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"][0]}


def _exported(hf_dir: Path, tmp_path: Path) -> Path:
    """HF -> megatron torch_dist -> HF through the project's converters (tokenizer included)."""
    from megatron_btx.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, tmp_path / "mg")
    return btx_lm_eval.export_model(tmp_path / "mg", tmp_path / "export")


def _expected_mc(model_dir: Path, limit: int | None = None) -> dict[str, float]:
    """acc and acc_norm from transformers: sum of log p(choice tokens | question), the choice
    tokens being those the question + " " + choice adds to the question's encoding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    acc = acc_norm = 0
    docs = QUESTIONS[:limit] if limit else QUESTIONS
    for question, choices, label in docs:
        scores = []
        for choice in choices:
            context = tok(question)["input_ids"]
            whole = tok(question + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            scores.append(
                sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole)))
            )
        acc += max(range(len(choices)), key=lambda i: scores[i]) == label
        norm = [s / len(c) for s, c in zip(scores, choices)]
        acc_norm += max(range(len(choices)), key=lambda i: norm[i]) == label
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


def _greedy(model_dir: Path) -> list[str]:
    """transformers' greedy continuation of each prompt, cut at the first newline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=tok.eos_token_id
            )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0])
    return out


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_multiple_choice_scores_equal_transformers_loglikelihoods(family, tokenizer_dir, tmp_path):
    make = make_hf_llama if family == "llama" else make_hf_mixtral
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf_dir = make(tmp_path / "hf", seed=3, vocab_size=vocab, **_special_ids(tokenizer_dir))
    export = _exported(_with_tokenizer(hf_dir, tokenizer_dir), tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_mc_task(tasks)
    expected = _expected_mc(hf_dir)  # the model transformers made, before any conversion
    scores = btx_lm_eval.evaluate_hf_model(export, ["btx_mc"], tasks)
    assert scores["btx_mc"]["acc"] == pytest.approx(expected["acc"], abs=1e-12)
    assert scores["btx_mc"]["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12)
    limited = btx_lm_eval.evaluate_hf_model(export, ["btx_mc"], tasks, limit=3)
    assert limited["btx_mc"]["acc"] == pytest.approx(_expected_mc(hf_dir, 3)["acc"], abs=1e-12)


def _forward_passes(run) -> int:
    """How many times a transformers causal LM's forward ran during `run()` (a torch global
    forward hook; nothing is replaced)."""
    calls = []

    def hook(module, args, output):
        if type(module).__name__.endswith("ForCausalLM"):
            calls.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def test_relative_data_path_and_batch_size(tokenizer_dir, tmp_path, monkeypatch):
    """A task YAML's relative data file is read from the tasks folder, whatever the working
    directory (which is restored); batch_size groups requests into fewer forward passes with
    the same scores as transformers' one sequence at a time."""
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf_dir = make_hf_llama(tmp_path / "hf", seed=3, vocab_size=vocab, **_special_ids(tokenizer_dir))
    export = _exported(_with_tokenizer(hf_dir, tokenizer_dir), tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_mc_task(tasks, relative=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = _expected_mc(hf_dir)
    got: dict[int, dict] = {}
    passes = {
        bs: _forward_passes(
            lambda bs=bs: got.update(
                {bs: btx_lm_eval.evaluate_hf_model(export, ["btx_mc"], "../tasks", batch_size=bs)}
            )
        )
        for bs in (1, 4)
    }
    assert Path.cwd() == elsewhere
    for bs in (1, 4):
        assert got[bs]["btx_mc"]["acc"] == pytest.approx(expected["acc"], abs=1e-12)
        assert got[bs]["btx_mc"]["acc_norm"] == pytest.approx(expected["acc_norm"], abs=1e-12)
    requests = sum(len(c) for _, c, _ in QUESTIONS)  # one per (question, choice)
    assert passes[1] == requests
    assert passes[4] == -(-requests // 4)


def test_generation_exact_match_equals_greedy_decoding(tokenizer_dir, tmp_path):
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf_dir = make_hf_llama(tmp_path / "hf", seed=5, vocab_size=vocab, **_special_ids(tokenizer_dir))
    export = _exported(_with_tokenizer(hf_dir, tokenizer_dir), tmp_path)
    greedy = _greedy(hf_dir)
    # even documents' answers are the greedy output, odd ones something the model did not say
    answers = [g if i % 2 == 0 else g + " (not it)" for i, g in enumerate(greedy)]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_gen_task(tasks, answers)
    scores = btx_lm_eval.evaluate_hf_model(export, ["btx_gen"], tasks)
    expected = sum(a == g for a, g in zip(answers, greedy)) / len(PROMPTS)
    assert expected == 0.5
    assert scores["btx_gen"]["exact_match"] == pytest.approx(expected, abs=1e-12)


def test_run_models_results_and_report(tokenizer_dir, tmp_path):
    """evaluate_run_models (what `btx evaluate --lm-eval` calls after the perplexity table):
    scores per model in results.json and a table in results.md; the BTM ensemble is skipped."""
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf_dir = make_hf_llama(tmp_path / "hf", seed=3, vocab_size=vocab, **_special_ids(tokenizer_dir))
    from megatron_btx.checkpoint.convert import hf_to_megatron

    hf_to_megatron(_with_tokenizer(hf_dir, tokenizer_dir), tmp_path / "mg")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_mc_task(tasks)
    result = {
        "split": "test",
        "domains": ["code"],
        "tokens": {"code": 64},
        "models": {m: dict(ROW) for m in ("seed", "btm_top1", "expert_code")},
        "claims": {},
    }
    models = {
        "seed": {"checkpoint": str(tmp_path / "mg"), "kind": "dense"},
        "btm_top1": {"checkpoint": None, "kind": "btm"},
        "expert_code": {"checkpoint": str(tmp_path / "not_a_checkpoint"), "kind": "dense"},
    }
    out = tmp_path / "eval"
    btx_lm_eval.evaluate_run_models(result, models, out, ["btx_mc"], tasks, None, lambda m: None)
    expected = _expected_mc(hf_dir)
    saved = json.loads((out / "results.json").read_text())["lm_eval"]
    assert saved["scores"]["seed"]["btx_mc"]["acc"] == pytest.approx(expected["acc"], abs=1e-12)
    assert "ensemble" in saved["skipped"]["btm_top1"]
    assert saved["skipped"]["expert_code"].startswith("no HF export: ")
    assert set(saved["scores"]) == {"seed"}
    assert (out / "hf" / "seed" / "model.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert "| model | btx_mc acc | btx_mc acc_norm |" in md
    assert f"| seed | {expected['acc']:.3f} | {expected['acc_norm']:.3f} |" in md


def test_unknown_task_and_bad_folder_are_one_line_errors(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_mc_task(tasks)
    assert btx_lm_eval.requested_tasks("btx_mc", tasks) == ["btx_mc"]
    with pytest.raises(BTXError, match="no task 'nosuch' in .*known: btx_mc"):
        btx_lm_eval.requested_tasks("btx_mc,nosuch", tasks)
    with pytest.raises(BTXError, match="no such folder"):
        btx_lm_eval.requested_tasks("btx_mc", tmp_path / "absent")
    with pytest.raises(BTXError, match="name one or more tasks"):
        btx_lm_eval.parse_tasks(" , ")


def test_cli_checks_tasks_before_evaluating(tmp_path, capsys):
    from megatron_btx.eval.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_mc_task(tasks)
    argv = ["--run-dir", str(tmp_path / "run"), "--lm-eval", "nosuch"]
    assert main([*argv, "--lm-eval-tasks-dir", str(tasks)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lm-eval: no task 'nosuch'")


class _NoLmEval:
    """A meta-path finder that makes `import lm_eval` fail, as on an install without the extra."""

    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


def test_without_lm_eval_it_is_skipped_with_one_line(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoLmEval(), *sys.meta_path])
    assert btx_lm_eval.missing().startswith("lm-eval is not installed")
    assert btx_lm_eval.requested_tasks("btx_mc", tmp_path) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "btx evaluate: --lm-eval skipped: lm-eval is not installed (No module named "
        "'lm_eval'); pip install 'megatron-btx[eval]'"
    ]


def test_run_config_lm_eval_keys_reach_btx_evaluate(tokenizer_dir, tmp_path):
    """`evaluation.lm_eval` of a run config: `btx run`'s evaluate stage (its planned command,
    run as it is) scores the seed on the tasks of `tasks_dir` (relative to the config's folder),
    `limit` documents each, `batch_size` at a time, and records them in results.json."""
    import yaml

    from megatron_btx.checkpoint.convert import hf_to_megatron
    from megatron_btx.cli import main as btx
    from megatron_btx.pipeline import plan

    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    hf_dir = make_hf_llama(tmp_path / "hf", seed=3, vocab_size=vocab, **_special_ids(tokenizer_dir))
    hf_to_megatron(_with_tokenizer(hf_dir, tokenizer_dir), tmp_path / "seed")
    for name in ("alpha", "beta"):  # two domains of text the tokenizer knows
        (tmp_path / name).mkdir()
        for i in range(40):
            words = [q for q, _, _ in QUESTIONS[i % 8 :]] + PROMPTS[: i % 6]
            (tmp_path / name / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    folder = tmp_path / "config"
    (folder / "tasks").mkdir(parents=True)
    _write_mc_task(folder / "tasks", relative=True)
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "tokenizer": str(tmp_path / "seed" / "tokenizer"),
            "seq_length": 32,
            "mixed_tokens": 0,
        },
        "domains": {n: {"source": str(tmp_path / n)} for n in ("alpha", "beta")},
        "seed": {"init_from": str(tmp_path / "seed")},
        "experts": {"steps": 1},
        "finetune": {"steps": 1},
        "baselines": {"dense": False, "sparse_upcycling": False, "btm": False},
        "evaluation": {
            "tokens_per_domain": 32,
            "lm_eval": {"tasks": ["btx_mc"], "tasks_dir": "tasks", "limit": 5, "batch_size": 3},
        },
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(raw))
    stages = {s.name: s for s in plan.build_plan(folder / "run.yaml")}
    argv = stages["evaluate"].argv
    assert argv[argv.index("--lm-eval-tasks-dir") + 1] == str(folder / "tasks")
    assert btx(stages["prepare_data"].argv) == 0
    assert btx([*argv, "--models", "seed"]) == 0
    saved = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["lm_eval"]
    assert (saved["tasks"], saved["limit"], saved["batch_size"]) == (["btx_mc"], 5, 3)
    expected = _expected_mc(hf_dir, limit=5)
    assert saved["scores"]["seed"]["btx_mc"]["acc"] == pytest.approx(expected["acc"], abs=1e-12)
    assert saved["scores"]["seed"]["btx_mc"]["sample_len"] == 5
