#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv in the repository root and install
# megatron_btx into it (editable) with the given extras. CPU machines get the CPU torch pin from
# constraints-cpu.txt; machines with an NVIDIA GPU get whatever torch setup.py allows.
# Re-running is cheap: nothing is installed when setup.py, the constraints and extras are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
CONSTRAINTS=()
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  CONSTRAINTS=(-c "$ROOT/constraints-cpu.txt")
fi
STAMP="$VENV/.btx-install-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/constraints-cpu.txt" | sha256sum | cut -d' ' -f1) ${EXTRAS} ${#CONSTRAINTS[@]}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[setup] installing megatron_btx${EXTRAS:+[$EXTRAS]} into $VENV"
SPEC="$ROOT"
[ -n "$EXTRAS" ] && SPEC="$ROOT[$EXTRAS]"
# torch first, alone: with the CPU pin pip takes the local CPU build instead of resolving CUDA.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${CONSTRAINTS[@]}" torch 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${CONSTRAINTS[@]}" -e "$SPEC" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -W ignore -c "import megatron_btx, megatron.core, torch; print('[setup] torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
echo "$WANT" > "$STAMP"
