"""Put the committed benchmark results into the docs.

    python scripts/publish_benchmarks.py          # rewrite the generated blocks, copy the plots
    python scripts/publish_benchmarks.py --check  # exit 1 if the docs differ from the results

Each ``benchmarks/<device>/<run>/results.json`` written by ``eff-attn compare``
has a block in ``docs/benchmarks.md`` between the markers

    <!-- BEGIN <device>/<run> -->
    <!-- END <device>/<run> -->

(and ``docs/tutorials/choosing-a-method.md`` has a ``summary`` block, one line per
method from the real-heads, clustered and scaling runs; an ``sdpa-anchor`` block
holds the Numba-exact / SDPA time and memory ratios of the ``cpu/exact`` run, so no
"× SDPA" figure is typed by hand), which this script fills
with: the command, device and versions; a results table
per N (every method and budget); for sweeps over N, the scaling exponents and
crossovers. The run's plots are redrawn from its JSON and copied to
``docs/figures/benchmarks/<device>-<run>-*.png``.
Only the blocks are touched; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eff_attn.bench.report import budget_label, load_json, markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
TUTORIAL = ROOT / "docs" / "tutorials" / "choosing-a-method.md"
#: The runs the tutorial's summary table reads: accuracy on real heads and on clusters, speed over N.
SUMMARY_RUNS = {"real": "cpu/real-512", "clustered": "cpu/clustered-2048", "scaling": "cpu/scaling-gaussian"}
FIGURES = ROOT / "docs" / "figures" / "benchmarks"
BLOCK = re.compile(r"(<!-- BEGIN (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.S)
COLUMNS = ("method", "budget", "backend", "target", "target_error_median", "target_ratio_median", "beats_uniform",
           "rel_fro_median", "warm_ms", "compile_s", "peak_mb")
#: The run the ``sdpa-anchor`` block reads.
ANCHOR_RUN = "cpu/exact"


def _environment_line(meta: dict) -> str:
    env = meta["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    threads = f", {env['cpu_count']} cores" if "cpu_count" in env else ""
    gpu = f"; GPU {env['gpu']}" if env.get("gpu") else ""
    return f"{env.get('cpu', '?')}{threads}{gpu}; Python {env.get('python', '?')}; {versions}"


def _first_reason(text: str) -> str:
    """The first concrete reason of a NotSupportedError message (one candidate's line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines[1:] or lines:
        if "not installed" not in line:
            return line.split(": ", 1)[1] if line.split(":")[0].count("/") == 1 else line
    return lines[0]


def _derived(payload: dict) -> str:
    derived = payload.get("derived", {})
    exponents = derived.get("scaling_exponent", {})
    if not exponents:
        return ""
    crossover = derived.get("crossover_n_vs_exact", {})
    lines = ["", "| method | budget | backend | time exponent | first N faster than exact |", "|---|---|---|---|---|"]
    for key, slope in sorted(exponents.items()):
        method, budget, backend = key.split(" | ")
        cross = crossover.get(key, "—") if method not in ("exact", "sdpa") else "—"
        cross = "none in the sweep" if cross is None else cross
        lines.append(f"| {method} | {budget} | {backend} | {slope:.2f} | {cross} |")
    return "\n".join(lines)


#: Said of a run whose SDPA rows came from 3-D input (torch's CPU math path), until it is regenerated.
STALE_SDPA = ("**This run predates the 4-D SDPA call:** its `sdpa` times and memory are torch's CPU math "
              "path (3-D input), several times slower than a user's 4-D call. Regenerate it with "
              "`bash scripts/run_benchmarks.sh`.")


def _stale_sdpa(payload: dict) -> bool:
    return "sdpa_call" not in payload["meta"] and any(r["method"] == "sdpa" for r in payload["rows"])


def render_walltime(payload: dict, name: str) -> str:
    """The block of a ``scripts/bench_compare_walltime.py`` result: cold and warm wall time, slowest cells."""
    meta = payload["meta"]
    warm = ", ".join(f"{w:.0f} s" for w in payload["warm_s"])
    cold_cpu = payload["cold_run"].get("cpu_s")
    warm_cpu = ", ".join(f"{w['cpu_s']:.0f} s" for w in payload["warm_runs"] if "cpu_s" in w)
    lines = [f"Command: `{meta['command']}`, timed by `{meta['script']}`.  ",
             f"Machine: {_environment_line(meta)}; load average {meta.get('load_average_at_end', ['?'])[0]:.1f} "
             "at the end.  ", f"Raw data: `benchmarks/{name}/results.json`.", "",
             "| Numba cache | wall time | CPU time (user + system) |", "|---|---|---|",
             f"| cold (empty) | {payload['cold_s']:.0f} s | {cold_cpu:.0f} s |" if cold_cpu is not None else
             f"| cold (empty) | {payload['cold_s']:.0f} s | — |",
             f"| warm | {warm} | {warm_cpu or '—'} |", ""]
    cells = payload["warm_runs"][-1]["cells"] if payload["warm_runs"] else payload["cold_run"]["cells"]
    slowest = sorted(cells.items(), key=lambda kv: -(kv[1]["cell_s"] or 0))[:5]
    lines.append("Slowest cells of the last warm run (fitting, timing and scoring included): "
                 + ", ".join(f"{k} {v['cell_s']:.1f} s" for k, v in slowest) + ".")
    return "\n".join(lines) + "\n"


def render(name: str) -> str:
    """The Markdown block of ``benchmarks/<name>/results.json``."""
    payload = load_json(RESULTS / name / "results.json")
    if payload.get("kind") == "compare-walltime":
        return render_walltime(payload, name)
    meta, rows = payload["meta"], payload["rows"]
    config = meta["config"]
    parts = [f"Command: `{meta.get('command', 'eff-attn compare')}`  ",
             f"Problem: `{config['problem']}`, {config['heads']} heads, D = {rows[0]['d']}, {config['dtype']}"
             f"{', causal' if config['causal'] else ''}; {config['seeds']} seed(s) per randomised method.  ",
             f"Machine: {_environment_line(meta)}.  ",
             f"Raw data: `benchmarks/{name}/results.json`."]
    if _stale_sdpa(payload):
        parts += ["", STALE_SDPA]
    for n in sorted({r["n"] for r in rows}):
        parts += ["", f"**N = {n}**", "", markdown_table([r for r in rows if r["n"] == n], columns=COLUMNS)]
    reasons = {}
    for item in payload.get("skipped", []):
        if item["backend"] != "cupy" or "cupy not installed" not in item["reason"]:
            reasons.setdefault(item["method"], _first_reason(item["reason"]))
    if reasons:
        parts += ["", "Not run (the method refuses these options):", ""]
        parts += [f"- `{method}`: {reason}" for method, reason in sorted(reasons.items())]
    parts.append(_derived(payload))
    images = sorted((RESULTS / name).glob("*.png"))
    slug = name.replace("/", "-")
    if images:
        parts.append("")
        for image in images:
            parts.append(f"![{image.stem.replace('_', ' ')}](figures/benchmarks/{slug}-{image.name})")
    return "\n".join(parts).rstrip() + "\n"


def _best(rows, method):
    """The row of ``method`` with the lowest err/uniform, or None."""
    mine = [r for r in rows if r["method"] == method]
    return min(mine, key=lambda r: r["err_ratio_median"]) if mine else None


def render_summary() -> str:
    """One line per method: best err/uniform on real heads and on clusters, time and crossover over N."""
    real, clustered, scaling = (load_json(RESULTS / SUMMARY_RUNS[k] / "results.json")
                                for k in ("real", "clustered", "scaling"))
    n_max = max(r["n"] for r in scaling["rows"])
    at_max = {r["method"]: r for r in scaling["rows"] if r["n"] == n_max}
    crossover = scaling.get("derived", {}).get("crossover_n_vs_exact", {})
    exact_ms = at_max["exact"]["warm_ms"]
    lines = [f"| method | best err/uniform, real heads $n=512$ | best err/uniform, clustered $N=2048$ "
             f"| time at $N={n_max}$ (Gaussian, default budget) | faster than exact from $N=$ |",
             "|---|---|---|---|---|"]
    names = [r["method"] for r in clustered["rows"] if r["method"] not in ("exact", "sdpa", "uniform")]
    for method in dict.fromkeys(names):
        cells = [f"`{method}`"]
        for rows in (real["rows"], clustered["rows"]):
            best = _best(rows, method)
            cells.append(f"{best['err_ratio_median']:.2g} ({budget_label(best)})" if best else "—")
        row = at_max.get(method)
        cells.append(f"{row['warm_ms'] / 1e3:.2f} s ({exact_ms / row['warm_ms']:.1f}× exact)" if row else "—")
        cross = [v for k, v in crossover.items() if k.startswith(f"{method} |")]
        cells.append(str(cross[0]) if cross and cross[0] else "not within the sweep" if cross else "—")
        lines.append("| " + " | ".join(cells) + " |")
    sdpa = None if _stale_sdpa(scaling) else at_max.get("sdpa")
    note = (f"\nExact attention (Numba) takes {exact_ms / 1e3:.2f} s at $N={n_max}$"
            + (f", PyTorch's CPU SDPA {sdpa['warm_ms'] / 1e3:.2f} s." if sdpa else "."))
    return "\n".join(lines) + "\n" + note + "\n"


def render_sdpa_anchor() -> str:
    """Numba exact attention against PyTorch's SDPA (4-D input) at every N of the exact run: time and memory."""
    payload = load_json(RESULTS / ANCHOR_RUN / "results.json")
    rows = payload["rows"]
    lines = ["| N | exact, Numba (ms) | SDPA (ms) | exact time / SDPA time | exact peak MB | SDPA peak MB |",
             "|---|---|---|---|---|---|"]
    for n in sorted({r["n"] for r in rows}):
        exact = [r for r in rows if r["n"] == n and r["method"] == "exact" and r["backend"] == "numba"]
        sdpa = [r for r in rows if r["n"] == n and r["method"] == "sdpa"]
        if not exact or not sdpa:
            continue
        e, t = min(exact, key=lambda r: r["warm_ms"]), sdpa[0]
        lines.append(f"| {n} | {e['warm_ms']:.1f} | {t['warm_ms']:.1f} | {e['warm_ms'] / t['warm_ms']:.2f} "
                     f"| {e['peak_mb']:.0f} | {t['peak_mb']:.0f} |")
    env = payload["meta"]["environment"]
    if _stale_sdpa(payload):
        lines = [STALE_SDPA, ""] + lines
    return ("\n".join(lines) + f"\n\nFrom `benchmarks/{ANCHOR_RUN}/results.json` (`{payload['meta'].get('command')}`), "
            f"torch {env.get('versions', {}).get('torch', '?')}, {env.get('cpu', '?')}. "
            "A ratio below 1 means the Numba kernel is faster.\n")


def replot(name: str) -> None:
    """Redraw the run's plots from its JSON (the current plotting code), then copy them to the docs."""
    from eff_attn.bench.plots import write_plots

    if load_json(RESULTS / name / "results.json").get("kind") == "compare-walltime":
        return
    for old in (RESULTS / name).glob("*.png"):
        old.unlink()
    write_plots(load_json(RESULTS / name / "results.json"), RESULTS / name)
    FIGURES.mkdir(parents=True, exist_ok=True)
    slug = name.replace("/", "-")
    for old in FIGURES.glob(f"{slug}-*.png"):
        old.unlink()
    for image in sorted((RESULTS / name).glob("*.png")):
        shutil.copyfile(image, FIGURES / f"{slug}-{image.name}")


def updated_page(text: str) -> str:
    def fill(match):
        name = match.group("name")
        special = {"summary": render_summary, "sdpa-anchor": render_sdpa_anchor}
        return match.group(1) + (special[name]() if name in special else render(name)) + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the docs are out of date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text) if m.group("name") not in ("summary", "sdpa-anchor")]
    if not args.check:
        for name in names:
            replot(name)
    new = updated_page(text)
    tutorial = TUTORIAL.read_text()
    new_tutorial = updated_page(tutorial)
    if args.check:
        stale = new != text or new_tutorial != tutorial
        missing = [n for n in names for image in (RESULTS / n).glob("*.png")
                   if not (FIGURES / f"{n.replace('/', '-')}-{image.name}").exists()]
        if stale or missing:
            print("docs are out of date: run python scripts/publish_benchmarks.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    TUTORIAL.write_text(new_tutorial)
    print(f"updated {len(names)} block(s) and their plots: {', '.join(names)}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
