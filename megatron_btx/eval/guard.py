"""What `btx evaluate` checks before it scores a checkpoint or writes its results.

- each checkpoint's files are re-hashed against its manifest's sha256 while the model loads (a
  flipped byte used to be scored with exit 0); ``--no-verify-hashes`` skips it;
- the held-out data's token ids lie in the model's vocabulary (data prepared with another
  tokenizer is one line, not an index error inside the model);
- ``--out`` is not a checkpoint, nor inside one (results written there changed the checkpoint,
  which `btx verify` then failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_btx.errors import BTXError


def load_verified(checkpoint: str, router: Any, verify: bool, sets: dict[str, Any]):
    """(model, args) of `checkpoint` for scoring (:func:`megatron_btx.eval.scoring.load_for_eval`),
    its files checked on a second thread meanwhile when `verify`, and every held-out set of
    `sets` checked against its vocabulary."""
    from megatron_btx.checkpoint import integrity
    from megatron_btx.eval import scoring

    check = integrity.BackgroundCheck(checkpoint, verify)
    try:
        model, args = scoring.load_for_eval(checkpoint, router)
        check.result()  # a changed file: nothing is scored with it
    finally:
        check.close()
    for domain, held_out in sets.items():
        top = int(held_out.windows.max())
        if top >= args.vocab_size:
            raise BTXError(
                f"{checkpoint}: the held-out {domain} data holds token id {top}, outside this "
                f"model's vocabulary of {args.vocab_size}; the data was prepared with another "
                f"tokenizer"
            )
    return model, args


def check_out(out: Path) -> None:
    """`--out` must not be (or lie inside) a checkpoint folder."""
    from megatron_btx.checkpoint.manifest import MANIFEST
    from megatron_btx.rundir import MCORE_METADATA

    for folder in (out, *out.resolve().parents):
        if (folder / MANIFEST).is_file() or (folder / MCORE_METADATA).is_file():
            raise BTXError(
                f"--out {out}: {'is' if folder == out else 'lies inside'} the checkpoint "
                f"{folder}; write the results to a folder of their own"
            )
