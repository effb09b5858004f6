"""``entmax``: alpha-entmax attention, and the public sparse transforms.

alpha-entmax (Peters, Niculae & Martins 2019) replaces softmax by a map with
exact zeros for every ``alpha > 1``: ``alpha = 2`` is sparsemax (Martins &
Astudillo 2016), ``alpha -> 1`` is softmax. It is a different attention, not a
softmax approximation, and still costs ``O(Nq Nk D)``.

The transforms :func:`sparsemax`, :func:`entmax15` and :func:`entmax_bisect`
(with their ``*_vjp`` forms) live in :mod:`.transforms` and are re-exported
at the package top level. See ``docs/methods/entmax.md``.
"""

from __future__ import annotations

import math

import numpy as np

from ... import masks
from ..._validate import check_choice, check_float, check_int
from ...registry import Impl, Method, Sharding
from .transforms import (
    entmax15,
    entmax15_vjp,
    entmax_bisect,
    entmax_bisect_vjp,
    sparsemax,
    sparsemax_vjp,
)

__all__ = [
    "entmax_attention",
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "sparsemax_vjp",
    "entmax15_vjp",
    "entmax_bisect_vjp",
    "flops",
    "threshold_flops",
    "resolve",
    "resolve_algorithm",
    "METHOD",
    "ALGORITHMS",
    "DEFAULT_ALPHA",
    "DEFAULT_N_ITER",
]

ALGORITHMS = ("auto", "softmax", "sort", "bisect")
#: The alpha of Peters et al. and Sparsefinder: sparse, smoother than sparsemax,
#: with an exact O(n log n) algorithm.
DEFAULT_ALPHA = 1.5
#: Bisection steps: the bracket [-1, -n**(1-alpha)] shrinks below 2**-50.
DEFAULT_N_ITER = 50
#: alphas with an exact sort-based algorithm.
SORT_ALPHAS = (1.5, 2.0)


def resolve_algorithm(alpha, algorithm: str) -> str:
    """The algorithm that runs: ``"auto"`` is softmax at alpha = 1, sort at 1.5 and 2, else bisect.

    ``alpha`` is a float, or None for a per-slice array of alphas (> 1), which
    forces bisection.
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    if alpha is None:
        if algorithm not in ("auto", "bisect"):
            raise ValueError(f"an array of alphas runs algorithm='bisect'; got algorithm={algorithm!r}")
        return "bisect"
    if algorithm == "auto":
        return "softmax" if alpha == 1 else ("sort" if alpha in SORT_ALPHAS else "bisect")
    if algorithm == "softmax" and alpha != 1:
        raise ValueError(f"algorithm='softmax' is alpha=1; got alpha={alpha}")
    if algorithm == "sort" and alpha not in SORT_ALPHAS:
        raise ValueError(f"algorithm='sort' exists for alpha=1.5 and alpha=2 only; got alpha={alpha}")
    if algorithm == "bisect" and alpha == 1:
        raise ValueError("algorithm='bisect' needs alpha > 1; alpha=1 is softmax (algorithm='softmax')")
    return algorithm


def check_alpha_array(alpha, shape, *, open_min: bool, what: str):
    """An array of alphas broadcast to ``shape``, float64, every entry finite and > 1 (``>= 1`` if not ``open_min``)."""
    a = np.asarray(alpha)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"alpha must be a real number or an array of them, got dtype {a.dtype}")
    try:
        a = np.broadcast_to(a.astype(np.float64), shape)
    except ValueError:
        raise ValueError(f"alpha of shape {np.shape(alpha)} does not broadcast to {what} {tuple(shape)}") from None
    low = (a <= 1) if open_min else (a < 1)
    if not np.isfinite(a).all() or low.any():
        bound = "greater than 1" if open_min else "at least 1"
        raise ValueError(f"every alpha must be finite and {bound}; got min {a.min()}")
    return np.ascontiguousarray(a)


def resolve(problem, *, alpha=DEFAULT_ALPHA, algorithm="auto", n_iter=DEFAULT_N_ITER) -> dict:
    """Check alpha (a float >= 1, or an array over the leading axes, all > 1), algorithm and n_iter."""
    n_iter = check_int("n_iter", n_iter, minimum=1)
    if isinstance(alpha, np.ndarray) and alpha.ndim == 0:
        alpha = alpha.item()
    if np.ndim(alpha) == 0:
        alpha = check_float("alpha", alpha, minimum=1.0)
        return {"alpha": alpha, "algorithm": resolve_algorithm(alpha, algorithm), "n_iter": n_iter}
    alphas = check_alpha_array(alpha, problem.batch_shape, open_min=True, what="the leading axes")
    return {"alpha": alphas.reshape(problem.G), "algorithm": resolve_algorithm(None, algorithm), "n_iter": n_iter}


def threshold_flops(algorithm: str, n: float, n_iter: int = DEFAULT_N_ITER) -> float:
    """Per-pair cost of finding the threshold (docs: methods/entmax, "Complexity").

    sort ``ceil(log2 n) + 6`` (comparisons counted), bisect ``4 T + 4``, softmax 5.
    """
    if algorithm == "softmax":
        return 5
    if algorithm == "sort":
        return math.ceil(math.log2(max(n, 1))) + 6
    return 4 * n_iter + 4


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, alpha=DEFAULT_ALPHA, algorithm="auto",
          n_iter=DEFAULT_N_ITER, **params) -> int:
    """FLOPs of entmax attention (docs: methods/entmax, "Complexity").

    With ``P`` visible pairs the forward costs ``P (2D + 2Dv + c_thr)``, where
    ``c_thr`` is :func:`threshold_flops` at ``n = Nk``; the backward adds
    ``P (6D + 4Dv + 9)``.
    """
    Dv = D if Dv is None else Dv
    algorithm = resolve_algorithm(float(alpha), algorithm) if algorithm == "auto" else algorithm
    pairs = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    total = pairs * (2 * D + 2 * Dv + threshold_flops(algorithm, Nk, n_iter))
    if backward:
        total += pairs * (6 * D + 4 * Dv + 9)
    return int(batch * total)


def visible_pair_counts(problem):
    """Visible pairs of every slice, shape (G,)."""
    counts = masks.visible_counts(problem.mask, problem.offset, problem.Nq, problem.Nk, problem.xp)   # (G|1, Nq)
    return problem.xp.broadcast_to(counts.sum(axis=-1), (problem.G,))


def mean_over_slices(values, weights_ok):
    """Unweighted mean over the slices where ``weights_ok``; NaN if none."""
    values, ok = np.asarray(values, dtype=np.float64), np.asarray(weights_ok, dtype=bool)
    return float(values[ok].mean()) if ok.any() else float("nan")


def host(a):
    """A NumPy copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def info(problem, params, res) -> dict:
    support = res["support_size"]                                            # (G, Nq)
    visible = host(visible_pair_counts(problem))                             # (G,)
    used = host(support).sum(axis=-1)                                        # (G,)
    sparsity = 1 - used / np.maximum(visible, 1)
    return {
        "algorithm": params["algorithm"],
        "tau": problem.unflatten(res["tau"]),
        "support_size": problem.unflatten(support),
        "sparsity": mean_over_slices(sparsity, visible > 0),
    }


