"""What a training run that fails before its first checkpoint leaves: nothing.

`btx train` writes `config.yaml`, `metrics.jsonl`, `tensorboard/` and (by default) the dataset
index cache `data_cache/` into its run directory before it trains; a run that then failed (a
diverging loss, a bad batch, a full disk) used to leave them, so the run directory looked
started. :func:`snapshot` records what was there before the run, :func:`undo` puts it back:
files the run created are removed, a resumed run's `metrics.jsonl` is cut back to its length
before this attempt and its `config.yaml` restored. A run that saved a checkpoint keeps
everything (its progress is real).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron_btx.rundir import atomic_write_text

#: what a run writes into its run directory besides checkpoints (removed again, or truncated
#: back, when it fails before its first checkpoint)
RUN_FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "data_cache")


def snapshot(run_dir: Path) -> dict[str, Any]:
    """Which of RUN_FILES exist before the run (metrics.jsonl: its size; config.yaml: its
    text, which the run rewrites)."""
    out: dict[str, Any] = {}
    for name in RUN_FILES:
        path = run_dir / name
        out[name] = path.stat().st_size if path.is_file() else (0 if path.exists() else None)
    config = run_dir / "config.yaml"
    if config.is_file() and not config.is_symlink():
        out["config.yaml"] = config.read_bytes()
    return out


def undo(run_dir: Path, before: dict[str, Any]) -> None:
    """Leave the run directory as a failed run found it: files it created removed, the metrics
    of this attempt cut off (only called when it saved no checkpoint)."""
    for name, old in before.items():
        path = run_dir / name
        if old is None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        elif name == "metrics.jsonl" and path.is_file() and path.stat().st_size > old:
            with open(path, "r+b") as f:
                f.truncate(old)
        elif name == "config.yaml" and isinstance(old, bytes):
            atomic_write_text(path, old.decode("utf-8", "surrogateescape"))
