"""Put the committed benchmark results into the docs.

    python scripts/publish_benchmarks.py          # rewrite the generated blocks, copy the plots
    python scripts/publish_benchmarks.py --check  # exit 1 if the docs differ from the results

Each ``benchmarks/<device>/<run>/results.json`` written by ``eff-attn compare``
has a block in ``docs/benchmarks.md`` between the markers

    <!-- BEGIN <device>/<run> -->
    <!-- END <device>/<run> -->

which this script fills with: the command, device and versions; a results table
per N (every method and budget); for sweeps over N, the scaling exponents and
crossovers. The run's plots are copied to ``docs/figures/benchmarks/<device>-<run>-*.png``.
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

from eff_attn.bench.report import load_json, markdown_table  # noqa: E402

RESULTS = ROOT / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
FIGURES = ROOT / "docs" / "figures" / "benchmarks"
BLOCK = re.compile(r"(<!-- BEGIN (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.S)
COLUMNS = ("method", "budget", "backend", "rel_fro_median", "rel_fro_p90", "err_ratio_median", "warm_ms",
           "compile_s", "peak_mb")


def _environment_line(meta: dict) -> str:
    env = meta["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    threads = f", {env['cpu_count']} cores" if "cpu_count" in env else ""
    gpu = f"; GPU {env['gpu']}" if env.get("gpu") else ""
    return f"{env.get('cpu', '?')}{threads}{gpu}; Python {env.get('python', '?')}; {versions}"


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


def render(name: str) -> str:
    """The Markdown block of ``benchmarks/<name>/results.json``."""
    payload = load_json(RESULTS / name / "results.json")
    meta, rows = payload["meta"], payload["rows"]
    config = meta["config"]
    parts = [f"Command: `{meta.get('command', 'eff-attn compare')}`  ",
             f"Problem: `{config['problem']}`, {config['heads']} heads, D = {rows[0]['d']}, {config['dtype']}"
             f"{', causal' if config['causal'] else ''}; {config['seeds']} seed(s) per randomised method.  ",
             f"Machine: {_environment_line(meta)}.  ",
             f"Raw data: `benchmarks/{name}/results.json`."]
    for n in sorted({r["n"] for r in rows}):
        parts += ["", f"**N = {n}**", "", markdown_table([r for r in rows if r["n"] == n], columns=COLUMNS)]
    if payload.get("skipped"):
        parts += ["", "Skipped (not supported): " + "; ".join(
            sorted({f"{s['method']} [{s['backend']}]" for s in payload["skipped"]})) + "."]
    parts.append(_derived(payload))
    images = sorted((RESULTS / name).glob("*.png"))
    slug = name.replace("/", "-")
    if images:
        parts.append("")
        for image in images:
            parts.append(f"![{image.stem.replace('_', ' ')}](figures/benchmarks/{slug}-{image.name})")
    return "\n".join(parts).rstrip() + "\n"


def copy_plots(name: str) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    slug = name.replace("/", "-")
    for image in sorted((RESULTS / name).glob("*.png")):
        shutil.copyfile(image, FIGURES / f"{slug}-{image.name}")


def updated_page(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the docs are out of date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text)]
    new = updated_page(text)
    if args.check:
        stale = new != text
        missing = [n for n in names for image in (RESULTS / n).glob("*.png")
                   if not (FIGURES / f"{n.replace('/', '-')}-{image.name}").exists()]
        if stale or missing:
            print("docs/benchmarks.md is out of date: run python scripts/publish_benchmarks.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    for name in names:
        copy_plots(name)
    print(f"updated {len(names)} block(s): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
