"""Figures of docs/methods/entmax.md (seeded; about 10 s on two cores).

- ``entmax-alpha.png``: one row's alpha-entmax as alpha goes from 1 (softmax)
  to 2.5, entry by entry, with the support size.
- ``entmax-support.png``: mean support of 1.5-entmax and sparsemax over
  Gaussian rows, against the row length n, for three spreads sigma.

Run: ``python scripts/figures/entmax.py`` (writes into docs/figures/).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"


def alpha_figure():
    z = np.array([1.6, 1.2, 0.9, 0.4, -0.1, -0.8])
    alphas = np.linspace(1.0, 2.5, 151)
    p = np.stack([eff_attn.entmax_bisect(z, a, backend="numpy") for a in alphas])     # (A, n)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1]})
    for j in range(z.size):
        ax.plot(alphas, p[:, j], label=f"z = {z[j]:+.1f}")
    for a, name in ((1.0, "softmax"), (1.5, "entmax15"), (2.0, "sparsemax")):
        ax.axvline(a, color="0.8", lw=0.8, zorder=0)
        ax.text(a, 0.62, name, rotation=90, va="top", ha="right", fontsize=8, color="0.4")
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel(r"$\mathrm{entmax}_\alpha(z)_j$")
    ax.set_title("one row, every entry")
    ax.legend(fontsize=7, ncol=2)
    ax2.plot(alphas, (p > 0).sum(-1), color="k")
    ax2.set_xlabel(r"$\alpha$")
    ax2.set_ylabel("support size")
    ax2.set_title("exact zeros for alpha > 1")
    fig.tight_layout()
    fig.savefig(OUT / "entmax-alpha.png", dpi=130)
    plt.close(fig)


def support_figure():
    rng = np.random.default_rng(0)
    ns = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for sigma, color in ((0.5, "C0"), (1.0, "C1"), (2.0, "C2")):
        for fn, style, name in ((eff_attn.entmax15, "-", "entmax15"), (eff_attn.sparsemax, "--", "sparsemax")):
            means = []
            for n in ns:
                _, info = fn(sigma * rng.standard_normal((200, n)), backend="numpy", return_info=True)
                means.append(info["support_size"].mean())
            ax.plot(ns, means, style, color=color, marker="o", ms=3, label=f"{name}, sigma={sigma}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("row length n")
    ax.set_ylabel("mean support size")
    ax.set_title("support of N(0, sigma^2) rows (200 rows per point)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT / "entmax-support.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    alpha_figure()
    support_figure()
    print("wrote", OUT / "entmax-alpha.png", OUT / "entmax-support.png")
