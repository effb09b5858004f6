"""Where one warm call of a method spends its time, on the Numba and the NumPy backend.

    python scripts/profile_methods.py performer nystrom kdeformer routing

Clustered problem at N = 4096 (8 heads, D = 64, float32), each method at its compare
defaults: one call to warm up, then one call under ``cProfile``; prints each
backend's wall time and its six largest own-time entries (a Numba kernel is one
entry). Single readings, for ``docs/methods/exact.md``'s per-method reasons.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import numpy as np


def main(names):
    import eff_attn
    from eff_attn.bench.problems import make_problem
    from eff_attn.registry import get_method

    q, k, v = make_problem("clustered", 4096).astype(np.float32)
    for name in names:
        kwargs = dict(get_method(name).compare_defaults)
        for backend in ("numba", "numpy"):
            eff_attn.attention(q, k, v, method=name, backend=backend, rng=0, **kwargs)
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            eff_attn.attention(q, k, v, method=name, backend=backend, rng=0, **kwargs)
            profile.disable()
            wall = time.perf_counter() - start
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(6)
            rows = [line.split() for line in text.getvalue().splitlines() if "/" in line or "{" in line][:6]
            print(f"== {name} [{backend}] {wall * 1e3:.0f} ms")
            for row in rows:
                print(f"   {float(row[1]) * 1e3:8.1f} ms  {' '.join(row[5:])}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["performer", "nystrom", "kdeformer", "routing"])
