"""Figures and tables of docs/methods/sparsefinder.md (seeded; about a minute on two cores).

- ``sparsefinder-pareto.png``: recall of the 1.5-entmax gold graph against the
  sparsity of the predicted graph, per predictor (k-means over
  ``num_clusters x top_clusters``, distance over calibrated thresholds,
  quantization over ``bucket_size``), with learned (solid) and untrained
  (dashed) projections, beside a plain local window; on the ``clustered`` and
  ``peaked`` benchmark regimes. The grey line is the gold graph's own
  sparsity: no graph with recall 1 is sparser.
- ``sparsefinder-groups.png``: k-means cells and quantization bands of one
  head in a learned 2-d projection.
- ``sparsefinder-time.png``: wall time of Sparsefinder (k-means defaults),
  dense entmax and exact softmax on the Numba backend against N.

It also prints the recall/sparsity table and the timings shown on the page.
Run: ``python scripts/figures/sparsefinder.py`` (writes into docs/figures/).
Timings depend on the machine and its load.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench import problems  # noqa: E402
from eff_attn.methods import sparsefinder as sf  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"
N, HEADS, D = 256, 4, 64
S_TRAIN, S_TEST = 24, 8


def sequences(regime: str, seed: int = 0):
    """q, k of shape (S, H, N, D): train and test sequences of one regime.

    ``clustered`` shares its centres across sequences (one long draw, cut into
    pieces); ``peaked`` has none to share, so each sequence is its own draw.
    """
    S = S_TRAIN + S_TEST
    if regime == "clustered":
        p = problems.clustered(N * S, d=D, heads=HEADS, seed=seed)
        cut = lambda x: np.moveaxis(x.reshape(HEADS, S, N, D), 1, 0)  # noqa: E731
        q, k = cut(p.q), cut(p.k)
    else:
        draws = [problems.peaked(N, d=D, heads=HEADS, seed=seed + s) for s in range(S)]
        q, k = np.stack([p.q for p in draws]), np.stack([p.k for p in draws])
    return (q[:S_TRAIN], k[:S_TRAIN]), (q[S_TRAIN:], k[S_TRAIN:])


def sweep(state, train, test, gold):
    """(predictor, [(sparsity, recall, label)]) for every budget of every predictor."""
    (q_tr, k_tr), (q_te, k_te) = train, test
    score = lambda graph: sf.graph_metrics(graph, gold)  # noqa: E731
    rows = {"kmeans": [], "distance": [], "quantize": []}
    for K in (2, 4, 8, 16, 20):
        fitted = sf.fit_centroids(state, q_tr, k_tr, num_clusters=K, rng=0)
        for t in (1, 2):
            m = score(sf.predict_graph(fitted, q_te, k_te, top_clusters=t, window=None))
            rows["kmeans"].append((m["sparsity"], m["recall"], f"K={K}, t={t}"))
    for target in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        fitted = sf.fit_threshold(state, q_tr, k_tr, target_recall=target)
        m = score(sf.predict_graph(fitted, q_te, k_te, predictor="distance", window=None))
        rows["distance"].append((m["sparsity"], m["recall"], f"target {target}"))
    for B in (2, 4, 8, 12, 16, 20):
        m = score(sf.predict_graph(state, q_te, k_te, predictor="quantize", bucket_size=B, window=None))
        rows["quantize"].append((m["sparsity"], m["recall"], f"B={B}"))
    return rows


def window_baseline(test, gold):
    q_te, k_te = test
    return [(m["sparsity"], m["recall"], f"w={w}") for w in (1, 2, 4, 8, 16, 32, 64)
            for m in [sf.graph_metrics(sf.predict_graph(None, q_te, k_te, predictor="none", window=w), gold)]]


def pareto_figure():
    colors = {"kmeans": "C0", "distance": "C1", "quantize": "C2"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    tables = {}
    for ax, regime in zip(axes, ("clustered", "peaked")):
        train, test = sequences(regime)
        gold = sf.gold_graph(*test)
        learned, history = sf.fit_sparsefinder(*train, r=4, epochs=3, rng=0)        # the paper's r, 6 steps
        untrained = sf.init_sparsefinder(D, head_shape=(HEADS,), rng=0)
        untrained = sf.fit_projections(untrained, *train, epochs=0)[0]            # records alpha and scale only
        for state, style, name in ((learned, "-", "learned"), (untrained, "--", "untrained")):
            rows = sweep(state, train, test, gold)
            tables[(regime, name)] = rows
            for predictor, points in rows.items():
                points = sorted(points)
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3,
                        color=colors[predictor], label=f"{predictor} ({name})")
        local = window_baseline(test, gold)
        tables[(regime, "window")] = {"window": local}
        ax.plot([p[0] for p in local], [p[1] for p in local], ":", marker="s", ms=3, color="k", label="local window")
        gold_sparsity = sf.graph_metrics(gold, gold)["sparsity"]
        ax.axvline(gold_sparsity, color="0.6", lw=1)
        ax.set_xlabel("sparsity of the predicted graph")
        ax.set_ylabel("recall of the entmax support")
        ax.set_title(f"{regime} (n={N}, {HEADS} heads, D={D}); loss {history['loss'][0].mean():.2f} -> "
                     f"{history['loss'][-1].mean():.2f}", fontsize=9)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(OUT / "sparsefinder-pareto.png", dpi=130)
    plt.close(fig)
    return tables


def groups_figure():
    """k-means cells and quantization bands of one head in a learned r = 2 projection."""
    from eff_attn.methods.sparsefinder.graph import cluster_ids

    train, test = sequences("clustered")
    (q_tr, k_tr), (q_te, k_te) = train, test
    state, _ = sf.fit_sparsefinder(q_tr[:, :1], k_tr[:, :1], r=2, num_clusters=6, rng=0)
    qp = q_te[0, 0] @ state.w_q[0].T + state.b_q[0]                               # (N, 2)
    kp = k_te[0, 0] @ state.w_k[0].T + state.b_k[0]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    lo, hi = np.minimum(qp.min(0), kp.min(0)) - 0.5, np.maximum(qp.max(0), kp.max(0)) + 0.5
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    grid = np.stack([gx.ravel(), gy.ravel()], -1)[None]                            # (1, M, 2)
    cells = cluster_ids(grid, state.centroids[:, :1], 1)[0, :, 0, 0].reshape(gx.shape)
    ax.contourf(gx, gy, cells, levels=np.arange(9) - 0.5, cmap="Dark2", vmin=0, vmax=7, alpha=0.15)
    for pts, marker, name in ((qp, "o", "queries"), (kp, "x", "keys")):
        ids = cluster_ids(pts[None], state.centroids[:, :1], 1)[0, :, 0, 0]
        ax.scatter(pts[:, 0], pts[:, 1], c=ids, cmap="Dark2", vmin=0, vmax=7, marker=marker, s=14, label=name)
    ax.scatter(*state.centroids[0, 0].T, c="k", marker="*", s=120, label="centroids")
    ax.set_title("k-means (K=6, t=1): attend within your cell", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    B = 32
    ax2.scatter(qp[:, 0], qp[:, 1], marker="o", s=14, color="C0", label="queries")
    ax2.scatter(kp[:, 0], kp[:, 1], marker="x", s=14, color="C3", label="keys")
    for c, line in ((0, ax2.axvline), (1, ax2.axhline)):
        for cut in np.sort(kp[:, c])[B::B]:
            line(cut, color="C3", lw=0.6, alpha=0.6)
    ax2.set_title(f"quantize (B={B} keys per bucket): key buckets per coordinate", fontsize=9)
    ax2.legend(fontsize=7, loc="lower right")
    for a in (ax, ax2):
        a.set_xlabel("q'_0, k'_0")
        a.set_ylabel("q'_1, k'_1")
    fig.tight_layout()
    fig.savefig(OUT / "sparsefinder-groups.png", dpi=130)
    plt.close(fig)


def best(fn, *args, repeats=3, **kw):
    fn(*args, **kw)                                                              # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_figure():
    train, _ = sequences("clustered")
    state, _ = sf.fit_sparsefinder(*train, r=4, epochs=3, rng=0)
    sizes = [512, 1024, 2048, 4096, 8192]
    results = {"sparsefinder (kmeans, K=16, t=1, w=5)": [], "dense entmax (sort)": [], "exact softmax": []}
    for n in sizes:
        p = problems.clustered(n, d=D, heads=HEADS, seed=0)                       # same centres as the training draw
        q, k, v = p.astype(np.float32)
        results["sparsefinder (kmeans, K=16, t=1, w=5)"].append(
            best(eff_attn.sparsefinder_attention, q, k, v, state=state, predictor="kmeans", backend="numba"))
        results["dense entmax (sort)"].append(best(eff_attn.entmax_attention, q, k, v, backend="numba"))
        results["exact softmax"].append(best(eff_attn.exact_attention, q, k, v, backend="numba"))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, times in results.items():
        ax.plot(sizes, times, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (= Nq = Nk)")
    ax.set_ylabel("seconds (median of 3)")
    ax.set_title(f"Numba, float32, {HEADS} heads, D={D}, clustered inputs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "sparsefinder-time.png", dpi=130)
    plt.close(fig)
    return sizes, results


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    groups_figure()
    tables = pareto_figure()
    for (regime, name), rows in tables.items():
        for predictor, points in rows.items():
            cells = ", ".join(f"{label}: {s:.3f}/{r:.3f}" for s, r, label in sorted(points))
            print(f"{regime:9s} {name:9s} {predictor:8s} (sparsity/recall) {cells}")
    sizes, results = time_figure()
    for name, times in results.items():
        print(f"{name:40s}", "  ".join(f"N={n}: {t * 1e3:8.1f} ms" for n, t in zip(sizes, times)))
