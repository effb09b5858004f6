"""YOSO on the GPU: cuBLAS hashing, atomic bucket tables and tiled YOSO-E.

Matches :mod:`eff_attn.methods.yoso.reference` through the shared
:func:`~eff_attn.methods.yoso.reference.forward_pipeline`; this module
supplies the five heavy steps, written against ``xp`` (CuPy on a GPU, NumPy
when emulated) with custom kernels in ``numba.cuda``.

Hashing
    The shared :func:`eff_attn._hashing.sign_bit_codes`: one batched float64
    matmul (TF32 stays off, CuPy's default) and the bit packing as array
    ops, in slice chunks whose (Gc, N, m tau) projections fit 256 MiB.

Tables (``bucket_sum``)
    Tables (Gc, mc, 2**tau, Dv), chunked over slices and hashes to at most
    256 MiB and zeroed per chunk, then two kernels:

    - ``_scatter_kernel``: one block per (slice, hash, kept source row),
      threads over Dv, ``cuda.atomic.add`` into the table (and the bucket
      sizes). Integer-valued sums are exact, so atomics stay bitwise
      reproducible there.
    - ``_gather_kernel``: one block per (slice, destination row), looping over
      the chunk's hashes in order; each output element has one owner, so it
      needs no atomics.

Sampled backward (``bucket_pairs_backward``)
    The pair form only: stable argsort of the (slice, hash, code) keys of the
    kept keys and of the queries (:func:`eff_attn._hashing.stable_key_argsort`),
    ``searchsorted`` for each row's bucket range, then one block (a warp) per
    query for ``dq^`` and one per key for ``dk^``, with no atomics. Cost
    ``O(Pi (D + Dv))`` for ``Pi`` colliding pairs: quadratic in the worst
    case (all tokens alike), unlike the Numba backend's per-bucket choice.

YOSO-E
    Key tiles of ``Bk`` columns (the largest power of two <= 4096 whose
    (G, Nq, Bk) tile fits 256 MiB): a batched matmul for the cosines,
    ``_weight_tile_kernel`` (one block per row) for ``P`` (and the gradient
    weight ``W`` in the backward), then batched matmuls into the outputs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..._array import swap_last
from ..._cuda import launch_rows, threads_per_block, to_xp, xp_of
from ..._hashing import sign_bit_codes, stable_key_argsort
from ...masks import as_cuda_mask
from .reference import YosoOps, entry_points

__all__ = ["forward", "backward", "OPS"]

#: Byte budget of one chunk of projections, tables or YOSO-E tiles.
CHUNK_BYTES = 256 * 2**20
#: Largest YOSO-E key tile.
MAX_BLOCK_K = 4096
#: Threads per block of the pair kernels: one warp per row.
PAIR_THREADS = 32


def _fit(count, unit_bytes, budget=CHUNK_BYTES):
    """How many units of ``unit_bytes`` fit the budget (at least 1, at most ``count``)."""
    return int(min(count, max(1, budget // max(unit_bytes, 1))))


# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------


def _codes(x, hyperplanes, hash_dtype):
    xp = xp_of(x)
    G, N, D = x.shape
    m, tau = hyperplanes.shape[-3:-1]
    dtype = np.float64 if hash_dtype == "float64" else x.dtype
    planes = to_xp(xp, hyperplanes, dtype)                                   # (Gr, m, tau, D)
    codes = xp.empty((G, N, m), dtype=np.int32)
    step = _fit(G, N * m * max(tau, 1) * 8)
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        R = planes if planes.shape[0] == 1 else planes[g0:g1]
        codes[g0:g1] = sign_bit_codes(x[g0:g1], R, xp, dtype=dtype)        # (Gc, N, m)
    return codes


# --------------------------------------------------------------------------------------
# Bucket tables
# --------------------------------------------------------------------------------------


@cuda.jit
def _scatter_kernel(codes, values, keep, has_keep, g0, h0, table, sizes):
    """``table[g, h, c_h(j)] += values[g0 + g, j]`` for kept ``j``; block = (g, h, j), threads over Dv."""
    _, mc, _, Dv = table.shape
    Ns = values.shape[1]
    j = cuda.blockIdx.x % Ns
    hl = (cuda.blockIdx.x // Ns) % mc
    gl = cuda.blockIdx.x // (Ns * mc)
    g = g0 + gl
    if has_keep and not keep[g, j]:
        return
    b = codes[g, j, h0 + hl]
    for d in range(cuda.threadIdx.x, Dv, cuda.blockDim.x):
        cuda.atomic.add(table, (gl, hl, b, d), values[g, j, d])
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(sizes, (gl, hl, b), 1)


@cuda.jit
def _gather_kernel(codes, table, sizes, g0, h0, sums, counts):
    """``sums[g0 + g, i] += sum_h table[g, h, c_h(i)]`` over the chunk's hashes, in order; block = (g, i)."""
    _, mc, _, Dv = table.shape
    Nd = codes.shape[1]
    gl = cuda.blockIdx.x // Nd
    i = cuda.blockIdx.x % Nd
    g = g0 + gl
    for d in range(cuda.threadIdx.x, Dv, cuda.blockDim.x):
        acc = sums[g, i, d]
        for hl in range(mc):
            acc += table[gl, hl, codes[g, i, h0 + hl], d]
        sums[g, i, d] = acc
    if cuda.threadIdx.x == 0:
        total = counts[g, i]
        for hl in range(mc):
            total += sizes[gl, hl, codes[g, i, h0 + hl]]
        counts[g, i] = total


