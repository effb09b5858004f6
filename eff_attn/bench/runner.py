"""The engine of ``eff-attn compare``: every method x budget x backend x N.

For each sequence length the runner builds the problem once, computes the
float64 exact attention (the truth) and the uniform baseline, then for every
method, budget and backend:

1. validates, dispatches and draws once (:func:`eff_attn.api.prepare`);
2. times the backend call alone (first call, then warm repeats);
3. measures its peak memory;
4. scores the output of every seed against the truth, per head.

``torch.nn.functional.scaled_dot_product_attention`` is timed as the
speed anchor (``method="sdpa"``) when torch is installed.
"""

from __future__ import annotations

import importlib.util
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import _backend, api, metrics, registry
from ..registry import NotSupportedError
from .measure import peak_memory, time_call
from .problems import make_problem

__all__ = ["CompareConfig", "run_compare", "environment", "SDPA"]

SDPA = "sdpa"


@dataclass
class CompareConfig:
    """What ``eff-attn compare`` runs; the defaults are its embedded default problem."""

    methods: list[str] | None = None
    backends: list[str] = field(default_factory=lambda: ["auto"])
    ns: list[int] = field(default_factory=lambda: [2048])
    problem: str = "clustered"
    heads: int = 8
    d: int = 64
    dtype: str = "float32"
    causal: bool = False
    budgets: str = "all"
    seeds: int = 2
    repeats: int = 5
    time_budget_s: float = 2.0
    sdpa: bool = True

    def method_list(self) -> list[str]:
        return list(self.methods) if self.methods else registry.method_names()


def environment() -> dict:
    """Device, versions and interpreter, recorded with every result."""
    versions = {}
    for name in ("numpy", "scipy", "numba", "cupy", "torch"):
        if importlib.util.find_spec(name) is not None:
            try:
                versions[name] = __import__(name).__version__
            except Exception as exc:  # a broken install must not stop the benchmark
                versions[name] = f"unavailable ({type(exc).__name__})"
    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "eff_attn": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": _cpu_count(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    ok, _ = _backend.available("cupy")
    if ok:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return env


def _cpu_count() -> int:
    try:
        import os

        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        import os

        return os.cpu_count() or 1


def _truth(q, k, v, causal):
    """float64 exact attention (blocked, so no N^2 memory) and the uniform output."""
    backend = "numba" if _backend.available("numba")[0] else "numpy"
    params = {"algorithm": "blocked"}
    exact = api.attention(q, k, v, method="exact", backend=backend, causal=causal, **params)
    uniform = api.attention(q, k, v, method="uniform", backend=backend, causal=causal)
    return exact, uniform


def _errors(out, exact, uniform) -> dict:
    fro = metrics.rel_frobenius(out, exact)                               # (heads,)
    spec = metrics.rel_spectral(out, exact)                               # (heads,)
    ratio = fro / np.maximum(metrics.rel_frobenius(uniform, exact), np.finfo(float).tiny)
    return {"rel_fro": fro, "rel_spectral": spec, "err_ratio": ratio,
            "max_abs": np.atleast_1d(metrics.max_abs_error(out, exact))}


def _summary(values: list[np.ndarray]) -> tuple[float, float]:
    flat = np.concatenate([np.ravel(v) for v in values])
    return float(np.median(flat)), float(np.percentile(flat, 90))


def _device_arrays(arrays, device):
    if device != "gpu":
        return arrays
    import cupy

    return tuple(cupy.asarray(a) for a in arrays)


def _backends_for(config: CompareConfig) -> list[str]:
    if config.backends == ["all"]:
        return [b for b in registry.BACKENDS if _backend.available(b)[0]]
    return config.backends


def _budget_list(method, mode: str) -> list[dict]:
    if mode == "default":
        return [dict(method.compare_defaults)]
    return [dict(b) for b in method.budgets]


def _budget_value(method, budget: dict):
    if method.budget_name and method.budget_name in budget:
        return budget[method.budget_name]
    return ", ".join(f"{k}={v}" for k, v in budget.items()) or "default"


def _time_sdpa(q, k, v, causal, repeats, time_budget_s):
    import torch

    device = "cuda" if hasattr(q, "__cuda_array_interface__") else "cpu"
    tq, tk, tv = (torch.from_dlpack(a) for a in (q, k, v))

    def call():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=bool(causal))

    def sync_call():
        out = call()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    dev = "gpu" if device == "cuda" else "cpu"
    first = time_call(sync_call, device=dev, repeats=1)
    reps = max(1, min(repeats, int(time_budget_s / max(first.first_s, 1e-6))))
    timing = time_call(sync_call, device=dev, repeats=reps)
    mem = peak_memory(sync_call, device=dev)
    out = call().cpu().numpy() if device == "cuda" else call().numpy()
    return out, timing, mem


