"""alpha-entmax in NumPy: the row transforms, their pullbacks, and the attention pullback.

The core of three callers: the entmax transforms (``eff_attn.entmax15`` and kin),
entmax attention (``eff_attn.methods.entmax``) and Sparsefinder, which runs
entmax over a predicted graph. The textbook attention forward is
:func:`eff_attn.methods.entmax.reference.entmax_attention_reference`.

For a row ``z`` (its visible entries) and ``alpha > 1``, ``beta = 1 / (alpha - 1)``::

    entmax_alpha(z)_j = [(alpha - 1) z_j - tau]_+ ** beta,   tau such that sum_j p_j = 1

Every algorithm works in the shifted units ``x = (alpha - 1) (z - max z)``, where
``p = [x - tau]_+ ** beta`` and ``-1 <= tau <= -n ** (1 - alpha)``. Entries with
``x <= -1`` are zero whatever ``tau`` is (the *guaranteed zeros*); masked entries
are therefore filled with ``x = -2``, which changes nothing.

- ``"sort"`` (alpha = 2 or 1.5): sort ``x`` descending and read ``tau`` off the
  prefix sums; exact, ``O(n log n)``.
- ``"bisect"`` (any alpha > 1): halve the bracket ``n_iter`` times, keeping the
  lower end ``lo`` with ``sum [x - lo]_+ ** beta >= 1``; output at ``lo``.
- ``"softmax"`` (alpha = 1): the max-shifted softmax of ``exact``; ``tau`` is the
  logsumexp, so that ``p = exp(z - tau)``.

The pullback of a row is ``dz = u g - u <u, g> / sum(u)`` with ``u = p ** (2 - alpha)``
on the support and 0 off it. See ``docs/methods/entmax.md``.
"""

from __future__ import annotations

import math

import numpy as np

from . import masks
from ._array import swap_last
from ._softmax import safe_row_max, softmax_attend
from ._validate import check_choice

