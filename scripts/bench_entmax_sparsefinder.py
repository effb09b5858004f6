"""CPU measurements of entmax and Sparsefinder (the numbers on their docs pages).

- transforms: ``entmax_bisect`` (alpha 1.3), ``entmax15`` and ``sparsemax`` on
  (8, 4096, 4096) float32 scores, Numba against NumPy, and throughput at
  n in {128, 1024, 8192};
- attention, float32, 8 heads, D = 64, clustered inputs: dense entmax (Numba,
  NumPy), Sparsefinder (Numba, k-means defaults), exact (Numba), torch SDPA;
- quality on ``clustered`` and ``peaked`` (and ``real`` when the shipped
  heads exist): entmax's distance from softmax, Sparsefinder's recall,
  sparsity and error against dense entmax.

Run: ``python scripts/bench_entmax_sparsefinder.py [--quick]``. Timings are the
median of ``--repeats`` warm runs; the machine's load shows in their spread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import eff_attn
from eff_attn import metrics
from eff_attn.bench import problems
from eff_attn.methods import sparsefinder as sf


def timed(fn, repeats):
    fn()                                                                         # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def fmt(t):
    return f"{t[0] * 1e3:9.1f} ms (min {t[1] * 1e3:.1f}, max {t[2] * 1e3:.1f})"


def transforms(repeats, batch):
    print(f"\n## transforms, float32 scores of shape ({batch}, 4096, 4096)")
    z = np.random.default_rng(0).standard_normal((batch, 4096, 4096), dtype=np.float32) * 3
    for name, fn in (("entmax_bisect(alpha=1.3)", lambda b: eff_attn.entmax_bisect(z, 1.3, backend=b)),
                     ("entmax15", lambda b: eff_attn.entmax15(z, backend=b)),
                     ("sparsemax", lambda b: eff_attn.sparsemax(z, backend=b))):
        numba_t = timed(lambda: fn("numba"), repeats)
        numpy_t = timed(lambda: fn("numpy"), 1)
        print(f"{name:26s} numba {fmt(numba_t)}   numpy {fmt(numpy_t)}   speed-up {numpy_t[0] / numba_t[0]:.1f}x")
    print("\n## transform throughput (rows x n = 2**22 entries, float32), Numba")
    for n in (128, 1024, 8192):
        z = np.random.default_rng(1).standard_normal((2 ** 22 // n, n), dtype=np.float32) * 3
        bisect = lambda x, backend: eff_attn.entmax_bisect(x, 1.3, backend=backend)  # noqa: E731
        for name, fn in (("entmax15", eff_attn.entmax15), ("entmax_bisect 1.3", bisect)):
            t = timed(lambda: fn(z, backend="numba"), repeats)
            print(f"n={n:5d} {name:18s} {z.size / t[0] / 1e6:8.1f} M entries/s  ({fmt(t)})")


def trained_state():
    p = problems.clustered(256 * 32, d=64, heads=8, seed=0)
    cut = lambda x: np.moveaxis(x.reshape(8, 32, 256, 64), 1, 0)  # noqa: E731
    state, _ = sf.fit_sparsefinder(cut(p.q), cut(p.k), r=4, epochs=3, rng=0)     # the paper's configuration
    return state


def attention_speed(repeats, sizes, numpy_sizes):
    print("\n## attention, float32, 8 heads, D=64, clustered inputs (same centres as the training draw)")
    state = trained_state()
    try:
        import torch
        torch.set_num_threads(2)
    except ImportError:
        torch = None
    for n in sizes:
        q, k, v = problems.clustered(n, d=64, heads=8, seed=0).astype(np.float32)
        rows = {
            "entmax numba (sort, 1.5)": lambda: eff_attn.entmax_attention(q, k, v, backend="numba"),
            "entmax numba (bisect, 1.3)": lambda: eff_attn.entmax_attention(q, k, v, alpha=1.3, backend="numba"),
            "sparsefinder numba (kmeans)": lambda: eff_attn.sparsefinder_attention(q, k, v, state=state,
                                                                                 predictor="kmeans",
                                                                                 backend="numba"),
            "exact numba": lambda: eff_attn.exact_attention(q, k, v, backend="numba"),
        }
        if n in numpy_sizes:
            rows["entmax numpy (sort, 1.5)"] = lambda: eff_attn.entmax_attention(q, k, v, backend="numpy")
            rows["sparsefinder numpy (kmeans)"] = lambda: eff_attn.sparsefinder_attention(q, k, v, state=state,
                                                                                        predictor="kmeans",
                                                                                        backend="numpy")
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a[None]) for a in (q, k, v))  # (1, H, N, D): the fused path
            rows["torch SDPA (softmax)"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        for name, fn in rows.items():
            t = timed(fn, 1 if "numpy" in name else repeats)
            print(f"N={n:5d} {name:30s} {fmt(t)}")
        _, info = eff_attn.sparsefinder_attention(q, k, v, state=state, predictor="kmeans", backend="numba",
                                                  return_info=True)
        print(f"N={n:5d} sparsefinder keys/query {info['keys_per_query'].mean():.1f}, "
              f"graph sparsity {info['graph_sparsity']:.3f}, compute efficiency {info['compute_efficiency']:.3f}")


def quality(n):
    print(f"\n## quality, n={n}, float64, 8 heads, D=64")
    regimes = {"clustered": problems.clustered(n, seed=3), "peaked": problems.peaked(n, seed=3)}
    try:
        regimes["real"] = problems.real_heads(n=n)
    except (FileNotFoundError, ValueError) as exc:
        print(f"real heads skipped: {exc}")
    for name, p in regimes.items():
        q, k, v = p.q, p.k, p.v
        exact = eff_attn.exact_attention(q, k, v, backend="numpy")
        uniform = metrics.uniform_output(v, Nq=q.shape[-2])
        for alpha in (2.0, 1.5, 1.25):
            out, info = eff_attn.entmax_attention(q, k, v, alpha=alpha, backend="numba", return_info=True)
            err = metrics.rel_frobenius(out, exact)
            ratio = metrics.err_over_uniform(out, exact, uniform)
            print(f"{name:9s} entmax alpha={alpha:4.2f}: rel. Frobenius error vs softmax median {np.median(err):.3f}, "
                  f"err/err_uniform {np.median(ratio):.3f}, support/row {info['support_size'].mean():.1f}, "
                  f"sparsity {info['sparsity']:.3f}")
        state = "fit"
        for predictor, kw in (("kmeans", {}), ("kmeans", {"top_clusters": 2}), ("distance", {}),
                              ("quantize", {}), ("none", {})):
            out, info = eff_attn.sparsefinder_attention(q, k, v, state=state, rng=0, predictor=predictor,
                                                        backend="numba", return_info=True, compute_recall=True, **kw)
            state = info.get("state", state)
            dense = eff_attn.entmax_attention(q, k, v, backend="numba")
            err = np.median(metrics.rel_frobenius(out, dense))
            print(f"{name:9s} sparsefinder {predictor:8s} {kw}: recall {info['recall']:.3f}, graph sparsity "
                  f"{info['graph_sparsity']:.3f} (gold {info['gold_sparsity']:.3f}), exact rows "
                  f"{info['exact_fraction']:.3f}, efficiency {info['compute_efficiency']:.3f}, "
                  f"rel. error vs dense entmax {err:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="transforms,attention,quality")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "transforms" in parts:
        transforms(args.repeats, 1 if args.quick else args.batch)
    if "attention" in parts:
        attention_speed(args.repeats, [1024, 2048] if args.quick else [1024, 2048, 4096], [1024, 4096])
    if "quality" in parts:
        quality(512 if args.quick else 1024)
