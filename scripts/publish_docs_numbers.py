"""Put the committed measurements quoted on the docs pages into those pages.

    python scripts/publish_docs_numbers.py           # rewrite every generated block
    python scripts/publish_docs_numbers.py --check   # exit 1 if a page differs from its JSON
    python scripts/publish_docs_numbers.py --survey  # list measured-looking numbers typed by hand

A page asks for a block with two markers (the same mechanism as
``scripts/publish_benchmarks.py``, whose ``BEGIN <device>/<run>`` blocks it leaves alone):

    <!-- BEGIN numbers:<source> -->
    <!-- END numbers:<source> -->

``<source>`` is either the name of a renderer in ``RENDERERS`` (a table that needs its own
layout, e.g. ``dist-scaling``), or the path of a JSON file under ``benchmarks/``
written by a benchmark script in the generic table format::

    {"command": "python scripts/x.py --out benchmarks/docs/x.json",
     "machine": "...", "note": "...",                      # optional
     "columns": ["N", "forward", ...],
     "formats": {"forward": "{:.3f} s"},                    # optional, per column
     "rows": [[1024, 0.062, ...], ...]}                     # null prints as an empty cell

Everything between the markers is generated; the prose around them is written by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- BEGIN numbers:(?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- END numbers:(?P=name) -->)",
                   re.S)
#: a number with a unit of time, a speed-up, or a throughput: what --survey flags outside generated blocks
MEASURED = re.compile(r"\d(?:[\d.,]*\d)?\s?(?:ms|s|µs|us|×|x faster|M entries/s|GB/s|MiB|GiB|MB)(?![\w/-])"
                      r"|\|\s*\d+\.\d+\s*(?:±\s*\d+\.\d+\s*)?\|")
FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render_dist_scaling() -> str:
    """The strong-scaling table of docs/distributed.md, from ``scripts/dist_scaling.py``'s run."""
    payload = json.loads((ROOT / "benchmarks" / "dist" / "scaling-cpu.json").read_text())
    return _script("dist_scaling").markdown_table(payload["rows"]) + "\n"


def render_compare_walltime() -> str:
    """Wall and CPU time of the default ``eff-attn compare``, cold and warm (``scripts/bench_compare_walltime.py``)."""
    payload = json.loads((ROOT / "benchmarks" / "cpu" / "compare-walltime" / "results.json").read_text())
    env = payload["meta"]["environment"]
    runs = [("empty Numba cache (cold)", payload["cold_run"])]
    runs += [(f"warm cache, run {i}", run) for i, run in enumerate(payload["warm_runs"], 1)]
    lines = ["| run | wall time | CPU time | of which compiling ahead | load average at start |", "|---|---|---|---|---|"]
    for label, run in runs:
        ahead = run.get("compile_ahead_wall_s")
        lines.append(f"| {label} | {run['wall_s']:.0f} s | {run['cpu_s']:.0f} s | "
                     f"{'-' if not ahead else f'{ahead:.0f} s'} | {run['load_average_at_start']:.2f} |")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines += ["", f"Command: `{payload['meta']['script']}` (runs `eff-attn compare` in fresh processes); "
              f"raw data: `benchmarks/cpu/compare-walltime/results.json`; {env['cpu']}, {env['cpu_count']} cores, "
              f"Python {env['python']}, {versions}; {env['date']}."]
    return "\n".join(lines) + "\n"


RENDERERS = {"dist-scaling": render_dist_scaling, "compare-walltime": render_compare_walltime}


def _cell(value, spec: str | None) -> str:
    if value is None:
        return ""
    if spec is None:
        return str(value)
    return spec.format(value)


def render_table(path: Path) -> str:
    """A Markdown table (and its provenance line) from a JSON file in the generic table format."""
    payload = json.loads(path.read_text())
    columns, formats = payload["columns"], payload.get("formats", {})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in payload["rows"]:
        if len(row) != len(columns):
            raise ValueError(f"{path}: row {row!r} has {len(row)} cells for {len(columns)} columns")
        lines.append("| " + " | ".join(_cell(v, formats.get(c)) for c, v in zip(columns, row)) + " |")
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()
    source = f"Command: `{payload['command']}`; raw data: `{shown}`"
    if payload.get("machine"):
        source += f"; {payload['machine']}"
    lines += ["", source + "." + (f" {payload['note']}" if payload.get("note") else "")]
    return "\n".join(lines) + "\n"


def render(name: str) -> str:
    if name in RENDERERS:
        return RENDERERS[name]()
    path = ROOT / name
    if not (name.startswith("benchmarks/") and name.endswith(".json") and path.is_file()):
        raise ValueError(f"numbers:{name}: neither a renderer ({', '.join(RENDERERS)}) "
                         f"nor a JSON file under benchmarks/")
    return render_table(path)


def updated(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def survey(pages) -> list[str]:
    """``file:line: text`` of each line quoting a measured-looking number outside a generated block."""
    found = []
    for page in pages:
        text = page.read_text()
        blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
        text = FENCE.sub(blank, text)
        text = BLOCK.sub(blank, text)
        text = re.sub(r"<!-- BEGIN (\S+) -->.*?<!-- END \1 -->", blank, text, flags=re.S)  # publish_benchmarks
        for number, line in enumerate(text.split("\n"), 1):
            if MEASURED.search(line):
                found.append(f"{page.relative_to(ROOT).as_posix()}:{number}: {line.strip()[:100]}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if a generated block is out of date")
    mode.add_argument("--survey", action="store_true", help="list hand-typed measured numbers")
    args = parser.parse_args(argv)
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    if args.survey:
        print("\n".join(survey(pages)))
        return 0
    stale = []
    for page in pages:
        text = page.read_text()
        new = updated(text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("out of date: " + ", ".join(stale) + "; run python scripts/publish_docs_numbers.py", file=sys.stderr)
        return 1
    blocks = sum(len(BLOCK.findall(p.read_text())) for p in pages)
    print(f"{blocks} generated block(s); " + (f"rewrote {', '.join(stale)}" if stale else "all up to date"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
