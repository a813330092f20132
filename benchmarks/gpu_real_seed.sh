#!/usr/bin/env bash
# One device call: BTX from the real seed against its baselines (see the top of
# benchmarks/gpu_real_seed.py for the two `run` calls that carry the seed's two parts). Installs
# the carried wheels (megatron-core, gguf) into /tmp/site, then both runs; results.json and the
# logs land under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: could not install .whl/*.whl" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
export BTX_CACHE="$PWD/runs/real_seed_gpu/cache"
OUT_DIR="${OUT:-runs/real_seed_gpu/out}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv >"$OUT_DIR/nvidia_smi.txt" 2>&1
python3 benchmarks/gpu_real_seed.py --run --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_real_seed.log"
