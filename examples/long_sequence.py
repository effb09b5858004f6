"""Long sequences: time and peak memory of efficient methods against exact attention.

    python examples/long_sequence.py --backend numba --n 16384
    python examples/long_sequence.py --backend cupy --n 65536 --methods exact,performer,yoso

For each method (at its default parameters) it runs one forward pass on a
clustered-keys problem (8 heads, D = 64, float32), and prints the warm time, the
peak memory during the call, the analytic FLOPs, and the relative error against
exact attention. The exact reference is the blocked online softmax, so even it
needs only O(N) memory; the naive algorithm would need 8 N^2 floats.
"""

from __future__ import annotations

import argparse

import numpy as np

import eff_attn
from eff_attn import registry
from eff_attn.bench.measure import peak_memory, time_call
from eff_attn.bench.problems import clustered
from eff_attn.metrics import rel_frobenius


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["numpy", "numba", "cupy"], default="numba")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    args = parser.parse_args(argv)

    problem = clustered(args.n, d=64, heads=args.heads, seed=0)
    q, k, v = problem.astype(np.float32)
    device = "gpu" if args.backend == "cupy" else "cpu"
    if device == "gpu":
        import cupy

        q, k, v = (cupy.asarray(a) for a in (q, k, v))
    exact = eff_attn.attention(q, k, v, method="exact", backend=args.backend)
    exact = exact.get() if hasattr(exact, "get") else exact
    naive_gib = args.heads * args.n * args.n * 4 / 2**30
    print(f"N={args.n}, {args.heads} heads, D=64, float32, backend={args.backend}; "
          f"a naive score matrix would take {naive_gib:.1f} GiB")
    print(f"{'method':14s} {'time (s)':>9s} {'peak MiB':>9s} {'GFLOP':>8s} {'rel. error':>11s}")
    names = args.methods.split(",") if args.methods else registry.method_names()
    for name in names:
        try:
            call = eff_attn.api.prepare(q, k, v, method=name, backend=args.backend, rng=0)
        except (eff_attn.NotSupportedError, ValueError) as exc:
            print(f"{name:14s} skipped: {str(exc).splitlines()[-1].strip()}")
            continue
        timing = time_call(call.run_forward, device=device, repeats=1)
        mem = peak_memory(call.run_forward, device=device)
        out, res = call.run_forward()
        out = call.problem.unflatten(out)
        out = out.get() if hasattr(out, "get") else out
        flops = eff_attn.api.build_info(call, res)["flops"]
        err = float(np.median(rel_frobenius(out, exact)))
        print(f"{name:14s} {timing.warm_median_s:9.3f} {mem / 2**20:9.1f} {flops / 1e9:8.2f} {err:11.2e}")


if __name__ == "__main__":
    main()
