"""Figures of docs/methods/nystrom.md: error against m, and the pseudo-inverse residual.

Seeded and CPU-only (about a minute on two shared cores)::

    python scripts/figures/nystrom.py

writes ``docs/figures/nystrom-error.png`` and ``docs/figures/nystrom-residual.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.problems import clustered, gaussian, peaked  # noqa: E402
from eff_attn.metrics import rel_frobenius  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"
N, D, HEADS = 512, 64, 4
LANDMARKS = (4, 8, 16, 32, 64, 128, 256)
PROBLEMS = {
    "gaussian": gaussian(N, d=D, heads=HEADS, seed=0),
    "clustered": clustered(N, d=D, heads=HEADS, seed=0),
    "peaked": peaked(N, d=D, heads=HEADS, seed=0),
}


def error_against_landmarks(ax):
    for (name, p), color in zip(PROBLEMS.items(), ("C0", "C1", "C2")):
        exact = eff_attn.attention(p.q, p.k, p.v, method="exact", backend="numpy")
        uniform = np.median(rel_frobenius(eff_attn.uniform_attention(p.q, p.k, p.v), exact))
        ax.axhline(uniform, color=color, lw=0.8, ls=":")
        for pinv, style in (("iterative", "-"), ("exact", "--")):
            errors = [np.median(rel_frobenius(
                eff_attn.nystrom_attention(p.q, p.k, p.v, backend="numpy", num_landmarks=m, pinv=pinv), exact))
                for m in LANDMARKS]
            ax.plot(LANDMARKS, errors, style, marker="o", color=color, label=f"{name}, pinv={pinv}")
    ax.set(xscale="log", yscale="log", xlabel="landmarks m", ylabel="relative Frobenius error (median of heads)",
           title=f"Nystrom error against m (N={N}, D={D}); dotted: uniform attention")
    ax.set_xticks(LANDMARKS, [str(m) for m in LANDMARKS])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def residual_against_iterations(ax):
    iterations = range(0, 25)
    for (name, p), color in zip(PROBLEMS.items(), ("C0", "C1", "C2")):
        for m, style in ((16, ":"), (64, "-")):
            residuals = [eff_attn.nystrom_attention(p.q, p.k, p.v, backend="numpy", num_landmarks=m, pinv_iters=t,
                                                    return_info=True)[1]["pinv_residual"] for t in iterations]
            ax.plot(iterations, np.maximum(residuals, 1e-17), style, marker=".", color=color, label=f"{name}, m={m}")
    ax.axvline(6, color="grey", lw=0.8)
    ax.text(6.3, 0.02, "default: 6", color="grey", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set(yscale="log", xlabel="pseudo-inverse iterations", ylabel="max ||AZA - A||_F / ||A||_F",
           title="Residual of the iterative pseudo-inverse")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("error", error_against_landmarks), ("residual", residual_against_iterations)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        fig.tight_layout()
        fig.savefig(OUT / f"nystrom-{name}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
