#!/usr/bin/env bash
# One device call on a lent H200 (see the top of benchmarks/gpu_throughput.py for the `run` call):
# installs the carried wheels (megatron-core, liger-kernel) into /tmp/site, then runs the script
# with its results and log under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: could not install .whl/*.whl" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
OUT_DIR="${OUT:-runs/bench}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv 2>&1 | tee "$OUT_DIR/nvidia_smi.txt"
python3 benchmarks/gpu_throughput.py --out "$OUT_DIR/gpu_throughput.json" --budget-s 420 "$@" \
    2>&1 | tee "$OUT_DIR/gpu_throughput.log"
