"""Reformer (LSH attention) in NumPy: the textbook, and the oracle of the other backends.

Per slice and round ``r`` (of ``R = n_h``), given the bucket ids of the
queries and the keys:

1. **Sort.** Stable-sort queries, and separately keys, by (bucket,
   position); cut the sorted order into ``n_c = ceil(N / c)`` chunks of
   ``c`` slots, the last one padded with empty slots (position -1).
2. **Windows.** Query chunk ``u`` sees key chunks ``u`` and
   ``u - 1 (mod n_c)`` (only ``u`` when ``n_c = 1``): a ``(c, 2c)`` score
   tile ``S = s q k^T``. Padding, masked keys and ``j > p_i`` (causal) are
   excluded; under shared QK the pair ``(i, i)`` scores ``-1e5``.
3. **Dedup.** ``c_ij`` counts the rounds whose window pairs ``i`` with
   ``j``; with ``dedup`` the score becomes ``S_ij - log c_ij``.
4. **Round output.** ``z_i^r`` = the window's logsumexp (``-inf`` if empty),
   ``o_i^r`` its softmax average of ``v``, scattered back to position order.
5. **Combine.** ``out_i = sum_r exp(z_i^r - Z_i) o_i^r`` with
   ``Z_i = lse_r z_i^r``; 0 when ``Z_i = -inf``.

Because ``sum_r exp(z_i^r) o_i^r = sum_r sum_{j in W_i^r} e^{S_ij} v_j / c_ij
= sum_{j in U_i} e^{S_ij} v_j``, dedup gives exact softmax attention over the
union ``U_i`` of the windows.

Time ``O(R N c (D + Dv) + R^2 N c)``, memory ``O(R N (c + D + Dv))``; the
(N, N) score matrix is never formed. Every function takes the array module
``xp``, so the CuPy backend runs this same program on the GPU.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._hashing import inverse_permutation, stable_key_argsort
from ..._softmax import safe_log, softmax_attend
from ._common import SELF_SCORE, assign_buckets, shared_keys

__all__ = [
    "sort_into_chunks",
    "attach_previous_chunk",
    "fold_previous_chunk",
    "gather",
    "to_positions",
    "window_logits",
    "combine_rounds",
    "reformer_reference",
    "reformer_backward",
    "forward",
    "backward",
]


def sort_into_chunks(buckets, chunk_size: int, xp=np):
    """Sorted slots of every round, cut into chunks.

    Parameters
    ----------
    buckets : int array of shape (R, G, N)

    Returns
    -------
    slots : int64 array of shape (R, G, n_c, c)
        The position in each sorted slot, -1 for padding.
    inv : int64 array of shape (R, G, N)
        The slot of each position.
    chunk_of : int64 array of shape (R, G, N)
        The chunk of each position, ``inv // c``.
    """
    R, G, N = buckets.shape
    n_c = -(-N // chunk_size)
    perm = stable_key_argsort(buckets, xp)                                  # (R, G, N) slot -> position
    inv = inverse_permutation(perm, xp)                                     # (R, G, N) position -> slot
    pad = xp.full((R, G, n_c * chunk_size - N), -1, dtype=perm.dtype)      # (R, G, pad)
    slots = xp.concatenate([perm, pad], axis=-1).reshape(R, G, n_c, chunk_size)  # (R, G, n_c, c)
    return slots, inv, inv // chunk_size


def attach_previous_chunk(x, xp=np):
    """Window ``u`` = chunk ``u`` then chunk ``u - 1 (mod n_c)``, along axis 3.

    ``x`` is (R, G, n_c, c, ...); the result is (R, G, n_c, 2c, ...), or ``x``
    itself when ``n_c = 1`` (the chunk is its own predecessor).
    """
    if x.shape[2] == 1:
        return x
    return xp.concatenate([x, xp.roll(x, 1, axis=2)], axis=3)


def fold_previous_chunk(x, xp=np):
    """Adjoint of :func:`attach_previous_chunk`: sum each slot's two window copies.

    (R, G, n_c, 2c, ...) -> (R, G, n_c, c, ...).
    """
    if x.shape[2] == 1:
        return x
    c = x.shape[3] // 2
    return x[:, :, :, :c] + xp.roll(x[:, :, :, c:], -1, axis=2)


def gather(x, pos, xp=np):
    """``x[g, pos]`` for positions ``pos`` of shape (R, G, ...); -1 reads position 0.

    ``x`` is (G, N, ...); the result is (R, G, ..., *x.shape[2:]).
    """
    g = xp.arange(x.shape[0]).reshape(1, -1, *([1] * (pos.ndim - 2)))      # (1, G, 1, ...)
    return x[g, xp.maximum(pos, 0)]


def to_positions(x, inv, xp=np):
    """Slot order back to position order: (R, G, n_c, c, ...) -> (R, G, N, ...)."""
    R, G = x.shape[:2]
    flat = x.reshape(R, G, -1, *x.shape[4:])                                # (R, G, n_c c, ...)
    r = xp.arange(R)[:, None, None]                                         # (R, 1, 1)
    g = xp.arange(G)[None, :, None]                                         # (1, G, 1)
    return flat[r, g, inv]                                                  # (R, G, N, ...)


def window_logits(S, qpos, kpos, chunk_q, chunk_k, mask, offset, shared_qk, dedup, xp=np):
    """Visibility, the shared-QK self score and the dedup shift of the window tiles.

    Parameters
    ----------
    S : array of shape (R, G, n_c, c, w)
        Scaled scores of the windows (``w = 2c``, or ``c`` when ``n_c = 1``).
    qpos : int array of shape (R, G, n_c, c)
    kpos : int array of shape (R, G, n_c, w)
    chunk_q, chunk_k : int arrays of shape (R, G, N)
        The chunk of every position in every round.
    mask : bool array of shape (G, N), or None
    offset : int or None

    Returns
    -------
    S : array of shape (R, G, n_c, c, w)
        ``S - log c_ij`` with dedup, ``-1e5`` on the self pair under shared QK.
    visible : bool array of shape (R, G, n_c, c, w)
    share : array of shape (R, G, n_c, c)
        ``sum_j visible / c_ij``: summed over rounds it is ``|U_i|``.
    self_seen : bool array of shape (R, G, n_c, c)
        The window holds the query's own position, visible.
    """
    n_c = qpos.shape[2]
    qj, kj = qpos[..., :, None], kpos[..., None, :]                         # (R, G, n_c, c, 1), (R, G, n_c, 1, w)
    visible = (qj >= 0) & (kj >= 0)                                         # (R, G, n_c, c, w)
    if mask is not None:
        visible = visible & gather(mask, kpos, xp)[..., None, :]            # (R, G, n_c, c, w)
    if offset is not None:
        visible = visible & (kj <= qj + offset)                             # (R, G, n_c, c, w)
    count = xp.zeros(S.shape, dtype=np.int64)                               # (R, G, n_c, c, w) c_ij
    for r in range(chunk_q.shape[0]):
        gap = (gather(chunk_q[r], qpos, xp)[..., :, None]
               - gather(chunk_k[r], kpos, xp)[..., None, :]) % n_c          # (R, G, n_c, c, w)
        count += gap <= 1                                                   # key chunk u or u - 1 in round r
    count = xp.maximum(count, 1)                                            # padding pairs: 1 (not visible)
    is_self = visible & (kj == qj)                                          # (R, G, n_c, c, w)
    if shared_qk:
        S = xp.where(is_self, SELF_SCORE, S)                                # (R, G, n_c, c, w)
    if dedup:
        S = S - xp.log(count).astype(S.dtype)                               # (R, G, n_c, c, w)
    share = xp.where(visible, 1.0 / count, 0.0).sum(axis=-1)                # (R, G, n_c, c)
    return S, visible, share, is_self.any(axis=-1)


def combine_rounds(out_r, lse_r, xp=np):
    """``out = sum_r exp(z^r - Z) o^r`` and ``Z = lse_r z^r``, over axis 0.

    Parameters
    ----------
    out_r : array of shape (R, G, N, Dv)
    lse_r : array of shape (R, G, N)

    Returns
    -------
    out : array of shape (G, N, Dv)
        0 where every round is empty.
    lse : array of shape (G, N)
        ``-inf`` where every round is empty.
    """
    mu = lse_r.max(axis=0)                                                  # (G, N)
    mu = xp.where(xp.isfinite(mu), mu, 0)                                   # (G, N)
    w = xp.exp(lse_r - mu)                                                  # (R, G, N); 0 for empty rounds
    total = w.sum(axis=0)                                                   # (G, N)
    out = (w[..., None] * out_r).sum(axis=0)                                # (G, N, Dv)
    out = out / xp.where(total > 0, total, 1)[..., None]                    # (G, N, Dv)
    return out, mu + safe_log(total, xp)


def _windows(q, keys, v, buckets_q, buckets_k, chunk_size, shared_qk, xp):
    """Sorted chunks and the gathered window tiles of every round."""
    qslots, inv_q, chunk_q = sort_into_chunks(buckets_q, chunk_size, xp)    # (R, G, n_c, c), (R, G, N) x 2
    if shared_qk:
        kslots, inv_k, chunk_k = qslots, inv_q, chunk_q
    else:
        kslots, inv_k, chunk_k = sort_into_chunks(buckets_k, chunk_size, xp)
    kpos = attach_previous_chunk(kslots, xp)                                # (R, G, n_c, w)
    Qw = gather(q, qslots, xp)                                              # (R, G, n_c, c, D)
    Kw = gather(keys, kpos, xp)                                             # (R, G, n_c, w, D)
    Vw = gather(v, kpos, xp)                                                # (R, G, n_c, w, Dv)
    return dict(qpos=qslots, kpos=kpos, inv_q=inv_q, inv_k=inv_k, chunk_q=chunk_q, chunk_k=chunk_k,
                Qw=Qw, Kw=Kw, Vw=Vw)


def reformer_reference(q, k, v, *, mask=None, offset=None, scale, buckets_q, buckets_k, chunk_size=64,
                       shared_qk=False, dedup=True, xp=np, logits=window_logits):
    """LSH attention for given buckets, step by step (see the module docstring).

    Parameters
    ----------
    q, k : arrays of shape (G, N, D)
        Under shared QK, ``k`` is ignored and the keys are ``q / ||q||``.
    v : array of shape (G, N, Dv)
    mask : bool array of shape (G, N), optional
    offset : int, optional
        Causal offset (0 here, since Nq = Nk); None when not causal.
    scale : float
    buckets_q, buckets_k : int arrays of shape (R, G, N)
    chunk_size : int
    shared_qk, dedup : bool
    logits : callable
        The :func:`window_logits` step (the CuPy backend passes its kernel).

    Returns
    -------
    out : array of shape (G, N, Dv)
    res : dict
        ``lse`` (G, N), the buckets, ``union_size`` (G, N) (``|U_i|``),
        ``self_only`` and ``empty_rows`` (G, N) bool.
    """
    keys = shared_keys(q, xp) if shared_qk else k                           # (G, N, D)
    w = _windows(q, keys, v, buckets_q, buckets_k, chunk_size, shared_qk, xp)
    S = scale * (w["Qw"] @ swap_last(w["Kw"]))                              # (R, G, n_c, c, w)
    S, visible, share, self_seen = logits(S, w["qpos"], w["kpos"], w["chunk_q"], w["chunk_k"], mask, offset,
                                          shared_qk, dedup, xp)
    out_r, lse_r, _ = softmax_attend(S, visible, w["Vw"], xp)               # (R, G, n_c, c, Dv), (R, G, n_c, c)
    out_r = to_positions(out_r, w["inv_q"], xp)                             # (R, G, N, Dv)
    lse_r = to_positions(lse_r, w["inv_q"], xp)                             # (R, G, N)
    out, lse = combine_rounds(out_r, lse_r, xp)                             # (G, N, Dv), (G, N)
    union_size = to_positions(share, w["inv_q"], xp).sum(axis=0)            # (G, N)
    self_seen = to_positions(self_seen, w["inv_q"], xp).any(axis=0)         # (G, N)
    res = {
        "lse": lse,
        "buckets": (buckets_q, buckets_k),
        "union_size": union_size,
        "self_only": self_seen & (xp.rint(union_size) == 1),
        "empty_rows": ~xp.isfinite(lse),
    }
    return out.astype(q.dtype, copy=False), res


def reformer_backward(dout, q, k, v, out, res, *, mask=None, offset=None, scale, chunk_size=64, shared_qk=False,
                      dedup=True, xp=np, logits=window_logits):
    """Gradients of :func:`reformer_reference` with the forward's buckets held fixed.

    The method is exact attention over ``U_i`` with ``P_ij = w_ij e^{S_ij - L_i}``
    (``w = 1`` with dedup, ``c_ij`` without), so per window appearance, with
    ``p = exp(S~_ij - L_i)`` and ``S~`` the window logits::

        dv_j += p dO_i,     dS_ij = p (dO_i . v_j - dO_i . o_i)
        dq_i += s dS_ij k_j,    dk_j += s dS_ij q_i

    summed over rounds; the self pair of shared QK gets no ``dS``. Under
    shared QK the keys are ``q / ||q||``, so
    ``dq_j += (dk_j - (dk_j . k_j) k_j) / ||q_j||`` and ``dk = 0``.

    Returns
    -------
    dq : array of shape (G, N, D)
    dk : array of shape (G, N, D)
    dv : array of shape (G, N, Dv)
    """
    buckets_q, buckets_k = res["buckets"]
    keys = shared_keys(q, xp) if shared_qk else k                           # (G, N, D)
    w = _windows(q, keys, v, buckets_q, buckets_k, chunk_size, shared_qk, xp)
    S = scale * (w["Qw"] @ swap_last(w["Kw"]))                              # (R, G, n_c, c, w)
    S, visible, _, _ = logits(S, w["qpos"], w["kpos"], w["chunk_q"], w["chunk_k"], mask, offset,
                              shared_qk, dedup, xp)
    L = gather(res["lse"], w["qpos"], xp)[..., None]                        # (R, G, n_c, c, 1)
    P = xp.exp(xp.where(visible, S - xp.where(xp.isfinite(L), L, 0), -xp.inf))  # (R, G, n_c, c, w)
    dO = gather(dout, w["qpos"], xp)                                        # (R, G, n_c, c, Dv)
    delta = gather((dout * out).sum(axis=-1), w["qpos"], xp)[..., None]     # (R, G, n_c, c, 1)
    dVw = swap_last(P) @ dO                                                 # (R, G, n_c, w, Dv)
    dS = P * (dO @ swap_last(w["Vw"]) - delta)                              # (R, G, n_c, c, w)
    if shared_qk:
        dS = xp.where(w["kpos"][..., None, :] == w["qpos"][..., :, None], 0, dS)  # constant self score
    dQw = scale * (dS @ w["Kw"])                                            # (R, G, n_c, c, D)
    dKw = scale * (swap_last(dS) @ w["Qw"])                                 # (R, G, n_c, w, D)
    dq = to_positions(dQw, w["inv_q"], xp).sum(axis=0)                      # (G, N, D)
    dkeys = to_positions(fold_previous_chunk(dKw, xp), w["inv_k"], xp).sum(axis=0)  # (G, N, D)
    dv = to_positions(fold_previous_chunk(dVw, xp), w["inv_k"], xp).sum(axis=0)     # (G, N, Dv)
    if not shared_qk:
        return dq, dkeys, dv
    norm = xp.sqrt((q * q).sum(axis=-1, keepdims=True))                     # (G, N, 1)
    radial = (dkeys * keys).sum(axis=-1, keepdims=True) * keys              # (G, N, D)
    dq = dq + (dkeys - radial) / xp.where(norm > 0, norm, 1)                # (G, N, D)
    return dq, xp.zeros_like(k), dv


def forward(q, k, v, *, mask, offset, scale, num_hashes, num_buckets, chunk_size, shared_qk, dedup,
            rotations=None, buckets=None, xp=np, logits=window_logits):
    """Backend entry point: hash (or replay) the buckets, then LSH attention."""
    buckets_q, buckets_k = assign_buckets(q, k, num_hashes=num_hashes, num_buckets=num_buckets, shared_qk=shared_qk,
                                          rotations=rotations, buckets=buckets, xp=xp)
    return reformer_reference(q, k, v, mask=mask, offset=offset, scale=scale, buckets_q=buckets_q,
                              buckets_k=buckets_k, chunk_size=chunk_size, shared_qk=shared_qk, dedup=dedup, xp=xp,
                              logits=logits)


def backward(dout, q, k, v, out, res, *, mask, offset, scale, chunk_size, shared_qk, dedup, xp=np,
             logits=window_logits, **params):
    """Backend entry point for the pullback (the forward's buckets are replayed from ``res``)."""
    return reformer_backward(dout, q, k, v, out, res, mask=mask, offset=offset, scale=scale, chunk_size=chunk_size,
                             shared_qk=shared_qk, dedup=dedup, xp=xp, logits=logits)
