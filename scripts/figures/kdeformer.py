"""Figures of docs/methods/kdeformer.md, seeded: ``python scripts/figures/kdeformer.py``.

Writes ``docs/figures/kdeformer-*.png``:

- ``kdeformer-pipeline.png``: the steps of the estimator;
- ``kdeformer-blocks.png``: an attention matrix before and after the bucket
  sort, with the diagonal blocks and the sampled columns outlined;
- ``kdeformer-order.png``: the bucket visiting orders ``"gray"`` and
  ``"official"`` for r = 4 bits;
- ``kdeformer-error-vs-budget.png``: spectral error against the budget in
  pairs per query (log-log) on a peaked and a diffuse regime, against
  Performer and Nystrom at equal budget when those methods are registered
  (otherwise against the uniform baseline only);
- ``kdeformer-time.png``: Numba wall time against N, KDEformer vs exact.

About 100 s of CPU time (measured), so under two minutes on two unloaded cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.measure import best_time  # noqa: E402
from eff_attn.bench import problems  # noqa: E402
from eff_attn.methods import kdeformer as kde  # noqa: E402
from eff_attn.metrics import spectral_error  # noqa: E402
from eff_attn.registry import METHOD_MODULES, get_method  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"
SEED = 0
#: Budgets ``f``: KDEformer runs ``b = f/2`` and ``m = f``, i.e. ``1.5 f`` key pairs per query.
BUDGETS = (16, 32, 64, 128, 256)
#: Methods compared at equal pairs per query when they are registered.
RIVALS = ("performer", "nystrom")


def pipeline():
    fig, ax = plt.subplots(figsize=(10.5, 2.6))
    ax.set_xlim(0, 10.2)
    ax.set_ylim(0, 2.6)
    ax.axis("off")
    steps = [  # (x, y, width, height, text)
        (0.1, 1.4, 1.4, 0.8, "q, k, v\n(per slice)"),
        (1.9, 1.4, 1.6, 0.8, "hash: r shared\nhyperplanes\nc = Σ 2ᵗ[gₜ·x > 0]"),
        (3.9, 1.4, 1.6, 0.8, "sort q and kept k\nby Gray rank\n(key·N + index)"),
        (5.9, 1.9, 1.9, 0.6, "exact softmax in\n⌈n/b⌉ diagonal blocks"),
        (5.9, 0.2, 1.9, 0.8, "m shared samples\nj ~ p, weight 1/(m pⱼ)\n(own block dropped)"),
        (8.2, 1.1, 1.8, 0.8, "merge on one shift μ\nout = N[:Dv] / N[Dv]\n(ones column)"),
    ]
    for x, y, w, h, text in steps:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", fc="#e8eaf6", ec="#3949ab"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8)
    arrow = dict(arrowstyle="->", color="#3949ab")
    for (x0, y0), (x1, y1) in [((1.55, 1.8), (1.85, 1.8)), ((3.55, 1.8), (3.85, 1.8)),
                               ((5.55, 1.9), (5.85, 2.2)), ((5.55, 1.6), (5.85, 0.6)),
                               ((7.85, 2.2), (8.15, 1.7)), ((7.85, 0.6), (8.15, 1.2))]:
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=arrow)
    fig.savefig(OUT / "kdeformer-pipeline.png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def blocks():
    p = problems.clustered(256, d=32, heads=1, clusters=8, seed=SEED)
    q, k, v = p.q, p.k, p.v
    b, m = 32, 24
    _, info = eff_attn.kdeformer_attention(q, k, v, rng=SEED, block_size=b, num_samples=m, return_info=True,
                                           backend="numpy")
    s = q[0] @ k[0].T / np.sqrt(q.shape[-1])
    P = np.exp(s - s.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    qo = np.lexsort((np.arange(256), info["q_block"][0]))
    ko = np.lexsort((np.arange(256), info["k_block"][0]))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.9))
    for ax, mat, title in ((axes[0], P, "exact attention, original order"),
                           (axes[1], P[qo][:, ko], "rows and columns sorted by bucket")):
        ax.imshow(np.log10(mat + 1e-6), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    qb, kb = np.sort(info["q_block"][0]), np.sort(info["k_block"][0])
    for u in range(int(info["n_blocks"][0])):
        rows, cols = np.flatnonzero(qb == u), np.flatnonzero(kb == u)
        if rows.size:
            axes[1].add_patch(Rectangle((cols[0] - 0.5, rows[0] - 0.5), cols.size, rows.size, fill=False,
                                        ec="cyan", lw=1.2))
    rank = np.argsort(ko)
    for j in np.unique(info["sample_idx"][0]):
        axes[1].axvline(rank[j], color="lime", lw=0.5, alpha=0.7)
    fig.suptitle(f"clustered inputs, N=256: diagonal blocks b={b} (cyan), m={m} sampled keys (green); "
                 "colour = log10 attention weight", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "kdeformer-blocks.png", dpi=90)
    plt.close(fig)


def orders():
    r = 4
    codes = np.arange(1 << r)
    fig, axes = plt.subplots(2, 1, figsize=(8, 3.2))
    for ax, order in zip(axes, ("gray", "official")):
        key = kde.gray_rank(codes) if order == "gray" else kde.gray_code(codes)
        seq = codes[np.argsort(key)]
        bits = (seq[None, :] >> np.arange(r)[:, None]) & 1
        ax.imshow(bits, cmap="Greys", vmin=0, vmax=1.4, aspect="auto")
        flips = [bin(a ^ c).count("1") for a, c in zip(seq[:-1], seq[1:])]
        for t, c in enumerate(seq):
            ax.text(t, -0.9, str(c), ha="center", fontsize=7)
        ax.set_yticks(range(r), [f"bit {t}" for t in range(r)], fontsize=7)
        ax.set_xticks([])
        ax.set_title(f'order="{order}": bucket visited at each step; bits flipped between neighbours: '
                     f"{flips.count(1)}/{len(flips)} single, max {max(flips)}", fontsize=8.5, pad=14)
    fig.tight_layout()
    fig.savefig(OUT / "kdeformer-order.png", dpi=130)
    plt.close(fig)


def _rivals():
    found = {}
    for name in RIVALS:
        if name in METHOD_MODULES:
            method = get_method(name)
            if method.budget_name:
                found[name] = method.budget_name
    return found


def error_vs_budget(n=1024, heads=4, seeds=3):
    regimes = {
        "peaked (near one-hot rows)": problems.peaked(n, d=64, heads=heads, seed=SEED),
        "clustered keys": problems.clustered(n, d=64, heads=heads, seed=SEED),
        "diffuse (Gaussian)": problems.gaussian(n, d=64, heads=heads, seed=SEED),
    }
    try:
        regimes["real heads"] = problems.real_heads(n=n, max_heads=heads)
    except (FileNotFoundError, ValueError):
        pass
    rivals = _rivals()
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.4 * len(regimes), 4.0), sharey=True)
    for ax, (title, p) in zip(np.atleast_1d(axes), regimes.items()):
        ref = eff_attn.attention(p.q, p.k, p.v, method="exact", backend="numpy")
        pairs = [int(1.5 * f) for f in BUDGETS]
        curves = {
            "kdeformer (b=f/2, m=f)": [dict(block_size=f // 2, num_samples=f) for f in BUDGETS],
            "LSH-only (m=0, b=1.5f)": [dict(block_size=int(1.5 * f), num_samples=0) for f in BUDGETS],
            "sampling only (r=0, b=1, uniform p)": [dict(num_bits=0, block_size=1, num_samples=int(1.5 * f) - 1,
                                                     probs="uniform") for f in BUDGETS],
        }
        for label, settings in curves.items():
            err = [np.mean([spectral_error(eff_attn.attention(p.q, p.k, p.v, method="kdeformer", rng=s, **kw),
                                           ref).mean for s in range(seeds)]) for kw in settings]
            ax.loglog(pairs, err, "o-", label=label)
        for name, param in rivals.items():
            err = [np.mean([spectral_error(eff_attn.attention(p.q, p.k, p.v, method=name, rng=s,
                                                              **{param: min(budget, n)}), ref).mean
                            for s in range(seeds)]) for budget in pairs]
            ax.loglog(pairs, err, "s--", label=f"{name} ({param} = pairs)")
        base = spectral_error(eff_attn.attention(p.q, p.k, p.v, method="uniform"), ref).mean
        ax.axhline(base, color="grey", ls=":", label="uniform (mean of v)")
        ax.set_title(f"{title}, N={n}", fontsize=10)
        ax.set_xlabel("key pairs per query")
        ax.set_xticks(pairs, [str(x) for x in pairs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("spectral error ‖Ŷ−Y‖₂ / ‖Y‖₂ (mean of heads, seeds)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "kdeformer-error-vs-budget.png", dpi=120)
    plt.close(fig)


def timing(sizes=(512, 1024, 2048, 4096, 8192)):
    rows = {"kdeformer (numba, b=64, m=128)": [], "exact (numba)": []}
    for n in sizes:
        q, k, v = problems.gaussian(n, d=64, heads=8, seed=SEED).astype(np.float32)
        reps = 3 if n <= 2048 else 1
        rows["kdeformer (numba, b=64, m=128)"].append(
            best_time(lambda: eff_attn.attention(q, k, v, method="kdeformer", backend="numba", rng=0), reps))
        rows["exact (numba)"].append(best_time(lambda: eff_attn.attention(q, k, v, backend="numba"), reps))
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for label, t in rows.items():
        ax.loglog(sizes, t, "o-", label=label)
    ax.set_xlabel("N (8 heads, D = Dv = 64, float32)")
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("seconds per call (best of runs)")
    ax.set_title("CPU wall time (2 shared cores; indicative)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "kdeformer-time.png", dpi=120)
    plt.close(fig)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-timing", action="store_true", help="keep the committed time figure")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    pipeline()
    blocks()
    orders()
    error_vs_budget()
    if not args.skip_timing:
        print(timing())


if __name__ == "__main__":
    main()
