#!/usr/bin/env bash
# The README's main command: the whole Branch-Train-MiX method in miniature, on a CPU, from one
# config (examples/small_btx.yaml) and one command (`btx run`):
#   data      the built-in domains (code, math, prose, legal, general text) -> SentencePiece,
#             datasets and mixed held-out documents
#   seed      a small Llama pretrained on general text (16 tokens per parameter, both cores)
#   branch    one dense expert per domain, continued on its own domain (two at a time)
#   MiX       merge: the experts' FFNs + the seed's as MoE experts, the rest averaged, new routers
#   finetune  the top-2 MoE on the blend of all domains, 19% general (load balancing, alpha 0.01)
#   baselines dense (the seed continued), sparse upcycling, Drop-Upcycling, granular upcycling, BAM
#             at the same training FLOPs; BTM
#   evaluate  held-out perplexity of every model per domain and group with 95% intervals, the
#             paper's claims, merge diagnostics, routing tables and heatmaps
# Re-running skips finished stages and resumes interrupted ones; `btx status runs/small_btx`
# shows where a run is. Extra arguments go to `btx run` (e.g. --parallel 1, --experts.steps 50).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh" tensorboard,plots   # plots: the heatmaps and diagnostics
cd "$ROOT"
# One thread per stage and two stages at a time: for models this small, two single-threaded
# processes train faster than one process with two threads.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
"$ROOT/.venv/bin/btx" run examples/small_btx.yaml --parallel "${BTX_PARALLEL:-2}" "$@"
# then the extend experiment on its data and seed: 4 experts, a fifth domain added afterwards
"$ROOT/.venv/bin/btx" run examples/small_extend.yaml --parallel "${BTX_PARALLEL:-2}"
echo "table: runs/small_btx/eval/results.md; routing: runs/small_btx/eval/routing.md;" \
  "plots: runs/small_btx/eval/routing*.png, diagnostics.png;" \
  "a domain added to a finetuned MoE: runs/small_extend/eval/results.md"
