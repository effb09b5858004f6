"""Dispatch: which implementation of a method runs a call.

The one place that chooses a backend. :mod:`eff_attn.api`, the Dask tasks
(:mod:`eff_attn.dist.tasks`), the entmax transforms and the methods' helpers
(``routing.route``) all ask here, so that the choice is made by one rule.
"""

from __future__ import annotations

import inspect

from . import _backend
from ._validate import Problem, check_choice
from .registry import BACKENDS, Impl, Method, NotSupportedError, not_supported_reasons

__all__ = ["AUTO_NUMBA_MIN_PAIRS", "resolve_params", "backend_order", "select_impl", "helper_impl"]

#: ``backend="auto"`` prefers Numba over NumPy for host arrays once the
#: problem has at least this many (batch x query x key) pairs; below it the
#: NumPy reference is faster than a first compilation.
AUTO_NUMBA_MIN_PAIRS = 1 << 20


def resolve_params(method: Method, problem: Problem, params: dict) -> dict:
    """``method.resolve(problem, **params)``, after refusing a parameter it does not take (TypeError)."""
    accepted = [
        name for name, p in inspect.signature(method.resolve).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(
            f"method {method.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(accepted) or '(none)'}"
        )
    return method.resolve(problem, **params)


def backend_order(backend: str, problem: Problem) -> list[str]:
    """The backends to try, best first: the one asked for, or for ``"auto"`` CuPy on device
    arrays and, on host arrays, Numba first from :data:`AUTO_NUMBA_MIN_PAIRS` pairs on."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
        return [backend]
    if problem.device == "gpu":
        return ["cupy"]
    pairs = problem.G * problem.Nq * problem.Nk
    return ["numba", "numpy"] if pairs >= AUTO_NUMBA_MIN_PAIRS else ["numpy", "numba"]


def select_impl(method: Method, backend: str, problem: Problem, params: dict, need_grad: bool) -> Impl:
    """The first implementation in :func:`backend_order` that can run the call.

    Raises
    ------
    NotSupportedError
        When none can, listing why each backend refused.
    """
    order = backend_order(backend, problem)
    refused = []
    for name in order:
        impl = method.impl(name)
        reasons = ["not implemented"] if impl is None else not_supported_reasons(impl, problem, params, need_grad=need_grad)
        if not reasons:
            return impl
        refused.append(f"  {method.name}/{name}: " + "; ".join(reasons))
    for impl in method.impls:  # show the user what else could have run
        if impl.backend not in order:
            reasons = not_supported_reasons(impl, problem, params, need_grad=need_grad)
            refused.append(f"  {method.name}/{impl.backend}: " + ("; ".join(reasons) if reasons else "would run"))
    asked = f"backend={backend!r}"
    raise NotSupportedError(f"no implementation of {method.name!r} can run these inputs with {asked}:\n" + "\n".join(refused))


def helper_impl(method: Method, backend: str, problem: Problem) -> Impl:
    """The implementation a method's helper runs (``routing.route``): one that
    needs no FLOP budget, so ``"auto"`` is CuPy on device arrays and NumPy on
    host arrays; an explicit backend must be available here.

    Raises
    ------
    ValueError
        If ``backend`` is not a backend name, or is not available.
    """
    if backend == "auto":
        backend = "cupy" if problem.device == "gpu" else "numpy"
    check_choice("backend", backend, BACKENDS)
    ok, why = _backend.available(backend)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    return method.impl(backend)
