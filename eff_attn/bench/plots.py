"""Plots of a comparison (matplotlib, written as PNG).

- ``error_vs_budget.png``: relative error (against each method's own
  target) against analytic FLOPs, one line per method and backend through
  its budget sweep, each point labelled with its budget, at the largest N.
- ``time_vs_n.png``: warm time against N on log-log axes, one line per
  method (its middle budget) and backend; only for a sweep over N.
- ``pareto.png``: relative error against softmax vs warm time at the
  largest N, with the Pareto front (:func:`eff_attn.bench.report.pareto_front`)
  of the rows judged against softmax drawn as a step line: the rows no
  other beats on both.

Every method keeps one colour and marker in every plot of every run
(:func:`method_style`), so plots of different runs can be read side by side.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import budget_label, pareto_front

__all__ = ["write_plots", "method_style"]

#: Methods in a fixed order: a method's colour is its place here, never its place in a run.
_STYLE_ORDER = ("exact", "uniform", "topk_oracle", "yoso", "kdeformer", "local", "performer", "routing", "nystrom",
                "reformer", "treeformer_tf", "treeformer_tc", "entmax", "sparsefinder", "sdpa")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def method_style(method: str) -> dict:
    """The colour and marker of ``method``, the same in every plot of every run.

    Built-in methods take a fixed slot of the tab20 palette; any other name
    a slot chosen from a stable hash of the name (not Python's salted ``hash``).
    """
    import zlib

    from matplotlib import colormaps

    colours = colormaps["tab20"].colors
    if method in _STYLE_ORDER:
        slot = _STYLE_ORDER.index(method)
    else:
        slot = len(_STYLE_ORDER) + zlib.crc32(method.encode()) % (len(colours) - len(_STYLE_ORDER))
    return {"color": colours[slot % len(colours)], "marker": _MARKERS[slot % len(_MARKERS)]}


def _series(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return groups


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _error(row) -> float:
    """The row's error against its own target (softmax for rows written before targets existed)."""
    value = row.get("target_error_median")
    return row["rel_fro_median"] if value is None else value


def _budget_text(row) -> str:
    label = budget_label(row)
    return label.split("=", 1)[1] if "=" in label else label


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

    def save(fig, ax, name, xticks=None, **axes):
        ax.set(xscale="log", yscale="log", **axes)
        if xticks is not None:                                             # one label per measured N, no overlap
            from matplotlib.ticker import NullLocator

            ax.set_xscale("log", base=2)
            ax.set_xticks(xticks, [str(n) for n in xticks])
            ax.xaxis.set_minor_locator(NullLocator())
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
            xs, ys = [r["flops"] for r in items], [max(_error(r), floor) for r in items]
            ax.plot(xs, ys, label=f"{method} [{backend}]", **method_style(method))
            for x, y, r in zip(xs, ys, items):                                # which point is which budget
                ax.annotate(_budget_text(r), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=method_style(method)["color"])
    save(fig, ax, "error_vs_budget.png", xlabel="analytic FLOPs (points labelled with their budget)",
         ylabel="relative error vs target (median)", title=f"Error vs budget — {title}")

    if len({r["n"] for r in rows}) > 1:                                    # a sweep over N: time against N
        middle = _middle_budget(rows)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (method, backend), items in sorted(_series(rows, lambda r: (r["method"], r["backend"])).items()):
            items = sorted((r for r in items if str(r["budget"]) == middle[(method, backend)]), key=lambda r: r["n"])
            ax.plot([r["n"] for r in items], [r["warm_ms"] for r in items], label=f"{method} [{backend}]",
                    **method_style(method))
        save(fig, ax, "time_vs_n.png", xlabel="sequence length N", ylabel="warm time (ms, median)",
             title="Time vs N", xticks=sorted({r["n"] for r in rows}))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, backend), items in sorted(_series(at_max, lambda r: (r["method"], r["backend"])).items()):
        ax.plot([r["warm_ms"] for r in items], [max(r["rel_fro_median"], floor) for r in items],
                linestyle="none", markersize=5, label=f"{method} [{backend}]", **method_style(method))
    # the front of the softmax approximations: entmax-style targets are other models, not faster softmax
    front = pareto_front([r for r in at_max if r.get("target", "softmax") == "softmax"])   # fastest first
    ax.step([r["warm_ms"] for r in front], [max(r["rel_fro_median"], floor) for r in front], where="post",
            color="black", linewidth=1, alpha=0.6, label="Pareto front (softmax targets)")
    save(fig, ax, "pareto.png", xlabel="warm time (ms, median)", ylabel="relative error vs softmax (median)",
         title=f"Error vs time — {title}")
    return paths
