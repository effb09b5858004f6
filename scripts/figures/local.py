"""Figures of docs/methods/local.md: error against the window, time against N.

Seeded and CPU-only; about a minute on two cores::

    python scripts/figures/local.py          # writes docs/figures/local-*.png
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.problems import AttentionProblem, clustered, gaussian, peaked  # noqa: E402
from eff_attn.metrics import err_over_uniform, uniform_output  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"


def positional(n: int, d: int = 64, heads: int = 8, seed: int = 0) -> AttentionProblem:
    """A relative-position head: ``q_i . k_j`` depends on ``i - j`` only and peaks at 0.

    Rotary-style features ``x_i = a [cos(w_f i), sin(w_f i)]`` with frequencies
    ``w_f`` spread over ``[1/256, 1/2]``, so attention decays with distance: the
    regime sliding windows are made for.
    """
    rng = np.random.default_rng(seed)
    freqs = np.geomspace(1 / 256, 1 / 2, d // 2)                           # (d/2,)
    angles = np.arange(n)[:, None] * freqs[None, :]                        # (n, d/2)
    x = np.concatenate([np.cos(angles), np.sin(angles)], axis=-1) * 0.6 * d ** 0.25  # (n, d)
    q = np.broadcast_to(x, (heads, n, d)).copy()
    v = rng.standard_normal((heads, n, d))
    return AttentionProblem("positional", q, q.copy(), v, "scores depend on i - j only")


def error_against_window(n=1024):
    windows = [0, 2, 8, 32, 128, 512, n - 1]
    floor = 1e-6
    problems = [positional(n), clustered(n), peaked(n), gaussian(n)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in problems:
        exact = eff_attn.attention(p.q, p.k, p.v, method="exact", backend="numba")
        uniform = uniform_output(p.v)
        errs = [err_over_uniform(eff_attn.attention(p.q, p.k, p.v, method="local", backend="numba", window=w),
                                 exact, uniform).mean() for w in windows]
        ax.plot([w + 1 for w in windows], np.maximum(errs, floor), marker="o", label=p.name)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 30)
    ax.set_xlabel("window w + 1 (keys on each side, plus one)")
    ax.set_ylabel("error / error of uniform (rel. Frobenius)")
    ax.set_title(f"local attention, N = {n}, D = 64, 8 heads; w = N - 1 is exact", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "local-error-vs-window.png", dpi=120)


def _time(f, repeats=3):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_against_n():
    rng = np.random.default_rng(0)
    sizes = [512, 1024, 2048, 4096, 8192]
    rows = {"exact (numba)": [], "local w=128 (numba)": [], "local w=32 (numba)": []}
    for n in sizes:
        q, k, v = (rng.standard_normal((4, n, 64)).astype(np.float32) for _ in range(3))
        rows["local w=128 (numba)"].append(_time(lambda: eff_attn.local_attention(q, k, v, backend="numba")))
        rows["local w=32 (numba)"].append(_time(lambda: eff_attn.local_attention(q, k, v, backend="numba", window=32)))
        if n <= 4096:
            rows["exact (numba)"].append(_time(lambda: eff_attn.exact_attention(q, k, v, backend="numba"), 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ts in rows.items():
        ax.plot(sizes[: len(ts)], ts, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward time [s]")
    ax.set_title("float32, D = 64, 4 heads, 2 shared CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "local-time-vs-n.png", dpi=120)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    error_against_window()
    time_against_n()
