"""KDEformer in NumPy: exact diagonal blocks plus importance-sampled keys.

Per slice (one batch entry and head), with ``s_ij = eta q_i . k_j`` and
``v~_j = [v_j, 1]`` (the ones column carries the normaliser)::

    B_i = {kept j : beta_j = alpha_i}             the query's own block
    R_i = {l : beta_{j_l} != alpha_i}             samples outside that block
    N_i = sum_{B_i} exp(s_ij - mu_i) v~_j
        + sum_{R_i} w_l exp(s_{i j_l} - mu_i) v~_{j_l},   w_l = 1 / (m p_{j_l})
    out_i = N_{i, :Dv} / N_{i, Dv}

The block part is computed over a work table of (slice, query chunk, key
block) items (:func:`eff_attn.methods.kdeformer._common.block_items`), the
sampled part as one (Nq, m) product per slice. Each part keeps its own row
max; :func:`merge_parts` rescales both to the common shift
``mu_i = max(mu_blk, mu_res)`` and divides.

Time ``O(Nq (b + m)(D + Dv) + (Nq + Nk)(rD + log N))`` per slice; memory
``O(Nq (b + m) + (Nq + Nk)(D + Dv))``; no (Nq, Nk) array is formed. The
functions take the array module ``xp``, and the CuPy backend runs them on
chunks of items and queries.
"""

from __future__ import annotations

import numpy as np

from ..._softmax import safe_log, safe_row_max
from ._common import block_items, inverse_cdf_sample, make_plan, plan_flops

__all__ = [
    "block_part",
    "residual_part",
    "effective_sample_size",
    "merge_parts",
    "residuals",
    "kdeformer_reference",
    "forward",
]


def _with_ones_column(v, keep, xp=np):
    """``v~ = [v, 1]`` on kept keys and all-zero rows on masked ones, shape (G, Nk, Dv+1)."""
    ones = keep[..., None].astype(v.dtype)                                   # (G, Nk, 1)
    return xp.concatenate([xp.where(keep[..., None], v, 0), ones], axis=-1)  # (G, Nk, Dv+1)


def block_part(q, k, v_tilde, q_perm, k_perm, items, c_q, b_max, scale, xp=np):
    """Exact attention inside the diagonal blocks, for the queries of ``items``.

    Parameters
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
    v_tilde : array of shape (G, Nk, Dv+1)
    q_perm, k_perm : int64 arrays of shape (G, Nq), (G, Nk)
        Sorted orders (:func:`kdeformer_blocks`).
    items : int64 array of shape (W, 5)
        ``(g, q_start, q_stop, k_start, k_stop)`` in sorted positions.
    c_q, b_max : int
        Padded query-chunk and key-block widths.

    Returns
    -------
    g, i : int arrays of shape (P,)
        Slice and (original) query index of each covered row.
    numer : array of shape (P, Dv+1)
        ``sum_{B_i} exp(s_ij - mu_i^blk) v~_j``.
    mu : array of shape (P,)
        The block row max ``mu_i^blk`` (finite: blocks are never empty).
    """
    g = items[:, 0:1]                                                        # (W, 1)
    q_pos = items[:, 1:2] + xp.arange(c_q)                                   # (W, c_q) sorted positions
    q_ok = q_pos < items[:, 2:3]                                             # (W, c_q)
    k_pos = items[:, 3:4] + xp.arange(b_max)                                 # (W, b)
    k_ok = k_pos < items[:, 4:5]                                             # (W, b)
    qi = q_perm[g, xp.where(q_ok, q_pos, 0)]                                 # (W, c_q) query index
    kj = k_perm[g, xp.where(k_ok, k_pos, 0)]                                 # (W, b) key index
    Q = q[g, qi]                                                             # (W, c_q, D)
    K = k[g, kj]                                                             # (W, b, D)
    V = v_tilde[g, kj]                                                       # (W, b, Dv+1)
    S = scale * xp.matmul(Q, xp.swapaxes(K, -1, -2))                         # (W, c_q, b)
    S = xp.where(k_ok[:, None, :], S, -xp.inf)                               # (W, c_q, b) padding out
    mu = S.max(axis=-1, keepdims=True)                                       # (W, c_q, 1)
    E = xp.exp(S - mu)                                                       # (W, c_q, b); 0 on padding
    numer = xp.matmul(E, V)                                                  # (W, c_q, Dv+1)
    rows_g = xp.broadcast_to(g, q_ok.shape)[q_ok]                            # (P,)
    return rows_g, qi[q_ok], numer[q_ok], mu[..., 0][q_ok]


