"""Figures of docs/methods/performer.md: error against m (iid and ORF), eps bias against input norm.

Seeded and CPU-only; under a minute on two cores::

    python scripts/figures/performer.py      # writes docs/figures/performer-*.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.problems import clustered  # noqa: E402
from eff_attn.methods.performer import draw_performer_features  # noqa: E402
from eff_attn.metrics import rel_frobenius  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"
SEEDS = range(8)


def error_against_features(n=256):
    sizes = [16, 32, 64, 128, 256, 512, 1024]
    regimes = [("|x~| ~ 1 (clustered, strength 1)", 1.0), ("|x~| ~ 3 (clustered, strength 3)", 3.0)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (title, strength) in zip(axes, regimes):
        p = clustered(n, d=64, heads=4, strength=strength, seed=1)
        exact = eff_attn.attention(p.q, p.k, p.v, method="exact")
        for orthogonal, label in ((False, "iid"), (True, "orthogonal (ORF, chi norms)")):
            runs = np.array([[rel_frobenius(eff_attn.performer_attention(p.q, p.k, p.v, backend="numba",
                                                                      num_features=m, orthogonal=orthogonal,
                                                                      rng=1000 + s), exact).mean()
                              for s in SEEDS] for m in sizes])                 # (sizes, seeds)
            mean = runs.mean(axis=1)
            ax.plot(sizes, mean, marker="o", label=label)
            ax.fill_between(sizes, runs.min(axis=1), runs.max(axis=1), alpha=0.2)
        ref = mean[0] * np.sqrt(sizes[0] / np.array(sizes))
        ax.plot(sizes, ref, color="gray", ls="--", lw=0.8, label="slope m^(-1/2)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of features m")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("relative Frobenius error vs exact")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FAVOR+, N = {n}, D = 64, 4 heads: mean and range over 8 draws", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "performer-error-vs-m.png", dpi=120)


def eps_bias_against_norm(n=256, D=64, m=256):
    norms = [0.5, 1, 2, 3, 4, 5, 6]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4, n, D)) for _ in range(3))
    unit_q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    unit_k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    omega = draw_performer_features(7, m, D)
    curves = {f"eps = {eps:g}": [] for eps in (1e-6, 1e-4, 1e-2)}
    curves["eps = 0, float32"] = []
    for r in norms:
        qr, kr = r * unit_q, r * unit_k                                         # |x~| = r at scale 1
        kw = dict(features=omega, scale=1.0, backend="numba")
        unbiased = eff_attn.performer_attention(qr, kr, v, **kw)               # eps = 0, float64: the estimate
        for eps in (1e-6, 1e-4, 1e-2):
            curves[f"eps = {eps:g}"].append(rel_frobenius(eff_attn.performer_attention(qr, kr, v, eps=eps, **kw),
                                                          unbiased).mean())
        single = eff_attn.performer_attention(*(a.astype(np.float32) for a in (qr, kr, v)), **kw)
        curves["eps = 0, float32"].append(rel_frobenius(single, unbiased).mean())
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, errs in curves.items():
        ax.plot(norms, np.maximum(errs, 1e-12), marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("input norm |x~| = sqrt(s) |x| (queries and keys)")
    ax.set_ylabel("relative error vs the eps = 0 float64 estimate")
    ax.set_title(f"bias of eps added after the shift (m = {m}, D = {D}, same features)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "performer-eps-bias.png", dpi=120)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    error_against_features()
    eps_bias_against_norm()
