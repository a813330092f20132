"""Progress bars for long single-process work (conversion, merge, evaluation), on stderr."""

from __future__ import annotations

import sys
import weakref

#: the bars made here and not yet garbage (see close_all)
_BARS: weakref.WeakSet = weakref.WeakSet()


def bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar, or None when disabled or tqdm is missing (callers check for None)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    made = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
    _BARS.add(made)
    return made


def close_all() -> None:
    """Close every bar still open (after an error, so that the one-line error message starts
    on a line of its own instead of after a half-drawn bar)."""
    for open_bar in list(_BARS):
        open_bar.close()


def note(message: str, source: str = "btx data") -> None:
    """One progress line on stderr, so JSON or paths printed on stdout stay machine-readable."""
    print(f"[{source}] {message}", file=sys.stderr, flush=True)
