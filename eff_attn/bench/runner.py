"""The engine of ``eff-attn compare``: every method x budget x backend x N.

For each sequence length the runner builds the problem once, computes the
float64 exact attention (the truth) and the uniform baseline, then for every
method, budget and backend:

1. validates, dispatches and draws once (:func:`eff_attn.api.prepare`);
2. times the backend call alone (first call, then warm repeats);
3. measures its peak memory;
4. scores the output of every seed per head, against softmax and against
   the method's own target (:mod:`eff_attn.bench.targets`: dense entmax for
   entmax and Sparsefinder, YOSO-E for YOSO), each also relative to the
   uniform mean's error against the same target.

``torch.nn.functional.scaled_dot_product_attention`` is timed as the
speed anchor (``method="sdpa"``), called as its users call it: with 4-D
``(B, H, N, D)`` contiguous tensors, which lets torch pick its fused
kernel (3-D input sends the CPU to the math path, which stores N x N).
Without torch the anchor is listed in ``skipped`` with the reason.

By default each method runs once, at its default budget
(``budgets="default"``); ``budgets="all"`` runs each method's sweep.
The ``progress`` callback advances by each cell's expected cost
(:func:`expected_cost`), so a progress bar's ETA means something.
"""

from __future__ import annotations

import importlib.util
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import _backend, _dispatch, api, metrics, registry
from .._validate import check_inputs
from ..registry import NotSupportedError
from .measure import measure_call
from .problems import make_problem
from .report import BETTER_THAN_UNIFORM
from .targets import SOFTMAX, Target, target_backend, target_of
from .warmup import cold_tasks, compile_ahead, compile_seconds

__all__ = ["CompareConfig", "run_compare", "environment", "expected_cost", "check_backends", "sdpa_inputs", "SDPA",
           "SDPA_CALL", "TORCH_MISSING"]

SDPA = "sdpa"
#: How the SDPA anchor is called, recorded in every result (runs without it passed 3-D tensors).
SDPA_CALL = "4-D (B, H, N, D) contiguous tensors"
TORCH_MISSING = "torch is not installed (pip install torch to time PyTorch's SDPA as the speed anchor)"


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
    budgets: str = "default"
    seeds: int = 2
    repeats: int = 5
    time_budget_s: float = 2.0
    sdpa: bool = True
    compile_jobs: int = 0

    # compile_jobs: processes that compile the Numba kernels before the timed run
    # (:mod:`eff_attn.bench.warmup`); 0 or 1 compiles in the first timed call instead.
    # ``eff-attn compare`` passes the CPU count.

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


class _Truth:
    """float64 reference outputs of one problem, computed once each: softmax, the uniform mean, other targets."""

    def __init__(self, q, k, v, causal):
        self.qkv, self.causal = (q, k, v), causal
        self.backend = target_backend(q.shape[0], q.shape[1], k.shape[1])
        self._cache = {}
        self.uniform = api.attention(q, k, v, method="uniform", backend=self.backend, causal=causal)
        self.exact = self.output(SOFTMAX)                                  # blocked: no N^2 memory

    def output(self, target: Target):
        key = (target.method, repr(target.params))
        if key not in self._cache:
            self._cache[key] = api.attention(*self.qkv, method=target.method, backend=self.backend,
                                             causal=self.causal, **target.kwargs)
        return self._cache[key]


def _errors(out, truth: _Truth, target: Target) -> dict:
    exact, uniform = truth.exact, truth.uniform
    tiny = np.finfo(float).tiny
    fro = metrics.rel_frobenius(out, exact)                               # (heads,)
    spec = metrics.rel_spectral(out, exact)                               # (heads,)
    ratio = fro / np.maximum(metrics.rel_frobenius(uniform, exact), tiny)
    ref = truth.output(target)                                            # (heads, N, Dv)
    target_fro = metrics.rel_frobenius(out, ref)                          # (heads,)
    target_ratio = target_fro / np.maximum(metrics.rel_frobenius(uniform, ref), tiny)
    return {"rel_fro": fro, "rel_spectral": spec, "err_ratio": ratio, "target_fro": target_fro,
            "target_ratio": target_ratio, "max_abs": np.atleast_1d(metrics.max_abs_error(out, exact))}


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


def check_backends(backends: list[str]) -> None:
    """Refuse, before any work, a named backend that is unknown or cannot run here.

    Raises
    ------
    ValueError
        For a name that is not a backend.
    NotSupportedError
        For a backend that is not installed or has no device, with the reason.
    """
    if backends == ["all"]:
        return
    for name in backends:
        if name == "auto":
            continue
        if name not in registry.BACKENDS:
            raise ValueError(f"backend={name!r} is not one of auto, all, {', '.join(registry.BACKENDS)}")
        ok, why = _backend.available(name)
        if not ok:
            raise NotSupportedError(f"backend={name!r} cannot run here: {why}")


def _budget_list(method, mode: str, n: int) -> list[dict]:
    if mode == "default":
        return [dict(method.compare_defaults)]
    if mode != "all":
        raise ValueError(f"budgets={mode!r} is not 'default' or 'all'")
    return method.sweep(n)


