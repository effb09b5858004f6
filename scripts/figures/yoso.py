"""Figures of docs/methods/yoso.md, seeded: ``python scripts/figures/yoso.py``.

Writes ``docs/figures/yoso-*.png``:

- ``yoso-collision.png``: the collision probability ``(1 - theta/pi)^tau``
  against the angle for tau = 1, 4, 9, with the measured collision rate of
  2000 Gaussian hashes on top;
- ``yoso-tables.png``: hashing and tables in two dimensions (tau = 2, one
  hash): two random lines cut the plane into four buckets, each bucket's
  table row sums its keys' values, each query reads its row;
- ``yoso-error.png``: the relative error of the sampled ``u`` against
  YOSO-E's and the row cosine of the normalised outputs, against the number
  of hashes ``m`` (log-log, 8 seeds), for tau = 4, 8 and ceil(log2 N), on
  Gaussian and clustered inputs;
- ``yoso-surrogate.png``: the ratio of the true derivative to the paper's
  surrogate against ``cos theta``;
- ``yoso-time.png``: Numba forward wall time against N: sampled YOSO
  (m = 32, tau = ceil(log2 N)), YOSO-E and exact softmax attention.

Runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.measure import best_time  # noqa: E402
from eff_attn.bench import problems  # noqa: E402
from eff_attn.methods.yoso import draw_yoso_hyperplanes, yoso_codes  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"
SEED = 0
#: Error figure: sequence length, heads, seeds and the sweep of m.
ERROR_N, ERROR_HEADS, ERROR_SEEDS = 512, 2, 8
HASHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Timing figure: sequence lengths, heads, repeats; quadratic YOSO-E stops early.
TIME_NS, TIME_HEADS, TIME_REPEATS = (256, 512, 1024, 2048, 4096), 8, 3
TIME_MAX_N_EXPECTATION = 2048


def collision_figure(path):
    theta = np.linspace(0, np.pi, 200)
    angles = np.linspace(0, np.pi, 13)
    D, m = 16, 2000
    q = np.zeros((1, D))
    q[0, 0] = 1.0
    k = np.zeros((len(angles), D))
    k[:, 0], k[:, 1] = np.cos(angles), np.sin(angles)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for tau, color in ((1, "C0"), (4, "C1"), (9, "C2")):
        ax.plot(theta, (1 - theta / np.pi) ** tau, color=color, label=rf"$\tau={tau}$: $(1-\theta/\pi)^\tau$")
        R = draw_yoso_hyperplanes(SEED + tau, m, tau, D)
        rate = (yoso_codes(q, R) == yoso_codes(k, R)).mean(axis=-1)
        ax.plot(angles, rate, "o", color=color, ms=4, mfc="none")
    ax.plot([], [], "ko", mfc="none", ms=4, label=f"measured, {m} Gaussian hashes")
    ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi], ["0", r"$\pi/4$", r"$\pi/2$", r"$3\pi/4$", r"$\pi$"])
    ax.set_xlabel(r"angle $\theta$ between $q_i$ and $k_j$")
    ax.set_ylabel(r"collision probability $P_{ij}$")
    ax.set_title("Bits multiply: tau is an inverse temperature")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tables_figure(path):
    rng = np.random.default_rng(SEED + 3)
    R = draw_yoso_hyperplanes(SEED + 1, 1, 2, 2)                           # one hash, two lines through 0

    def ring(n):                                                             # points spread around the origin
        phi = rng.uniform(0, 2 * np.pi, n)
        return rng.uniform(1.0, 2.6, n)[:, None] * np.stack([np.cos(phi), np.sin(phi)], axis=-1)

    keys = ring(10)
    values = rng.integers(1, 6, size=10)                                     # scalar values, for reading
    queries = ring(3)
    kc, qc = yoso_codes(keys, R)[:, 0], yoso_codes(queries, R)[:, 0]
    table = np.bincount(kc, weights=values, minlength=4)
    colors = ["C0", "C1", "C2", "C3"]
    fig, (ax, tx) = plt.subplots(1, 2, figsize=(8.6, 3.8), gridspec_kw={"width_ratios": [1.25, 1]})
    lim = 3.0
    grid = np.linspace(-lim, lim, 300)
    X, Y = np.meshgrid(grid, grid)
    codes = yoso_codes(np.stack([X.ravel(), Y.ravel()], axis=-1), R)[:, 0].reshape(X.shape)
    ax.contourf(X, Y, codes, levels=[-0.5, 0.5, 1.5, 2.5, 3.5], colors=colors, alpha=0.13)
    for b, r in enumerate(R[0]):
        d = np.array([-r[1], r[0]]) / np.linalg.norm(r)                     # the line r . x = 0
        ax.plot([-lim * 2 * d[0], lim * 2 * d[0]], [-lim * 2 * d[1], lim * 2 * d[1]], "k-", lw=1)
        ax.annotate("", xy=0.9 * r / np.linalg.norm(r), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": "k"})
        ax.text(*(1.05 * r / np.linalg.norm(r)), rf"$r_{b}$", fontsize=10)
    for (x, y), c, val in zip(keys, kc, values):
        ax.plot(x, y, "o", color=colors[c], ms=7)
        ax.text(x + 0.08, y + 0.08, f"v={val}", fontsize=7)
    for n, ((x, y), c) in enumerate(zip(queries, qc)):
        ax.plot(x, y, "*", color=colors[c], ms=14, mec="k")
        ax.text(x + 0.1, y - 0.3, f"$q_{n}$", fontsize=10)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(r"hash: $c(x)=\sum_b 2^b[r_b\cdot x>0]$  (keys o, queries *)", fontsize=9)
    tx.axis("off")
    tx.set_xlim(0, 1)
    tx.set_ylim(-0.6, 5)
    tx.text(0.02, 4.6, "table $T[b]$ = sum of the values of the keys in bucket $b$", fontsize=9)
    for b in range(4):
        y = 3.6 - b
        tx.add_patch(plt.Rectangle((0.05, y - 0.35), 0.5, 0.7, color=colors[b], alpha=0.25))
        tx.text(0.08, y, f"b = {b} ({b:02b})", va="center", fontsize=9)
        tx.text(0.4, y, f"{table[b]:g}", va="center", fontsize=11, weight="bold")
        readers = [f"$q_{n}$" for n in range(3) if qc[n] == b]
        if readers:
            tx.annotate(", ".join(readers) + " read this row", xy=(0.56, y), xytext=(0.62, y), va="center", fontsize=9,
                        arrowprops={"arrowstyle": "<-"})
    tx.text(0.02, -0.4, r"$u_i=\frac{1}{m}\sum_h T_h[c_h(q_i)] = (Cv)_i$, then $y_i=u_i/\|u_i\|$", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _error_curves(problem, tau):
    q, k, v = problem.astype(np.float64)
    uE = eff_attn.yoso_attention(q, k, v, variant="expectation", tau=tau, normalize_output=False, backend="numba")
    yE = uE / np.maximum(np.linalg.norm(uE, axis=-1, keepdims=True), 1e-12)
    rel, cos = [], []
    for m in HASHES:
        r, c = [], []
        for seed in range(ERROR_SEEDS):
            u = eff_attn.yoso_attention(q, k, v, rng=1000 * m + seed, num_hashes=m, tau=tau, normalize_output=False,
                                        backend="numba")
            r.append(np.linalg.norm(u - uE) / np.linalg.norm(uE))
            y = u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
            c.append((y * yE).sum(-1).mean())
        rel.append(np.mean(r))
        cos.append(np.mean(c))
    return np.array(rel), np.array(cos)


def error_figure(path):
    n = ERROR_N
    taus = (4, 8, math.ceil(math.log2(n)))
    regimes = {
        "gaussian": problems.gaussian(n, d=64, heads=ERROR_HEADS, seed=SEED),
        "clustered": problems.clustered(n, d=64, heads=ERROR_HEADS, seed=SEED),
    }
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6))
    ms = np.array(HASHES)
    for (name, problem), style in zip(regimes.items(), ("-", "--")):
        for tau, color in zip(taus, ("C0", "C1", "C2")):
            rel, cos = _error_curves(problem, tau)
            axes[0].loglog(ms, rel, style, marker="o", ms=3, color=color, label=f"{name}, tau={tau}")
            axes[1].semilogx(ms, cos, style, marker="o", ms=3, color=color, label=f"{name}, tau={tau}")
    axes[0].loglog(ms, 2.0 * ms**-0.5, "k:", lw=1, label=r"slope $-1/2$")
    axes[0].set_xlabel("hashes m")
    axes[0].set_ylabel(r"$\|u_m-u_E\|\,/\,\|u_E\|$")
    axes[0].set_title(f"unnormalised output vs YOSO-E (N={n}, {ERROR_SEEDS} seeds)", fontsize=9)
    axes[1].set_xlabel("hashes m")
    axes[1].set_ylabel("mean row cosine, normalised outputs")
    axes[1].set_title("normalised YOSO-m vs YOSO-E", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False, ncol=1)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def surrogate_figure(path):
    c = np.linspace(-0.995, 0.995, 4001)
    theta = np.arccos(c)
    ratio = 2 / ((np.pi - theta) * np.sin(theta))
    best = np.argmin(ratio)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(c, ratio, "C3")
    ax.axhline(1, color="k", lw=0.7, ls=":")
    ax.plot(c[best], ratio[best], "ko", ms=4)
    ax.annotate(rf"min {ratio[best]:.4f} at $\cos\theta={c[best]:.3f}$", (c[best], ratio[best]),
                xytext=(0.05, 3.6), arrowprops={"arrowstyle": "->"}, fontsize=9)
    ax.plot(0, 4 / np.pi, "k^", ms=4)
    ax.annotate(r"$4/\pi$ at $\theta=\pi/2$", (0, 4 / np.pi), xytext=(-0.75, 2.6), arrowprops={"arrowstyle": "->"},
                fontsize=9)
    ax.set_ylim(0, 8)
    ax.set_xlabel(r"$\cos\theta$")
    ax.set_ylabel("true / surrogate")
    ax.set_title(r"$dP/dx$ over the surrogate $\frac{\tau}{2}P$: $2/((\pi-\theta)\sin\theta)$", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def time_figure(path):
    labels = ("yoso sampled (m=32, tau=ceil(log2 N))", "yoso expectation", "exact (blocked)")
    rows = {label: ([], []) for label in labels}
    for n in TIME_NS:
        q, k, v = problems.gaussian(n, d=64, heads=TIME_HEADS, seed=SEED).astype(np.float32)
        tau = math.ceil(math.log2(n))
        calls = (
            lambda: eff_attn.yoso_attention(q, k, v, rng=0, num_hashes=32, tau=tau, backend="numba"),
            lambda: eff_attn.yoso_attention(q, k, v, variant="expectation", tau=tau, backend="numba"),
            lambda: eff_attn.exact_attention(q, k, v, backend="numba"),
        )
        for label, call in zip(labels, calls):
            if label == labels[1] and n > TIME_MAX_N_EXPECTATION:
                continue
            if n == TIME_NS[0]:
                call()                                                       # compile or load the kernels
            rows[label][0].append(n)
            rows[label][1].append(best_time(call, TIME_REPEATS))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for (label, (ns, times)), marker in zip(rows.items(), "osd"):
        ax.loglog(ns, times, marker=marker, ms=4, label=label)
    ax.set_xticks(TIME_NS, [str(n) for n in TIME_NS])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(f"forward wall time [s], best of {TIME_REPEATS}")
    ax.set_title(f"Numba, float32, D=64, {TIME_HEADS} heads, 2 shared CPU cores", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    collision_figure(args.out / "yoso-collision.png")
    tables_figure(args.out / "yoso-tables.png")
    surrogate_figure(args.out / "yoso-surrogate.png")
    error_figure(args.out / "yoso-error.png")
    rows = time_figure(args.out / "yoso-time.png")
    for label, (ns, times) in rows.items():
        print(label, " ".join(f"N={n}: {t:.4f}s" for n, t in zip(ns, times)))


if __name__ == "__main__":
    main()