def _bucket_sum(src_codes, src_values, src_keep, dst_codes, tau):
    xp = xp_of(src_values)
    G, Ns, Dv = src_values.shape
    Nd, m = dst_codes.shape[1:]
    rows = 1 << tau
    keep, has_keep = as_cuda_mask(xp, src_keep)
    table_bytes = rows * (Dv * src_values.dtype.itemsize + 8)                # one (slice, hash) table + sizes
    mc = _fit(m, table_bytes)
    gc = _fit(G, mc * table_bytes)
    table = xp.empty((gc, mc, rows, Dv), dtype=src_values.dtype)
    sizes = xp.empty((gc, mc, rows), dtype=np.int64)
    sums = xp.zeros((G, Nd, Dv), dtype=src_values.dtype)
    counts = xp.zeros((G, Nd), dtype=np.int64)
    for g0 in range(0, G, gc):
        g1 = min(G, g0 + gc)
        for h0 in range(0, m, mc):
            h1 = min(m, h0 + mc)
            t, s = table[: g1 - g0, : h1 - h0], sizes[: g1 - g0, : h1 - h0]
            t[...] = 0
            s[...] = 0
            launch_rows(_scatter_kernel, (g1 - g0) * (h1 - h0) * Ns, src_codes, src_values, keep, has_keep, g0, h0,
                        t, s)
            launch_rows(_gather_kernel, (g1 - g0) * Nd, dst_codes, t, s, g0, h0, sums, counts)
    return sums, counts


# --------------------------------------------------------------------------------------
# Sampled backward: colliding pairs
# --------------------------------------------------------------------------------------


