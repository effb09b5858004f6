"""Tables, JSON and derived quantities of a comparison.

- :func:`scaling_exponents`: the slope of log(time) against log(N) per
  (method, budget, backend), fitted over the sweep's lengths.
- :func:`crossovers`: the smallest swept N at which a method is faster than
  ``exact`` on the same backend (None if never within the sweep).
- :func:`pareto_front`: the rows no other row beats on both error and time.
- :func:`fastest_within`: the fastest row whose error meets a target.
- :func:`markdown_table`: a results table for the docs.
- :func:`print_table`: a rich table on the terminal.
- :func:`write_json`: the results, with device, versions and command.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["scaling_exponents", "crossovers", "budget_label", "pareto_front", "fastest_within", "markdown_table",
           "print_table", "write_json", "load_json", "summarise"]


def _key(row) -> tuple:
    return (row["method"], str(row["budget"]), row["backend"])


def scaling_exponents(rows) -> dict:
    """``{(method, budget, backend): slope}`` of log time vs log N (needs >= 2 lengths)."""
    series = defaultdict(list)
    for row in rows:
        series[_key(row)].append((row["n"], row["warm_ms"]))
    slopes = {}
    for key, points in series.items():
        points = sorted(set(points))
        if len({n for n, _ in points}) >= 2:
            n, t = np.log([p[0] for p in points]), np.log([max(p[1], 1e-9) for p in points])
            slopes[key] = float(np.polyfit(n, t, 1)[0])
    return slopes


def crossovers(rows) -> dict:
    """``{(method, budget, backend): N}``: the first swept N where it beats exact on its backend."""
    exact = {}
    for r in rows:  # the fastest exact algorithm on each backend and length
        if r["method"] == "exact":
            key = (r["backend"], r["n"])
            exact[key] = min(exact.get(key, math.inf), r["warm_ms"])
    by_key = defaultdict(list)
    for row in rows:
        if row["method"] != "exact":
            by_key[_key(row)].append(row)
    result = {}
    for key, items in by_key.items():
        result[key] = None
        for row in sorted(items, key=lambda r: r["n"]):
            ref = exact.get((row["backend"], row["n"]))
            if ref is not None and row["warm_ms"] < ref:
                result[key] = row["n"]
                break
    return result


def budget_label(row) -> str:
    """``"window=64"`` for a row of a budget sweep; the bare budget (``"default"``) otherwise."""
    name = row.get("budget_name")
    if name and name in (row.get("params") or {}):
        return f"{name}={row['budget']}"
    return str(row["budget"])


def pareto_front(rows, *, error: str = "rel_fro_median") -> list[dict]:
    """Rows not dominated in (``error``, ``warm_ms``), fastest first.

    A row is dominated when another is at least as accurate and at least as
    fast, and strictly better in one. Pass the rows of one N (and one
    problem): across lengths the comparison means nothing.
    """
    ordered = sorted(rows, key=lambda r: (r["warm_ms"], r[error]))
    front, best_error = [], math.inf
    for row in ordered:                                                  # by time: keep each new error record
        if row[error] < best_error:
            front.append(row)
            best_error = row[error]
    return front


def fastest_within(rows, max_error: float, *, error: str = "rel_fro_median"):
    """The fastest row with ``row[error] <= max_error``, or None if none is that accurate."""
    within = [r for r in rows if r[error] <= max_error]
    return min(within, key=lambda r: r["warm_ms"]) if within else None


def markdown_table(rows, *, columns=("method", "budget", "backend", "rel_fro_median", "err_ratio_median",
                                     "warm_ms", "peak_mb")) -> str:
    """A Markdown table of ``rows`` with numbers rounded for reading."""
    header = {"rel_fro_median": "rel. error (median)", "err_ratio_median": "err / err_uniform",
              "rel_spectral_median": "spectral error", "warm_ms": "warm ms", "peak_mb": "peak MB",
              "compile_s": "compile s", "rel_fro_p90": "rel. error (p90)"}
    formats = {"rel_fro_median": ".3f", "rel_fro_p90": ".3f", "err_ratio_median": ".3f",
               "rel_spectral_median": ".3f", "warm_ms": ".1f", "peak_mb": ".0f", "compile_s": ".1f"}
    lines = ["| " + " | ".join(header.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if c == "budget":
                value = budget_label(row)
            cells.append(_fmt(value, formats[c]) if c in formats else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(result: dict) -> dict:
    """Derived quantities added to the JSON: exponents and crossovers."""
    rows = result["rows"]
    return {
        "scaling_exponent": {" | ".join(k): v for k, v in scaling_exponents(rows).items()},
        "crossover_n_vs_exact": {" | ".join(k): v for k, v in crossovers(rows).items()},
    }


def _fmt(x, spec=".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def print_table(result: dict, console=None):
    """Print one rich table per sequence length."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rows = result["rows"]
    for n in sorted({r["n"] for r in rows}):
        table = Table(title=f"N = {n}  ({rows[0]['problem']}, {rows[0]['heads']} heads, D = {rows[0]['d']}, "
                            f"{rows[0]['dtype']}{', causal' if rows[0]['causal'] else ''})")
        for col, justify in [("method", "left"), ("budget", "right"), ("backend", "left"), ("rel. error", "right"),
                             ("spectral", "right"), ("err/unif", "right"), ("warm ms", "right"),
                             ("compile s", "right"), ("peak MB", "right"), ("GFLOP", "right")]:
            table.add_column(col, justify=justify, no_wrap=True)
        for r in (r for r in rows if r["n"] == n):
            budget = budget_label(r)
            table.add_row(
                r["method"], budget, r["backend"], _fmt(r["rel_fro_median"], ".2e"), _fmt(r["rel_spectral_median"], ".2e"),
                _fmt(r["err_ratio_median"], ".3f"),
                f"{_fmt(r['warm_ms'], '.2f')} ±{_fmt((r['warm_ms_q75'] - r['warm_ms_q25']) / 2, '.2f')}",
                _fmt(r["compile_s"], ".2f"), _fmt(r["peak_mb"], ".1f"),
                _fmt(r["flops"] / 1e9 if r["flops"] else None, ".3g"),
            )
        console.print(table)
    from rich.markup import escape

    for item in result.get("skipped", []):
        reasons = [line.strip() for line in item["reason"].splitlines()[1:] if line.strip()] or [item["reason"]]
        console.print(f"[yellow]skipped[/] N={item['n']} {item['method']} {escape(str(item['budget']))} "
                      f"{escape('[' + item['backend'] + ']')}: {escape(reasons[0])}")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def load_json(path) -> dict:
    """Read a results file written by :func:`write_json` (``null`` numbers become NaN)."""
    payload = json.loads(Path(path).read_text())
    for row in payload.get("rows", []):
        for key, value in row.items():
            if value is None and key not in ("flops",):
                row[key] = math.nan
    return payload


def write_json(result: dict, path: Path, command: str | None = None) -> Path:
    """Write the results, the derived quantities and the command to ``path``."""
    payload = dict(result)
    payload["derived"] = summarise(result)
    if command is not None:
        payload["meta"] = {**payload["meta"], "command": command}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return path
