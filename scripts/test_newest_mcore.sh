#!/usr/bin/env bash
# Run the test suite against the newest megatron-core in a Python 3.12 environment (.venv312).
#
# megatron-core 0.19 and later need Python >= 3.12, while the project's main environment (.venv)
# is Python 3.11 with the CPU torch from local disk. This script builds a second environment:
#   - Python 3.12: $PYTHON312, else `python3.12` on PATH, else pyenv's 3.12.x;
#   - torch $TORCH_VERSION (default 2.13.0): a CPU wheel for cp312 when one lies in pip's
#     find-links, else PyPI's build (CUDA libraries included, ~4 GB installed), which imports and
#     runs on a machine without a GPU;
#   - megatron-core $MCORE_VERSION (default: the newest release the index serves);
#   - the project with its test extra, editable.
# Then it runs pytest with the given arguments (default: -m "not slurm").
# Re-running reuses the environment when nothing changed.
#
#   bash scripts/test_newest_mcore.sh                       # the suite, minus Slurm
#   MCORE_VERSION=0.18.2 bash scripts/test_newest_mcore.sh tests/test_train_runs.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV312:-$ROOT/.venv312}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

is_python312() {
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1
}

find_python312() {
  # A pyenv shim named python3.12 can be on PATH and still fail: check each candidate runs.
  local candidate
  for candidate in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && is_python312 "$candidate"; then
      echo "$candidate"
      return
    fi
  done
  echo "error: no working Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
  exit 2
}

if [ ! -x "$VENV/bin/python" ]; then
  PY312="$(find_python312)"
  echo "[newest-mcore] creating $VENV with $("$PY312" --version)"
  "$PY312" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

MCORE="${MCORE_VERSION:-}"
if [ -z "$MCORE" ]; then
  # `|| true`: under pipefail a failed query would otherwise end the script here, silently
  MCORE="$("${PIP[@]}" index versions megatron-core 2>/dev/null \
    | sed -n 's/^megatron-core (\(.*\))$/\1/p' || true)"
  if [ -z "$MCORE" ]; then
    echo "error: cannot ask the package index for megatron-core's versions; set MCORE_VERSION" >&2
    exit 2
  fi
fi

pip_install() {
  # pip names each absent local index folder it skips ("WARNING: Location ..."): noise here.
  local log
  log="$(mktemp)"
  if ! "${PIP[@]}" install -q -c "$CONSTRAINTS" "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    echo "error: pip install $* failed (see above)" >&2
    exit 2
  fi
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
}

CONSTRAINTS="$VENV/btx-constraints.txt"
printf 'torch==%s\nmegatron-core==%s\ntransformers==5.24.0\n' "$TORCH_VERSION" "$MCORE" \
  > "$CONSTRAINTS"
STAMP="$VENV/.btx-install-stamp"
WANT="$(cat "$ROOT/setup.py" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[newest-mcore] installing torch $TORCH_VERSION, megatron-core $MCORE, megatron_btx[test]"
  pip_install torch
  pip_install -e "$ROOT[test]"
  echo "$WANT" > "$STAMP"
fi
# megatron-core's package_info runs `git rev-parse` from its own folder and appends the sha of
# whatever repository holds the venv (this one): switch that off.
export NO_VCS_VERSION=1
"$VENV/bin/python" -W ignore -c "import sys, torch, megatron.core as m; print('[newest-mcore] python', sys.version.split()[0], '| torch', torch.__version__, '| cuda available', torch.cuda.is_available(), '| megatron-core', m.__version__)"

cd "$ROOT"
# This checkout's code, also in subprocesses started elsewhere, even where $VENV's editable
# install points at another checkout (VENV312=/elsewhere/.venv312).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
if [ "$#" -eq 0 ]; then
  set -- -m "not slurm"
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