#: Rough sustained rate of an attention kernel on one CPU core, for progress weights only.
_CPU_FLOPS_PER_S = 2e9
#: Seconds per call that do not scale with FLOPs (dispatch, scoring, allocation), for progress weights only.
_CALL_OVERHEAD_S = 0.01
#: Fitting a learned state on the call's inputs, in seconds per million (query, key) pairs per slice
#: (measured on a 2-core box at N = 2048); for progress weights only.
_FIT_S_PER_MPAIR = {"treeformer_tf": 0.4, "treeformer_tc": 0.4, "sparsefinder": 0.8}


def _fits(method, params: dict) -> bool:
    return params.get("tree_init") == "fit" or params.get("state") == "fit"


def expected_cost(method, budget: dict, n: int, config: CompareConfig) -> float:
    """Expected seconds of one cell: its timed calls, estimated from analytic FLOPs, plus any fitting.

    Only the progress bar uses it; a budget that does not resolve costs one call's overhead.
    """
    q = np.empty((config.heads, n, config.d), dtype=config.dtype)          # shapes only; never read
    try:
        problem = check_inputs(q, q, q, causal=config.causal, check_finite=False)
        params = _dispatch.resolve_params(method, problem, budget)
        scalars = registry.scalar_params(params)
        flops = method.flops(n, n, config.d, config.d, batch=config.heads, causal=bool(config.causal), **scalars)
    except Exception:                                                      # the cell will report why
        return _CALL_OVERHEAD_S
    fit = _FIT_S_PER_MPAIR.get(method.name, 0.0) * config.heads * n * n / 1e6 if _fits(method, budget) else 0.0
    seconds = flops / _CPU_FLOPS_PER_S + _CALL_OVERHEAD_S + fit                    # every call fits its state
    calls = 1 + min(config.repeats, max(1, int(config.time_budget_s / seconds)))   # first, warm (measure_call)
    calls += config.seeds - 1 if method.randomized else 0                          # the other seeds' scoring
    return calls * seconds


def _sdpa_cost(n: int, config: CompareConfig) -> float:
    seconds = 4 * config.heads * n * n * config.d / _CPU_FLOPS_PER_S + _CALL_OVERHEAD_S
    return (3 + min(config.repeats, max(1, int(config.time_budget_s / seconds)))) * seconds


def _budget_value(method, budget: dict):
    if method.budget_name and method.budget_name in budget:
        return budget[method.budget_name]
    return ", ".join(f"{k}={v}" for k, v in budget.items()) or "default"


def sdpa_inputs(q, k, v):
    """q, k, v of shape (H, N, D) as torch tensors of shape (1, H, N, D), contiguous, on their device.

    This is how a user calls SDPA, and the shape its fused kernels need
    (CPU flash attention takes 4-D input only).
    """
    import torch

    return tuple(torch.from_dlpack(a).unsqueeze(0).contiguous() for a in (q, k, v))


def _time_sdpa(q, k, v, causal, repeats, time_budget_s):
    import torch

    device = "cuda" if hasattr(q, "__cuda_array_interface__") else "cpu"
    tq, tk, tv = sdpa_inputs(q, k, v)                                      # (1, H, N, D) each

    def call():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=bool(causal))

    def sync_call():
        out = call()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    dev = "gpu" if device == "cuda" else "cpu"
    measured = measure_call(sync_call, device=dev, repeats=repeats, time_budget_s=time_budget_s)
    out = measured.result[0]                                               # (H, N, D)
    out = out.cpu().numpy() if device == "cuda" else out.numpy()
    return out, measured.timing, measured.peak_bytes


