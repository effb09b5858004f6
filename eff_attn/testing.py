"""Helpers for testing attention methods and backends.

Used by the package's own test suite, and meant for anyone adding a method
or a backend: one assertion with an informative failure message, random
inputs of given shapes, a finite-difference vector-Jacobian product, and the
CuPy emulation switch.
"""

from __future__ import annotations

import numpy as np

from ._array import to_host
from ._backend import emulate_cupy

__all__ = [
    "assert_close",
    "relative_error",
    "random_qkv",
    "finite_difference_vjp",
    "emulate_cupy",
    "to_host",
]


def relative_error(actual, desired) -> float:
    """Max-abs difference over the max-abs entry of ``desired`` (the agreement measure)."""
    a, d = to_host(actual).astype(np.float64), to_host(desired).astype(np.float64)
    scale = np.abs(d).max(initial=0.0)
    diff = np.abs(a - d).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(actual, desired, *, rel=1e-10, atol=0.0, what="arrays"):
    """Assert ``|actual - desired| <= rel * max|desired| + atol`` everywhere.

    On failure the message gives the worst index, both values there, the
    relative error and the share of elements out of tolerance.

    Parameters
    ----------
    actual, desired : array-like of the same shape (any framework)
    rel : float
        Tolerance relative to the largest entry of ``desired``.
    atol : float
        Absolute slack added to the bound.
    what : str
        Name used in the failure message.
    """
    a, d = to_host(actual), to_host(desired)
    if a.shape != d.shape:
        raise AssertionError(f"{what}: shapes differ, {a.shape} vs {d.shape}")
    a64, d64 = a.astype(np.float64), d.astype(np.float64)
    nan_a, nan_d = np.isnan(a64), np.isnan(d64)
    if (nan_a != nan_d).any():
        idx = tuple(int(i) for i in np.argwhere(nan_a != nan_d)[0])
        raise AssertionError(f"{what}: NaN mismatch at {idx}: actual={a64[idx]}, desired={d64[idx]}")
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a64 - d64)                                   # inf - inf is NaN here
    same = (a64 == d64) | (nan_a & nan_d)                          # equal values, equal infinities
    diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
    scale = np.abs(np.where(np.isfinite(d64), d64, 0.0)).max(initial=0.0)
    bound = rel * scale + atol
    bad = diff > bound
    if bad.any():
        worst = np.unravel_index(int(np.argmax(np.where(bad, diff, -1.0))), d.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{what} differ: {bad.mean():.2%} of {bad.size} elements out of tolerance "
            f"(rel={rel:g}, atol={atol:g}, max|desired|={scale:.6g}); worst at {worst}: "
            f"actual={a64[worst]!r}, desired={d64[worst]!r}"
        )


def random_qkv(rng, batch=(2,), Nq=8, Nk=None, D=4, Dv=None, dtype=np.float64, scale=1.0):
    """Gaussian ``q (*batch, Nq, D)``, ``k (*batch, Nk, D)``, ``v (*batch, Nk, Dv)``."""
    rng = np.random.default_rng(rng)
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    batch = tuple(batch)
    q = scale * rng.standard_normal((*batch, Nq, D))
    k = scale * rng.standard_normal((*batch, Nk, D))
    v = rng.standard_normal((*batch, Nk, Dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def finite_difference_vjp(f, arrays, dout, h=1e-6):
    """Central-difference vector-Jacobian product of ``f(*arrays)`` against ``dout``.

    Returns one gradient per array: ``d/dx <dout, f(x)>``, each entry from
    ``(f(x + h e) - f(x - h e)) / 2h``. Use float64 and small shapes.
    """
    grads = []
    for index, x in enumerate(arrays):
        g = np.zeros_like(x, dtype=np.float64)
        flat = g.reshape(-1)
        for j in range(x.size):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[index].reshape(-1)[j] += h
            minus[index].reshape(-1)[j] -= h
            flat[j] = np.sum(dout * (to_host(f(*plus)) - to_host(f(*minus)))) / (2 * h)
        grads.append(g)
    return grads
