"""alpha-entmax attention in NumPy, the textbook way, and the backend entry points.

The row transform ``entmax_alpha`` (sort, bisection, softmax), its pullbacks and
the attention pullback are the NumPy core :mod:`eff_attn._entmax`, which the
entmax transforms and Sparsefinder share; see ``docs/methods/entmax.md``.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._entmax import (
    attention_alpha,
    entmax_attention_backward,
    entmax_rows,
    entmax_rows_alpha_grad,
    entmax_rows_vjp,
)
from ...masks import visible_pairs

__all__ = [
    "entmax_attention_reference",
    "entmax_attention_backward",
    "rows_forward",
    "rows_backward",
    "rows_alpha_grad",
    "forward",
    "backward",
]


def entmax_attention_reference(q, k, v, *, mask=None, offset=None, scale, alpha=1.5, algorithm="sort",
                               n_iter=50):
    """alpha-entmax attention, computed the textbook way.

    ``out_i = sum_j entmax_alpha(s q_i . k_j over V_i)_j v_j``.
    Time ``O(Nq Nk (D + Dv + log Nk))`` (sort) or ``O(Nq Nk (D + Dv + n_iter))``
    (bisect); memory ``O(Nq Nk)``.

    Parameters
    ----------
    q : ndarray of shape (..., Nq, D)
    k : ndarray of shape (..., Nk, D)
    v : ndarray of shape (..., Nk, Dv)
    mask : bool ndarray of shape (..., Nk), optional
    offset : int, optional
        Causal offset: query ``i`` sees keys ``j <= i + offset``. None: not causal.
    scale : float
    alpha : float, or ndarray of shape (...)
    algorithm : {"softmax", "sort", "bisect"}
    n_iter : int

    Returns
    -------
    out : ndarray of shape (..., Nq, Dv)
    P : ndarray of shape (..., Nq, Nk)
    tau : ndarray of shape (..., Nq), unshifted
    support : int64 ndarray of shape (..., Nq)
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    scores = scale * (q @ swap_last(k))                                         # (..., Nq, Nk)
    visible = visible_pairs(mask, offset, Nq, Nk)                               # (..., Nq, Nk)
    a = attention_alpha(alpha, q)                                              # float or (..., 1)
    P, tau, support = entmax_rows(scores, visible, a, algorithm=algorithm, n_iter=n_iter)  # (..., Nq, Nk)
    out = P @ v                                                                 # (..., Nq, Dv)
    return out, P, tau, support


# --- backend entry points ------------------------------------------------------------


def rows_forward(z, mask, alpha, *, algorithm, n_iter, ensure_sum_one):
    """Transform entry point: rows ``z (R, n)``, ``mask (R, n)`` or None, alpha float or (R,)."""
    visible = np.ones(z.shape, dtype=bool) if mask is None else mask
    return entmax_rows(z, visible, alpha, algorithm=algorithm, n_iter=n_iter, ensure_sum_one=ensure_sum_one)


def rows_backward(p, g, alpha):
    """Transform pullback entry point, rows (R, n)."""
    return entmax_rows_vjp(p, g, alpha)


def rows_alpha_grad(p, g, alpha):
    """Per-row alpha derivative entry point, shape (R,)."""
    return entmax_rows_alpha_grad(p, g, alpha)


def forward(q, k, v, *, mask, offset, scale, alpha, algorithm, n_iter):
    """Attention entry point."""
    out, P, tau, support = entmax_attention_reference(q, k, v, mask=mask, offset=offset, scale=scale, alpha=alpha,
                                                      algorithm=algorithm, n_iter=n_iter)
    return out, {"P": P, "tau": tau, "support_size": support}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, alpha, **params):
    """Attention pullback entry point."""
    return entmax_attention_backward(dout, q, k, v, res["P"], scale=scale, alpha=alpha)
