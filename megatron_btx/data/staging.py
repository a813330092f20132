"""Writing a prepared data folder so that a failure leaves nothing that looks finished.

`btx prepare-data` fixes the shared tokenizer first (trains a SentencePiece model, or copies the
given one) and tokenizes the domains with it; the tokenizer goes into place (``tokenizer.model``,
or an HF ``tokenizer/`` folder) only when every domain is done, so a failed preparation never
leaves a tokenizer (or a manifest) beside datasets it does not describe. The output is locked
while it is written (:func:`megatron_btx.rundir.locked`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatron_btx import rundir


@contextlib.contextmanager
def staged_tokenizer(out: Path) -> Iterator[Path]:
    """A temporary folder in `out` for the tokenizer's files and every domain's datasets: each
    moved into `out` (replacing what is there) when the block succeeds, all removed when it
    fails (a bad second domain leaves nothing of the first)."""
    staging = out / f".tokenizer.tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def output_lock(output_dir: str | None, output_prefix: str | None):
    """The lock of a prepare-data output: inside an output folder, or ``.NAME.lock`` beside the
    files of an output prefix."""
    if output_dir:
        return rundir.locked(output_dir, "data folder")
    prefix = Path(output_prefix or "out")
    return rundir.locked(prefix.parent, "data output", rundir.lock_path_beside(prefix))
