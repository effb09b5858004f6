"""Reformer (LSH attention) on the CPU: one Numba task per (slice, round, chunk).

Matches :func:`eff_attn.methods.reformer.reference.reformer_reference`.

Hashing
    ``_hash_kernel``: ``prange`` over (slice, block of 64 rows); one float64
    ``np.dot`` per tile against all rounds' rotations, then a fused
    argmax/argmin per round and bucket factor (the same ids as
    :func:`eff_attn.methods.reformer.hash_buckets`, ties included).

Host steps (NumPy, shared with the other backends)
    The stable sort through the shared int64 ``key * N + index`` helper of
    :mod:`eff_attn._hashing`, and the chunk id of every position in every
    round.

Blocking
    ``_window_kernel``: ``prange`` over ``G x R x n_c`` tasks. A task owns
    one query chunk of one round: it gathers its ``<= c`` query rows and the
    ``<= 2c`` key and value rows of chunks ``u`` and ``u - 1 (mod n_c)`` into
    private tiles, takes the (c, 2c) scores with one ``np.dot``, applies
    visibility, the shared-QK self score and the dedup shift ``-log c_ij``
    (``c_ij`` from ``R`` comparisons of chunk ids gathered once per tile),
    and writes the round's
    softmax average and logsumexp at the queries' positions. Every query
    sits in exactly one chunk per round, so writes never collide.
    ``_combine_kernel``: ``prange`` over slices; per position, the rounds'
    logsumexp weights ``exp(z^r - Z)``.

Memory ``O(G R N Dv)`` for the round outputs plus one tile per worker; no
(N, N) array. There is no backward pass here (``differentiable=False``):
``attention_vjp`` runs the NumPy or CuPy pullback.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._hashing import inverse_permutation, stable_key_argsort
from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from ...masks import as_kernel_mask
from ._common import SELF_SCORE, assign_buckets, bucket_groups, shared_keys

__all__ = ["forward"]

#: Rows per task of the hash kernel: a (64, D) x (D, R cols) float64 tile product.
HASH_BLOCK = 64


@kernel
def _hash_kernel(x, flat_rot, groups, block, codes):
    """Bucket ids as :func:`eff_attn.methods.reformer.hash_buckets`, one task per (slice, row block).

    ``flat_rot`` (D, R * cols) holds round ``r`` in columns ``[r cols, (r+1) cols)``.
    A task projects its rows in float64 with one ``np.dot``, then per round and
    factor takes ``argmax [p; -p]`` as ``argmax p`` if ``max p >= -min p``,
    else ``b/2 + argmin p`` (first indices, as the reference).
    """
    R, G, N = codes.shape
    cols = flat_rot.shape[1] // R
    n_blocks = (N + block - 1) // block
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block
        i1 = min(N, i0 + block)
        xb = np.empty((i1 - i0, x.shape[2]), dtype=np.float64)             # (B, D)
        for a in range(i1 - i0):                                           # a loop, not astype: cheaper to compile
            for d in range(x.shape[2]):
                xb[a, d] = x[g, i0 + a, d]
        p = np.empty((i1 - i0, R * cols), dtype=np.float64)
        np.dot(xb, flat_rot, p)                                            # (B, R * cols)
        for a in range(i1 - i0):
            for r in range(R):
                code, base, col = 0, 1, r * cols
                for b in groups:
                    hi, lo = col, col
                    for c in range(col + 1, col + b // 2):
                        if p[a, c] > p[a, hi]:
                            hi = c
                        if p[a, c] < p[a, lo]:
                            lo = c
                    digit = hi - col if p[a, hi] >= -p[a, lo] else b // 2 + lo - col
                    code += base * digit
                    base *= b
                    col += b // 2
                codes[r, g, i0 + a] = code


def _hash(x, rotations, num_buckets, xp=np):
    """Host wrapper of :func:`_hash_kernel`, with the signature of ``hash_buckets``."""
    R, D, cols = rotations.shape
    flat_rot = np.ascontiguousarray(np.moveaxis(rotations.astype(np.float64), 0, 1).reshape(D, R * cols))
    codes = np.empty((R, x.shape[0], x.shape[1]), dtype=np.int64)
    with blas_single_thread():
        _hash_kernel(x, flat_rot, np.array(bucket_groups(num_buckets), dtype=np.int64), HASH_BLOCK, codes)
    return codes


@serial
def _round_count(q_chunks, k_chunks, n_c):
    """``c_ij``: rounds whose window pairs the query with the key.

    ``q_chunks``, ``k_chunks`` (R,) are their chunks in every round; the
    window of query chunk u holds key chunks u and u - 1 (mod n_c), i.e. a
    difference of 0, 1 or 1 - n_c.
    """
    count = 0
    for r in range(q_chunks.shape[0]):
        d = q_chunks[r] - k_chunks[r]
        if d == 0 or d == 1 or d == 1 - n_c:
            count += 1
    return count


@serial
def _chunks_of(chunk_of, g, positions, out):
    """``out[b, r] = chunk_of[r, g, positions[b]]``: a tile's chunk ids, gathered once."""
    for b in range(out.shape[0]):
        for r in range(out.shape[1]):
            out[b, r] = chunk_of[r, g, positions[b]]


