"""Exact softmax attention in NumPy: the textbook, and the oracle of every test.

Per (batch, head) slice, with ``S = s q k^T`` restricted to the visible set
``V_i`` (key kept by the mask and, if causal, at a position ``<= p_i``)::

    mu_i  = max_{j in V_i} S_ij                 the max shift
    E_ij  = exp(S_ij - mu_i)   (0 off V_i)
    l_i   = sum_j E_ij
    out_i = (E v)_i / l_i      (0 when V_i is empty)
    L_i   = mu_i + log l_i     the logsumexp, saved for the backward
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._softmax import safe_log, softmax_attend, softmax_attend_backward
from ..._tile_sizes import cpu_blocks
from ...masks import visible_pairs

__all__ = ["exact_naive", "exact_blocked", "exact_backward", "forward", "backward"]


def exact_naive(q, k, v, *, mask=None, offset=None, scale):
    """Softmax attention, computed the textbook way.

    ``out_i = sum_j softmax_j(s q_i . k_j) v_j`` over the visible keys ``j``.
    Time ``O(Nq Nk (D + Dv))``, memory ``O(Nq Nk)``.

    Parameters
    ----------
    q : ndarray of shape (..., Nq, D)
    k : ndarray of shape (..., Nk, D)
    v : ndarray of shape (..., Nk, Dv)
    mask : bool ndarray of shape (..., Nk), optional
    offset : int, optional
        Causal offset: query ``i`` sees keys ``j <= i + offset``. None: not causal.
    scale : float

    Returns
    -------
    out : ndarray of shape (..., Nq, Dv)
    lse : ndarray of shape (..., Nq)
        ``log sum_j exp(S_ij)`` over visible keys, ``-inf`` for empty rows.
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    scores = scale * (q @ swap_last(k))                                     # (..., Nq, Nk)
    visible = visible_pairs(mask, offset, Nq, Nk)                           # (..., Nq, Nk)
    out, lse, _ = softmax_attend(scores, visible, v)                        # (..., Nq, Dv), (..., Nq)
    return out, lse


def exact_blocked(q, k, v, *, mask=None, offset=None, scale, block_q=64, block_k=128):
    """Softmax attention by the online softmax over key blocks.

    Each query row keeps a running max ``mu``, a running sum ``l`` and an
    accumulator ``acc``. For each key block ``J`` (visible scores ``s_J``)::

        mu'  = max(mu, max s_J)         skip the block while mu' = -inf
        a    = exp(mu - mu')            0 when mu = -inf
        p    = exp(s_J - mu')
        l   <- a l + sum p
        acc <- a acc + p v_J

    Invariant after each block: ``acc = sum_{seen j} exp(S_ij - mu) v_j`` and
    ``l = sum_{seen j} exp(S_ij - mu)``. At the end ``out = acc / l``.
    Under causal attention, key blocks after a query block's last position
    are never visited (the causal halving of the work).

    Time ``O(Nq Nk (D + Dv))``; memory ``O(Nq Dv + Bq Bk)`` per slice.
    Same parameters and returns as :func:`exact_naive`, plus the block sizes.
    """
    lead, (Nq, Nk, Dv) = q.shape[:-2], (q.shape[-2], k.shape[-2], v.shape[-1])
    out = np.zeros((*lead, Nq, Dv), dtype=q.dtype)                          # (..., Nq, Dv)
    lse = np.full((*lead, Nq), -np.inf, dtype=q.dtype)                      # (..., Nq)
    for i0 in range(0, Nq, block_q):
        i1 = min(Nq, i0 + block_q)
        qi = q[..., i0:i1, :]                                               # (..., Bq, D)
        mu = np.full((*lead, i1 - i0, 1), -np.inf, dtype=q.dtype)           # (..., Bq, 1)
        ell = np.zeros((*lead, i1 - i0, 1), dtype=q.dtype)                  # (..., Bq, 1)
        acc = np.zeros((*lead, i1 - i0, Dv), dtype=q.dtype)                 # (..., Bq, Dv)
        last_key = Nk if offset is None else min(Nk, i1 - 1 + offset + 1)
        for j0 in range(0, last_key, block_k):
            j1 = min(last_key, j0 + block_k)
            s = scale * (qi @ swap_last(k[..., j0:j1, :]))                  # (..., Bq, Bk)
            visible = _block_visibility(mask, offset, i0, i1, j0, j1)       # (..., Bq, Bk)
            s = np.where(visible, s, -np.inf)                               # (..., Bq, Bk)
            mu_new = np.maximum(mu, s.max(axis=-1, keepdims=True))          # (..., Bq, 1)
            seen = np.isfinite(mu_new)                                      # (..., Bq, 1)
            mu_safe = np.where(seen, mu_new, 0.0)                           # (..., Bq, 1)
            alpha = np.exp(mu - mu_safe)                                    # (..., Bq, 1); 0 while mu = -inf
            p = np.where(visible, np.exp(s - mu_safe), 0.0)                 # (..., Bq, Bk)
            ell = alpha * ell + p.sum(axis=-1, keepdims=True)               # (..., Bq, 1)
            acc = alpha * acc + p @ v[..., j0:j1, :]                        # (..., Bq, Dv)
            mu = mu_new                                                     # (..., Bq, 1)
        out[..., i0:i1, :] = acc / np.where(ell > 0, ell, 1.0)             # (..., Bq, Dv)
        lse[..., i0:i1] = (mu + safe_log(ell))[..., 0]                      # (..., Bq)
    return out, lse


