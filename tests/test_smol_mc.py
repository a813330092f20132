"""examples/smol_mc/: the 52 multiple-choice questions of examples/smol_btx.yaml's downstream
task. Their form (4 distinct options, the right one 13 times at each position, 13 per domain),
each right answer against an independent reference (Python itself for the code questions; the
text of set.mm, the GCIDE dictionary and the licence texts, read from the built-in corpora, for
the others) and lm-eval's reading of the task folder."""

from __future__ import annotations

import collections
import json
import os.path
import re
from pathlib import Path

import pytest

from megatron_btx.errors import BTXError

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "smol_mc"
DOMAINS = ("code", "math", "prose", "legal")


def _docs() -> list[dict]:
    return [json.loads(line) for line in (FOLDER / "smol_mc.jsonl").read_text().splitlines()]


def _right(doc: dict) -> str:
    return doc["choices"][doc["label"]]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_questions_are_balanced_and_well_formed():
    docs = _docs()
    assert len(docs) == 52
    assert collections.Counter(d["domain"] for d in docs) == {d: 13 for d in DOMAINS}
    assert collections.Counter(d["label"] for d in docs) == {i: 13 for i in range(4)}
    for doc in docs:
        assert len(doc["choices"]) == 4 == len(set(doc["choices"])), doc["id"]
        assert all(c.strip() == c and c for c in doc["choices"]), doc["id"]
    assert len({d["id"] for d in docs}) == len({d["question"] for d in docs}) == 52


def test_code_answers_are_what_python_does():
    """Each code question's expression (its `evidence`), run here; the right option is its
    value as Python prints it."""
    import collections as collections_module
    import json as json_module

    def raises(expr) -> str:
        try:
            expr()
        except Exception as exc:  # noqa: BLE001 - the exception's class is the answer
            return type(exc).__name__
        return "nothing"

    expected = {
        'len("hello")': repr(len("hello")),
        "sorted([3, 1, 2])": repr(sorted([3, 1, 2])),
        '"a,b,c".split(",")': repr("a,b,c".split(",")),
        "defaultdict": collections_module.defaultdict.__module__,
        '"-".join(["a", "b", "c"])': repr("-".join(["a", "b", "c"])),
        'json.dumps({"a": 1})': f"the string {json_module.dumps({'a': 1})!r}",
        'os.path.join("a", "b")': repr(os.path.join("a", "b")),
        "list(range(3))": repr(list(range(3))),
        "bool([])": repr(bool([])),
        '{}["x"]': raises(lambda: {}["x"]),
        "7 // 2": repr(7 // 2),
        'collections.Counter("banana")["a"]': repr(collections_module.Counter("banana")["a"]),
        're.sub(r"\\d", "#", "a1b2")': repr(re.sub(r"\d", "#", "a1b2")),
    }
    code = [d for d in _docs() if d["domain"] == "code"]
    assert sorted(d["evidence"] for d in code) == sorted(expected)
    for doc in code:
        assert doc["source"] == "python" and doc["evidence"] in doc["question"]
        assert _right(doc) == expected[doc["evidence"]], doc["id"]


def _corpus_or_skip(domain: str) -> list[tuple[str, str]]:
    from megatron_btx.data.corpora import iter_domain_documents

    try:
        return list(iter_domain_documents(domain))
    except BTXError as exc:
        pytest.skip(f"cannot fetch {domain}: {exc}")


@pytest.mark.network
@pytest.mark.slow
def test_math_prose_and_legal_answers_are_stated_in_their_sources():
    """Each question's `evidence` is in its source, word for word (whitespace aside): a set.mm
    statement, the GCIDE entry of the word asked about, the named licence's text."""
    docs = _docs()
    math = _flat("".join(t for _, t in _corpus_or_skip("math")))
    prose = _flat("".join(t for _, t in _corpus_or_skip("prose")))
    licences = {k.split("/", 1)[1]: _flat(t) for k, t in _corpus_or_skip("legal")}
    for doc in docs:
        evidence = _flat(doc["evidence"])
        if doc["domain"] == "math":
            assert doc["source"] == "set.mm" and evidence in math, doc["id"]
        elif doc["domain"] == "prose":
            word = re.search(r'the word "(\w+)"', doc["question"]).group(1)
            at = prose.find(evidence)
            assert doc["source"] == "gcide" and at >= 0, doc["id"]
            entry = prose.rfind(f"{word.capitalize()} \\", 0, at)  # its headword, just before
            assert 0 <= at - entry < 700, doc["id"]
        elif doc["domain"] == "legal":
            key = doc["source"].removeprefix("license:")
            assert evidence in licences[key], doc["id"]


def test_lm_eval_reads_the_folder():
    """lm-eval indexes the folder and reads the 52 questions from the relative data path, the
    prompt as the YAML shapes it."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional eval extra")
    from lm_eval.tasks import get_task_dict

    from megatron_btx.eval import lm_eval as btx_lm_eval

    manager = btx_lm_eval.task_manager(["smol_mc"], FOLDER)
    with btx_lm_eval.offline(), btx_lm_eval.working_dir(FOLDER):
        task = get_task_dict(["smol_mc"], manager)["smol_mc"]
    docs = list(task.test_docs())
    assert len(docs) == 52
    first = _docs()[0]
    assert task.doc_to_text(docs[0]) == f"Question: {first['question']}\nAnswer:"
    assert task.doc_to_choice(docs[0]) == first["choices"]
    assert task.doc_to_target(docs[0]) == first["label"]


def test_smol_btx_runs_the_task():
    """examples/smol_btx.yaml's evaluate stage runs smol_mc from this folder (the config's
    `evaluation.lm_eval`, as the planner passes it on)."""
    from megatron_btx.pipeline import config as btx_config

    cfg = btx_config.load(FOLDER.parent / "smol_btx.yaml")
    assert cfg.evaluation.lm_eval.argv() == [
        "--lm-eval",
        "smol_mc",
        "--lm-eval-tasks-dir",
        str(FOLDER),
        "--lm-eval-batch-size",
        "16",
    ]
