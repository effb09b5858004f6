"""YOSO on the CPU: parallel hashing, bucket tables and tiled YOSO-E in Numba.

Matches :mod:`eff_attn.methods.yoso.reference` through the shared
:func:`~eff_attn.methods.yoso.reference.forward_pipeline`; this module
supplies the five heavy steps.

Hashing
    ``prange`` over (slice, block of 256 rows). Each task takes one
    ``np.dot`` of its rows (in the hash dtype, float64 by default) with the
    slice's hyperplanes ``R^T`` (D x m tau) and packs the signs as
    :func:`eff_attn._hashing.sign_bit_codes` does (bit ``b`` worth ``2**b``,
    a zero projection gives 0); the tests check the codes bit for bit.

Tables (``bucket_sum``)
    ``prange`` over (slice, group of 8 hashes). A task owns a table of
    ``2**tau x Dc`` (``Dc`` a chunk of the value columns, at most 2**22
    entries) and a partial output. Per hash it scatters the kept source rows
    into the table, gathers the table at the destination codes, then resets
    only the rows it touched: ``O((Ns + Nd) Dc)`` per hash, never
    ``O(2**tau Dc)``. The partials of the hash groups are added in group
    order, so the result does not depend on the number of threads.

Sampled backward (``bucket_pairs_backward``)
    The same task grid. Per hash, the queries and kept keys are threaded into
    per-bucket lists (ascending index); every bucket holding both takes the
    cheaper of the *pair* form (cost ``2|I||J|(Dv + 2D)``) and the *outer*
    form (``4(|I| + |J|) D Dv``), a choice made from the codes alone, so the
    worst case stays linear.

YOSO-E
    ``prange`` over (slice, block of 64 queries) with tiles of 256 keys:
    ``np.dot`` for ``x = q^ k^T``, then clip/arccos/power/mask in place, then
    ``np.dot`` into the accumulator. No Nq x Nk array is ever allocated; the
    weights lie in [0, 1], so no rescaling is needed. The backward makes two
    passes that recompute the weights per tile: one over query blocks for
    ``dq^``, one over key blocks for ``dk^`` and ``dv``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from ..._jit import FASTMATH, blas_single_thread, contiguous, kernel, serial
from ..._tiles import add_into, set_zero, store_scaled
from ...masks import as_kernel_mask
from .reference import YosoOps, entry_points

__all__ = ["forward", "backward", "OPS"]

#: Rows per hashing task.
HASH_BLOCK = 256
#: Hashes per table task: enough tasks to fill the cores at G = 1, few enough
#: that the partial outputs (one per group) stay small.
HASH_GROUP = 8
#: Entries of one task's table (2**tau x Dc): 16 MiB in float32.
MAX_TABLE_ENTRIES = 2**22
#: The fast-math set without ``afn`` and ``arcp`` for the weights: LLVM's
#: approximate ``acos`` is off by about 5e-5 at +-1, and ``acos(-1) / pi``
#: through a reciprocal is not exactly 1; there ``P`` must be exactly 0 or 1.
PRECISE_FASTMATH = FASTMATH - {"afn", "arcp"}

#: YOSO-E tiles: queries per task and keys per tile.
BLOCK_Q = 64
BLOCK_K = 256


@serial
def _task_block(task, n_blocks, block, n):
    """Task ``task`` of a ``G x n_blocks`` grid: its slice ``g`` and its rows ``[start, stop)`` of ``n``."""
    g = task // n_blocks
    start = (task % n_blocks) * block
    return g, start, min(n, start + block)


def _hash_major(codes):
    """Codes (G, N, m) as C-contiguous (G, m, N): one hash's codes are then adjacent."""
    return np.ascontiguousarray(np.swapaxes(codes, 1, 2))


def _group_sum(partial):
    """Sum over the hash-group axis 1 in group order (a fixed order)."""
    return partial[:, 0] if partial.shape[1] == 1 else partial.sum(axis=1)


# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------