@cuda.jit
def _pairs_kernel(du, v, other_unit, rows_of, lo, hi, own_is_query, has_keep, keep, out):
    """Pair-form gradient of one row per block: query rows (``dq^``) or kept key rows (``dk^``).

    For query ``i``: ``out_i = sum_h sum_{p in [lo, hi)} (du_i . v_j) k^_j`` with
    ``j = rows_of[p]``; for key ``j`` the same with the roles swapped. Every
    thread computes the dot product itself (broadcast loads), then updates
    its own columns: no shared memory, no atomics, a fixed order.
    """
    _, N, m = lo.shape
    D = out.shape[2]
    Dv = v.shape[2]
    g = cuda.blockIdx.x // N
    r = cuda.blockIdx.x % N
    if has_keep and not own_is_query and not keep[g, r]:
        return
    for h in range(m):
        for p in range(lo[g, r, h], hi[g, r, h]):
            o = rows_of[p]
            s = 0.0
            if own_is_query:
                for e in range(Dv):
                    s += du[g, r, e] * v[g, o, e]
            else:
                for e in range(Dv):
                    s += du[g, o, e] * v[g, r, e]
            for d in range(cuda.threadIdx.x, D, cuda.blockDim.x):
                out[g, r, d] += s * other_unit[g, o, d]


def _bucket_keys(xp, codes, tau, keep=None):
    """Unique sortable keys ``(g m + h) 2**tau + code`` (G, N, m); masked rows get the sentinel ``G m 2**tau``."""
    G, _, m = codes.shape
    base = (xp.arange(G, dtype=np.int64)[:, None, None] * m + xp.arange(m, dtype=np.int64)) << tau  # (G, 1, m)
    keys = base + codes                                                      # (G, N, m)
    return keys if keep is None else xp.where(keep[..., None], keys, G * m << tau)


