#!/usr/bin/env bash
# Install transformers 4.57.1 (the last 4.x release) and the versions of its dependencies that it
# needs into a folder that shadows the venv's transformers 5 when put first on PYTHONPATH, so
# tests/test_hf_versions.py can check that our HF exports load in transformers 4.x too (and that
# 4.x checkpoints import). torch, safetensors and numpy stay the venv's.
#   bash scripts/transformers4_overlay.sh [DIR]        (default: .venv/transformers4)
#   BTX_TRANSFORMERS4=DIR bash scripts/test.sh -k hf_versions
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.venv/transformers4}"
"$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade --no-deps --target "$DIR" \
  "transformers==4.57.1" "huggingface-hub==0.36.0" "tokenizers==0.22.1" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade --target "$DIR" \
  "requests>=2.32" 2>&1 | grep -v "^WARNING: Location" || true
PYTHONPATH="$DIR" "$ROOT/.venv/bin/python" -c \
  "import transformers; print('[transformers4] ' + transformers.__version__ + ' in $DIR')"
