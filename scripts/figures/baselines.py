"""Figure of docs/methods/baselines.md: exact softmax mass kept by the top-k keys.

For each input regime (N=512, 8 heads; real heads at D=32, the others at D=64), the
median over rows of ``info["mass_kept"]`` of ``topk_oracle`` against k. Seeded.

Run: ``python scripts/figures/baselines.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eff_attn  # noqa: E402
from eff_attn.bench.problems import make_problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N, HEADS = 512, 8
KS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def main():
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime in ("gaussian", "clustered", "peaked", "real"):
        try:
            problem = make_problem(regime, N, d=64, heads=HEADS, seed=0)
        except FileNotFoundError:
            continue
        masses = []
        for k in KS:
            _, info = eff_attn.topk_oracle_attention(problem.q, problem.k, problem.v, topk=k, return_info=True,
                                                     backend="numpy")
            masses.append(np.median(info["mass_kept"]))
        ax.plot(KS, masses, marker="o", label=f"{regime} (D={problem.q.shape[-1]})")
    ax.set(xscale="log", xlabel="k (keys kept per query)", ylabel="median softmax mass kept",
           title=f"top-k oracle, N={N}, {HEADS} heads", ylim=(0, 1.02))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "figures" / "baselines-mass-kept.png", dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