def _ranges(xp, own_keys, other_keys):
    """Rows of ``other_keys`` sorted, and each own entry's ``[lo, hi)`` range of equal keys."""
    flat = other_keys.ravel()                                                # (G N' m,)
    order = stable_key_argsort(flat, xp)                                     # (G N' m,)
    ordered = flat[order]
    m, n_other = other_keys.shape[2], other_keys.shape[1]
    rows_of = (order // m) % n_other                                         # row index of each sorted entry
    lo = xp.searchsorted(ordered, own_keys.ravel(), side="left").reshape(own_keys.shape)
    hi = xp.searchsorted(ordered, own_keys.ravel(), side="right").reshape(own_keys.shape)
    return rows_of, lo, hi


def _bucket_pairs_backward(du, v, q_unit, k_unit, q_codes, k_codes, mask, tau):
    xp = xp_of(du)
    keep, has_keep = as_cuda_mask(xp, mask)
    q_keys = _bucket_keys(xp, q_codes, tau)                                  # (G, Nq, m)
    k_keys = _bucket_keys(xp, k_codes, tau, mask)                            # (G, Nk, m)
    dq = xp.zeros_like(q_unit)
    dk = xp.zeros_like(k_unit)
    threads = threads_per_block(PAIR_THREADS)
    rows_of, lo, hi = _ranges(xp, q_keys, k_keys)                            # keys met by each query
    launch_rows(_pairs_kernel, q_unit.shape[0] * q_unit.shape[1], du, v, k_unit, rows_of, lo, hi, True,
                has_keep, keep, dq, threads=threads)
    rows_of, lo, hi = _ranges(xp, k_keys, q_keys)                            # queries met by each key
    launch_rows(_pairs_kernel, k_unit.shape[0] * k_unit.shape[1], du, v, q_unit, rows_of, lo, hi, False,
                has_keep, keep, dk, threads=threads)
    return dq, dk


# --------------------------------------------------------------------------------------
# YOSO-E: tiles of collision probabilities
# --------------------------------------------------------------------------------------


@cuda.jit
def _weight_tile_kernel(x, keep, has_keep, j0, tau, damping, exact_grad, want_w, W):
    """In place ``x <- P = F(clip(c x))`` (0 at masked keys) and, if ``want_w``, the gradient weight ``W``.

    One block per row of the (G, Nq, Bk) tile. ``W = c tau/2 P`` (surrogate)
    or ``c F'(z)`` with ``|z| <= 1 - 1e-6`` (exact).
    """
    _, Nq, Bk = x.shape
    g = cuda.blockIdx.x // Nq
    i = cuda.blockIdx.x % Nq
    for c in range(cuda.threadIdx.x, Bk, cuda.blockDim.x):
        if has_keep and not keep[g, j0 + c]:
            x[g, i, c] = 0
            if want_w:
                W[g, i, c] = 0
            continue
        xv = x[g, i, c]
        z = min(1.0, max(-1.0, damping * xv))
        p = max(0.0, 1.0 - math.acos(z) / math.pi) ** tau
        x[g, i, c] = p
        if want_w:
            if not exact_grad:
                W[g, i, c] = damping * tau / 2.0 * p
            elif tau == 0:
                W[g, i, c] = 0
            else:
                zc = min(1.0 - 1e-6, max(-1.0 + 1e-6, damping * xv))
                bc = 1.0 - math.acos(zc) / math.pi
                W[g, i, c] = damping * tau * bc ** (tau - 1) / (math.pi * math.sqrt(1.0 - zc * zc))


def _block_k(G, Nq, itemsize, tiles):
    """Largest power of two <= 4096 with ``tiles`` (G, Nq, Bk) tiles in 256 MiB (at least 1)."""
    fit = _fit(MAX_BLOCK_K, G * Nq * itemsize * tiles)
    return 1 << (fit.bit_length() - 1)


def _expectation_sum(q_unit, k_unit, v, mask, tau, damping):
    xp = xp_of(v)
    G, Nq, _ = q_unit.shape
    Nk = k_unit.shape[1]
    keep, has_keep = as_cuda_mask(xp, mask)
    Bk = _block_k(G, Nq, v.dtype.itemsize, 1)
    no_w = xp.empty((1, 1, 1), dtype=v.dtype)
    u = xp.zeros((G, Nq, v.shape[2]), dtype=v.dtype)
    row_mass = xp.zeros((G, Nq), dtype=v.dtype)
    for j0 in range(0, Nk, Bk):
        j1 = min(Nk, j0 + Bk)
        P = xp.matmul(q_unit, swap_last(k_unit[:, j0:j1]))                   # (G, Nq, Bk) cosines
        launch_rows(_weight_tile_kernel, G * Nq, P, keep, has_keep, j0, tau, damping, False, False, no_w)
        row_mass += P.sum(axis=-1)                                           # (G, Nq)
        u += xp.matmul(P, v[:, j0:j1])                                       # (G, Nq, Dv)
    return u, row_mass


def _expectation_backward(du, q_unit, k_unit, v, mask, tau, damping, grad):
    xp = xp_of(du)
    G, Nq, _ = q_unit.shape
    Nk = k_unit.shape[1]
    keep, has_keep = as_cuda_mask(xp, mask)
    Bk = _block_k(G, Nq, du.dtype.itemsize, 3)
    dq = xp.zeros_like(q_unit)
    dk = xp.empty_like(k_unit)
    dv = xp.empty_like(v)
    for j0 in range(0, Nk, Bk):
        j1 = min(Nk, j0 + Bk)
        P = xp.matmul(q_unit, swap_last(k_unit[:, j0:j1]))                   # (G, Nq, Bk) cosines
        W = xp.empty_like(P)
        launch_rows(_weight_tile_kernel, G * Nq, P, keep, has_keep, j0, tau, damping, grad == "exact", True, W)
        dv[:, j0:j1] = xp.matmul(swap_last(P), du)                           # (G, Bk, Dv) P^T du
        dx = xp.matmul(du, swap_last(v[:, j0:j1])) * W                       # (G, Nq, Bk)
        dq += xp.matmul(dx, k_unit[:, j0:j1])                                # (G, Nq, D)
        dk[:, j0:j1] = xp.matmul(swap_last(dx), q_unit)                      # (G, Bk, D)
    return dq, dk, dv


OPS = YosoOps(_codes, _bucket_sum, _expectation_sum, _bucket_pairs_backward, _expectation_backward)


#: Backend entry points: the shared pipelines with these ops.
forward, backward = entry_points(OPS, xp_of)
