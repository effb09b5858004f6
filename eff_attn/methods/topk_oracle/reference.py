"""``topk_oracle`` in NumPy: select the top-k visible scores, then softmax.

Per query ``i``: ``T_i`` = the ``min(k, |V_i|)`` largest visible ``S_ij``,
ties broken by the lower key index. Then exact softmax attention on ``T_i``.
``mass_kept_i = sum_{j in T_i} softmax(S_i)_j`` is the share of the exact
attention row the oracle keeps; ``2 (1 - mass_kept)`` is its total-variation
distance to the exact row, the smallest any k-subset achieves.

Time ``O(Nq Nk (D + log Nk))``, memory ``O(Nq Nk)``.
"""

from __future__ import annotations

import numpy as np

from ..._softmax import softmax_attend, softmax_attend_backward
from ...masks import visible_pairs

__all__ = ["topk_support", "support_to_mask", "topk_oracle_reference", "forward", "backward"]


def topk_support(scores, visible, topk, xp=np):
    """Indices of each row's top-k visible scores, ties to the lower index.

    A stable sort of ``-S`` keeps equal scores in index order; invisible
    entries sort last as ``+inf``.

    Returns
    -------
    support : int64 array of shape (..., Nq, min(topk, Nk))
        -1 where the row has fewer visible keys.
    """
    kk = min(topk, scores.shape[-1])
    order = xp.argsort(xp.where(visible, -scores, xp.inf), axis=-1, kind="stable")[..., :kk]  # (..., Nq, kk)
    chosen_visible = xp.take_along_axis(xp.broadcast_to(visible, scores.shape), order, axis=-1)  # (..., Nq, kk)
    return xp.where(chosen_visible, order, -1)                                               # (..., Nq, kk)


def support_to_mask(support, Nk, xp=np):
    """Boolean (..., Nq, Nk) indicator of the kept keys; -1 entries keep nothing."""
    slots = xp.where(support >= 0, support, Nk)                                              # (..., Nq, kk)
    selected = xp.zeros((*support.shape[:-1], Nk + 1), dtype=bool)                           # (..., Nq, Nk + 1)
    xp.put_along_axis(selected, slots, True, axis=-1)                                        # (..., Nq, Nk + 1)
    return selected[..., :Nk]                                                                # (..., Nq, Nk)


def topk_oracle_reference(q, k, v, *, mask=None, offset=None, scale, topk):
    """Exact softmax over the top-k visible keys of each query.

    Returns
    -------
    out : ndarray of shape (..., Nq, Dv)
    support : int64 ndarray of shape (..., Nq, min(topk, Nk))
    mass_kept : ndarray of shape (..., Nq)
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    scores = scale * (q @ np.swapaxes(k, -1, -2))                          # (..., Nq, Nk)
    visible = visible_pairs(mask, offset, Nq, Nk)                          # (..., Nq, Nk)
    support = topk_support(scores, visible, topk)                          # (..., Nq, kk)
    selected = support_to_mask(support, Nk)                                # (..., Nq, Nk)
    out, _, _ = softmax_attend(scores, selected, v)                        # (..., Nq, Dv)
    _, _, P_exact = softmax_attend(scores, visible, v)                     # (..., Nq, Nk)
    mass_kept = np.where(selected, P_exact, 0.0).sum(axis=-1)              # (..., Nq)
    return out, support, mass_kept


def forward(q, k, v, *, mask, offset, scale, topk):
    """Backend entry point."""
    out, support, mass_kept = topk_oracle_reference(q, k, v, mask=mask, offset=offset, scale=scale, topk=topk)
    count = (support >= 0).sum(axis=-1)
    return out, {"support": support, "mass_kept": mass_kept, "count": count}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, topk):
    """Exact attention's backward with each ``T_i`` held fixed."""
    selected = support_to_mask(res["support"], k.shape[-2])                # (..., Nq, Nk)
    scores = scale * (q @ np.swapaxes(k, -1, -2))                          # (..., Nq, Nk)
    _, _, P = softmax_attend(scores, selected, v)                          # (..., Nq, Nk)
    dS, dv = softmax_attend_backward(dout, out, P, v)                      # (..., Nq, Nk), (..., Nk, Dv)
    dq = scale * (dS @ k)                                                  # (..., Nq, D)
    dk = scale * (np.swapaxes(dS, -1, -2) @ q)                             # (..., Nk, D)
    return dq, dk, dv
