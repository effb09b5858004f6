#!/usr/bin/env bash
# The GPU run of the benchmarks issue: GPU tests, then every method at N = 1k ... 64k
# (D = 64, 8 heads, float32) on the CuPy backend, with torch SDPA on the same GPU as
# the exact speed anchor in the same run.
#
#   bash scripts/gpu_benchmark.sh [OUT]      # OUT defaults to $OUT, then gpu-out
#
# Needs the cuda and test extras (pip install -e ".[cuda,test]") and an NVIDIA GPU.
# Copy OUT/<run> to benchmarks/gpu/ and run python scripts/publish_benchmarks.py
# after adding a <!-- BEGIN gpu/<run> --> block to docs/benchmarks.md.
set -euo pipefail
out="${1:-${OUT:-gpu-out}}"
mkdir -p "$out"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$HOME/.cache/eff_attn/numba}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.csv"
python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.log" | tail -5
eff-attn compare --backend cupy --n 1024,4096,16384,65536 --problem gaussian --budget default --seeds 1 \
    --repeats 5 --no-plots --out "$out/scaling-gaussian" 2>&1 | tail -40
eff-attn compare --backend cupy --n 4096 --problem clustered --out "$out/clustered-4096" 2>&1 | tail -60
eff-attn compare --backend cupy --n 512 --problem real --out "$out/real-512" 2>&1 | tail -60
