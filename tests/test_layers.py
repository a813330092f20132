"""The package's layers, read from its own import statements: a stage imports the layers below it
(checkpoint, models, data, runtime), never another stage; the layers below never import a stage;
nothing outside runtime/ touches runtime.cpu; convert, train and eval never load the merge; no
two modules import each other, directly or round a longer circle."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "megatron_btx"
STAGES = ("merge", "training", "eval", "pipeline", "convert")
LOWER = ("checkpoint", "models", "data", "runtime")


def _imports(path) -> set[str]:
    """Every megatron_btx module a file imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("megatron_btx.")}


def _part(module: str) -> str | None:
    """The package part a module belongs to (`merge`, `checkpoint`, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _files(part: str):
    return sorted((PACKAGE / part).glob("*.py"))


@pytest.mark.parametrize("part", LOWER)
def test_lower_layers_never_import_a_stage(part):
    for path in _files(part):
        bad = [m for m in _imports(path) if _part(m) in STAGES]
        assert not bad, f"{path.relative_to(ROOT)} imports the stage module(s) {bad}"


#: the only imports across stages: the evaluator reads the pipeline's plan.json through the
#: pipeline's reader; the pipeline, which launches every stage by command line, plans the merged
#: model's shape with the merge's own parser and plan (pure code: no I/O, nothing run)
ALLOWED_ACROSS = {
    "megatron_btx.pipeline.plan",
    "megatron_btx.pipeline.config",
    "megatron_btx.merge.cli",
    "megatron_btx.merge.plan",
    "megatron_btx.merge.plan.plan_for",
    "megatron_btx.merge.settings",
    "megatron_btx.merge.settings.MergeSettings",
    "megatron_btx.merge.settings.check_run_value",
    "megatron_btx.merge.settings.run_keys",
    "megatron_btx.merge.cli.build_parser",
    "megatron_btx.merge.router_inits",
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    for path in _files(stage):
        bad = [
            m
            for m in _imports(path)
            if _part(m) in STAGES and _part(m) != stage and m not in ALLOWED_ACROSS
        ]
        assert not bad, f"{path.relative_to(ROOT)} imports another stage: {bad}"


def test_runtime_cpu_is_private_to_runtime():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "runtime":
            continue
        text = path.read_text()
        bad = [m for m in _imports(path) if m.startswith("megatron_btx.runtime.cpu")]
        assert not bad and "_RUNTIME" not in text and "__btx_wrapped__" not in text, path


def test_convert_train_and_eval_do_not_load_the_merge():
    code = (
        "import sys\n"
        "import megatron_btx.checkpoint.convert, megatron_btx.training.loop\n"
        "import megatron_btx.eval.cli, megatron_btx.eval.scoring\n"
        "loaded = [m for m in sys.modules if m.startswith('megatron_btx.merge')]\n"
        "print(loaded)\n"
        "assert not loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_size_limits():
    """No module over 800 lines and no function over 120 (the redesign's bounds)."""
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().count("\n")
        assert lines <= 800, f"{path.relative_to(ROOT)} has {lines} lines"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 120, f"{path.relative_to(ROOT)}:{node.name} has {length} lines"


def _module_files() -> dict[str, object]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (the longest dotted prefix of each imported name
    that is a module: ``megatron_btx.data.preprocess.split_prefix`` -> ``...preprocess``)."""
    modules = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            parts = imported.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
        graph[name] = targets
    return graph


def test_no_two_modules_import_each_other():
    """No import circle, lazy imports inside functions included: each module sits above the
    ones it imports (what `farm-studio look` reports as circles)."""
    graph = _import_graph()
    circles = []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
