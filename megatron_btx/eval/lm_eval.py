"""Downstream evaluation: lm-evaluation-harness on each model's HF export, fully offline.

The BTX paper's evaluation is downstream tasks, not perplexity. ``btx evaluate --lm-eval TASKS``
exports each model of a run to HF safetensors (:func:`megatron_btx.checkpoint.convert.
megatron_to_hf`, into ``RUN/eval/hf/<model>/``), runs lm-eval's Python API on it
(``lm_eval.simple_evaluate`` with an ``HFLM`` model on the CPU, fp32) and adds the scores per task
and metric to ``results.json`` and a table in ``results.md``.

Offline: the hub is never asked (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and
``TRANSFORMERS_OFFLINE`` are set for the duration). Tasks come from local YAML files in
``--lm-eval-tasks-dir`` whose data are local too, e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: test.jsonl}}``; only that folder is indexed, and lm-eval runs
with it as the working directory, so a relative data path is relative to the tasks folder
(``examples/smol_mc/`` is such a folder). Without a tasks folder lm-eval's built-in tasks are
used, which work only when their datasets are already in the local HF datasets cache.

lm-eval is the optional ``eval`` extra (``pip install 'megatron-btx[eval]'``); without it
``--lm-eval`` is skipped with one line saying so (:func:`missing`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def missing() -> str | None:
    """Why lm-eval cannot run here (one line), or None when it imports."""
    try:
        importlib.import_module("lm_eval")
    except ImportError as exc:
        return f"lm-eval is not installed ({exc}); pip install 'megatron-btx[eval]'"
    return None


def parse_tasks(spec: str) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]``; BTXError when nothing is named."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise BTXError(f"--lm-eval {spec!r}: name one or more tasks, comma-separated")
    return tasks


def requested_tasks(spec: str | None, tasks_dir: str | os.PathLike[str] | None) -> list[str]:
    """The tasks of ``--lm-eval SPEC``, checked to exist (BTXError naming the first unknown one);
    [] when none are asked for, or when lm-eval is missing (then one line on stderr says so)."""
    if not spec:
        return []
    why = missing()
    if why:
        print(f"btx evaluate: --lm-eval skipped: {why}", file=sys.stderr)
        return []
    tasks = parse_tasks(spec)
    with offline():
        task_manager(tasks, tasks_dir)
    return tasks


@contextlib.contextmanager
def working_dir(folder: str | os.PathLike[str] | None) -> Iterator[None]:
    """The process's working directory set to `folder` for the duration (unchanged for None):
    a task's relative ``data_files`` are relative to its tasks folder."""
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """The hub switched off for HF libraries, also those already imported (their constants were
    read from the environment at import); everything restored afterwards."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def task_manager(tasks: list[str], tasks_dir: str | os.PathLike[str] | None) -> Any:
    """lm-eval's TaskManager over ``tasks_dir`` only (or the built-in tasks without one); a
    BTXError names the first task it does not know."""
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise BTXError(f"--lm-eval-tasks-dir {tasks_dir}: no such folder of task YAML files")
    manager = (
        TaskManager(include_path=str(tasks_dir), include_defaults=False)
        if tasks_dir is not None
        else TaskManager()
    )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"in {tasks_dir}" if tasks_dir is not None else "among lm-eval's built-in tasks"
        known = ", ".join(manager.all_tasks[:20]) or "none"
        raise BTXError(f"--lm-eval: no task {unknown[0]!r} {where} (known: {known})")
    return manager


def scores_of(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's output; lm-eval's ``,none`` filter suffix
    is dropped, other filters stay (``exact_match,strict-match``); stderr entries are left out."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        scores[task] = {}
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            name = key[: -len(",none")] if key.endswith(",none") else key
            scores[task][name] = float(value)
    return scores


def evaluate_hf_model(
    model_dir: str | os.PathLike[str],
    tasks: list[str],
    tasks_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on an HF model folder (Llama or Mixtral safetensors with its tokenizer) on the
    CPU in fp32, offline; return {task: {metric: value}}. ``limit`` caps documents per task;
    ``batch_size`` is lm-eval's requests per forward pass (the same scores, fewer passes)."""
    why = missing()
    if why:
        raise BTXError(why)
    if not (Path(model_dir) / "config.json").is_file():
        raise BTXError(f"{model_dir}: not an HF model folder (no config.json)")
    model_dir = Path(model_dir).resolve()  # lm-eval runs in the tasks folder
    tasks_dir = Path(tasks_dir).resolve() if tasks_dir is not None else None
    with offline():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        manager = task_manager(tasks, tasks_dir)
        model = HFLM(
            pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=batch_size
        )
        with working_dir(tasks_dir):  # the tasks' datasets are read here
            output = simple_evaluate(
                model=model,
                tasks=tasks,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    if output is None:  # only on non-zero ranks of a distributed run
        raise BTXError("lm-eval returned no results")
    return scores_of(output)


# ---------------------------------------------------------------------------------------------
# Every model of a BTX run (btx evaluate --lm-eval)
# ---------------------------------------------------------------------------------------------
def why_not_exportable(model: Mapping[str, Any]) -> str | None:
    """Why a model of a run has no exact HF export, as far as its run entry tells (the exporter
    itself refuses what it cannot write exactly, e.g. merge variants), or None."""
    if model.get("kind") == "btm" or not model.get("checkpoint"):
        return "an ensemble of separate experts has no single HF model"
    from megatron_btx.models.router_settings import why_no_hf_form

    return why_no_hf_form(model.get("router"))


def export_model(checkpoint: str | os.PathLike[str], hf_dir: Path) -> Path:
    """The checkpoint as an HF folder (overwritten: the export follows the checkpoint)."""
    from megatron_btx.checkpoint.convert import megatron_to_hf

    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    megatron_to_hf(checkpoint, hf_dir, dtype="fp32", overwrite=True)
    return hf_dir


def evaluate_run_models(
    result: dict[str, Any],
    models: Mapping[str, Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    tasks: list[str],
    tasks_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: Any = print,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Export and evaluate every model of ``result["models"]`` (``models`` gives each one's
    checkpoint, kind and router), put ``result["lm_eval"]`` = {tasks, limit, batch_size, scores:
    {model: {task: {metric: value}}}, skipped: {model: why}} and rewrite results.json /
    results.md. ``batch_size``: lm-eval's requests per forward pass."""
    from megatron_btx.eval import report

    out = Path(out_dir)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    skipped: dict[str, str] = {}
    for name in result["models"]:
        why = why_not_exportable(models.get(name, {}))
        if why:
            skipped[name] = why
            progress(f"lm-eval: skip {name}: {why}")
            continue
        try:
            hf_dir = export_model(models[name]["checkpoint"], out / "hf" / name)
        except BTXError as exc:  # e.g. a merge variant with no HF form yet
            skipped[name] = f"no HF export: {exc}"
            progress(f"lm-eval: skip {name}: {skipped[name]}")
            continue
        scores[name] = evaluate_hf_model(hf_dir, tasks, tasks_dir, limit, batch_size)
        progress(
            f"lm-eval {name}: "
            + " | ".join(f"{t} {report.headline(s):.3f}" for t, s in scores[name].items())
        )
    result["lm_eval"] = {
        "tasks": tasks,
        "tasks_dir": str(tasks_dir) if tasks_dir else None,
        "limit": limit,
        "batch_size": batch_size,
        "scores": scores,
        "skipped": skipped,
    }
    report.write_results(result, out)
    return result["lm_eval"]
