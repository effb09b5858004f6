"""Figures of docs/methods/routing.md (seeded; about a minute on two cores).

    python scripts/figures/routing.py [--out docs/figures] [--skip-timing]

Writes
    routing-circle.png    2-D routing: argmax cells vs balanced windows, unrouted queries marked
    routing-clusters.png  error, captured mass and unrouted fraction against the number of clusters
    routing-kmeans.png    k-means loss against online EMA steps for three decays
    routing-time.png      Numba time against N (C = ceil(sqrt N)) beside exact attention
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
from eff_attn.bench.problems import clustered  # noqa: E402
from eff_attn.methods.routing import (  # noqa: E402
    RoutingState,
    init_centroids,
    kmeans_loss,
    route,
    update_centroids,
)
from eff_attn.metrics import err_over_uniform, uniform_output  # noqa: E402

SEED = 0
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]


def circle_figure(path):
    """Three centroids on the circle; 12 queries and 12 keys; argmax cells vs balanced windows."""
    rng = np.random.default_rng(SEED)
    C, N = 3, 12
    angles = np.array([0.3, 2.2, 4.0])
    mu = np.stack([np.cos(angles), np.sin(angles)], axis=1)                 # (C, 2)
    state = RoutingState(mu, np.full(C, 1 / C))
    centre_of = rng.choice(C, size=2 * N, p=[0.6, 0.3, 0.1])                 # uneven clusters
    theta = angles[centre_of] + rng.normal(0, 0.55, 2 * N)
    radius = rng.uniform(0.75, 1.0, 2 * N)
    pts = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    q, k = pts[:N], pts[N:]
    v = np.zeros((N, 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    grid = np.linspace(-1.2, 1.2, 301)
    gx, gy = np.meshgrid(grid, grid)
    cells = np.argmax(np.stack([gx, gy], -1) @ mu.T, axis=-1)
    for ax, assignment in zip(axes, ("argmax", "balanced")):
        plan = route(q, k, state, assignment=assignment)
        ax.contourf(gx, gy, cells, levels=[-0.5, 0.5, 1.5, 2.5], colors=COLORS[:3], alpha=0.08)
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="0.7"))
        for c in range(C):
            ax.plot([0, mu[c, 0]], [0, mu[c, 1]], color=COLORS[c], lw=2)
        _, info = eff_attn.routing_attention(q, k, v, state=state, assignment=assignment, return_info=True)
        if assignment == "argmax":
            for c in range(C):
                sel = plan.query_cluster == c
                ax.scatter(*q[sel].T, color=COLORS[c], marker="o", s=60, label="queries" if c == 0 else None)
                sel = plan.key_cluster == c
                ax.scatter(*k[sel].T, color=COLORS[c], marker="s", s=60, facecolors="none",
                           label="keys" if c == 0 else None)
            ax.set_title("argmax: every token in its nearest cell")
        else:
            for c in range(C):
                qw, kw = plan.query_windows[c], plan.key_windows[c]
                kw = kw[kw >= 0]
                ax.scatter(*(q[qw] * (1.0 + 0.06 * c)).T, color=COLORS[c], marker="o", s=60 - 15 * c)
                ax.scatter(*(k[kw] * (1.0 + 0.06 * c)).T, color=COLORS[c], marker="s", s=60 - 15 * c,
                           facecolors="none")
            lost = info["unrouted"]
            ax.scatter(*q[lost].T, color="red", marker="x", s=120, lw=2, label="unrouted query (output 0)")
            ax.set_title(f"balanced, w = {info['window'][0]}: {lost.sum()} of {N} queries in no window")
        ax.set_aspect("equal")
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("Routing on the circle: 3 centroids (lines), queries (dots), keys (squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def clusters_figure(path, N=1024, heads=4):
    """Quality against C on the clustered regime, centroids fitted on the data (seeded)."""
    problem = clustered(N, d=64, heads=heads, clusters=16, seed=SEED)
    q, k, v = problem.q, problem.k, problem.v
    exact = eff_attn.exact_attention(q, k, v, backend="numpy")
    uniform = uniform_output(v)
    budgets = [2, 4, 8, 16, 32, 64]
    modes = [("argmax", "nearest", "argmax (default)"), ("balanced", "zero", "balanced (paper)"),
             ("balanced", "nearest", "balanced + nearest")]
    rows = {label: {"err": [], "mass": [], "unrouted": [], "zero": []} for *_, label in modes}
    dropped = []
    for C in budgets:
        state = init_centroids(q, k, num_clusters=C, rng=SEED)
        for assignment, unrouted, label in modes:
            out, info = eff_attn.routing_attention(q, k, v, state=state, assignment=assignment, unrouted=unrouted,
                                                   return_info=True, compute_exact=True, backend="numba")
            rows[label]["err"].append(float(np.median(err_over_uniform(out, exact, uniform))))
            rows[label]["mass"].append(float(info["captured_mass"].mean()))
            rows[label]["unrouted"].append(info["unrouted_fraction"])
            rows[label]["zero"].append(info["zero_output_fraction"])
        rng = np.random.default_rng(C)
        keep = rng.random((heads, N, 1)) >= 0.25                            # exact, a quarter of rows dropped
        dropped.append(float(np.median(err_over_uniform(exact * keep, exact, uniform))))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for (_, _, label), color in zip(modes, COLORS):
        r = rows[label]
        axes[0].plot(budgets, r["err"], "o-", color=color, label=label)
        axes[1].plot(budgets, r["mass"], "o-", color=color, label=label)
        axes[2].plot(budgets, r["zero"], "o-", color=color, label=f"{label}: zero rows", ms=9 - 2 * COLORS.index(color))
    axes[2].plot(budgets, rows["balanced (paper)"]["unrouted"], "x--", color="0.4", label="unrouted (before fallback)")
    axes[0].plot(budgets, dropped, "k:", label="exact with 25% of rows dropped")
    axes[0].set_ylabel("err / err_uniform (median over heads)")
    axes[1].set_ylabel("captured exact softmax mass")
    axes[2].set_ylabel("share of rows")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of clusters C")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"clustered regime, N = {N}, D = 64, {heads} heads, 16 true clusters; centroids fitted on the data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows, dropped


def _token_stream(centres, rng, N, spread=0.3):
    """q and k (1, N, D) scattered around fixed unit ``centres`` (as in ``bench.problems.clustered``)."""
    D = centres.shape[1]

    def tokens():
        labels = rng.integers(0, centres.shape[0], N)
        return centres[labels] + spread * rng.standard_normal((N, D)) / np.sqrt(D)

    return tokens()[None], tokens()[None]


def kmeans_figure(path, steps=400, N=256, C=16, D=64):
    """Online k-means from random directions on a stationary stream (fixed centres, fresh
    tokens every step); the loss is measured on held-out tokens."""
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((16, D))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    held_q, held_k = _token_stream(centres, np.random.default_rng(10_000), N)
    fig, ax = plt.subplots(figsize=(6, 4))
    for decay, color in zip((0.9, 0.99, 0.999), COLORS):
        stream = np.random.default_rng(1)                                   # the same batches for every decay
        state = init_centroids(num_clusters=C, dim=D, rng=SEED + 1)
        losses = [kmeans_loss(state, held_q, held_k).item()]
        for _ in range(steps):
            q, k = _token_stream(centres, stream, N)
            state = update_centroids(state, q, k, decay=decay)
            losses.append(kmeans_loss(state, held_q, held_k).item())
        ax.plot(np.arange(steps + 1), losses, color=color, label=f"decay {decay}")
    lloyd = init_centroids(held_q, held_k, num_clusters=C, rng=SEED)
    ax.axhline(kmeans_loss(lloyd, held_q, held_k).item(), color="k", ls=":",
               label="10 Lloyd steps on the held-out tokens")
    ax.set_xlabel("EMA steps (one batch of 2 x 256 tokens each)")
    ax.set_ylabel("k-means loss on held-out tokens")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, steps)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing_figure(path, sizes=(1024, 2048, 4096, 8192, 16384), heads=2):
    """Numba routing (both modes) and Numba exact against N; float32, D = 64."""
    times = {"routing argmax": [], "routing balanced": [], "exact": []}
    for N in sizes:
        problem = clustered(N, d=64, heads=heads, seed=SEED)
        q, k, v = problem.astype(np.float32)
        state = init_centroids(q, k, num_clusters=math.ceil(math.sqrt(N)), rng=SEED)
        times["routing argmax"].append(best_time(lambda: eff_attn.routing_attention(q, k, v, state=state,
                                                                                     backend="numba",
                                                                                     assignment="argmax")))
        times["routing balanced"].append(best_time(lambda: eff_attn.routing_attention(
            q, k, v, state=state, backend="numba", assignment="balanced")))
        times["exact"].append(best_time(lambda: eff_attn.exact_attention(q, k, v, backend="numba")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, t), color in zip(times.items(), COLORS):
        slope = np.polyfit(np.log(sizes[-3:]), np.log(t[-3:]), 1)[0]
        ax.loglog(sizes, t, "o-", color=color, label=f"{label} (slope {slope:.2f} over the last 3 N)")
    ax.set_xticks(sizes, [f"{n // 1024}k" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N (C = ceil(sqrt N))")
    ax.set_ylabel("seconds (best of 3)")
    ax.set_title(f"Numba, float32, D = 64, {heads} heads")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--skip-timing", action="store_true", help="leave routing-time.png as it is")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    circle_figure(out / "routing-circle.png")
    rows, dropped = clusters_figure(out / "routing-clusters.png")
    for label, r in rows.items():
        print(label, {key: np.round(val, 3).tolist() for key, val in r.items()})
    print("exact with 25% rows dropped", np.round(dropped, 3).tolist())
    kmeans_figure(out / "routing-kmeans.png")
    if not args.skip_timing:
        print({key: np.round(val, 4).tolist() for key, val in timing_figure(out / "routing-time.png").items()})


if __name__ == "__main__":
    main()
