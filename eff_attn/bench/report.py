"""Tables, JSON and derived quantities of a comparison.

- :func:`scaling_exponents`: the slope of log(time) against log(N) per
  (method, budget, backend), fitted over the sweep's lengths.
- :func:`crossovers`: the smallest swept N at which a method is faster than
  ``exact`` on the same backend (None if never within the sweep).
- :func:`pareto_front`: the rows no other row beats on both error and time.
- :func:`fastest_within`: the fastest row whose error meets a target.
- :func:`markdown_table`: a results table for the docs.
- :func:`compact`: numbers in at most 7 characters, never cut.
- :func:`print_table`: a rich table on the terminal that fits 80 columns.
- :func:`write_json`: the results, with device, versions and command.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["scaling_exponents", "crossovers", "budget_label", "pareto_front", "fastest_within", "markdown_table",
           "compact", "print_table", "write_json", "load_json", "summarise", "progress_bar"]


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
    """``"window=64"`` for a row with a budget parameter (given or resolved); the bare budget otherwise."""
    name, budget = row.get("budget_name"), str(row["budget"])
    if name and budget != "default" and "=" not in budget:
        return f"{name}={budget}"
    return budget


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


#: Columns of runs written before each row had a target: they were all judged against softmax.
_BEFORE_TARGETS = {"target": None, "target_error_median": "rel_fro_median",
                   "target_error_p90": "rel_fro_p90", "target_ratio_median": "err_ratio_median"}


def markdown_table(rows, *, columns=("method", "budget", "backend", "rel_fro_median", "err_ratio_median",
                                     "warm_ms", "peak_mb")) -> str:
    """A Markdown table of ``rows`` with numbers rounded for reading."""
    header = {"rel_fro_median": "rel. error vs softmax (median)", "err_ratio_median": "err / err_uniform",
              "rel_spectral_median": "spectral error", "warm_ms": "warm ms", "peak_mb": "peak MB",
              "compile_s": "compile s", "rel_fro_p90": "rel. error vs softmax (p90)", "target": "judged against",
              "target_error_median": "rel. error vs target (median)", "target_error_p90": "rel. error vs target (p90)",
              "target_ratio_median": "err / err_uniform (target)", "beats_uniform": "better than uniform"}
    formats = {"rel_fro_median": ".3f", "rel_fro_p90": ".3f", "err_ratio_median": ".3f",
               "rel_spectral_median": ".3f", "warm_ms": ".1f", "peak_mb": ".0f", "compile_s": ".1f",
               "target_error_median": ".3f", "target_error_p90": ".3f", "target_ratio_median": ".3f"}
    lines = ["| " + " | ".join(header.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if c == "budget":
                value = budget_label(row)
            if c == "beats_uniform":
                value = _verdict(row)
            if value is None and c in _BEFORE_TARGETS:                    # a run written before targets existed
                value = "softmax" if c == "target" else row.get(_BEFORE_TARGETS[c])
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


def compact(x) -> str:
    """A number in at most 8 characters with 3 significant digits: ``0.973``, ``12.3``, ``4097``, ``9.73e-8``.

    Plain notation from 0.001 to 99999 (whole numbers from 100 on), else
    scientific with the shortest exponent.
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    a = abs(x)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e5:
        digits = max(0, 2 - int(math.floor(math.log10(a))))
        text = f"{x:.{digits}f}"
        return text if len(text) <= 7 else f"{x:.0f}"
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


#: A row is better than the uniform mean when its error is below this fraction of the mean's: float32
#: rounding alone moves the uniform row itself a hair below 1.
BETTER_THAN_UNIFORM = 0.999


def _verdict(row) -> str:
    """``"yes"`` when the row's error against its target is clearly below the uniform mean's (median over heads)."""
    ratio = row.get("target_ratio_median", row.get("err_ratio_median"))
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "-"
    return "yes" if ratio < BETTER_THAN_UNIFORM else "no"


#: print_table's columns: (header, justify, row -> text). Fits 80 columns with a 17-character method cell.
_COLUMNS = (
    ("target", "left", lambda r: r.get("target", "softmax")),
    ("error", "right", lambda r: compact(r.get("target_error_median", r["rel_fro_median"]))),
    ("/unif", "right", lambda r: compact(r.get("target_ratio_median", r["err_ratio_median"]))),
    ("better", "left", _verdict),
    ("softmax", "right", lambda r: compact(r["rel_fro_median"])),
    ("ms", "right", lambda r: compact(r["warm_ms"])),
    ("MB", "right", lambda r: compact(r["peak_mb"])),
)


def print_table(result: dict, console=None):
    """Print one rich table per sequence length, then the skipped cells with their reasons.

    Each row: the method and its budget (wrapped onto a second line), the
    target it is judged against, its relative error against that target,
    that error over the uniform mean's, the verdict (better than the
    uniform mean?), its relative error against softmax, warm time and peak
    memory. Numbers use :func:`compact`, so none is cut at 80 columns;
    the JSON holds every field in full.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    rows, skipped = result["rows"], result.get("skipped", [])
    config = result.get("meta", {}).get("config", {})
    first = rows[0] if rows else {**config, "problem": config.get("problem", "?"), "d": config.get("d", "?")}
    backends = {r["backend"] for r in rows if r["method"] != "sdpa"}
    one_backend = len(backends) == 1
    for n in sorted({r["n"] for r in rows} | {s["n"] for s in skipped}):
        table = Table(title=f"N = {n}  ({first['problem']}, {first['heads']} heads, D = {first['d']}, "
                            f"{first['dtype']}{', causal' if first['causal'] else ''}"
                            f"{', backend ' + next(iter(backends)) if one_backend else ''})",
                      box=None, padding=(0, 1, 0, 0), pad_edge=False, title_justify="left", header_style="bold underline",
                      caption="error: median relative Frobenius error against the target; /unif: that over the "
                              "uniform mean's; better: than the uniform mean; softmax: error against softmax; "
                              "ms: warm median; MB: peak",
                      caption_justify="left")
        table.add_column("method", justify="left", no_wrap=False, min_width=16, overflow="fold")
        for header, justify, _ in _COLUMNS:
            table.add_column(header, justify=justify, no_wrap=True)
        for r in (r for r in rows if r["n"] == n):
            label = r["method"] if r["budget"] == "default" else f"{r['method']} {budget_label(r)}"
            if not one_backend or r["method"] == "sdpa":
                label += f" [{r['backend']}]"
            table.add_row(escape(label), *(escape(str(cell(r))) for _, _, cell in _COLUMNS))
        for item in (s for s in skipped if s["n"] == n and s["method"] == "sdpa"):
            table.add_row(escape(f"sdpa [{item['backend']}]"), "softmax", "skipped", *[""] * (len(_COLUMNS) - 2))
        console.print(table)
    for item in skipped:
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


def progress_bar(console):
    """A rich progress bar whose total is the cells' expected seconds, so its ETA follows the real cost."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    from rich.table import Column

    return Progress(TextColumn("{task.description}", table_column=Column(width=32, no_wrap=True, overflow="ellipsis")),
                    BarColumn(bar_width=16), TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=True)
