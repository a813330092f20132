#!/usr/bin/env bash
# The main job, on built-in defaults, on a CPU: set up .venv, fetch and tokenise the four
# built-in domains (code, math, prose, legal), train a small dense Llama expert on the code
# domain with megatron-core, and export it to an HF Llama checkpoint.
# (The full BTX run -- seed, N experts, merge, MoE finetune, evaluation -- replaces this once
# the pipeline lands; see the README's status section.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh" tensorboard
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
BTX="$ROOT/.venv/bin/btx"
echo "== [1/3] data: built-in corpora -> SentencePiece + indexed datasets (data/small)"
"$BTX" prepare-data --builtin-domains all --output-dir data/small
echo "== [2/3] train: small dense Llama on the code domain (runs/small_dense)"
"$BTX" train examples/small_dense.yaml "$@"
echo "== [3/3] export: latest checkpoint -> HF Llama (runs/small_dense/hf)"
LATEST="runs/small_dense/checkpoints/$(cat runs/small_dense/checkpoints/latest)"
"$BTX" export-hf --load "$LATEST" --save runs/small_dense/hf --overwrite
echo "done: checkpoints in runs/small_dense/checkpoints, HF export in runs/small_dense/hf"
