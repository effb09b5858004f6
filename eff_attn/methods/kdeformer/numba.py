"""KDEformer on the CPU: block-diagonal exact tiles plus one sampled tile per query tile.

Matches :func:`eff_attn.methods.kdeformer.reference.kdeformer_reference`.
Nothing of size Nq x Nk is allocated: each task holds one (c_q, b) block
tile or one (64, m) sampled tile.

Steps
    1. **Plan** (host NumPy, shared with the other backends): float64 codes,
       the int64-keyed sorts, the balanced blocks and the probabilities
       (:func:`eff_attn.methods.kdeformer._common.make_plan`). The
       inverse-CDF draw is :func:`_sample_kernel`: per slice a sequential
       float64 prefix sum and ``np.searchsorted`` (side right), the same
       numbers as the reference's count.
    2. **Blocks** (:func:`_block_kernel`): ``prange`` over the items of the
       work table (slice, chunk of at most ``c_q`` sorted queries, its key
       block). A task gathers its queries and keys contiguously, then
       ``np.dot``, row max, ``exp_shifted``, ``np.dot``, and scatters the
       rows' block numerators ``N^blk`` and maxima ``mu^blk``.
    3. **Samples and merge** (:func:`_residual_merge_kernel`): ``prange``
       over (slice, 64-query tile). ``np.dot`` with ``K_J^T``, entries whose
       sampled key lies in the query's own block set to ``-inf``, then max,
       exp times the weight, ``np.dot`` with ``V_J`` and a row sum (the ones
       column): ``N^res`` and ``mu^res``. The same task then does the reference's
       :func:`merge_parts` for its rows: rescale both parts to
       ``mu = max(mu^blk, mu^res)`` and divide by the ones column.

BLAS is held to one thread while ``prange`` owns the cores.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum
from ._common import block_items, make_plan, plan_flops
from .reference import residuals

__all__ = ["forward", "inverse_cdf_sample_numba"]

#: Queries per task of the sampled part.
RESIDUAL_TILE = 64


# Serial (the work is O(G (Nk + m log Nk))) and without fast-math: the prefix
# sum must add in order, like NumPy's cumsum.
@numba.njit(cache=True, error_model="numpy")
def _sample_kernel(pi, u, out):
    """``out[g, l] = #{j : C_j <= u_l C_last}`` with ``C = cumsum(pi[g])``; -1 if ``C_last = 0``.

    The prefix sum and the binary search (``np.searchsorted``, side right)
    are written out: the loops compile far faster than NumPy's versions.
    """
    Nk = pi.shape[1]
    C = np.empty(Nk, dtype=pi.dtype)                                       # (Nk,) prefix sums, in order
    for g in range(pi.shape[0]):
        total = pi.dtype.type(0)
        for j in range(Nk):
            total += pi[g, j]
            C[j] = total
        for ell in range(u.shape[1]):
            if not total > 0:
                out[g, ell] = -1
                continue
            x = u[g, ell] * total
            lo, hi = 0, Nk                                                 # first j with C_j > x
            while lo < hi:
                mid = (lo + hi) // 2
                if C[mid] <= x:
                    lo = mid + 1
                else:
                    hi = mid
            out[g, ell] = lo


def inverse_cdf_sample_numba(pi, u):
    """:func:`eff_attn.methods.kdeformer.inverse_cdf_sample` by binary search, (G, m) int64."""
    pi, u = contiguous(pi, u)
    out = np.empty(u.shape, dtype=np.int64)
    _sample_kernel(pi, u, out)
    return out


@kernel
def _block_kernel(q, k, v, q_perm, k_perm, items, scale, numer, mu_out):
    """Exact softmax numerators inside each item's block (see the module docstring).

    Invariant after task ``w``: for each query ``i`` of the item,
    ``numer[g, i] = sum_{j in B_i} exp(s_ij - mu_i) [v_j, 1]`` and
    ``mu_out[g, i] = mu_i = max_{j in B_i} s_ij``.
    """
    D, Dv = q.shape[2], v.shape[2]
    for w in prange(items.shape[0]):
        g, q0, q1, k0, k1 = items[w, 0], items[w, 1], items[w, 2], items[w, 3], items[w, 4]
        nq, nk = q1 - q0, k1 - k0
        Q = np.empty((nq, D), dtype=q.dtype)                               # (c_q, D) gathered, scaled
        K = np.empty((nk, D), dtype=q.dtype)                               # (b, D) gathered
        V = np.empty((nk, Dv), dtype=q.dtype)                              # (b, Dv) gathered
        for r in range(nq):
            i = q_perm[g, q0 + r]
            for d in range(D):
                Q[r, d] = q[g, i, d] * scale
        for c in range(nk):
            j = k_perm[g, k0 + c]
            for d in range(D):
                K[c, d] = k[g, j, d]
            for d in range(Dv):
                V[c, d] = v[g, j, d]
        S = np.empty((nq, nk), dtype=q.dtype)                              # (c_q, b) scores
        np.dot(Q, K.T, S)
        PV = np.empty((nq, Dv), dtype=q.dtype)                             # (c_q, Dv)
        bits = np.empty(nk, dtype=np.int32)
        for r in range(nq):
            i = q_perm[g, q0 + r]
            shift = row_maximum(S[r])
            numer[g, i, Dv] = exp_shifted(S[r], shift, bits)              # S[r] <- exp(S[r] - mu)
            mu_out[g, i] = shift
        np.dot(S, V, PV)
        for r in range(nq):
            i = q_perm[g, q0 + r]
            for d in range(Dv):
                numer[g, i, d] = PV[r, d]


@kernel
def _residual_merge_kernel(q, KJ, VJ, beta_J, weight, q_block, scale, tile,
                           numer_blk, mu_blk, numer_res, mu_out, used, ess, out):
    """Importance-sampled numerators outside each query's block, merged with the block part.

    One task per (slice, tile of queries). For query ``i`` of the tile, with
    ``R_i`` the samples outside its block, the task forms
    ``N^res_i = sum_{R_i} w_l exp(s_{i j_l} - mu^res_i) [v_{j_l}, 1]``, then
    rescales both parts to ``mu_i = max(mu^blk_i, mu^res_i)`` in place and
    writes ``out_i = N_{i, :Dv} / N_{i, Dv}`` (0 when both parts are empty).
    ``used`` is ``|R_i|`` and ``ess`` Kish's effective sample size.
    """
    G, Nq, D = q.shape
    m, Dv = KJ.shape[1], VJ.shape[2]
    n_tiles = (Nq + tile - 1) // tile
    for task in prange(G * n_tiles):
        g = task // n_tiles
        i0 = (task % n_tiles) * tile
        i1 = min(Nq, i0 + tile)
        bq = i1 - i0
        # np.empty and loops: np.zeros and np.full would be nested parfors.
        S = np.empty((bq, m), dtype=q.dtype)                               # (Bq, m) weighted terms
        PV = np.empty((bq, Dv), dtype=q.dtype)                             # (Bq, Dv) N^res, values, 0
        ones = np.empty(bq, dtype=q.dtype)                                 # (Bq,) N^res, ones column, 0
        mu_res = np.empty(bq, dtype=q.dtype)                               # (Bq,) -inf: no sample
        for r in range(bq):
            mu_res[r] = -np.inf
            ones[r] = 0
            for c in range(Dv):
                PV[r, c] = 0
        if m > 0:
            Q = np.empty((bq, D), dtype=q.dtype)                           # (Bq, D) scaled queries
            for r in range(bq):
                for d in range(D):
                    Q[r, d] = q[g, i0 + r, d] * scale
            np.dot(Q, KJ[g].T, S)
            bits = np.empty(m, dtype=np.int32)
            for r in range(bq):
                alpha = q_block[g, i0 + r]
                count = 0
                for c in range(m):
                    if beta_J[g, c] == alpha or beta_J[g, c] < -1:         # own block, or no sample
                        S[r, c] = -np.inf
                    else:
                        count += 1
                used[g, i0 + r] = count
                if count == 0:
                    for c in range(m):
                        S[r, c] = 0
                    continue
                mu_res[r] = row_maximum(S[r])
                exp_shifted(S[r], mu_res[r], bits)                         # S[r] <- exp(S[r] - mu^res)
                squares = q.dtype.type(0)
                total = q.dtype.type(0)
                for c in range(m):
                    a = S[r, c] * weight[g, c]
                    S[r, c] = a
                    total += a
                    squares += a * a
                ones[r] = total
                ess[g, i0 + r] = ones[r] * ones[r] / squares if squares > 0 else 0
            np.dot(S, VJ[g], PV)
        for r in range(bq):
            i = i0 + r
            mu = max(mu_blk[g, i], mu_res[r])
            mu_out[g, i] = mu
            if mu == -np.inf:                                              # no kept key at all
                for c in range(Dv):
                    out[g, i, c] = 0
                continue
            a_blk = np.exp(mu_blk[g, i] - mu)
            a_res = np.exp(mu_res[r] - mu)
            for c in range(Dv + 1):
                numer_blk[g, i, c] *= a_blk
            for c in range(Dv):
                numer_res[g, i, c] = a_res * PV[r, c]
            numer_res[g, i, Dv] = a_res * ones[r]
            den = numer_blk[g, i, Dv] + numer_res[g, i, Dv]
            for c in range(Dv):
                out[g, i, c] = (numer_blk[g, i, c] + numer_res[g, i, c]) / den


def forward(q, k, v, *, mask, offset, scale, num_bits, block_size, num_samples, order, probs, hyperplanes=None,
            q_codes=None, k_codes=None, sample_idx=None, uniforms=None):
    """Plan on the host, then the block and sampled kernels; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    if mask is not None:                                                     # masked rows may hold NaN
        k = np.where(mask[..., None], k, 0).astype(q.dtype)                  # (G, Nk, D)
        v = np.where(mask[..., None], v, 0).astype(q.dtype)                  # (G, Nk, Dv)
    s_ = q.dtype.type(scale)
    numer_blk = np.zeros((G, Nq, Dv + 1), dtype=q.dtype)                     # (G, Nq, Dv+1)
    mu_blk = np.full((G, Nq), -np.inf, dtype=q.dtype)                        # (G, Nq)
    numer_res = np.empty((G, Nq, Dv + 1), dtype=q.dtype)                     # (G, Nq, Dv+1)
    mu = np.empty((G, Nq), dtype=q.dtype)                                    # (G, Nq)
    used = np.zeros((G, Nq), dtype=np.int64)
    ess = np.zeros((G, Nq), dtype=q.dtype)
    out = np.empty((G, Nq, Dv), dtype=q.dtype)
    # The host steps run with one BLAS thread too: Numba's worker threads may
    # still be spinning from the previous kernel.
    with blas_single_thread():
        plan = make_plan(q, k, v, mask, hyperplanes=hyperplanes, q_codes=q_codes, k_codes=k_codes,
                         sample_idx=sample_idx, uniforms=uniforms, num_samples=num_samples,
                         block_size=block_size, order=order, probs=probs, scale=scale,
                         sampler=inverse_cdf_sample_numba)
        items, _, _ = block_items(plan.n_kept, Nq, Nk, block_size)
        rows = np.arange(G)[:, None]
        J = np.maximum(plan.sample_idx, 0)                                   # (G, m)
        KJ = np.ascontiguousarray(k[rows, J])                                # (G, m, D)
        VJ = np.ascontiguousarray(v[rows, J])                                # (G, m, Dv)
        beta_J = np.where(plan.sample_idx >= 0, plan.k_block[rows, J], -2)   # (G, m); -2 = no sample
        weight = np.ascontiguousarray(plan.sample_weight.astype(q.dtype))    # (G, m)
        _block_kernel(q, k, v, plan.q_perm, plan.k_perm, items, s_, numer_blk, mu_blk)
        _residual_merge_kernel(q, KJ, VJ, beta_J, weight, plan.q_block, s_, RESIDUAL_TILE,
                               numer_blk, mu_blk, numer_res, mu, used, ess, out)
    flops = plan_flops(plan, Nq, Nk, q.shape[2], Dv, num_bits=num_bits, block_size=block_size,
                       num_samples=num_samples, probs=probs)
    return out, residuals(plan, items, numer_blk, numer_res, mu, used, ess, flops)