def residual_part(q, k, v_tilde, q_block, k_block, sample_idx, sample_weight, scale, xp=np):
    """The importance-sampled estimate of the attention outside each query's block.

    Parameters
    ----------
    q : array of shape (G, Nq', D)
        All queries, or a chunk of them (with the matching ``q_block``).
    k : array of shape (G, Nk, D)
    v_tilde : array of shape (G, Nk, Dv+1)
    q_block : int64 array of shape (G, Nq')
    k_block : int64 array of shape (G, Nk)
    sample_idx : int64 array of shape (G, m)
        Drawn keys; -1 in slices without kept keys.
    sample_weight : float64 array of shape (G, m)
        ``1 / (m p_j)``.

    Returns
    -------
    numer : array of shape (G, Nq', Dv+1)
        ``sum_{R_i} w_l exp(s_{i j_l} - mu_i^res) v~_{j_l}``.
    mu : array of shape (G, Nq')
        The residual row max ``mu_i^res``; ``-inf`` where ``R_i`` is empty.
    used : int64 array of shape (G, Nq')
        ``|R_i|``, the samples that fell outside the query's block.
    ess : array of shape (G, Nq')
        Effective sample size of the weighted terms (:func:`effective_sample_size`).
    """
    rows = xp.arange(q.shape[0])[:, None]                                    # (G, 1)
    J = xp.maximum(sample_idx, 0)                                            # (G, m)
    KJ = k[rows, J]                                                          # (G, m, D)
    VJ = v_tilde[rows, J]                                                    # (G, m, Dv+1)
    beta_J = xp.where(sample_idx >= 0, k_block[rows, J], -2)                 # (G, m); -2 never matches
    w = sample_weight.astype(q.dtype)                                        # (G, m)
    S = scale * xp.matmul(q, xp.swapaxes(KJ, -1, -2))                        # (G, Nq', m)
    R = (beta_J[:, None, :] != q_block[:, :, None]) & (sample_idx >= 0)[:, None, :]  # (G, Nq', m)
    S = xp.where(R, S, -xp.inf)                                              # (G, Nq', m)
    mu = safe_row_max(S, xp)                                                 # (G, Nq', 1); 0 if R_i empty
    E = w[:, None, :] * xp.exp(S - mu)                                       # (G, Nq', m); 0 off R_i
    numer = xp.matmul(E, VJ)                                                 # (G, Nq', Dv+1)
    used = R.sum(axis=-1)                                                    # (G, Nq')
    mu = xp.where(used > 0, mu[..., 0], -xp.inf)                             # (G, Nq')
    return numer, mu, used, effective_sample_size(numer[..., -1], (E * E).sum(axis=-1), xp)


def effective_sample_size(total, sum_sq, xp=np):
    """Kish's ``(sum_l a_l)^2 / sum_l a_l^2`` of the residual terms ``a_l = w_l exp(s - mu)``.

    Between 1 and ``|R_i|``; ``|R_i|`` when every used sample carries the
    same weight. 0 where ``R_i`` is empty.
    """
    return total * total / xp.where(sum_sq > 0, sum_sq, 1)


def merge_parts(numer_blk, mu_blk, numer_res, mu_res, xp=np):
    """Rescale both parts to ``mu = max(mu_blk, mu_res)`` and divide by the ones column.

    Parameters
    ----------
    numer_blk, numer_res : arrays of shape (G, Nq, Dv+1)
    mu_blk, mu_res : arrays of shape (G, Nq)
        ``-inf`` where the part is empty (a slice without kept keys has both).

    Returns
    -------
    out : array of shape (G, Nq, Dv)
    numer_blk, numer_res : arrays of shape (G, Nq, Dv+1)
        Both parts with the common shift ``mu``.
    mu : array of shape (G, Nq)
        ``-inf`` on empty rows.
    """
    mu = xp.maximum(mu_blk, mu_res)                                          # (G, Nq)
    mu_safe = xp.where(xp.isfinite(mu), mu, 0)                               # (G, Nq)
    numer_blk = xp.exp(mu_blk - mu_safe)[..., None] * numer_blk              # (G, Nq, Dv+1)
    numer_res = xp.exp(mu_res - mu_safe)[..., None] * numer_res              # (G, Nq, Dv+1)
    numer = numer_blk + numer_res                                            # (G, Nq, Dv+1)
    den = numer[..., -1:]                                                    # (G, Nq, 1) estimates D_ii e^-mu
    out = numer[..., :-1] / xp.where(den > 0, den, 1)                        # (G, Nq, Dv); empty rows 0
    return out, numer_blk, numer_res, mu


