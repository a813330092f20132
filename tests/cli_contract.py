"""Running `btx` commands in tests and checking the error contract: a user error is one line
``error: ...`` on stderr, exit code 2, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import train_common as tc  # noqa: E402

ROOT = tc.ROOT


def btx(
    *args: str, cwd: Path = ROOT, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m megatron_btx ARGS` in a child process (one thread, this checkout first;
    `env`: more environment variables)."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_btx", *args],
        cwd=cwd,
        env=tc.env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error(proc: subprocess.CompletedProcess, needle: str = "") -> str:
    """The command failed by the contract with `needle` in its one `error:` line; that line."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]
    return errors[0]
