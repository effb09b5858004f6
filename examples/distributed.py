"""Attention over a Dask cluster: batch and head blocks, query blocks and key blocks.

    python examples/distributed.py                                  # LocalCluster, 2 workers, small problem
    python examples/distributed.py --n 8192 --q-chunk 2048 --k-chunk 2048 --causal --backend numba
    python examples/distributed.py --method yoso --n 4096 --head-chunk 2
    python examples/distributed.py --address tcp://scheduler:8786   # a running cluster
    python examples/distributed.py --address tcp://scheduler:8786 --gpu --backend cupy

It builds a (batch, heads, N, D) problem, chunks it as asked, runs
``eff_attn.dist.attention`` on the cluster and checks the result against the
single-machine ``eff_attn.attention`` on the same arrays (``--no-check`` skips
that: it needs the whole problem in this process). It prints the chunking, the
number of tasks, the warm wall time and the error.

With ``--gpu`` the chunks are CuPy arrays (``map_blocks(cupy.asarray)``), so the
tasks run the ``cupy`` backend on whichever GPU each worker owns: start one worker
per GPU, e.g. ``dask-cuda-worker tcp://scheduler:8786`` or
``CUDA_VISIBLE_DEVICES=i dask worker tcp://scheduler:8786 --nthreads 1`` per GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

# This file shares its name with the ``distributed`` package that dask.distributed
# imports; keep its own folder off the import path so that the package is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def build_problem(batch, heads, n, d, dtype, seed=0):
    """Gaussian q, k, v of shape (batch, heads, n, d)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, heads, n, d)).astype(dtype) for _ in range(3))
    return q, k, v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="scheduler of a running cluster (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (one thread each)")
    parser.add_argument("--method", default="exact")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "cupy"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--head-chunk", type=int, default=1, help="heads per block")
    parser.add_argument("--q-chunk", type=int, default=None, help="queries per block (default: all)")
    parser.add_argument("--k-chunk", type=int, default=None, help="keys per block (default: all)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--rng", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="CuPy-backed chunks")
    parser.add_argument("--no-check", action="store_true", help="skip the single-machine comparison")
    args = parser.parse_args(argv)

    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import eff_attn
    import eff_attn.dist
    from eff_attn.testing import relative_error

    if args.address:
        client = Client(args.address)
    else:
        client = Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"))
    print(f"cluster: {len(client.scheduler_info()['workers'])} workers")

    q, k, v = build_problem(args.batch, args.heads, args.n, args.d, args.dtype)
    qc, kc = args.q_chunk or args.n, args.k_chunk or args.n
    dq = da.from_array(q, chunks=(1, args.head_chunk, qc, args.d))
    dk = da.from_array(k, chunks=(1, args.head_chunk, kc, args.d))
    dv = da.from_array(v, chunks=(1, args.head_chunk, kc, args.d))
    if args.gpu:
        import cupy

        dq, dk, dv = (x.map_blocks(cupy.asarray) for x in (dq, dk, dv))
    rng = args.rng if eff_attn.registry.get_method(args.method).randomized else None
    out = eff_attn.dist.attention(dq, dk, dv, method=args.method, backend=args.backend, causal=args.causal,
                                  rng=rng)
    print(f"{args.method}: q {q.shape} in blocks {dq.chunksize}, keys in blocks of {kc}; "
          f"output blocks {out.chunksize}, {len(out.__dask_graph__())} graph nodes")

    client.compute(out).result()                                   # warm: imports and compilation on every worker
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = client.compute(out, retries=2).result()
        times.append(time.perf_counter() - start)
    print(f"wall time: median {statistics.median(times):.3f} s over {args.repeats} runs "
          f"(min {min(times):.3f} s)")

    if not args.no_check:
        if args.gpu:
            import cupy

            q, k, v = (cupy.asarray(a) for a in (q, k, v))
        single = eff_attn.attention(q, k, v, method=args.method, backend=args.backend, causal=args.causal, rng=rng)
        print(f"max relative difference to the single-machine call: {relative_error(result, single):.2e}")
    client.close()
    return result


if __name__ == "__main__":
    main()
