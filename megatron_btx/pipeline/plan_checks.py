"""Checks of a run's plan.json as read back from disk.

plan.json is a file in the run directory that anyone may edit; what it says becomes file paths
(``RUN/stages/<name>.done``, ``RUN/slurm/<name>.sbatch``), command lines and sbatch scripts.
Each stage entry must therefore have exactly the types the planner writes, and a stage name
must be a plain file-name word (``[A-Za-z0-9_.-]+``, not ``.`` or ``..``): a name with a slash,
a newline or a shell character is refused with one line naming the file and the stage.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError

#: stage kinds: what a stage entry's ``kind`` may be
KINDS = ("data", "convert", "train", "merge", "match", "eval")

#: what a stage name may be: it names files and Slurm jobs and is pasted into scripts (quoted)
STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def valid_stage_name(name: Any) -> bool:
    return isinstance(name, str) and bool(STAGE_NAME.fullmatch(name)) and name not in (".", "..")


def stage_entries(document: dict[str, Any], path: Path) -> list[Any]:
    """The list of stage entries of a plan document."""
    entries = document.get("stages", [])
    if not isinstance(entries, list):
        raise BTXError(f"{path}: 'stages' is not a list; re-run `btx run` to plan again")
    return entries


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_stage_entry(entry: Any, path: Path) -> dict[str, Any]:
    """`entry` when it is a well-formed stage; else one BTXError naming the stage and key."""
    if not isinstance(entry, dict):
        raise BTXError(f"{path}: a stage entry is a {type(entry).__name__}, not a mapping")
    name = entry.get("name")
    if not valid_stage_name(name):
        raise BTXError(
            f"{path}: stage name {name!r} is not letters, digits, '_', '.' or '-'; re-run "
            f"`btx run` to plan again"
        )

    def bad(key: str, what: str) -> BTXError:
        return BTXError(f"{path}: stage {name}: {key}={entry.get(key)!r} {what}")

    if entry.get("kind") not in KINDS:
        raise bad("kind", f"is not one of {', '.join(KINDS)}")
    if not _str_list(entry.get("argv")) or not entry["argv"]:
        raise bad("argv", "is not a non-empty list of strings")
    for key in ("deps", "outputs", "builds_on"):
        if key in entry and not _str_list(entry[key]):
            raise bad(key, "is not a list of strings")
    for key in ("deps", "builds_on"):
        if any(not valid_stage_name(d) for d in entry.get(key, [])):
            raise bad(key, "names a stage that is not a plain name")
    if "nproc" in entry and (not _is_int(entry["nproc"]) or entry["nproc"] < 1):
        raise bad("nproc", "is not a process count >= 1")
    for key in ("steps", "tokens", "active_params"):
        if key in entry and (not _is_int(entry[key]) or entry[key] < 0):
            raise bad(key, "is not a count")
    flops = entry.get("flops", 0.0)
    if not isinstance(flops, (int, float)) or isinstance(flops, bool) or not math.isfinite(flops):
        raise bad("flops", "is not a number")
    if "resumable" in entry and not isinstance(entry["resumable"], bool):
        raise bad("resumable", "is not true or false")
    for key in ("workdir", "checkpoint", "group", "time_like"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise bad(key, "is not a string")
    if entry.get("router") is not None and not isinstance(entry["router"], dict):
        raise bad("router", "is not a mapping")
    return entry


def model_entries(document: dict[str, Any], path: Path, stages: list[Any]) -> list[dict]:
    """The plan's model entries, each well-formed: a name the results can carry, the stages it
    names existing in the plan. (Kinds, roles and parts are checked by ModelSpec itself.)"""
    entries = document.get("models", [])
    if not isinstance(entries, list):
        raise BTXError(f"{path}: 'models' is not a list; re-run `btx run` to plan again")
    names = {s.name for s in stages}
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict) or not valid_stage_name(entry.get("name")):
            raise BTXError(f"{path}: a model entry is not a mapping with a plain name")
        name = entry["name"]

        def bad(key: str, what: str, entry=entry, name=name) -> BTXError:
            return BTXError(f"{path}: model {name}: {key}={entry.get(key)!r} {what}")

        if name in seen:
            raise bad("name", "appears twice")
        seen.add(name)
        for key in ("kind", "role"):
            if not isinstance(entry.get(key), str):
                raise bad(key, "is not a string")
        stages = entry.get("stages", [])
        if not _str_list(stages) or any(s not in names for s in stages):
            raise bad("stages", "is not a list of the plan's stages")
        for key in ("checkpoint", "stage", "part", "domain", "label"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise bad(key, "is not a string")
        for key in ("k", "order"):
            if entry.get(key) is not None and not _is_int(entry[key]):
                raise bad(key, "is not an integer")
        if entry.get("router") is not None and not isinstance(entry["router"], dict):
            raise bad("router", "is not a mapping")
    return entries