@kernel
def _codes_kernel(x, planes_t, m, tau, codes):
    """``codes[g, i, h] = sum_b 2**b [R[g, h, b] . x[g, i] > 0]``; ``planes_t`` is (Gr, D, m tau)."""
    G, N, D = x.shape
    n_blocks = (N + HASH_BLOCK - 1) // HASH_BLOCK
    for task in prange(G * n_blocks):
        g, i0, i1 = _task_block(task, n_blocks, HASH_BLOCK, N)
        rows = np.empty((i1 - i0, D), dtype=planes_t.dtype)                   # (B, D)
        for r in range(i1 - i0):                                              # a loop, not astype: cheaper to compile
            for d in range(D):
                rows[r, d] = x[g, i0 + r, d]
        proj = np.empty((i1 - i0, m * tau), dtype=planes_t.dtype)             # (B, m tau)
        np.dot(rows, planes_t[g if planes_t.shape[0] > 1 else 0], proj)
        for r in range(i1 - i0):
            for h in range(m):
                code = 0
                for b in range(tau):
                    if proj[r, h * tau + b] > 0:
                        code |= 1 << b
                codes[g, i0 + r, h] = code


def _codes(x, hyperplanes, hash_dtype):
    G, N, D = x.shape
    m, tau = hyperplanes.shape[-3:-1]
    codes = np.zeros((G, N, m), dtype=np.int32)
    if tau == 0:
        return codes
    dtype = np.float64 if hash_dtype == "float64" else x.dtype
    planes_t = np.ascontiguousarray(
        np.swapaxes(hyperplanes.reshape(hyperplanes.shape[0], m * tau, D), 1, 2), dtype=dtype
    )                                                                          # (Gr, D, m tau)
    (x,) = contiguous(x)
    with blas_single_thread():
        _codes_kernel(x, planes_t, m, tau, codes)
    return codes


# --------------------------------------------------------------------------------------
# Bucket tables
# --------------------------------------------------------------------------------------


@kernel
def _bucket_sum_kernel(src_codes, src_values, keep, dst_codes, tau, chunk, partial, counts):
    """Partial sums ``partial[g, grp, i] = sum_{h in grp} T_h[c_h(dst_i)]`` and bucket counts.

    ``src_codes`` (G, m, Ns) and ``dst_codes`` (G, m, Nd) are hash-major.
    Invariant between hashes: every row of ``table`` and ``sizes`` is 0.
    """
    G, m, Ns = src_codes.shape
    Nd = dst_codes.shape[2]
    Dv = src_values.shape[2]
    n_groups = partial.shape[1]
    has_keep = keep.shape[0] > 0
    for task in prange(G * n_groups):
        g, h0, h1 = _task_block(task, n_groups, HASH_GROUP, m)
        table = np.empty(((1 << tau), chunk), dtype=src_values.dtype)        # (2^tau, Dc)
        sizes = np.empty(1 << tau, dtype=np.int64)                            # (2^tau,)
        for b in range(1 << tau):                                             # loops, not array expressions:
            sizes[b] = 0                                                      # far cheaper to compile
            for d in range(chunk):
                table[b, d] = 0
        out = partial[g, task % n_groups]                                     # (Nd, Dv)
        for i in range(Nd):
            for d in range(Dv):
                out[i, d] = 0
        for c0 in range(0, Dv, chunk):
            c1 = min(Dv, c0 + chunk)
            first = c0 == 0
            for h in range(h0, h1):
                for j in range(Ns):                                           # scatter the kept rows
                    if has_keep and not keep[g, j]:
                        continue
                    b = src_codes[g, h, j]
                    for d in range(c0, c1):
                        table[b, d - c0] += src_values[g, j, d]
                    if first:
                        sizes[b] += 1
                for i in range(Nd):                                           # gather at the destinations
                    b = dst_codes[g, h, i]
                    for d in range(c0, c1):
                        out[i, d] += table[b, d - c0]
                    if first:
                        counts[g, task % n_groups, i] += sizes[b]
                for j in range(Ns):                                           # reset the touched rows
                    b = src_codes[g, h, j]
                    for d in range(chunk):
                        table[b, d] = 0
                    sizes[b] = 0