def _torch_missing() -> str | None:
    """Why the SDPA anchor cannot run here, or None."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return TORCH_MISSING
    return None


def run_compare(config: CompareConfig, progress=None) -> dict:
    """Run the comparison and return ``{"meta": ..., "rows": [...], "skipped": [...]}``.

    ``progress`` is an optional callable ``progress(description, advance, total)``:
    called with ``advance=0`` as a cell starts and with the cell's expected
    cost in seconds (:func:`expected_cost`) as it ends; ``total`` is the sum
    over all cells.
    """
    dtype = np.dtype(config.dtype)
    rows, skipped = [], []
    methods = [registry.get_method(name) for name in config.method_list()]
    backends = _backends_for(config)
    sdpa_missing = _torch_missing() if config.sdpa else None
    sdpa_devices = sorted({("gpu" if b == "cupy" else "cpu") for b in backends} or {"cpu"}) if config.sdpa else []
    cells = [(n, method, budget, backend, expected_cost(method, budget, n, config))
             for n in config.ns for method in methods
             for budget in _budget_list(method, config.budgets, n) for backend in backends]
    jobs = config.compile_jobs
    tasks = cold_tasks(config, [c[:4] for c in cells]) if jobs > 1 else []   # none on a warm cache
    compile_cost = sum(compile_seconds(t) for t in tasks) / jobs if tasks else 0.0
    total = (compile_cost + sum(c[-1] for c in cells)
             + sum(_sdpa_cost(n, config) for n in config.ns) * len(sdpa_devices))

    def tick(label, advance):
        if progress is not None:
            progress(label, advance, total)

    ahead, ahead_wall = {}, 0.0
    if tasks:
        tick(f"compiling kernels ({jobs} processes)", 0)
        start = time.perf_counter()
        ahead = compile_ahead(tasks, jobs)
        ahead_wall = time.perf_counter() - start
        tick(f"compiling kernels ({jobs} processes)", compile_cost)

    for n in config.ns:
        problem = make_problem(config.problem, n, d=config.d, heads=config.heads)
        tick(f"N={n} float64 references", 0)
        truth = _Truth(*problem.astype(np.float64), config.causal)
        host = problem.astype(dtype)
        for _, method, budget, backend, cost in (c for c in cells if c[0] == n):
            label = f"N={n} {method.name} {_budget_value(method, budget)} [{backend}]"
            tick(label, 0)
            start, start_cpu = time.perf_counter(), time.process_time()
            row = _run_cell(method, budget, backend, host, truth, config)
            row["cell_s"] = time.perf_counter() - start                     # draws, fits, timing, scoring
            row["cell_cpu_s"] = time.process_time() - start_cpu             # all threads: steadier when shared
            if method.name in ahead:
                row["compile_ahead_s"] = ahead[method.name]                 # a worker's compile + one call per cell
            tick(label, cost)
            if row.get("status") == "skipped":
                skipped.append({"n": n, **row})
            else:
                rows.append({"n": n, "problem": problem.name, **row})
        for device in sdpa_devices:
            backend = "torch-cuda" if device == "gpu" else "torch-cpu"
            if sdpa_missing is not None:
                skipped.append({"n": n, "status": "skipped", "method": SDPA, "budget": "default", "backend": backend,
                                "reason": sdpa_missing})
                continue
            label = f"N={n} {SDPA} [{backend}]"
            tick(label, 0)
            arrays = _device_arrays(host, device)
            out, timing, mem = _time_sdpa(*arrays, config.causal, config.repeats, config.time_budget_s)
            errs = _errors(out, truth, SOFTMAX)
            rows.append(_row(n, problem.name, SDPA, "", "default", backend, errs, timing, mem,
                             flops=4 * config.heads * n * n * config.d, config=config, target=SOFTMAX))
            tick(label, _sdpa_cost(n, config))
    return {
        "meta": {"config": asdict(config), "environment": environment(), "sdpa_call": SDPA_CALL,
                 "compile_ahead_wall_s": ahead_wall},
        "rows": rows,
        "skipped": skipped,
    }


def _run_cell(method, budget, backend, host, truth, config):
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
    measured = measure_call(call.run_forward, device=dev, repeats=config.repeats,
                            time_budget_s=config.time_budget_s)   # seed 0's output comes from its warm call
    target = target_of(method.name, call.params)
    errs = {}
    flops = None
    for c in calls:
        out, res = measured.result if c is call else c.run_forward()
        out = c.problem.unflatten(out)
        out = out.get() if hasattr(out, "get") else out
        for key, value in _errors(out, truth, target).items():
            errs.setdefault(key, []).append(value)
        if flops is None:
            flops = api.build_info(c, res)["flops"]
    # the resolved budget parameter when the cell sets it (or runs on defaults); a cell that sets other
    # parameters (Sparsefinder's distance predictor has no top_clusters) is labelled by what it sets
    names_budget = method.budget_name and (method.budget_name in budget or not budget)
    used = call.params.get(method.budget_name) if names_budget else None
    value = used if isinstance(used, (bool, int, float, str, np.integer, np.floating)) else \
        _budget_value(method, budget)
    return _row(None, None, method.name, method.budget_name, value, call.impl.backend,
                errs, measured.timing, measured.peak_bytes, flops=flops, config=config, budget=budget,
                target=target)


def _row(n, problem, method, budget_name, budget_value, backend, errs, timing, mem, *, flops, config, target,
         budget=None):
    as_lists = {k: (v if isinstance(v, list) else [v]) for k, v in errs.items()}
    fro, fro90 = _summary(as_lists["rel_fro"])
    spec, spec90 = _summary(as_lists["rel_spectral"])
    ratio, ratio90 = _summary(as_lists["err_ratio"])
    target_fro, target_fro90 = _summary(as_lists["target_fro"])
    target_ratio, target_ratio90 = _summary(as_lists["target_ratio"])
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
        "target": target.label,                                   # what the row is judged against
        "target_error_median": target_fro,                         # rel. Frobenius error against the target
        "target_error_p90": target_fro90,
        "target_ratio_median": target_ratio,                       # ... over the uniform mean's, same target
        "target_ratio_p90": target_ratio90,
        "beats_uniform": bool(target_ratio < BETTER_THAN_UNIFORM),
        "rel_fro_median": fro,                                     # against softmax, for every row
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
