#!/usr/bin/env bash
# Regenerate every committed CPU benchmark under benchmarks/cpu/, then the docs tables and plots.
#
#   bash scripts/run_benchmarks.sh            # all runs (about 40 min on a quiet 2-core box)
#   bash scripts/run_benchmarks.sh exact      # only the named runs (folder names under benchmarks/cpu/)
#
# Run it on a quiet machine, from the repository root, with the numba extra and torch installed
# (torch is the SDPA speed anchor, called with 4-D (B, H, N, D) tensors as its users call it).
# Each run's command is the one recorded in its results.json; keep them in step.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
python -c "import torch" 2>/dev/null || { echo "torch is needed for the SDPA anchor: pip install torch" >&2; exit 1; }

compare() { python -m eff_attn.cli compare "$@"; }

declare -A RUNS=(
  [exact]="--methods exact --backend numpy,numba --n 256,512,1024,2048,4096,8192 --problem gaussian --repeats 3 --out benchmarks/cpu/exact --no-plots"
  [clustered-2048]="--sweep --out benchmarks/cpu/clustered-2048"
  [real-512]="--problem real --n 512 --sweep --out benchmarks/cpu/real-512"
  [scaling-gaussian]="--problem gaussian --n 1024,4096,16384 --seeds 1 --repeats 3 --out benchmarks/cpu/scaling-gaussian"
  [causal-gaussian-4096]="--problem gaussian --n 4096 --causal --seeds 1 --repeats 3 --out benchmarks/cpu/causal-gaussian-4096"
)
ORDER=(exact clustered-2048 real-512 scaling-gaussian causal-gaussian-4096)
selected=("${@:-${ORDER[@]}}")

for name in "${selected[@]}"; do
  if [[ "$name" == compare-walltime ]]; then
    echo "== compare-walltime"; python scripts/bench_compare_walltime.py; continue
  fi
  [[ -n "${RUNS[$name]:-}" ]] || { echo "unknown run: $name (one of ${ORDER[*]} compare-walltime)" >&2; exit 2; }
  echo "== $name: eff-attn compare ${RUNS[$name]}"
  start=$SECONDS
  # shellcheck disable=SC2086  # the options are words
  compare ${RUNS[$name]} > /dev/null
  echo "   $((SECONDS - start)) s"
done
if [[ $# -eq 0 ]]; then
  echo "== compare-walltime"; python scripts/bench_compare_walltime.py
fi

python scripts/publish_benchmarks.py
if [[ -f scripts/publish_docs_numbers.py ]]; then python scripts/publish_docs_numbers.py; fi
echo "done: review git diff benchmarks/ docs/ and commit"