def _bucket_sum(src_codes, src_values, src_keep, dst_codes, tau):
    (src_values,) = contiguous(src_values)
    G, Nd, m = dst_codes.shape
    Dv = src_values.shape[2]
    n_groups = -(-m // HASH_GROUP)
    chunk = min(Dv, max(1, MAX_TABLE_ENTRIES >> tau))
    partial = np.empty((G, n_groups, Nd, Dv), dtype=src_values.dtype)
    counts = np.zeros((G, n_groups, Nd), dtype=np.int64)
    _bucket_sum_kernel(_hash_major(src_codes), src_values, as_kernel_mask(src_keep), _hash_major(dst_codes), tau, chunk,
                       partial, counts)
    return _group_sum(partial), _group_sum(counts)


# --------------------------------------------------------------------------------------
# Sampled backward: colliding pairs, bucket by bucket
# --------------------------------------------------------------------------------------


@serial
def _bucket_pairs(first_q, next_q, first_k, next_k, du, v, q_unit, k_unit, g, dq, dk):
    """Pair form: ``s = du_i . v_j``, ``dq_i += s k^_j``, ``dk_j += s q^_i`` over I x J."""
    D, Dv = q_unit.shape[2], v.shape[2]
    i = first_q
    while i >= 0:
        j = first_k
        while j >= 0:
            s = du.dtype.type(0)
            for e in range(Dv):
                s += du[g, i, e] * v[g, j, e]
            for d in range(D):
                dq[i, d] += s * k_unit[g, j, d]
                dk[j, d] += s * q_unit[g, i, d]
            j = next_k[j]
        i = next_q[i]


@serial
def _add_outer(M, a, b):
    """``M += a b^T``."""
    for e in range(a.shape[0]):
        for d in range(b.shape[0]):
            M[e, d] += a[e] * b[d]


@serial
def _add_row_product(out, a, M):
    """``out += a^T M``."""
    for e in range(a.shape[0]):
        for d in range(out.shape[0]):
            out[d] += a[e] * M[e, d]


@serial
def _bucket_outer(first_q, next_q, first_k, next_k, du, v, q_unit, k_unit, g, dq, dk, M, Nmat):
    """Outer form: ``dq_I += du_I (v_J^T k^_J)`` and ``dk_J += v_J (du_I^T q^_I)``."""
    set_zero(M)
    set_zero(Nmat)
    j = first_k
    while j >= 0:                                                             # M = v_J^T k^_J (Dv, D)
        _add_outer(M, v[g, j], k_unit[g, j])
        j = next_k[j]
    i = first_q
    while i >= 0:                                                             # Nmat = du_I^T q^_I (Dv, D)
        _add_outer(Nmat, du[g, i], q_unit[g, i])
        _add_row_product(dq[i], du[g, i], M)
        i = next_q[i]
    j = first_k
    while j >= 0:
        _add_row_product(dk[j], v[g, j], Nmat)
        j = next_k[j]


@kernel
def _pairs_backward_kernel(du, v, q_unit, k_unit, q_codes, k_codes, keep, tau, dq_part, dk_part):
    """Partial ``sum_{h in grp} sum_{colliding (i, j)} (du_i . v_j) (k^_j | q^_i)`` per hash group.

    Per hash, ``head_*[b]`` starts the ascending list of rows in bucket ``b``
    (``next_*`` links it); all ``head`` entries are -1 and all sizes 0
    between hashes.
    """
    G, m, Nq = q_codes.shape
    Nk = k_codes.shape[2]
    D, Dv = q_unit.shape[2], v.shape[2]
    n_groups = dq_part.shape[1]
    has_keep = keep.shape[0] > 0
    for task in prange(G * n_groups):
        g, h0, h1 = _task_block(task, n_groups, HASH_GROUP, m)
        grp = task % n_groups
        head_q = np.empty(1 << tau, dtype=np.int64)
        head_k = np.empty(1 << tau, dtype=np.int64)
        size_q = np.empty(1 << tau, dtype=np.int64)
        size_k = np.empty(1 << tau, dtype=np.int64)
        for b in range(1 << tau):                                             # loops, not array expressions:
            head_q[b] = -1                                                    # far cheaper to compile
            head_k[b] = -1
            size_q[b] = 0
            size_k[b] = 0
        next_q = np.empty(Nq, dtype=np.int64)
        next_k = np.empty(Nk, dtype=np.int64)
        M = np.empty((Dv, D), dtype=du.dtype)
        Nmat = np.empty((Dv, D), dtype=du.dtype)
        dq = dq_part[g, grp]                                                  # (Nq, D)
        dk = dk_part[g, grp]                                                  # (Nk, D)
        set_zero(dq)
        set_zero(dk)
        for h in range(h0, h1):
            for i in range(Nq - 1, -1, -1):                                   # thread the buckets
                b = q_codes[g, h, i]
                next_q[i] = head_q[b]
                head_q[b] = i
                size_q[b] += 1
            for j in range(Nk - 1, -1, -1):
                if has_keep and not keep[g, j]:
                    continue
                b = k_codes[g, h, j]
                next_k[j] = head_k[b]
                head_k[b] = j
                size_k[b] += 1
            for i in range(Nq):                                               # each bucket once, at its first query
                b = q_codes[g, h, i]
                if head_q[b] != i or size_k[b] == 0:
                    continue
                I, J = size_q[b], size_k[b]
                if 2 * I * J * (Dv + 2 * D) <= 4 * (I + J) * D * Dv:
                    _bucket_pairs(i, next_q, head_k[b], next_k, du, v, q_unit, k_unit, g, dq, dk)
                else:
                    _bucket_outer(i, next_q, head_k[b], next_k, du, v, q_unit, k_unit, g, dq, dk, M, Nmat)
            for i in range(Nq):                                               # reset the touched buckets
                b = q_codes[g, h, i]
                head_q[b] = -1
                size_q[b] = 0
            for j in range(Nk):
                b = k_codes[g, h, j]
                head_k[b] = -1
                size_k[b] = 0


def _bucket_pairs_backward(du, v, q_unit, k_unit, q_codes, k_codes, mask, tau):
    du, v, q_unit, k_unit = contiguous(du, v, q_unit, k_unit)
    G, Nq, m = q_codes.shape
    n_groups = -(-m // HASH_GROUP)
    dq_part = np.empty((G, n_groups, Nq, q_unit.shape[2]), dtype=du.dtype)
    dk_part = np.empty((G, n_groups, k_unit.shape[1], k_unit.shape[2]), dtype=du.dtype)
    _pairs_backward_kernel(du, v, q_unit, k_unit, _hash_major(q_codes), _hash_major(k_codes), as_kernel_mask(mask), tau,
                           dq_part, dk_part)
    return _group_sum(dq_part), _group_sum(dk_part)


# --------------------------------------------------------------------------------------
# YOSO-E: tiles of collision probabilities
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=PRECISE_FASTMATH, error_model="numpy")
def _weight_tile(x, keep, g, j0, tau, damping, exact_grad, P, W):
    """In place ``P = F(clip(c x))`` (0 at masked keys) and, if ``W`` is not empty, its gradient weight.

    ``W = c tau/2 P`` (surrogate) or ``c F'(z)`` with ``|z| <= 1 - 1e-6`` (exact).
    """
    has_keep = keep.shape[0] > 0
    want_w = W.shape[0] > 0
    cap = 1.0 - 1e-6
    half = damping * tau / 2.0
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            if has_keep and not keep[g, j0 + c]:
                P[r, c] = 0
                if want_w:
                    W[r, c] = 0
                continue
            xv = x[r, c]                                                      # read before P overwrites it
            z = min(1.0, max(-1.0, damping * xv))
            base = max(0.0, 1.0 - math.acos(z) / math.pi)
            p = base ** tau
            P[r, c] = p
            if want_w:
                if not exact_grad:
                    W[r, c] = half * p
                elif tau == 0:
                    W[r, c] = 0
                else:
                    zc = min(cap, max(-cap, damping * xv))
                    bc = 1.0 - math.acos(zc) / math.pi
                    W[r, c] = damping * tau * bc ** (tau - 1) / (math.pi * math.sqrt(1.0 - zc * zc))


@serial
def _tile(buffer, rows, cols):
    """A C-contiguous (rows, cols) view of the front of a flat buffer."""
    return buffer[: rows * cols].reshape((rows, cols))


@kernel
def _expectation_kernel(q_unit, k_unit, v, keep, tau, damping, u, row_mass):
    """``u = P v`` and ``row_mass = P 1``, one (slice, query block) per task.

    Invariant after each key tile: ``acc = sum_{seen j} P_ij v_j``.
    """
    G, Nq, D = q_unit.shape
    Nk, Dv = k_unit.shape[1], v.shape[2]
    n_blocks = (Nq + BLOCK_Q - 1) // BLOCK_Q
    no_w = np.empty((0, 0), dtype=q_unit.dtype)
    for task in prange(G * n_blocks):
        g, i0, i1 = _task_block(task, n_blocks, BLOCK_Q, Nq)
        bq = i1 - i0
        acc = u[g, i0:i1]                                                     # (Bq, Dv), accumulated in place
        mass = row_mass[g, i0:i1]                                             # (Bq,)
        for r in range(bq):                                                   # loops, not array expressions:
            mass[r] = 0                                                       # far cheaper to compile
            for d in range(Dv):
                acc[r, d] = 0
        pv = np.empty((bq, Dv), dtype=v.dtype)                                # (Bq, Dv)
        x_buf = np.empty(bq * BLOCK_K, dtype=q_unit.dtype)
        for j0 in range(0, Nk, BLOCK_K):
            j1 = min(Nk, j0 + BLOCK_K)
            x = _tile(x_buf, bq, j1 - j0)                                     # (Bq, Bk)
            np.dot(q_unit[g, i0:i1], k_unit[g, j0:j1].T, x)                   # (Bq, Bk) cosines
            _weight_tile(x, keep, g, j0, tau, damping, False, x, no_w)        # (Bq, Bk) P, in place
            for r in range(bq):
                total = x.dtype.type(0)
                for c in range(j1 - j0):
                    total += x[r, c]
                mass[r] += total
            np.dot(x, v[g, j0:j1], pv)                                        # (Bq, Dv) P_J v_J
            for r in range(bq):
                for d in range(Dv):
                    acc[r, d] += pv[r, d]


def _expectation_sum(q_unit, k_unit, v, mask, tau, damping):
    q_unit, k_unit, v = contiguous(q_unit, k_unit, v)
    G, Nq, _ = q_unit.shape
    u = np.empty((G, Nq, v.shape[2]), dtype=v.dtype)
    row_mass = np.empty((G, Nq), dtype=v.dtype)
    with blas_single_thread():
        _expectation_kernel(q_unit, k_unit, v, as_kernel_mask(mask), tau, q_unit.dtype.type(damping), u, row_mass)
    return u, row_mass


@serial
def _multiply_into(S, W):
    """``S *= W`` for two (rows, cols) tiles, as an explicit loop (cheaper to compile)."""
    for r in range(S.shape[0]):
        for c in range(S.shape[1]):
            S[r, c] *= W[r, c]


@kernel
def _expectation_dq_kernel(du, q_unit, k_unit, v, keep, tau, damping, exact_grad, dq):
    """``dq^ = ((du v^T) * W) k^``, one (slice, query block) per task, W recomputed per tile."""
    G, Nq, D = q_unit.shape
    Nk, Dv = k_unit.shape[1], v.shape[2]
    n_blocks = (Nq + BLOCK_Q - 1) // BLOCK_Q
    for task in prange(G * n_blocks):
        g, i0, i1 = _task_block(task, n_blocks, BLOCK_Q, Nq)
        bq = i1 - i0
        acc = np.empty((bq, D), dtype=dq.dtype)                               # (Bq, D)
        set_zero(acc)
        part = np.empty((bq, D), dtype=dq.dtype)
        x_buf = np.empty(bq * BLOCK_K, dtype=dq.dtype)
        w_buf = np.empty(bq * BLOCK_K, dtype=dq.dtype)
        s_buf = np.empty(bq * BLOCK_K, dtype=dq.dtype)
        for j0 in range(0, Nk, BLOCK_K):
            j1 = min(Nk, j0 + BLOCK_K)
            x = _tile(x_buf, bq, j1 - j0)
            W = _tile(w_buf, bq, j1 - j0)
            S = _tile(s_buf, bq, j1 - j0)
            np.dot(q_unit[g, i0:i1], k_unit[g, j0:j1].T, x)                   # (Bq, Bk) cosines
            _weight_tile(x, keep, g, j0, tau, damping, exact_grad, x, W)      # x <- P; W
            np.dot(du[g, i0:i1], v[g, j0:j1].T, S)                            # (Bq, Bk) du v^T
            _multiply_into(S, W)                                              # (Bq, Bk) dx
            np.dot(S, k_unit[g, j0:j1], part)                                 # (Bq, D)
            add_into(acc, part)
        store_scaled(dq, g, i0, acc, dq.dtype.type(1))


@kernel
def _expectation_dkv_kernel(du, q_unit, k_unit, v, keep, tau, damping, exact_grad, dk, dv):
    """``dk^ = dx^T q^`` and ``dv = P^T du``, one (slice, key block) per task."""
    G, Nq, D = q_unit.shape
    Nk, Dv = k_unit.shape[1], v.shape[2]
    n_blocks = (Nk + BLOCK_K - 1) // BLOCK_K
    for task in prange(G * n_blocks):
        g, j0, j1 = _task_block(task, n_blocks, BLOCK_K, Nk)
        bk = j1 - j0
        dk_acc = np.empty((bk, D), dtype=dk.dtype)                            # (Bk, D)
        dv_acc = np.empty((bk, Dv), dtype=dv.dtype)                           # (Bk, Dv)
        set_zero(dk_acc)
        set_zero(dv_acc)
        dk_part = np.empty((bk, D), dtype=dk.dtype)
        dv_part = np.empty((bk, Dv), dtype=dv.dtype)
        x_buf = np.empty(BLOCK_Q * bk, dtype=dk.dtype)
        w_buf = np.empty(BLOCK_Q * bk, dtype=dk.dtype)
        s_buf = np.empty(BLOCK_Q * bk, dtype=dk.dtype)
        for i0 in range(0, Nq, BLOCK_Q):
            i1 = min(Nq, i0 + BLOCK_Q)
            x = _tile(x_buf, i1 - i0, bk)
            W = _tile(w_buf, i1 - i0, bk)
            S = _tile(s_buf, i1 - i0, bk)
            np.dot(q_unit[g, i0:i1], k_unit[g, j0:j1].T, x)                   # (Bq, Bk) cosines
            _weight_tile(x, keep, g, j0, tau, damping, exact_grad, x, W)      # x <- P; W
            np.dot(x.T, du[g, i0:i1], dv_part)                                # (Bk, Dv) P^T du
            add_into(dv_acc, dv_part)
            np.dot(du[g, i0:i1], v[g, j0:j1].T, S)                            # (Bq, Bk) du v^T
            _multiply_into(S, W)                                              # (Bq, Bk) dx
            np.dot(S.T, q_unit[g, i0:i1], dk_part)                            # (Bk, D)
            add_into(dk_acc, dk_part)
        store_scaled(dk, g, j0, dk_acc, dk.dtype.type(1))
        store_scaled(dv, g, j0, dv_acc, dv.dtype.type(1))


def _expectation_backward(du, q_unit, k_unit, v, mask, tau, damping, grad):
    du, q_unit, k_unit, v = contiguous(du, q_unit, k_unit, v)
    c = q_unit.dtype.type(damping)
    args = (du, q_unit, k_unit, v, as_kernel_mask(mask), tau, c, grad == "exact")
    dq, dk, dv = np.empty_like(q_unit), np.empty_like(k_unit), np.empty_like(v)
    with blas_single_thread():
        _expectation_dq_kernel(*args, dq)
        _expectation_dkv_kernel(*args, dk, dv)
    return dq, dk, dv


OPS = YosoOps(_codes, _bucket_sum, _expectation_sum, _bucket_pairs_backward, _expectation_backward)


#: Backend entry points: the shared pipelines with these ops.
forward, backward = entry_points(OPS)
