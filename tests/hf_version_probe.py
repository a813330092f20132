"""Run under another transformers (PYTHONPATH=an overlay, see scripts/transformers4_overlay.sh):
`make FAMILY DIR` saves a tiny model of a family with that version; `logits IDS OUT DIR...` writes
{DIR: logits} of HF folders loaded by that version. Used by tests/test_hf_versions.py."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str]) -> None:
    import transformers
    from families_common import hf_logits, make_hf

    print(f"transformers {transformers.__version__}", file=sys.stderr)
    if argv[0] == "make":
        make_hf(argv[1], Path(argv[2]), seed=int(argv[3]) if len(argv) > 3 else 0)
    elif argv[0] == "logits":
        ids = torch.load(argv[1], weights_only=True)
        torch.save({folder: hf_logits(Path(folder), ids) for folder in argv[3:]}, argv[2])
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