METHOD = Method(
    name="entmax",
    summary="alpha-entmax attention: exact zeros for alpha > 1 (sparsemax at 2, softmax at 1)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.entmax.reference"),
        Impl("numba", "eff_attn.methods.entmax.numba"),
        Impl("cupy", "eff_attn.methods.entmax.cupy"),
    ),
    budgets=({"alpha": 2.0}, {"alpha": 1.75}, {"alpha": 1.5}, {"alpha": 1.25}),
    budget_name="alpha",
    sharding=Sharding(reads_data=False, queries=True),
)


def entmax_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None, return_info=False,
                     alpha=DEFAULT_ALPHA, algorithm="auto", n_iter=DEFAULT_N_ITER):
    """alpha-entmax attention: ``out_i = sum_j entmax_alpha(s q_i . k_j)_j v_j`` over visible keys.

    ``entmax_alpha(z)_j = [(alpha - 1) z_j - tau]_+ ** (1 / (alpha - 1))`` with
    ``tau`` such that the row sums to one: exact zeros for ``alpha > 1``,
    sparsemax at ``alpha = 2``, softmax (``exact``) at ``alpha = 1``.
    Time ``O(Nq Nk (D + Dv + c))`` with ``c = log Nk`` (sort) or ``n_iter``
    (bisect); memory ``O(Nq Nk)`` on NumPy, ``O(Bq Nk)`` per worker on Numba
    (``Bq = 128`` at D = 64) and
    ``O(G Bq Nk)`` per query block on CuPy.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended).
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Unused: entmax attention is deterministic.
    return_info : bool, default=False
    alpha : float or array, default=1.5
        ``alpha >= 1`` (``alpha < 1`` raises ``ValueError``). An array
        broadcastable to the leading shape ``q.shape[:-2]`` gives each slice
        its own alpha (all > 1) and runs the bisection.
    algorithm : {"auto", "softmax", "sort", "bisect"}, default="auto"
        ``"auto"``: softmax at alpha = 1, the exact sort at alpha = 1.5 and 2,
        bisection otherwise. ``"sort"`` exists for alpha = 1.5 and 2 only.
    n_iter : int, default=50
        Bisection steps; the bracket ends below ``2**-50``.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with no visible key are 0.
    info : dict, only if ``return_info``
        Base keys plus ``algorithm`` (as run), ``tau`` (..., Nq) (unshifted
        threshold, ``p = [(alpha - 1) S - tau]_+ ** beta``; ``+inf`` on empty
        rows), ``support_size`` (..., Nq) and ``sparsity``
        (``1 - sum_i |supp_i| / |V|`` per slice, averaged over slices).
    """
    from ...api import attention

    return attention(q, k, v, method="entmax", backend=backend, mask=mask, causal=causal, scale=scale, rng=rng,
                     return_info=return_info, alpha=alpha, algorithm=algorithm, n_iter=n_iter)
