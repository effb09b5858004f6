"""Where a cold ``eff-attn compare`` spends its compile time: Numba seconds per kernel, per method.

For each method, a fresh process with an empty Numba cache runs the method's
default compare cells once, as the compile-ahead workers do
(:func:`eff_attn.bench.warmup.warm_cells`: the float32 cells plus the
float64 targets), and records every Numba compilation through Numba's event
API. A kernel's seconds include the callees it compiles first (helpers and
Numba's own implementations of NumPy functions), so the rows of one method
overlap; ``wall`` is the whole task.

    python scripts/compile_profile.py                 # every method, one line of JSON each
    python scripts/compile_profile.py exact nystrom   # some
    python scripts/compile_profile.py --out benchmarks/cpu/compile-profile/profile.json

With ``--out``, also a table in the generic format of
``scripts/publish_docs_numbers.py`` (the benchmarks page shows it): per
method, the task's seconds and its three costliest kernels of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def profile_one(name: str) -> dict:
    """Run in the child process: compile ``name``'s default cells, return the per-kernel seconds."""
    from numba.core import event

    from eff_attn.bench import runner, warmup
    from eff_attn.registry import get_method

    seconds, counts, starts = defaultdict(float), defaultdict(int), {}

    class Listener(event.Listener):
        def on_start(self, ev):
            starts[id(ev.data["dispatcher"]), str(ev.data["args"])] = time.perf_counter()

        def on_end(self, ev):
            fn = ev.data["dispatcher"].py_func
            began = starts.pop((id(ev.data["dispatcher"]), str(ev.data["args"])), None)
            if began is not None:
                seconds[f"{fn.__module__}.{fn.__qualname__}"] += time.perf_counter() - began
                counts[f"{fn.__module__}.{fn.__qualname__}"] += 1

    event.register("numba:compile", Listener())
    config = runner.CompareConfig(methods=[name])
    method = get_method(name)
    cells = [(n, method, budget, backend) for n in config.ns
             for budget in runner._budget_list(method, config.budgets, n) for backend in runner._backends_for(config)]
    start = time.perf_counter()
    for task in warmup.cold_tasks(config, cells):
        warmup.warm_cells(task)
    kernels = sorted(((round(s, 2), counts[k], k) for k, s in seconds.items()), reverse=True)
    return {"method": name, "wall_s": round(time.perf_counter() - start, 2), "kernels": kernels}


def table(results: list[dict], command: str) -> dict:
    """The generic table of ``scripts/publish_docs_numbers.py`` from :func:`profile_one`'s results."""
    from eff_attn.bench.runner import environment

    env = environment()
    rows = []
    for r in results:
        own = [k for k in r["kernels"] if k[2].startswith("eff_attn.")][:3]
        names = [k[2].removeprefix("eff_attn.").removeprefix("methods.").replace(".numba.", ".") for k in own]
        rows.append([r["method"], r["wall_s"], ", ".join(f"`{n}` {k[0]:.1f}" for n, k in zip(names, own))])
    total = sum(r["wall_s"] for r in results)
    return {"command": command, "columns": ["method", "compile task", "costliest kernels (s, with their callees)"],
            "formats": {"compile task": "{:.1f} s"}, "rows": rows,
            "machine": f"{env['cpu_count']} cores, {env['cpu']}, numba {env['versions'].get('numba', '?')}, {env['date']}",
            "note": f"One process per method on an empty cache, one after another: {total:.0f} s in all.",
            "raw": results}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(profile_one(argv[1])))
        return
    from eff_attn import registry

    out_path = None
    if "--out" in argv:
        at = argv.index("--out")
        out_path, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    results = []
    for name in argv or registry.method_names():
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, "--child", name], env=env, cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    if out_path:
        command = "python scripts/compile_profile.py " + " ".join([*argv, "--out", out_path])
        path = os.path.join(ROOT, out_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(table(results, command.strip()), fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
