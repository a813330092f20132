"""Progress bars for long single-process work (conversion, merge, evaluation), on stderr."""

from __future__ import annotations

import sys


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar, or None when disabled or tqdm is missing (callers check for None)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def note(message: str, source: str = "btx data") -> None:
    """One progress line on stderr, so JSON or paths printed on stdout stay machine-readable."""
    print(f"[{source}] {message}", file=sys.stderr, flush=True)
