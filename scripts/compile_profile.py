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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(profile_one(argv[1])))
        return
    from eff_attn import registry

    for name in argv or registry.method_names():
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            out = subprocess.run([sys.executable, __file__, "--child", name], env=env, cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
