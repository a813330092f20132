""".ci/run's second step, the smoke subset against the newest megatron-core under Python 3.12
(scripts/smoke_newest_mcore.sh), checked without building its 6 GB environment: its node ids
name tests that exist, a machine without Python 3.12 or without the package index fails the
step with an `error:` line and exit 2 rather than skipping it, and .ci/run runs both steps and
exits with the first failure's status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SMOKE = ROOT / "scripts" / "smoke_newest_mcore.sh"


def smoke_ids() -> list[str]:
    block = SMOKE.read_text().split("SMOKE=(\n", 1)[1].split("\n)\n", 1)[0]
    lines = (line.strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.slow
def test_smoke_ids_name_existing_tests():
    ids = smoke_ids()
    areas = ("convert", "merge", "train_runs", "train_parallel", "pipeline_e2e", "evaluate")
    assert all(any(area in i for i in ids) for area in areas), ids
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["--long", *ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    collected = [line for line in r.stdout.splitlines() if "::" in line]
    for i in ids:  # each id selects at least one test (a file: all of its tests)
        assert any(c == i or c.startswith((i + "[", i + "::")) for c in collected), i


def _tools(tmp_path: Path, names: tuple[str, ...]) -> str:
    """A PATH folder holding only `names` (links to the real tools)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(shutil.which(name))
    return str(folder)


def _python312() -> str | None:
    """A working Python 3.12's own executable (not a pyenv shim, which needs pyenv's root)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = [shutil.which("python3.12"), *sorted(pyenv.glob("versions/3.12*/bin/python3.12"))]
    for candidate in filter(None, found):
        probe = "import sys, venv; assert sys.version_info[:2] == (3, 12); print(sys.executable)"
        r = subprocess.run([str(candidate), "-c", probe], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return None


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VENV"))}
    env.update(HOME=str(tmp_path), PYENV_ROOT=str(tmp_path / "no-pyenv"))
    env.update(VENV312=str(tmp_path / "venv312"), **extra)
    return env


def test_smoke_step_without_python312_fails_loudly(tmp_path):
    env = _env(tmp_path, PATH=_tools(tmp_path, ("bash", "dirname", "mktemp", "rm")))
    r = subprocess.run(
        ["bash", str(SMOKE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: no working Python 3.12 found; set PYTHON312" in r.stderr
    assert not (tmp_path / "venv312").exists()


@pytest.mark.slow
def test_smoke_step_without_the_package_index_fails_loudly(tmp_path):
    """Python 3.12 present (the venv is made), the index unreachable (a closed local port, no
    pip configuration files, no find-links): the step stops before pytest."""
    python312 = _python312()
    if python312 is None:
        pytest.skip("no Python 3.12 here: the step's other failure is the one tested above")
    env = _env(
        tmp_path,
        PYTHON312=python312,
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_TIMEOUT="5",
    )
    r = subprocess.run(
        ["bash", str(SMOKE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: cannot ask the package index for megatron-core's versions" in r.stderr
    assert (tmp_path / "venv312" / "bin" / "python").exists()  # it got as far as the index
    assert "passed" not in r.stdout and "[newest-mcore] smoke subset" not in r.stdout


@pytest.mark.parametrize(
    "suite, smoke, status",
    [(0, 0, 0), (3, 0, 3), (0, 2, 2), (3, 2, 3)],
    ids=["both-pass", "suite-fails", "smoke-fails", "both-fail"],
)
def test_ci_runs_both_steps_and_exits_with_the_first_failure(tmp_path, suite, smoke, status):
    """.ci/run itself, in a copy whose steps are scripts that record that they ran (and with
    which arguments) and exit with the given status (the real steps take 20 minutes and more):
    scripts/test.sh runs three times (the default suite, the real-seed group, the long group)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    for name, rc in (("test.sh", suite), ("smoke_newest_mcore.sh", smoke)):
        (tmp_path / "scripts" / name).write_text(f'echo "ran $*" >> {name}.log\nexit {rc}\n')
    r = subprocess.run(
        ["bash", ".ci/run"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == status, r.stdout + r.stderr
    assert (tmp_path / "test.sh.log").read_text() == (
        "ran \nran --real -m real\nran --long -m long\n"
    )
    assert (tmp_path / "smoke_newest_mcore.sh.log").read_text() == "ran \n"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 * (suite != 0) + (smoke != 0), r.stderr
    if suite:
        assert f"default suite (scripts/test.sh) failed (exit {suite})" in errors[0]