def run_compare(config: CompareConfig, progress=None) -> dict:
    """Run the comparison and return ``{"meta": ..., "rows": [...], "skipped": [...]}``.

    ``progress`` is an optional callable ``progress(description, advance)``
    driven once per (N, method, budget, backend) cell.
    """
    dtype = np.dtype(config.dtype)
    rows, skipped = [], []
    methods = [registry.get_method(name) for name in config.method_list()]
    backends = _backends_for(config)
    use_sdpa = config.sdpa and importlib.util.find_spec("torch") is not None
    for n in config.ns:
        problem = make_problem(config.problem, n, d=config.d, heads=config.heads)
        q64, k64, v64 = problem.astype(np.float64)
        exact, uniform = _truth(q64, k64, v64, config.causal)
        host = problem.astype(dtype)
        for method in methods:
            for budget in _budget_list(method, config.budgets):
                for backend in backends:
                    label = f"N={n} {method.name} {_budget_value(method, budget)} [{backend}]"
                    if progress is not None:
                        progress(label, 0)
                    start = time.perf_counter()
                    row = _run_cell(method, budget, backend, host, exact, uniform, config)
                    row["cell_s"] = time.perf_counter() - start                 # draws, fits, timing, scoring
                    if progress is not None:
                        progress(label, 1)
                    if row.get("status") == "skipped":
                        skipped.append({"n": n, **row})
                    else:
                        rows.append({"n": n, "problem": problem.name, **row})
        if use_sdpa:
            for device in sorted({("gpu" if b == "cupy" else "cpu") for b in backends} or {"cpu"}):
                arrays = _device_arrays(host, device)
                out, timing, mem = _time_sdpa(*arrays, config.causal, config.repeats, config.time_budget_s)
                errs = _errors(out, exact, uniform)
                rows.append(_row(n, problem.name, SDPA, "", "default", "torch-cuda" if device == "gpu" else "torch-cpu",
                                 errs, timing, mem, flops=4 * config.heads * n * n * config.d, config=config))
    return {
        "meta": {"config": asdict(config), "environment": environment()},
        "rows": rows,
        "skipped": skipped,
    }


def _run_cell(method, budget, backend, host, exact, uniform, config):
    device = "gpu" if backend == "cupy" else "cpu"
    arrays = _device_arrays(host, device)
    try:
        calls = [
            api.prepare(*arrays, method=method.name, backend=backend, causal=config.causal, rng=seed, **budget)
            for seed in range(config.seeds if method.randomized else 1)
        ]
    except (NotSupportedError, ValueError) as exc:
        return {"status": "skipped", "method": method.name, "budget": budget, "backend": backend, "reason": str(exc)}
    call = calls[0]
    dev = "gpu" if call.impl.backend == "cupy" else "cpu"
    first = time_call(call.run_forward, device=dev, repeats=1)
    reps = max(1, min(config.repeats, int(config.time_budget_s / max(first.warm_median_s, 1e-6))))
    timing = time_call(call.run_forward, device=dev, repeats=reps)
    timing = type(timing)(first.first_s, timing.warm_median_s, timing.warm_q25_s, timing.warm_q75_s, timing.repeats)
    mem = peak_memory(call.run_forward, device=dev)
    errs = {key: [] for key in ("rel_fro", "rel_spectral", "err_ratio", "max_abs")}
    flops = None
    for c in calls:
        out, res = c.run_forward()
        out = c.problem.unflatten(out)
        out = out.get() if hasattr(out, "get") else out
        for key, value in _errors(out, exact, uniform).items():
            errs[key].append(value)
        if flops is None:
            flops = api.build_info(c, res)["flops"]
    return _row(None, None, method.name, method.budget_name, _budget_value(method, budget), call.impl.backend,
                errs, timing, mem, flops=flops, config=config, budget=budget)


def _row(n, problem, method, budget_name, budget_value, backend, errs, timing, mem, *, flops, config, budget=None):
    as_lists = {k: (v if isinstance(v, list) else [v]) for k, v in errs.items()}
    fro, fro90 = _summary(as_lists["rel_fro"])
    spec, spec90 = _summary(as_lists["rel_spectral"])
    ratio, ratio90 = _summary(as_lists["err_ratio"])
    row = {
        "method": method,
        "budget_name": budget_name,
        "budget": budget_value if not isinstance(budget_value, (np.integer, np.floating)) else budget_value.item(),
        "params": budget or {},
        "backend": backend,
        "dtype": config.dtype,
        "heads": config.heads,
        "d": config.d,
        "causal": config.causal,
        "rel_fro_median": fro,
        "rel_fro_p90": fro90,
        "rel_spectral_median": spec,
        "rel_spectral_p90": spec90,
        "err_ratio_median": ratio,
        "err_ratio_p90": ratio90,
        "max_abs": float(np.max(np.concatenate([np.ravel(v) for v in as_lists["max_abs"]]))),
        "warm_ms": 1e3 * timing.warm_median_s,
        "warm_ms_q25": 1e3 * timing.warm_q25_s,
        "warm_ms_q75": 1e3 * timing.warm_q75_s,
        "repeats": timing.repeats,
        "compile_s": timing.compile_s,
        "peak_mb": mem / 2**20,
        "flops": int(flops) if flops is not None else None,
        "gflops_per_s": (flops / timing.warm_median_s / 1e9) if flops and timing.warm_median_s > 0 else math.nan,
    }
    if n is not None:
        row = {"n": n, "problem": problem, **row}
    return row
