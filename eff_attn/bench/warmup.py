"""Compile a comparison's Numba kernels ahead of it, in parallel processes.

Numba compiles a kernel the first time it meets a type signature and, with
``cache=True``, stores the machine code in its cache directory; later
processes load it in a fraction of a second. A cold first run of
``eff-attn compare`` spends most of its time compiling, one kernel after
another, on one core: the compiler holds a process-wide lock.
:func:`compile_ahead` runs each method's cells once, on the same problem
(a kernel's argument types can follow the shapes: a one-head copy missed
some), in ``jobs`` spawned processes. Their kernels land in the
shared cache, and the timed run in the parent then loads them.

Only methods whose kernels are not cached at all take part
(:func:`has_cached_kernels`): on a warm cache the pass is skipped, since
loading every kernel twice and fitting states in the workers would cost a
warm run about a third more CPU time. With ``jobs <= 1`` there is no pass
and the first timed call of each cell compiles, as before. A cell that
fails here is ignored: the timed run reports it.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

__all__ = ["cold_tasks", "compile_ahead", "warm_cells", "has_cached_kernels", "compile_seconds", "COMPILE_S"]

#: Seconds a worker took to compile and run each method's default compare cells in the compile-ahead pass
#: of a cold default run (``compile_ahead_s`` of ``benchmarks/cpu/compare-walltime``, 2-core box; kernels
#: another task had cached by then are loaded, not compiled). They order the tasks, longest first, and
#: weight the progress bar; nothing else reads them.
COMPILE_S = {"exact": 25.0, "uniform": 3.0, "topk_oracle": 10.0, "yoso": 16.0, "kdeformer": 13.0,
             "performer": 16.0, "routing": 19.0, "nystrom": 15.0, "reformer": 14.0, "treeformer_tf": 10.0,
             "treeformer_tc": 10.0, "entmax": 10.0, "sparsefinder": 39.0}
#: A method missing from :data:`COMPILE_S`.
_COMPILE_S_OTHER = 30.0


def compile_seconds(task: dict) -> float:
    """A task's expected compile seconds (:data:`COMPILE_S`)."""
    return COMPILE_S.get(task["method"], _COMPILE_S_OTHER)


def has_cached_kernels(method) -> bool:
    """Whether any kernel of ``method``'s Numba backend has an entry in Numba's cache.

    Reads each dispatcher's cache index (a Numba internal, behind a guard:
    if it cannot be read, the answer is True, which skips the pass).
    """
    import importlib

    import numba

    impl = method.impl("numba")
    if impl is None or not isinstance(impl.module, str):
        return True
    try:
        module = importlib.import_module(impl.module)
        home = importlib.import_module(module.forward.__module__)         # where a re-exported forward lives
        dispatchers = [obj for m in {module, home} for obj in vars(m).values()
                       if isinstance(obj, numba.core.dispatcher.Dispatcher) and obj.py_func.__module__ == m.__name__]
        return not dispatchers or any(bool(d._cache._cache_file._load_index()) for d in dispatchers)
    except Exception:  # noqa: BLE001 - a Numba without these internals: behave as before (no pass)
        return True


def warm_cells(task: dict) -> tuple[str, float]:
    """Run one method's cells once (in a worker); returns ``(method, seconds)``."""
    start = time.perf_counter()
    import numba

    from .. import api
    from .problems import make_problem
    from .targets import SOFTMAX, Target, target_backend, target_of

    numba.set_num_threads(1)                                 # the workers share the cores
    problem = make_problem(task["problem"], task["n"], d=task["d"], heads=task["heads"])
    host, host64 = problem.astype(np.dtype(task["dtype"])), problem.astype(np.float64)
    targets = {SOFTMAX, Target("uniform", "uniform")}                 # the float64 references every run computes
    for budget in task["budgets"]:
        for backend in task["backends"]:
            try:
                call = api.prepare(*host, method=task["method"], backend=backend, causal=task["causal"], rng=0,
                                   **budget)
                if call.impl.backend != "numba":
                    continue
                call.run_forward()
                targets.add(target_of(task["method"], call.params))
            except Exception:  # noqa: BLE001 - the timed run reports every failure with its reason
                continue
    if target_backend(*host64[0].shape[:2], host64[1].shape[1]) == "numba":   # the targets' float64 kernels
        for target in targets:
            try:
                api.attention(*host64, method=target.method, backend="numba", causal=task["causal"], **target.kwargs)
            except Exception:  # noqa: BLE001
                pass
    return task["method"], time.perf_counter() - start


def cold_tasks(config, cells) -> list[dict]:
    """One task per (length, method) of ``cells`` (``(n, method, budget, backend)`` tuples) whose kernels are
    not cached at all (:func:`has_cached_kernels`); ``[]`` without Numba or on a warm cache. In the order
    the workers should take them."""
    from .. import _backend

    if not _backend.available("numba")[0]:
        return []
    tasks, cold = {}, {}
    for n, method, budget, backend in cells:
        if backend not in ("auto", "numba"):
            continue
        if method.name not in cold:
            cold[method.name] = not has_cached_kernels(method)
        if not cold[method.name]:
            continue
        task = tasks.setdefault((n, method.name), {
            "method": method.name, "n": n, "problem": config.problem, "d": config.d, "heads": config.heads,
            "dtype": config.dtype, "causal": config.causal, "budgets": [], "backends": []})
        for key, value in (("budgets", budget), ("backends", backend)):
            if value not in task[key]:
                task[key].append(value)
    # Longest first, so that no worker starts a long task last; but exact before all: its float64
    # kernels are every task's softmax target, which the others then load from the cache.
    return sorted(tasks.values(), key=lambda t: (t["method"] != "exact", -compile_seconds(t)))


def compile_ahead(tasks: list[dict], jobs: int) -> dict[str, float]:
    """Run :func:`cold_tasks`' ``tasks`` in ``jobs`` processes, filling the Numba cache.

    Returns ``{method: seconds}``, each worker's wall time for that method
    (compiling its kernels, plus one call per cell); ``{}`` when there is
    nothing to do or ``jobs <= 1``.
    """
    if jobs <= 1 or not tasks:
        return {}
    context = multiprocessing.get_context("spawn")           # never fork a process that may hold threads
    seconds: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        for name, elapsed in pool.map(warm_cells, tasks):
            seconds[name] = seconds.get(name, 0.0) + elapsed
    return seconds