def _block_visibility(mask, offset, i0, i1, j0, j1):
    """Visible pairs of the tile rows ``[i0, i1)`` x keys ``[j0, j1)``."""
    cols = np.arange(j0, j1)                                                # (Bk,)
    visible = np.ones((i1 - i0, j1 - j0), dtype=bool)                       # (Bq, Bk)
    if offset is not None:
        visible = cols[None, :] <= (np.arange(i0, i1) + offset)[:, None]   # (Bq, Bk)
    if mask is not None:
        visible = visible & mask[..., None, j0:j1]                          # (..., Bq, Bk)
    return visible


def exact_backward(dout, q, k, v, out, lse, *, mask=None, offset=None, scale):
    """Gradients of exact attention, from the saved logsumexp.

    With ``P = exp(S - L)`` (0 off the visible set) and ``delta_i = dO_i . O_i``::

        dv = P^T dO
        dS = P * (dO v^T - delta)
        dq = s dS k,   dk = s dS^T q

    Time ``O(Nq Nk (D + Dv))``, memory ``O(Nq Nk)``.

    Parameters
    ----------
    dout : ndarray of shape (..., Nq, Dv)
    q, k, v, out : the forward's inputs and output
    lse : ndarray of shape (..., Nq), the forward's logsumexp

    Returns
    -------
    dq : ndarray of shape (..., Nq, D)
    dk : ndarray of shape (..., Nk, D)
    dv : ndarray of shape (..., Nk, Dv)
    """
    Nq, Nk = q.shape[-2], k.shape[-2]
    visible = visible_pairs(mask, offset, Nq, Nk)                           # (..., Nq, Nk)
    scores = np.where(visible, scale * (q @ swap_last(k)), -np.inf)         # (..., Nq, Nk)
    L = np.where(np.isfinite(lse), lse, 0.0)[..., None]                     # (..., Nq, 1)
    P = np.exp(scores - L)                                                  # (..., Nq, Nk); 0 off V
    dS, dv = softmax_attend_backward(dout, out, P, v)                       # (..., Nq, Nk), (..., Nk, Dv)
    dq = scale * (dS @ k)                                                   # (..., Nq, D)
    dk = scale * (swap_last(dS) @ q)                                        # (..., Nk, D)
    return dq, dk, dv


def forward(q, k, v, *, mask, offset, scale, algorithm="auto", block_q=None, block_k=None):
    """Backend entry point: naive unless ``algorithm="blocked"``."""
    if algorithm == "blocked":
        block_q, block_k = cpu_blocks(q.shape[-1], v.shape[-1], block_q, block_k)
        out, lse = exact_blocked(q, k, v, mask=mask, offset=offset, scale=scale, block_q=block_q, block_k=block_k)
    else:
        algorithm = "naive"
        out, lse = exact_naive(q, k, v, mask=mask, offset=offset, scale=scale)
    return out, {"lse": lse, "algorithm": algorithm, "block_q": block_q, "block_k": block_k}


def backward(dout, q, k, v, out, res, *, mask, offset, scale, **params):
    """Backend entry point for the pullback."""
    return exact_backward(dout, q, k, v, out, res["lse"], mask=mask, offset=offset, scale=scale)