def residuals(plan, items, numer_blk, numer_res, mu, used, ess, flops, xp=np):
    """The ``res`` dict of every backend: the plan, both numerators and the row statistics.

    ``numer_blk``, ``numer_res`` and ``mu`` as returned by :func:`merge_parts`;
    ``used`` and ``ess`` from the residual part; ``items`` the block work
    table; ``flops`` the call's count (:func:`_common.plan_flops`).
    """
    den = numer_blk[..., -1] + numer_res[..., -1]                            # (G, Nq)
    return {
        "plan": plan,
        "items": items,
        "numer_blk": numer_blk,
        "numer_res": numer_res,
        "row_shift": mu,
        "log_normaliser": mu + safe_log(den, xp),
        "block_mass_fraction": numer_blk[..., -1] / xp.where(den > 0, den, 1),
        "samples_used": used,
        "effective_sample_size": ess,
        "empty_rows": ~xp.isfinite(mu),
        "flops": flops,
    }


def kdeformer_reference(q, k, v, *, mask=None, scale, num_bits, num_samples, block_size, order, probs,
                        hyperplanes=None, q_codes=None, k_codes=None, sample_idx=None, uniforms=None, xp=np,
                        sampler=inverse_cdf_sample, item_chunk=None, query_chunk=None, slice_chunk=None):
    """KDEformer's practical estimator (spec section 2.2), vectorised over slices.

    Parameters
    ----------
    q : ndarray of shape (G, Nq, D)
    k : ndarray of shape (G, Nk, D)
    v : ndarray of shape (G, Nk, Dv)
    mask : bool ndarray of shape (G, Nk), optional
    scale : float
    num_bits, num_samples, block_size : int
    order : {"gray", "official"}
    probs : {"columns", "mixture", "official", "uniform"}
    hyperplanes : float64 ndarray of shape (G, r, D), optional
    q_codes, k_codes : int ndarrays of shape (G, Nq), (G, Nk), optional
    sample_idx : int ndarray of shape (G, m), optional
    uniforms : float64 ndarray of shape (G, m), optional
    xp, sampler, item_chunk, query_chunk, slice_chunk
        The array module, the inverse-CDF sampler, and the number of block
        items, queries and slices per step. The CuPy backend sets them to
        bound its memory; by default everything is one step.

    Returns
    -------
    out : ndarray of shape (G, Nq, Dv)
    res : dict
        See :func:`residuals`.
    """
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    keep = xp.ones((G, Nk), dtype=bool) if mask is None else mask            # (G, Nk)
    k = xp.where(keep[..., None], k, 0)                                      # (G, Nk, D) masked rows 0
    v_tilde = _with_ones_column(v, keep, xp)                                 # (G, Nk, Dv+1)
    plan = make_plan(q, k, v_tilde[..., :-1], mask, hyperplanes=hyperplanes, q_codes=q_codes, k_codes=k_codes,
                     sample_idx=sample_idx, uniforms=uniforms, num_samples=num_samples, block_size=block_size,
                     order=order, probs=probs, scale=scale, xp=xp, sampler=sampler, slice_chunk=slice_chunk)
    items, c_q, b_max = block_items(plan.n_kept, Nq, Nk, block_size)

    numer_blk = xp.zeros((G, Nq, v_tilde.shape[-1]), dtype=q.dtype)          # (G, Nq, Dv+1)
    mu_blk = xp.full((G, Nq), -xp.inf, dtype=q.dtype)                        # (G, Nq)
    W = items.shape[0]
    for w0 in range(0, W, item_chunk or max(W, 1)):
        chunk = xp.asarray(items[w0:w0 + (item_chunk or W)])                 # (W', 5)
        g, i, numer, mu = block_part(q, k, v_tilde, plan.q_perm, plan.k_perm, chunk, c_q, b_max, scale, xp)
        numer_blk[g, i] = numer                                              # each row is written once
        mu_blk[g, i] = mu

    numer_res = xp.empty_like(numer_blk)                                     # (G, Nq, Dv+1)
    mu_res = xp.empty_like(mu_blk)                                           # (G, Nq)
    used = xp.empty((G, Nq), dtype=np.int64)                                 # (G, Nq)
    ess = xp.empty_like(mu_blk)                                              # (G, Nq)
    for i0 in range(0, Nq, query_chunk or Nq):
        rows = slice(i0, i0 + (query_chunk or Nq))
        numer_res[:, rows], mu_res[:, rows], used[:, rows], ess[:, rows] = residual_part(
            q[:, rows], k, v_tilde, plan.q_block[:, rows], plan.k_block, plan.sample_idx, plan.sample_weight,
            scale, xp)

    out, numer_blk, numer_res, mu = merge_parts(numer_blk, mu_blk, numer_res, mu_res, xp)
    flops = plan_flops(plan, Nq, Nk, q.shape[2], v.shape[2], num_bits=num_bits, block_size=block_size,
                       num_samples=num_samples, probs=probs)
    return out, residuals(plan, items, numer_blk, numer_res, mu, used, ess, flops, xp)


def forward(q, k, v, *, mask, offset, scale, **params):
    """Backend entry point (``offset`` is always None: causal is refused)."""
    return kdeformer_reference(q, k, v, mask=mask, scale=scale, **params)