__all__ = [
    "GUARANTEED_ZERO_FILL",
    "entmax_rows",
    "entmax_rows_vjp",
    "entmax_rows_alpha_grad",
    "entmax_probabilities",
    "entmax_attention_backward",
    "attention_alpha",
    "ALGORITHMS",
    "DEFAULT_ALPHA",
    "DEFAULT_N_ITER",
    "SORT_ALPHAS",
    "resolve_algorithm",
    "check_alpha_array",
    "threshold_flops",
    "entmax_attention_flops",
    "visible_pair_counts",
    "mean_over_slices",
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


#: Shifted value given to masked entries: below the guaranteed-zero bound -1.
GUARANTEED_ZERO_FILL = -2.0


def _per_row(alpha, z, xp):
    """``alpha`` as a float or an array of shape (..., 1) against rows ``z`` (..., n)."""
    if np.ndim(alpha) == 0:
        return float(alpha)
    return xp.asarray(alpha, dtype=z.dtype)[..., None]                         # (..., 1)


def _shifted(z, visible, alpha, xp):
    """``x = (alpha - 1) (z - max z)`` on visible entries, -2 elsewhere, and the row max."""
    z = xp.where(visible, z, -xp.inf)                                           # (..., n)
    z_max = safe_row_max(z, xp)                                                 # (..., 1); 0 on empty rows
    x = (alpha - 1) * (xp.where(visible, z, z_max) - z_max)                     # (..., n)
    return xp.where(visible, x, GUARANTEED_ZERO_FILL).astype(z.dtype, copy=False), z_max


#: :func:`_sort_tau` first sorts only the largest entries of each row; a row whose support
#: reaches this many is sorted whole.
SORT_CANDIDATES = 256


def _tau_of_sorted(xs, alpha, xp):
    """Threshold from a descending row ``xs`` (..., m); also whether the support is shorter than ``m``.

    With ``x_(1) >= x_(2) >= ...`` and ``k = 1..m``:

    - alpha = 2: ``c_k = sum_{l<=k} x_(l)``, ``k* = max{k : 1 + k x_(k) > c_k}``,
      ``tau = (c_k* - 1) / k*``;
    - alpha = 1.5: prefix means ``mu_k`` of ``x`` and ``m_k`` of ``x**2``,
      ``delta_k = (1 - k (m_k - mu_k**2)) / k``, ``tau_k = mu_k - sqrt(max(delta_k, 0))``,
      ``k* = #{k : tau_k <= x_(k)}``, ``tau = tau_k*``.

    The condition holds exactly for ``k <= k*``, and ``tau`` reads only the
    first ``k*`` entries: from the ``m`` largest entries of a longer row, the
    answer is the whole row's wherever ``k* < m``.
    """
    m = xs.shape[-1]
    k = xp.arange(1, m + 1, dtype=xs.dtype)                                     # (m,)
    c = xp.cumsum(xs, axis=-1)                                                  # (..., m)
    if alpha == 2:
        holds = 1 + k * xs > c                                                  # (..., m)
        k_star = xp.max(xp.where(holds, k, 1), axis=-1, keepdims=True)          # (..., 1)
        c_star = xp.take_along_axis(c, k_star.astype(np.int64) - 1, axis=-1)    # (..., 1)
        return (c_star - 1) / k_star, k_star[..., 0] < m                        # (..., 1), (...)
    mu = c / k                                                                  # (..., m)
    m2 = xp.cumsum(xs * xs, axis=-1) / k                                        # (..., m)
    delta = (1 - k * (m2 - mu * mu)) / k                                        # (..., m)
    tau_k = mu - xp.sqrt(xp.maximum(delta, 0))                                  # (..., m)
    k_star = xp.maximum((tau_k <= xs).sum(axis=-1, keepdims=True), 1)           # (..., 1)
    return xp.take_along_axis(tau_k, k_star - 1, axis=-1), k_star[..., 0] < m   # (..., 1), (...)


def _sort_tau(x, alpha, xp):
    """Exact threshold from the sorted row, alpha = 2 (sparsemax) or 1.5 (:func:`_tau_of_sorted`).

    Rows longer than :data:`SORT_CANDIDATES` sort only their largest
    ``SORT_CANDIDATES`` entries (a partition, then a sort); the rows whose
    support may not fit in them are sorted whole. Same result, same
    rounding: the prefix sums see the same entries in the same order.
    """
    n = x.shape[-1]
    if n <= SORT_CANDIDATES:
        return _tau_of_sorted(-xp.sort(-x, axis=-1), alpha, xp)[0]              # (..., 1)
    top = -xp.partition(-x, SORT_CANDIDATES - 1, axis=-1)[..., :SORT_CANDIDATES]   # (..., m) largest, any order
    tau, fits = _tau_of_sorted(-xp.sort(-top, axis=-1), alpha, xp)             # (..., 1), (...)
    if not bool(xp.all(fits)):                                                  # long supports: the whole row
        tau[~fits] = _tau_of_sorted(-xp.sort(-x[~fits], axis=-1), alpha, xp)[0]
    return tau

def _bisect_tau(x, n_visible, alpha, n_iter, xp):
    """Lower end ``lo`` of the bisection bracket after ``n_iter`` halvings.

    ``lo = -1``, ``hi = -n ** (1 - alpha)``; each step keeps the half on which
    ``f(m) = sum [x - m]_+ ** beta - 1`` changes sign, testing ``f(m) >= 0``
    (never ``f(m) f(lo) >= 0``, which drifts once ``f(lo) = 0``).
    """
    beta = 1 / (alpha - 1)                                                      # float or (..., 1)
    n = xp.maximum(n_visible, 1).astype(x.dtype)                                # (..., 1)
    lo = xp.full(n.shape, -1, dtype=x.dtype)                                    # (..., 1)
    hi = -(n ** (1 - alpha))                                                    # (..., 1)
    for _ in range(n_iter):
        m = (lo + hi) / 2                                                       # (..., 1)
        mass = (xp.maximum(x - m, 0) ** beta).sum(axis=-1, keepdims=True)      # (..., 1)
        enough = mass >= 1                                                      # (..., 1)
        lo = xp.where(enough, m, lo)                                            # (..., 1)
        hi = xp.where(enough, hi, m)                                            # (..., 1)
    return lo.astype(x.dtype, copy=False)


def entmax_rows(z, visible, alpha, *, algorithm, n_iter=50, ensure_sum_one=True, xp=np):
    """alpha-entmax of every row of ``z`` over its visible entries.

    Parameters
    ----------
    z : ndarray of shape (..., n)
    visible : bool ndarray broadcastable to (..., n)
    alpha : float, or ndarray broadcastable to (...)
        ``alpha >= 1``; per row for ``"bisect"`` (rows with alpha = 1 use softmax).
    algorithm : {"softmax", "sort", "bisect"}
        ``"sort"`` needs a scalar alpha of 1.5 or 2.
    n_iter : int
        Bisection steps.
    ensure_sum_one : bool
        Divide the bisection output by its sum.

    Returns
    -------
    p : ndarray of shape (..., n)
        0 off the visible set and on rows with nothing visible.
    tau : ndarray of shape (...)
        In unshifted units: ``p = [(alpha - 1) z - tau]_+ ** beta`` (``exp(z - tau)``
        at alpha = 1); ``+inf`` on rows with nothing visible.
    support : int64 ndarray of shape (...)
        Number of entries with ``p > 0``.

    Time ``O(n log n)`` per row (sort) or ``O(n_iter n)`` (bisect); memory ``O(n)``.
    """
    visible = xp.broadcast_to(visible, z.shape)                                 # (..., n)
    n_visible = visible.sum(axis=-1, keepdims=True)                             # (..., 1)
    if algorithm == "softmax":
        _, lse, p = softmax_attend(z, visible, xp.zeros((z.shape[-1], 0), dtype=z.dtype), xp)  # (..., n)
        tau = xp.where(n_visible[..., 0] > 0, lse, xp.inf)                      # (...)
        return p, tau.astype(z.dtype, copy=False), n_visible[..., 0].astype(np.int64)
    a = _per_row(alpha, z, xp)                                                  # float or (..., 1)
    is_softmax = None
    if algorithm == "bisect" and np.ndim(alpha) > 0:
        is_softmax = a == 1                                                     # (..., 1)
        a = xp.where(is_softmax, 2, a)                                          # (..., 1) placeholder
    x, z_max = _shifted(z, visible, a, xp)                                      # (..., n), (..., 1)
    if algorithm == "sort":
        tau = _sort_tau(x, a, xp)                                               # (..., 1)
    else:
        tau = _bisect_tau(x, n_visible, a, n_iter, xp)                          # (..., 1)
    p = xp.maximum(x - tau, 0) ** (1 / (a - 1))                                 # (..., n)
    p = xp.where(visible, p, 0).astype(z.dtype, copy=False)                     # (..., n)
    if algorithm == "bisect" and ensure_sum_one:
        total = p.sum(axis=-1, keepdims=True)                                   # (..., 1)
        p = p / xp.where(total > 0, total, 1)                                   # (..., n)
    support = (p > 0).sum(axis=-1)                                              # (...)
    tau = tau + (a - 1) * z_max                                                 # (..., 1) unshifted
    tau = xp.where(n_visible > 0, tau, xp.inf)[..., 0]                          # (...)
    if is_softmax is not None and bool(is_softmax.any()):
        p_soft, tau_soft, support_soft = entmax_rows(z, visible, 1.0, algorithm="softmax", xp=xp)
        p = xp.where(is_softmax, p_soft, p)                                     # (..., n)
        tau = xp.where(is_softmax[..., 0], tau_soft, tau)                       # (...)
        support = xp.where(is_softmax[..., 0], support_soft, support)           # (...)
    return p, tau.astype(z.dtype, copy=False), support.astype(np.int64)


def _support_weights(p, alpha, xp):
    """``u = p ** (2 - alpha)`` on the support, 0 off it (never ``0 ** (2 - alpha)``)."""
    on = p > 0                                                                  # (..., n)
    return xp.where(on, xp.where(on, p, 1) ** (2 - alpha), 0).astype(p.dtype, copy=False)


def entmax_rows_vjp(p, g, alpha, xp=np):
    """Pullback of :func:`entmax_rows`: ``dz = u g - u <u, g> / sum(u)``.

    ``J = Diag(u) - u u^T / 1^T u`` is symmetric with ``J 1 = 0``: sparsemax
    subtracts the support mean, entmax15 has ``u = sqrt(p)``, softmax ``u = p``.

    Parameters
    ----------
    p : ndarray of shape (..., n), the forward output
    g : ndarray of shape (..., n), the cotangent of ``p``
    alpha : float or ndarray broadcastable to (...)

    Returns
    -------
    dz : ndarray of shape (..., n)
    """
    u = _support_weights(p, _per_row(alpha, p, xp), xp)                         # (..., n)
    su = u.sum(axis=-1, keepdims=True)                                          # (..., 1)
    ug = (u * g).sum(axis=-1, keepdims=True)                                    # (..., 1)
    return u * g - u * (ug / xp.where(su > 0, su, 1))                           # (..., n)


def entmax_rows_alpha_grad(p, g, alpha, xp=np):
    """Derivative of ``<g, entmax_alpha(z)>`` with respect to alpha, per row.

    With ``p~ = u / sum(u)`` and ``h_j = p_j log p_j`` (0 off the support)::

        dalpha = sum_j g_j [(p_j - p~_j) / (alpha - 1)**2 - (h_j - p~_j sum_k h_k) / (alpha - 1)]

    Returns
    -------
    ndarray of shape (...)
    """
    a = _per_row(alpha, p, xp)                                                  # float or (..., 1)
    u = _support_weights(p, a, xp)                                              # (..., n)
    su = u.sum(axis=-1, keepdims=True)                                          # (..., 1)
    p_tilde = u / xp.where(su > 0, su, 1)                                       # (..., n)
    on = p > 0                                                                  # (..., n)
    h = xp.where(on, p * xp.log(xp.where(on, p, 1)), 0)                        # (..., n)
    dp = (p - p_tilde) / (a - 1) ** 2 - (h - p_tilde * h.sum(axis=-1, keepdims=True)) / (a - 1)
    return (g * dp).sum(axis=-1)                                                # (...)


def entmax_probabilities(scores, visible, alpha, z_max, tau_shifted, norm, xp=np):
    """Rebuild the weights from saved row quantities, for the backward passes.

    ``p = [(alpha - 1)(S - z_max) - tau_shifted]_+ ** beta / norm`` on visible entries.

    Parameters
    ----------
    scores : ndarray of shape (..., Nq, Nk)
    visible : bool ndarray broadcastable to (..., Nq, Nk)
    alpha : float or ndarray broadcastable to (..., Nq)
    z_max, tau_shifted, norm : ndarray of shape (..., Nq)
    """
    a = _per_row(alpha, scores, xp)                                             # float or (..., Nq, 1)
    x = (a - 1) * (scores - z_max[..., None])                                   # (..., Nq, Nk)
    p = xp.maximum(x - tau_shifted[..., None], 0) ** (1 / (a - 1))              # (..., Nq, Nk)
    return xp.where(visible, p, 0) / norm[..., None]                            # (..., Nq, Nk)


def attention_alpha(alpha, q):
    """Per-slice alpha as a float, or an array of shape (..., 1) against (..., Nq)."""
    if np.ndim(alpha) == 0:
        return float(alpha)
    return np.asarray(alpha, dtype=np.float64).reshape(*np.shape(alpha), 1)      # (..., 1)


def entmax_attention_backward(dout, q, k, v, P, *, scale, alpha, xp=np):
    """Gradients of entmax attention from its weights ``P`` (the support is held).

    ``dP = dO v^T``, ``dS = u (dP - sum_l u_l dP_l / sum_l u_l)`` row by row
    (:func:`entmax_rows_vjp`), ``dv = P^T dO``, ``dq = s dS k``, ``dk = s dS^T q``.
    At alpha = 1 this is the ``exact`` backward. Time ``O(Nq Nk (D + Dv))``.

    Returns
    -------
    dq : ndarray of shape (..., Nq, D)
    dk : ndarray of shape (..., Nk, D)
    dv : ndarray of shape (..., Nk, Dv)
    """
    dP = dout @ swap_last(v)                                                    # (..., Nq, Nk)
    dS = entmax_rows_vjp(P, dP, attention_alpha(alpha, q), xp)                 # (..., Nq, Nk)
    dv = swap_last(P) @ dout                                                    # (..., Nk, Dv)
    dq = scale * (dS @ k)                                                       # (..., Nq, D)
    dk = scale * (swap_last(dS) @ q)                                            # (..., Nk, D)
    return dq, dk, dv


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


def threshold_flops(algorithm: str, n: float, n_iter: int = DEFAULT_N_ITER) -> float:
    """Per-pair cost of finding the threshold (docs: methods/entmax, "Complexity").

    sort ``ceil(log2 n) + 6`` (comparisons counted), bisect ``4 T + 4``, softmax 5.
    """
    if algorithm == "softmax":
        return 5
    if algorithm == "sort":
        return math.ceil(math.log2(max(n, 1))) + 6
    return 4 * n_iter + 4


def entmax_attention_flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, alpha=DEFAULT_ALPHA,
                           algorithm="auto", n_iter=DEFAULT_N_ITER, **params) -> int:
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
