"""Figures of docs/methods/exact.md (seeded, reproducible).

1. ``exact-alignment.png``: the visible pairs of bottom-right and top-left causal
   attention for Nq=3, Nk=5, computed by ``eff_attn.masks.visible_pairs``.
2. ``exact-time-memory.png``: warm time and peak memory against N per backend, read
   from the committed benchmark ``benchmarks/cpu/exact/results.json`` (regenerate it
   with the command recorded in that file).

Run: ``python scripts/figures/exact.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eff_attn.masks import causal_offset, visible_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "figures"


def alignment():
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 2.6))
    for ax, (label, causal) in zip(axes, [("causal=True (bottom-right)", True), ('causal="top_left"', "top_left")]):
        vis = visible_pairs(None, causal_offset(causal, 3, 5), 3, 5)
        ax.imshow(vis, cmap="Blues", vmin=0, vmax=1.4)
        for i in range(3):
            for j in range(5):
                ax.text(j, i, "✓" if vis[i, j] else "", ha="center", va="center", fontsize=11)
        ax.set_xticks(range(5), [f"k{j}" for j in range(5)])
        ax.set_yticks(range(3), [f"q{i}" for i in range(3)])
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(FIGURES / "exact-alignment.png", dpi=130)
    plt.close(fig)


def time_memory_figure(data):
    """Warm time and peak memory against N per backend, from a ``results.json`` payload.

    The x axis is log base 2 with one labelled tick per measured N (plain integers, no
    minor tick labels), so the labels cannot run into each other.
    """
    rows = data["rows"]
    series = {}
    for r in rows:
        label = "torch SDPA" if r["method"] == "sdpa" else f"{r['backend']} {r['budget']}"
        series.setdefault(label, []).append((r["n"], r["warm_ms"], r["peak_mb"]))
    sizes = sorted({r["n"] for r in rows})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for label, points in sorted(series.items()):
        n, t, m = np.array(sorted(points)).T
        ax_t.plot(n, t, marker="o", label=label)
        ax_m.plot(n, np.maximum(m, 1e-2), marker="o", label=label)
    env = data["meta"]["environment"]
    ax_t.set(yscale="log", xlabel="N", ylabel="warm time (ms)", title="forward time, 8 heads, D=64, float32")
    ax_m.set(yscale="log", xlabel="N", ylabel="peak memory (MiB)", title="peak memory during the call")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{env['cpu']} ({env['cpu_count']} cores)", fontsize=9)
    fig.tight_layout()
    return fig


def time_memory():
    data = json.loads((ROOT / "benchmarks" / "cpu" / "exact" / "results.json").read_text())
    fig = time_memory_figure(data)
    fig.savefig(FIGURES / "exact-time-memory.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    FIGURES.mkdir(parents=True, exist_ok=True)
    alignment()
    time_memory()
