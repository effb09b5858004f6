"""Time exact attention's Numba kernels over CPU tile sizes (docs/methods/exact.md).

    python scripts/tile_sweep.py [N]

Prints the best of three warm runs of the forward, forward plus backward, and
causal forward at D = 64, 8 heads, float32, for each (block_q, block_k).
"""

from __future__ import annotations

import sys
import numpy as np

import eff_attn
from eff_attn.bench.measure import best_time

TILES = [(32, 128), (64, 128), (64, 256), (128, 128), (128, 256), (256, 256), (128, 512)]


def main(N=4096, heads=8, D=64):
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, heads, N, D), dtype=np.float32) for _ in range(4))
    for block_q, block_k in TILES:
        params = dict(method="exact", backend="numba", block_q=block_q, block_k=block_k)

        def forward_backward():
            _, vjp = eff_attn.attention_vjp(q, k, v, **params)
            vjp(dout)

        fwd = best_time(lambda: eff_attn.attention(q, k, v, **params))
        both = best_time(forward_backward)
        causal = best_time(lambda: eff_attn.attention(q, k, v, causal=True, **params))
        print(f"({block_q:3d}, {block_k:3d})  forward {fwd:.3f} s  "
              f"forward+backward {both:.3f} s  causal {causal:.3f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
