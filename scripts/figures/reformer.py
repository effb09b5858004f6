"""Figures of docs/methods/reformer.md: collision probability against angle, error against rounds.

Seeded and CPU-only (well under a minute on two cores)::

    python scripts/figures/reformer.py

writes ``docs/figures/reformer-collisions.png`` and ``docs/figures/reformer-error.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.problems import clustered, gaussian, peaked  # noqa: E402
from eff_attn.methods.reformer import default_num_buckets, draw_reformer_rotations, hash_buckets  # noqa: E402
from eff_attn.metrics import rel_frobenius  # noqa: E402

OUT = Path(__file__).resolve().parents[2] / "docs" / "figures"


def collisions_against_angle(ax, D=64, draws=4000):
    angles = np.linspace(0, np.pi, 37)
    e0, e1 = np.eye(D)[0], np.eye(D)[1]
    x = np.stack([e0] + [np.cos(a) * e0 + np.sin(a) * e1 for a in angles])[None]       # (1, 1 + A, D)
    for b, color in zip((2, 8, 32, 128), ("C0", "C1", "C2", "C3")):
        h = hash_buckets(x, draw_reformer_rotations(b, draws, D, b), b)[:, 0]         # (draws, 1 + A)
        rate = (h[:, 1:] == h[:, :1]).mean(axis=0)
        ax.plot(angles, rate, marker=".", color=color, label=f"b = {b}")
    ax.plot(angles, 1 - angles / np.pi, "k--", lw=0.8, label=r"$1-\theta/\pi$ (b = 2, exact)")
    ax.set(xlabel="angle between x and y (radians)", ylabel="P[h(x) = h(y)]",
           title=f"Angular LSH collision rate ({draws} rotations, D={D})")
    ax.set_xticks([0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi], ["0", "π/4", "π/2", "3π/4", "π"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def error_against_rounds(ax, N=512, D=64, heads=4, chunk=32, seeds=4):
    rounds = (1, 2, 4, 8, 16)
    problems = {"gaussian": gaussian, "clustered": clustered, "peaked": peaked}
    b = default_num_buckets(N, chunk)
    for (name, make), color in zip(problems.items(), ("C0", "C1", "C2")):
        p = make(N, d=D, heads=heads, seed=0)
        exact = eff_attn.attention(p.q, p.k, p.v, method="exact", backend="numpy")
        ax.axhline(np.median(rel_frobenius(eff_attn.uniform_attention(p.q, p.k, p.v), exact)), color=color, lw=0.8,
                   ls=":")
        for dedup, style in ((True, "-"), (False, "--")):
            errors = np.zeros((seeds, len(rounds)))
            for seed in range(seeds):
                rotations = draw_reformer_rotations(seed, max(rounds), D, b)
                for t, r in enumerate(rounds):
                    out = eff_attn.reformer_attention(p.q, p.k, p.v, backend="numpy", chunk_size=chunk, dedup=dedup,
                                                      rotations=rotations[:r])
                    errors[seed, t] = np.median(rel_frobenius(out, exact))
            ax.plot(rounds, errors.mean(axis=0), style, marker="o", color=color, label=f"{name}, dedup={dedup}")
    ax.set(xscale="log", yscale="log", xlabel="rounds n_h", ylabel="relative Frobenius error (mean of seeds)",
           title=f"Reformer error against rounds (N={N}, c={chunk}, b={b}); dotted: uniform")
    ax.set_xticks(rounds, [str(r) for r in rounds])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("collisions", collisions_against_angle), ("error", error_against_rounds)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        fig.tight_layout()
        fig.savefig(OUT / f"reformer-{name}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