@kernel
def _window_kernel(q, keys, v, perm_q, perm_k, chunk_q, chunk_k, keep, causal, offset, scale, chunk,
                   shared, dedup, self_score, out_r, lse_r, share_r, self_r):
    R, G, N = perm_q.shape
    D, Dv = q.shape[2], v.shape[2]
    n_c = (N + chunk - 1) // chunk
    has_mask = keep.shape[0] > 0
    for task in prange(G * R * n_c):
        g = task // (R * n_c)
        r = (task // n_c) % R
        u = task % n_c
        s0 = u * chunk
        nq = min(N, s0 + chunk) - s0
        kpos = np.empty(2 * chunk, dtype=np.int64)
        nk = 0
        for t in range(s0, s0 + nq):                                       # key chunk u
            kpos[nk] = perm_k[r, g, t]
            nk += 1
        if n_c > 1:                                                        # key chunk u - 1 (mod n_c)
            p0 = ((u + n_c - 1) % n_c) * chunk
            for t in range(p0, min(N, p0 + chunk)):
                kpos[nk] = perm_k[r, g, t]
                nk += 1
        qt = np.empty((nq, D), dtype=q.dtype)
        kt = np.empty((nk, D), dtype=q.dtype)
        vt = np.empty((nk, Dv), dtype=q.dtype)
        for a in range(nq):                                                # loops, not array expressions:
            i = perm_q[r, g, s0 + a]                                       # far cheaper to compile
            for d in range(D):
                qt[a, d] = q[g, i, d] * scale
        for b in range(nk):
            for d in range(D):
                kt[b, d] = keys[g, kpos[b], d]
            for d in range(Dv):
                vt[b, d] = v[g, kpos[b], d]
        s = np.empty((nq, nk), dtype=q.dtype)
        np.dot(qt, kt.T, s)                                                # (c, 2c) scores
        qch = np.empty((nq, R), dtype=np.int64)
        kch = np.empty((nk, R), dtype=np.int64)
        _chunks_of(chunk_q, g, perm_q[r, g, s0:s0 + nq], qch)
        _chunks_of(chunk_k, g, kpos[:nk], kch)
        log_count = np.empty(R, dtype=q.dtype)                             # log c, c = 1..R
        for c in range(R):
            log_count[c] = np.log(np.float64(c + 1))
        bits = np.empty(nk, dtype=np.int32)
        totals = np.empty(nq, dtype=q.dtype)
        for a in range(nq):
            totals[a] = 0
        for a in range(nq):
            i = perm_q[r, g, s0 + a]
            share = 0.0
            seen_self = False
            for b in range(nk):
                j = kpos[b]
                if (has_mask and not keep[g, j]) or (causal and j > i + offset):
                    s[a, b] = -np.inf
                    continue
                count = _round_count(qch[a], kch[b], n_c)
                share += 1.0 / count
                if j == i:
                    seen_self = True
                    if shared:
                        s[a, b] = self_score
                if dedup:
                    s[a, b] -= log_count[count - 1]
            share_r[g, r, i] = share
            self_r[g, r, i] = seen_self
            mu = row_maximum(s[a])
            if mu == -np.inf:                                              # nothing visible in this window
                for b in range(nk):
                    s[a, b] = 0
                lse_r[g, r, i] = -np.inf
                continue
            totals[a] = exp_shifted(s[a], mu, bits)
            lse_r[g, r, i] = mu + np.log(totals[a])
        o = np.empty((nq, Dv), dtype=q.dtype)
        np.dot(s, vt, o)                                                   # (c, Dv)
        for a in range(nq):
            i = perm_q[r, g, s0 + a]
            for d in range(Dv):
                out_r[g, r, i, d] = o[a, d] / totals[a] if totals[a] > 0 else 0


@kernel
def _combine_kernel(out_r, lse_r, out, lse):
    """``out = sum_r exp(z^r - Z) o^r``, ``Z = lse_r z^r``; 0 and -inf where all rounds are empty."""
    G, R, N, Dv = out_r.shape
    for g in prange(G):
        for i in range(N):
            mu = -np.inf
            for r in range(R):
                mu = max(mu, lse_r[g, r, i])
            for d in range(Dv):
                out[g, i, d] = 0
            if mu == -np.inf:
                lse[g, i] = -np.inf
                continue
            total = 0.0
            for r in range(R):
                w = np.exp(lse_r[g, r, i] - mu)
                total += w
                for d in range(Dv):
                    out[g, i, d] += w * out_r[g, r, i, d]
            for d in range(Dv):
                out[g, i, d] /= total
            lse[g, i] = mu + np.log(total)


def forward(q, k, v, *, mask, offset, scale, num_hashes, num_buckets, chunk_size, shared_qk, dedup,
            rotations=None, buckets=None):
    """Hash and sort on the host, then the window and combine kernels."""
    q, k, v = contiguous(q, k, v)
    buckets_q, buckets_k = assign_buckets(q, k, num_hashes=num_hashes, num_buckets=num_buckets,
                                          shared_qk=shared_qk, rotations=rotations, buckets=buckets, hash_fn=_hash)
    keys = np.ascontiguousarray(shared_keys(q)) if shared_qk else k
    perm_q = stable_key_argsort(buckets_q)                                 # (R, G, N)
    perm_k = perm_q if shared_qk else stable_key_argsort(buckets_k)        # (R, G, N)
    chunk_q = inverse_permutation(perm_q) // chunk_size                    # (R, G, N)
    chunk_k = chunk_q if shared_qk else inverse_permutation(perm_k) // chunk_size
    G, N, Dv = v.shape
    R = num_hashes
    keep = as_kernel_mask(mask)
    out_r = np.empty((G, R, N, Dv), dtype=q.dtype)
    lse_r = np.empty((G, R, N), dtype=q.dtype)
    share_r = np.empty((G, R, N), dtype=np.float64)
    self_r = np.empty((G, R, N), dtype=np.bool_)
    out = np.empty((G, N, Dv), dtype=q.dtype)
    lse = np.empty((G, N), dtype=q.dtype)
    dtype = q.dtype.type
    with blas_single_thread():
        _window_kernel(q, keys, v, perm_q, perm_k, chunk_q, chunk_k, keep, offset is not None,
                       0 if offset is None else int(offset), dtype(scale), chunk_size, shared_qk, dedup,
                       dtype(SELF_SCORE), out_r, lse_r, share_r, self_r)
    _combine_kernel(out_r, lse_r, out, lse)
    union_size = share_r.sum(axis=1)                                       # (G, N)
    res = {
        "lse": lse,
        "buckets": (buckets_q, buckets_k),
        "union_size": union_size,
        "self_only": self_r.any(axis=1) & (np.rint(union_size) == 1),
        "empty_rows": ~np.isfinite(lse),
    }
    return out, res
