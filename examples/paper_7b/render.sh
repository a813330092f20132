#!/usr/bin/env bash
# Render the paper-scale sbatch scripts into examples/paper_7b/sbatch/ without submitting
# (`btx launch --dry-run`). On the cluster, drop --dry-run (and this copy) to submit them.
# Needs the config's inputs to exist (the seed's config.json and tokenizer.model, the domain
# folders): the plan reads the architecture and vocabulary to size the stages.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
IMAGE="${BTX_IMAGE:-registry.example.com#btx/megatron-btx:0.1.0}"
RUN="${BTX_RUN_DIR:-/shared/btx/runs/btx_7b}"
cd /
"$PY" -m megatron_btx launch "$HERE/btx_7b.yaml" --executor slurm --dry-run --run-dir "$RUN" \
    --partition gpu --time 2-00:00:00 --nodes-per-expert 4 --gpus-per-node 8 \
    --cpus-per-task 64 --extra-sbatch=--exclusive \
    --container-image "$IMAGE" --container-mounts /shared/btx:/shared/btx --workdir /shared/btx \
    > "$HERE/dry_run.txt"
rm -rf "$HERE/sbatch"
mkdir -p "$HERE/sbatch"
cp "$RUN"/slurm/*.sbatch "$HERE/sbatch/"
mkdir -p "$HERE/sbatch/configs"        # the per-stage training configs the scripts run
cp "$RUN"/configs/*.yaml "$HERE/sbatch/configs/"
sed -n '/^stages of/,$p' "$HERE/dry_run.txt" > "$HERE/sbatch/GRAPH.txt"
rm "$HERE/dry_run.txt"
echo "wrote $HERE/sbatch ($(ls "$HERE/sbatch" | wc -l) files)"
