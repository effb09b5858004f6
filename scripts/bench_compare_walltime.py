"""Wall time of the default ``eff-attn compare`` with a cold and with a warm Numba cache.

    python scripts/bench_compare_walltime.py                      # writes benchmarks/cpu/compare-walltime/results.json
    python scripts/bench_compare_walltime.py --warm-runs 2 --out some/dir

Runs ``python -m eff_attn.cli compare`` (no options but ``--out``) in a fresh
process: first with an empty ``NUMBA_CACHE_DIR`` (cold: every kernel the
default run uses is compiled), then ``--warm-runs`` times reusing that cache
(warm). Records each wall time and CPU time (user + system, all threads: on
a shared machine the CPU time is the steadier number; on an idle 2-core box
the wall time is at most it), the load average, the per-method cell seconds and compile
seconds from the run's JSON, the device, versions and the command. This is a
benchmark, not a test: it says how long a newcomer waits, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eff_attn.bench.runner import environment  # noqa: E402

OUT = ROOT / "benchmarks" / "cpu" / "compare-walltime"


def _run(cache: Path, out: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "eff_attn.cli", "compare", "--out", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    payload = json.loads((out / "results.json").read_text())
    cells = {}
    for row in payload["rows"]:
        name = f"{row['method']} [{row['backend']}]"
        cells[name] = {"cell_s": row.get("cell_s"), "cell_cpu_s": row.get("cell_cpu_s"),
                       "compile_s": row.get("compile_s"), "compile_ahead_s": row.get("compile_ahead_s"),
                       "warm_ms": row.get("warm_ms")}
    return {"wall_s": wall, "cpu_s": cpu, "load_average_at_start": load, "load_average_at_end": os.getloadavg()[0],
            "compile_ahead_wall_s": payload["meta"].get("compile_ahead_wall_s"),
            "cells": cells, "skipped": [s["method"] for s in payload.get("skipped", [])]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=2, help="warm-cache runs after the cold one (default: 2)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eff-attn-walltime-") as tmp:
        cache, work = Path(tmp) / "numba-cache", Path(tmp) / "compare-out"
        cold = _run(cache, work)
        print(f"cold: {cold['wall_s']:.1f} s wall, {cold['cpu_s']:.1f} s CPU", flush=True)
        warm = []
        for i in range(args.warm_runs):
            warm.append(_run(cache, work))
            print(f"warm {i + 1}: {warm[-1]['wall_s']:.1f} s wall, {warm[-1]['cpu_s']:.1f} s CPU", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "kind": "compare-walltime",
        "meta": {"command": "eff-attn compare", "script": "python scripts/bench_compare_walltime.py "
                 + " ".join(argv if argv is not None else sys.argv[1:]), "environment": environment(),
                 "load_average_at_end": load},
        "cold_s": cold["wall_s"],
        "warm_s": [w["wall_s"] for w in warm],
        "warm_best_s": min((w["wall_s"] for w in warm), default=None),
        "cold_run": cold,
        "warm_runs": warm,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
