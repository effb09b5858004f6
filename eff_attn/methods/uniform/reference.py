"""``uniform`` in NumPy: prefix sums of the kept values.

``out_i = (1 / |V_i|) sum_{j in V_i} v_j``. With the kept prefix sums
``C_t = sum_{j < t, kept} v_j`` and ``e_i`` one past the last key query ``i``
may see (``Nk``, or ``p_i + 1`` if causal)::

    out_i = C_{e_i} / |V_i|            (0 when |V_i| = 0)

Time and memory ``O((Nq + Nk) Dv)``; no (Nq, Nk) array is formed. The
functions take the array module ``xp``, so the CuPy backend runs them as is.
"""

from __future__ import annotations

import numpy as np

from ...masks import visible_counts

__all__ = ["uniform_reference", "uniform_backward", "forward", "backward"]


def _visible_end(offset, Nq, Nk, xp=np):
    """``e_i``: one past the last key index query ``i`` may see, shape (Nq,), non-decreasing."""
    if offset is None:
        return xp.full(Nq, Nk)                                              # (Nq,)
    return xp.clip(xp.arange(Nq) + offset + 1, 0, Nk)                      # (Nq,)


def uniform_reference(v, *, mask=None, offset=None, Nq, xp=np):
    """Mean of the visible values of each of ``Nq`` queries.

    Parameters
    ----------
    v : ndarray of shape (..., Nk, Dv)
    mask : bool ndarray of shape (..., Nk), optional
    offset : int, optional
        Causal offset; None when not causal.
    Nq : int

    Returns
    -------
    ndarray of shape (..., Nq, Dv)
    """
    Nk = v.shape[-2]
    kept_v = v if mask is None else xp.where(mask[..., None], v, 0)        # (..., Nk, Dv)
    zero = xp.zeros_like(kept_v[..., :1, :])                                # (..., 1, Dv)
    prefix = xp.concatenate([zero, xp.cumsum(kept_v, axis=-2)], axis=-2)    # (..., Nk + 1, Dv)
    e = _visible_end(offset, Nq, Nk, xp)                                    # (Nq,)
    counts = visible_counts(mask, offset, Nq, Nk, xp)                       # (..., Nq)
    sums = prefix[..., e, :]                                                # (..., Nq, Dv)
    return sums / xp.maximum(counts, 1)[..., None].astype(v.dtype)         # (..., Nq, Dv); empty rows 0


def uniform_backward(dout, *, mask=None, offset=None, Nk, xp=np):
    """``dv_j = sum_{i : j in V_i} dO_i / |V_i|``; q and k get no gradient.

    Key ``j`` is seen by exactly the queries with ``e_i > j`` (and only if it
    is kept). ``e`` is non-decreasing, so those queries are a suffix
    ``i >= first_i(j)``, and ``dv_j`` is a suffix sum of ``g_i = dO_i/|V_i|``.

    Returns
    -------
    dv : ndarray of shape (..., Nk, Dv)
    """
    Nq = dout.shape[-2]
    counts = visible_counts(mask, offset, Nq, Nk, xp)                       # (..., Nq)
    g = dout / xp.maximum(counts, 1)[..., None].astype(dout.dtype)         # (..., Nq, Dv)
    zero = xp.zeros_like(g[..., :1, :])                                     # (..., 1, Dv)
    suffix = xp.concatenate([xp.cumsum(g[..., ::-1, :], axis=-2)[..., ::-1, :], zero], axis=-2)  # (..., Nq + 1, Dv)
    e = _visible_end(offset, Nq, Nk, xp)                                    # (Nq,)
    first_i = xp.searchsorted(e, xp.arange(Nk), side="right")              # (Nk,) first query with e_i > j
    dv = suffix[..., first_i, :]                                            # (..., Nk, Dv)
    return dv if mask is None else xp.where(mask[..., None], dv, 0)        # (..., Nk, Dv)


def forward(q, k, v, *, mask, offset, scale, xp=np):
    """Backend entry point."""
    return uniform_reference(v, mask=mask, offset=offset, Nq=q.shape[-2], xp=xp), {}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, xp=np):
    """Backend entry point: zero gradients for q and k."""
    dv = uniform_backward(dout, mask=mask, offset=offset, Nk=k.shape[-2], xp=xp)
    return xp.zeros_like(q), xp.zeros_like(k), dv
