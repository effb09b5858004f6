"""Masked softmax attention over an explicit set of visible pairs.

Every method that ends in "exact softmax over some set of keys" (exact,
local, topk_oracle, the union references of reformer and routing, ...) uses
:func:`softmax_attend` and its backward in its NumPy reference, so the max
shift, the empty-row rule and the backward are written once. Methods that need
the attention matrix itself (Nystrom's three softmaxes) use
:func:`masked_softmax` and :func:`masked_softmax_backward`, on which
:func:`softmax_attend` is built.

Rows with no visible key get output 0, logsumexp ``-inf`` and zero gradient;
no ``exp(-inf + inf)`` or ``log 0`` is ever evaluated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["safe_row_max", "safe_log", "masked_softmax", "masked_softmax_backward", "softmax_attend", "softmax_attend_backward"]


def safe_row_max(scores, xp=np):
    """Row maximum, with 0 for rows that are all ``-inf`` (NaN and ``+inf`` kept), shape (..., N, 1)."""
    mu = xp.max(scores, axis=-1, keepdims=True) if scores.shape[-1] else xp.full((*scores.shape[:-1], 1), -xp.inf)
    return xp.where(mu == -xp.inf, 0.0, mu).astype(scores.dtype, copy=False)


def safe_log(x, xp=np):
    """``log x``, with ``-inf`` for ``x == 0`` and no warning."""
    return xp.where(x > 0, xp.log(xp.where(x > 0, x, 1.0)), -xp.inf).astype(x.dtype, copy=False)


def masked_softmax(scores, visible, xp=np):
    """Row softmax over the visible entries, 0 elsewhere and on empty rows.

    ``P_ij = exp(S_ij - mu_i) / l_i`` on visible pairs, with ``mu_i`` the row
    max and ``l_i`` the row sum. A NaN score makes its row NaN; a row whose
    max is ``+inf`` puts its weight on the ``+inf`` keys (the limit of a
    growing score: ``exp(S_ij - mu_i)`` is read as 1 where ``S_ij = mu_i``).

    Parameters
    ----------
    scores : array of shape (..., Nq, Nk)
    visible : bool array broadcastable to (..., Nq, Nk)

    Returns
    -------
    P : array of shape (..., Nq, Nk)
        Rows with nothing visible are 0.
    lse : array of shape (..., Nq)
        ``mu + log l``; ``-inf`` on empty rows.
    """
    scores = xp.where(visible, scores, -xp.inf)                             # (..., Nq, Nk)
    mu = safe_row_max(scores, xp)                                           # (..., Nq, 1); 0 on empty rows
    with np.errstate(invalid="ignore"):                                     # inf - inf where S = mu = +inf
        e = xp.exp(scores - mu)                                             # (..., Nq, Nk); 0 where not visible
    if xp.any(mu == xp.inf):                                                # rows scored +inf somewhere:
        e = xp.where(scores == mu, 1.0, e)                                  # exp(inf - inf) := 1
    ell = e.sum(axis=-1, keepdims=True)                                     # (..., Nq, 1)
    P = e / xp.where(ell > 0, ell, 1.0)                                     # (..., Nq, Nk); empty rows 0
    lse = (mu + safe_log(ell, xp))[..., 0]                                  # (..., Nq)
    return P, lse


def masked_softmax_backward(dP, P, xp=np):
    """Pullback of :func:`masked_softmax`: ``dS = P * (dP - rowsum(dP * P))``.

    Zero off the visible set and on empty rows, since ``P`` is zero there.

    Parameters
    ----------
    dP, P : arrays of shape (..., Nq, Nk)

    Returns
    -------
    dS : array of shape (..., Nq, Nk)
    """
    return P * (dP - (dP * P).sum(axis=-1, keepdims=True))                  # (..., Nq, Nk)


def softmax_attend(scores, visible, v, xp=np):
    """Softmax over the visible pairs, then the weighted sum of values.

    ``P_ij = exp(S_ij - mu_i) / l_i`` on visible pairs and 0 elsewhere, with
    ``mu_i`` the row max and ``l_i`` the row sum.

    Parameters
    ----------
    scores : array of shape (..., Nq, Nk)
        Scaled scores ``S``.
    visible : bool array broadcastable to (..., Nq, Nk)
    v : array of shape (..., Nk, Dv)

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        ``P v``; rows with nothing visible are 0.
    lse : array of shape (..., Nq)
        ``mu + log l``; ``-inf`` on empty rows.
    P : array of shape (..., Nq, Nk)
        The attention weights, for the backward.
    """
    P, lse = masked_softmax(scores, visible, xp)                            # (..., Nq, Nk), (..., Nq)
    return P @ v, lse, P                                                    # (..., Nq, Dv)


def softmax_attend_backward(dout, out, P, v, xp=np):
    """Pullback of :func:`softmax_attend` to the scores and the values.

    With ``delta_i = dO_i . O_i``::

        dv = P^T dO
        dS = P * (dO v^T - delta)

    Parameters
    ----------
    dout, out : arrays of shape (..., Nq, Dv)
    P : array of shape (..., Nq, Nk)
    v : array of shape (..., Nk, Dv)

    Returns
    -------
    dS : array of shape (..., Nq, Nk)
        Gradient with respect to the (scaled) scores; 0 off the visible set.
    dv : array of shape (..., Nk, Dv)
    """
    delta = (dout * out).sum(axis=-1, keepdims=True)                        # (..., Nq, 1)
    dv = xp.swapaxes(P, -1, -2) @ dout                                      # (..., Nk, Dv)
    dS = P * (dout @ xp.swapaxes(v, -1, -2) - delta)                        # (..., Nq, Nk)
    return dS, dv
