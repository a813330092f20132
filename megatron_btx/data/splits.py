"""Document-level train/valid/test assignment by a stable hash of the document key.

A document always lands in the same split, whatever order it is read in, whichever machine reads
it and whatever else is in the corpus, so evaluation sets never leak into training when a corpus
grows or is re-prepared. The hash is sha256 (not Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
import re

from megatron_btx.errors import BTXError

SPLITS: tuple[str, str, str] = ("train", "valid", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"test": 0.02, "valid": 0.02}


def key_fraction(key: str, salt: str = "split") -> float:
    """Map ``key`` to a uniform number in [0, 1); different salts give independent draws."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, fractions: dict[str, float] | None = None) -> str:
    """The split of a document: test takes the lowest hash range, valid the next, train the rest.

    Test comes first so that raising the valid fraction never moves a test document.
    """
    fr = DEFAULT_FRACTIONS if fractions is None else fractions
    u = key_fraction(key)
    test = fr.get("test", 0.0)
    if u < test:
        return "test"
    if u < test + fr.get("valid", 0.0):
        return "valid"
    return "train"


def parse_split(spec: str | dict[str, float] | None) -> dict[str, float]:
    """Parse ``"test=0.02,valid=0.02"`` (train gets the rest) into validated fractions."""
    if spec is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(spec, dict):
        items = dict(spec)
    else:
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(train|valid|test)\s*=\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", part)
            if not match:
                raise BTXError(
                    f"--split {spec!r}: cannot parse {part!r}; write e.g. --split test=0.02,valid=0.02"
                )
            items[match.group(1)] = float(match.group(2))
    unknown = set(items) - set(SPLITS)
    if unknown:
        raise BTXError(f"--split: unknown split(s) {sorted(unknown)}; use train, valid and test")
    test, valid = float(items.get("test", 0.0)), float(items.get("valid", 0.0))
    if "train" in items and abs(items["train"] - (1.0 - test - valid)) > 1e-9:
        raise BTXError(
            f"--split: train={items['train']} does not equal 1 - test - valid = {1 - test - valid}; "
            "give only test and valid, train gets the rest"
        )
    if test < 0 or valid < 0 or test + valid >= 1.0:
        raise BTXError(
            f"--split: test={test} and valid={valid} must be >= 0 and sum to less than 1"
        )
    return {"test": test, "valid": valid}


def check_split_sizes(label: str, documents: dict[str, int], fractions: dict[str, float]) -> None:
    """Every split that is meant to hold documents holds some: the train split always, valid and
    test when their fraction is above 0. An empty one is an error at preparation (one line naming
    the domain, the split and the fix), not a crash in training ("cannot mmap an empty file") or
    an evaluation on nothing; a split given fraction 0 stays empty on purpose, and training skips
    validation on it with a warning."""
    total = sum(documents.values())
    for split in SPLITS:
        wanted = split == "train" or fractions.get(split, 0.0) > 0
        if wanted and documents.get(split, 0) == 0:
            fix = (
                "lower the valid and test fractions"
                if split == "train"
                else f"raise its fraction (e.g. --split {split}=0.1) or set it to 0 for no {split} split"
            )
            raise BTXError(
                f"{label}: the {split} split is empty ({total} documents in all, split "
                f"test={fractions.get('test', 0.0)} valid={fractions.get('valid', 0.0)}); give "
                f"more documents or {fix}"
            )
