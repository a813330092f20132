#!/usr/bin/env bash
# The test command: set up .venv (with the test extras) and run the test suite.
# Arguments go to pytest, e.g. `scripts/test.sh -m "not dist"` for the single-process tests only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh" test
cd "$ROOT"
# Lint and format first (seconds): the same checks a reviewer runs.
"$ROOT/.venv/bin/ruff" check --quiet .
"$ROOT/.venv/bin/ruff" format --check --quiet .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
