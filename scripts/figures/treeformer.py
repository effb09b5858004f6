"""Figures of docs/methods/treeformer.md (seeded; about a minute on two CPU cores).

Writes
    docs/figures/treeformer-leaves.png   2-D leaves and splits before and after fit_tree
    docs/figures/treeformer-error.png    error vs height: untrained (random, PCA-median) vs fitted,
                                         fitted on one batch and evaluated on a held-out batch
    docs/figures/treeformer-time.png     Numba time vs n against exact attention

Run from the repository root: ``python scripts/figures/treeformer.py``.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.measure import best_time  # noqa: E402
from eff_attn.methods import treeformer as tfm  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parents[2] / "docs" / "figures"
SEED = 0


def exact(q, k, v):
    return eff_attn.attention(q, k, v, method="exact", backend="numpy")


def rel_error(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def planted_centres(seed, C=8, Dv=8):
    """Cluster centres and values of the spec's planted task (section 8.12)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(C, 8))
    mu *= 4 / np.linalg.norm(mu, axis=1, keepdims=True)
    return mu, rng.normal(size=(C, Dv))


def planted_batch(mu, nu, seed, n=256, D=16):
    """Tokens of the planted task around fixed centres: q near mu, k near mu plus 8 noise features."""
    rng = np.random.default_rng(seed)
    C = len(mu)
    cq, ck = rng.integers(0, C, n), rng.integers(0, C, n)
    q = np.zeros((n, D))
    q[:, :8] = mu[cq] + 0.5 * rng.normal(size=(n, 8))
    k = np.zeros((n, D))
    k[:, :8] = mu[ck] + 0.5 * rng.normal(size=(n, 8))
    k[:, 8:] = 3 * rng.normal(size=(n, D - 8))
    v = nu[ck] + 0.5 * rng.normal(size=(n, nu.shape[1]))
    return q, k, v


def leaves_figure():
    """A 2-D toy: four query/key clusters; the tree's leaves as background colours."""
    rng = np.random.default_rng(SEED)
    centres = np.array([[-2.0, 1.5], [1.8, 2.0], [2.2, -1.6], [-1.5, -2.2]])
    labels_q, labels_k = rng.integers(0, 4, 160), rng.integers(0, 4, 160)
    q = 1.8 * (centres[labels_q] + 0.55 * rng.standard_normal((160, 2)))
    k = 1.8 * (centres[labels_k] + 0.55 * rng.standard_normal((160, 2)))
    v = np.eye(4)[labels_k] + 0.1 * rng.standard_normal((160, 4))
    start = tfm.init_tree(2, 2, rng=SEED, q=q, k=k)
    fitted, history = tfm.fit_tree(start, q, k, v, variant="tf", steps=150, progress=False)
    ref = exact(q, k, v)
    grid = np.stack(np.meshgrid(np.linspace(-8, 8, 300), np.linspace(-8, 8, 300)), axis=-1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.6), sharey=True)
    for ax, tree, title in ((axes[0], start, "random splits, median-centred"), (axes[1], fitted, "after fit_tree (TF)")):
        out = eff_attn.attention(q, k, v, method="treeformer_tf", backend="numpy", state=tree)
        ax.imshow(tfm.route(grid, tree).reshape(300, 300), origin="lower", extent=(-8, 8, -8, 8), cmap="Pastel1",
                  vmin=0, vmax=8, interpolation="nearest")
        ax.scatter(*k.T, c=labels_k, cmap="Dark2", vmin=0, vmax=7, marker="o", s=14, label="keys")
        ax.scatter(*q.T, c=labels_q, cmap="Dark2", vmin=0, vmax=7, marker="x", s=18, label="queries")
        ax.set_title(f"{title}\nTF error vs exact {rel_error(out, ref):.2f}")
        ax.set_xlim(-8, 8)
        ax.set_ylim(-8, 8)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Height-2 tree on 2-D data: background = leaf, colour = cluster")
    fig.tight_layout()
    fig.savefig(OUT / "treeformer-leaves.png", dpi=110)
    plt.close(fig)
    print(f"leaves: loss {history.loss[0]:.3f} -> {history.best_loss:.3f}")


def error_figure():
    """Held-out error vs height on the planted task: untrained trees vs trees fitted on another batch."""
    mu, nu = planted_centres(SEED)
    train, test = planted_batch(mu, nu, seed=1), planted_batch(mu, nu, seed=2)
    ref = exact(*test)
    uniform = rel_error(np.broadcast_to(test[2].mean(0), ref.shape), ref)
    heights = range(1, 7)
    rows = {}
    for variant in ("tf", "tc"):
        method = f"treeformer_{variant}"
        for h in heights:
            random_tree = tfm.init_tree(16, h, rng=SEED, q=train[0], k=train[1])
            pca_tree = tfm.init_tree_pca(train[0], train[1], h)
            fitted, _ = tfm.fit_tree(pca_tree, *train, variant=variant, progress=False)
            for label, tree in (("random", random_tree), ("pca_median", pca_tree), ("fitted", fitted)):
                out = eff_attn.attention(*test, method=method, backend="numpy", state=tree)
                rows.setdefault((variant, label), []).append(rel_error(out, ref))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4), sharey=True)
    styles = {"random": ("tab:gray", ":"), "pca_median": ("tab:blue", "--"), "fitted": ("tab:red", "-")}
    for ax, variant in zip(axes, ("tf", "tc")):
        for label, (colour, dash) in styles.items():
            ax.plot(list(heights), rows[(variant, label)], dash, marker="o", color=colour,
                    label=label if label != "fitted" else "fitted (on another batch)")
        ax.axhline(uniform, color="k", lw=0.8)
        ax.text(1, uniform * 1.02, "mean(v)", fontsize=8)
        ax.set_title(f"treeformer_{variant}")
        ax.set_xlabel("height h (2**h leaves)")
    axes[0].set_ylabel("rel. Frobenius error vs exact (held-out batch)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Planted clusters, n = 256, D = 16: what training buys")
    fig.tight_layout()
    fig.savefig(OUT / "treeformer-error.png", dpi=110)
    plt.close(fig)
    for key, values in rows.items():
        print("error", key, " ".join(f"{e:.3f}" for e in values))
    print(f"error uniform {uniform:.3f}")


def time_figure():
    """Numba forward time vs n, float32, D = 64, 8 heads, default height (leaves of ~64 keys)."""
    from eff_attn.bench.problems import clustered

    ns = [512, 1024, 2048, 4096]
    times = {"exact": [], "treeformer_tf": [], "treeformer_tc": []}
    for n in ns:
        problem = clustered(n, d=64, heads=8, seed=SEED)
        q, k, v = problem.astype(np.float32)
        tree = tfm.init_tree_pca(problem.q, problem.k, tfm.default_height(n), tree_shape=(8,))
        times["exact"].append(best_time(lambda: eff_attn.attention(q, k, v, method="exact", backend="numba")))
        for method in ("treeformer_tf", "treeformer_tc"):
            times[method].append(best_time(lambda: eff_attn.attention(q, k, v, method=method, backend="numba",
                                                                      state=tree)))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, values in times.items():
        ax.loglog(ns, values, marker="o", label=method)
    ax.set_xlabel("n = Nq = Nk")
    ax.set_ylabel("seconds (best of 3, Numba, 2 shared cores)")
    ax.set_title("float32, D = 64, 8 heads, h = floor(log2(n / 64))")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "treeformer-time.png", dpi=110)
    plt.close(fig)
    for method, values in times.items():
        print("time", method, " ".join(f"{t * 1e3:.1f}ms" for t in values))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    leaves_figure()
    error_figure()
    time_figure()
