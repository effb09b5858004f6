"""Time exact attention's Numba kernels over CPU tile sizes, interleaved with torch's SDPA.

    python scripts/tile_sweep.py [--n 4096] [--repeats 5] [--tiles 128x512 256x512 ...]

D = 64, 8 heads, float32, every core for both. For each case (forward, causal
forward, forward + backward) the tile sizes and SDPA are timed in turn, repeat
after repeat (``scripts/bench_kernels.py``'s interleaving), so that load from
other processes hits them alike; it prints each tile's median and its ratio to
SDPA's median (docs/methods/exact.md, "What the backends do").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eff_attn  # noqa: E402
from bench_kernels import HEADS, D, _interleaved  # noqa: E402

TILES = ["128x512", "256x256", "256x512", "128x256"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiles", nargs="+", default=TILES, help="block_q x block_k")
    ap.add_argument("--cases", nargs="+", default=["forward", "causal", "forward_backward"])
    args = ap.parse_args(argv)

    import numba
    import torch
    import torch.nn.functional as F

    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, HEADS, args.n, D), dtype=np.float32) for _ in range(4))
    tq, tk, tv, tdo = (torch.from_numpy(a) for a in (q, k, v, dout))
    gq, gk, gv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))

    def ours(case, block_q, block_k):
        params = dict(method="exact", backend="numba", block_q=block_q, block_k=block_k)
        if case == "forward_backward":
            _, vjp = eff_attn.attention_vjp(q, k, v, **params)
            return lambda: vjp(dout)
        return lambda: eff_attn.attention(q, k, v, causal=case == "causal", **params)

    def sdpa(case):
        if case == "forward_backward":
            def both():
                for t in (gq, gk, gv):
                    t.grad = None
                F.scaled_dot_product_attention(gq, gk, gv).backward(tdo)
            return both

        def forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=case == "causal")
        return forward

    for case in args.cases:
        fns = {tile: ours(case, *map(int, tile.split("x"))) for tile in args.tiles}
        fns["sdpa"] = sdpa(case)
        t = _interleaved(fns, args.repeats)
        ref = t["sdpa"]["median_s"]
        for name, row in t.items():
            print(f"N={args.n} {case:16s} {name:8s} {row['median_s'] * 1e3:8.1f} ms  "
                  f"ratio {row['median_s'] / ref:.2f}  CPU time: median ratio "
              f"{row['cpu_median_s'] / t['sdpa']['cpu_median_s']:.2f}, best ratio {row['cpu_best_s'] / t['sdpa']['cpu_best_s']:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
