"""Plots of a comparison (matplotlib, written as PNG).

- ``error_vs_budget.png``: relative error against analytic FLOPs, one line
  per method and backend through its budget sweep, at the largest N.
- ``time_vs_n.png``: warm time against N on log-log axes, one line per
  method (its middle budget) and backend; only for a sweep over N.
- ``pareto.png``: relative error against warm time at the largest N; the
  lower-left frontier is the set of methods worth using there.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["write_plots"]


def _series(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return groups


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # 20 colours times 4 markers: every method of a full run keeps its own style
    colours = plt.get_cmap("tab20").colors
    plt.rcParams["axes.prop_cycle"] = cycler(color=colours) + cycler(marker=["o", "s", "^", "D"] * 5)
    return plt


def _middle_budget(rows):
    """For each (method, backend), the budget in the middle of its sweep."""
    chosen = {}
    for (method, backend), items in _series(rows, lambda r: (r["method"], r["backend"])).items():
        budgets = sorted({str(r["budget"]) for r in items}, key=lambda b: (len(b), b))
        chosen[(method, backend)] = budgets[len(budgets) // 2]
    return chosen


def write_plots(result: dict, out_dir: Path) -> list[Path]:
    """Write the three PNGs into ``out_dir`` and return their paths."""
    plt = _figure()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r.get("rel_fro_median") is not None]
    if not rows:
        return []
    n_max = max(r["n"] for r in rows)
    at_max = [r for r in rows if r["n"] == n_max]
    title = f"{rows[0]['problem']}, N={n_max}, {rows[0]['heads']} heads, D={rows[0]['d']}, {rows[0]['dtype']}"
    floor = 1e-8
    paths = []

    def save(fig, ax, name, **axes):
        ax.set(xscale="log", yscale="log", **axes)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, backend), items in sorted(_series(at_max, lambda r: (r["method"], r["backend"])).items()):
        items = sorted((r for r in items if r["flops"]), key=lambda r: r["flops"])
        if items:
            ax.plot([r["flops"] for r in items], [max(r["rel_fro_median"], floor) for r in items],
                    label=f"{method} [{backend}]")
    save(fig, ax, "error_vs_budget.png", xlabel="analytic FLOPs", ylabel="relative Frobenius error (median)",
         title=f"Error vs budget — {title}")

    if len({r["n"] for r in rows}) > 1:                                    # a sweep over N: time against N
        middle = _middle_budget(rows)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, backend), items in sorted(_series(rows, lambda r: (r["method"], r["backend"])).items()):
            items = sorted((r for r in items if str(r["budget"]) == middle[(method, backend)]), key=lambda r: r["n"])
            ax.plot([r["n"] for r in items], [r["warm_ms"] for r in items], label=f"{method} [{backend}]")
        save(fig, ax, "time_vs_n.png", xlabel="sequence length N", ylabel="warm time (ms, median)",
             title="Time vs N")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, backend), items in sorted(_series(at_max, lambda r: (r["method"], r["backend"])).items()):
        ax.plot([r["warm_ms"] for r in items], [max(r["rel_fro_median"], floor) for r in items],
                linestyle="none", markersize=5, label=f"{method} [{backend}]")
    save(fig, ax, "pareto.png", xlabel="warm time (ms, median)", ylabel="relative Frobenius error (median)",
         title=f"Error vs time — {title}")
    return paths
