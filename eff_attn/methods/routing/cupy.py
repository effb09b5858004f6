"""Routing attention on the GPU: cuBLAS routing, sort and segment, ragged kernels.

Matches :mod:`eff_attn.methods.routing.reference`. Written against ``xp``
(CuPy on a GPU, NumPy under emulation) with the ragged parts in numba.cuda.

Route
    Routing scores are one batched cuBLAS product of the unit rows with
    ``mu^T``, then ``argmax``. Balanced windows sort each cluster column by
    ``(-R, position)`` without relying on a stable sort: float32 sorts a
    composite uint64 key (the order-preserving bits of ``-R`` high, the
    position low); float64 uses a three-key lexsort (row, ``-R``, position).
    The cluster CSR is the shared int64 ``key * N + index`` sort.

argmax attention (ragged)
    ``_ragged_forward``: one thread block per (slice, cluster, tile of
    query slots), one thread per query row. The block stages the cluster's
    keys and values in shared-memory tiles and every thread runs the online
    softmax over the keys it may see (a prefix, under causal masking),
    accumulating in its own output row. The backward is two atomic-free
    ragged passes: query tiles give ``dq``, key tiles ``dk`` and ``dv``.

balanced attention (static)
    The windows have static shapes, so they run as gathers and batched
    cuBLAS products (the reference's ``window_attention``); only the
    fallback rows of ``unrouted="nearest"`` take the ragged kernel.

Combine
    ``_combine_rows``: one block per (slice, row) sums the row's served
    slots in ascending window order (no scatter-add).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64, int64

from ..._array import to_host
from ..._cuda import launch_rows, threads_per_block, to_xp, xp_of
from ..._cuda_device import exp_shift, nan_max
from .plan import (
    argmax_plan,
    balanced_plan,
    first_key_of_clusters,
    plan_statistics,
    rank_scores,
    row_limits,
    slot_layout,
    tile_tasks,
    visible_prefix,
)
from .reference import routing_scores, window_attention, window_backward

__all__ = ["route", "forward", "backward"]

#: float64 slots of the shared-memory tile (32 KiB): ``4096 // (D + Dv)`` keys per tile.
_TILE_FLOATS = 4096
#: Threads per block of the ragged kernels on a GPU (one warp: one query row per thread).
RAGGED_THREADS = 32


# --- routing --------------------------------------------------------------------------


def _ordered_bits32(x, xp):
    """uint64 holding bits of float32 ``x`` whose unsigned order is the float order, NaN (either sign) last."""
    x = xp.where(xp.isnan(x), xp.abs(x), x)                                 # clear NaN's sign bit: after +inf
    u = xp.ascontiguousarray(x).view(xp.uint32).astype(xp.uint64)
    negative = (u >> np.uint64(31)) == np.uint64(1)
    return xp.where(negative, (~u) & np.uint64(0xFFFFFFFF), u | np.uint64(0x80000000))


def _ranked_positions(neg, xp):
    """Positions of each (slice, cluster) row of ``neg`` (G, C, N) sorted by ``(neg, position)``."""
    G, C, N = neg.shape
    pos = xp.arange(N, dtype=xp.int64)
    if neg.dtype == np.float32:
        key = (_ordered_bits32(neg, xp) << np.uint64(32)) | pos.astype(xp.uint64)   # (G, C, N) unique
        return xp.argsort(key, axis=-1)
    row = xp.repeat(xp.arange(G * C, dtype=xp.float64), N)                  # (G C N,)
    keys = xp.stack([xp.tile(pos, G * C).astype(xp.float64), neg.ravel().astype(xp.float64), row])
    order = xp.lexsort(keys)                                                # by row, then -R, then position
    return (order % N).reshape(G, C, N)


def _top_windows(R, w, dropped, keep_dropped, xp):
    """As :func:`eff_attn.methods.routing.reference.top_windows`, without a stable sort."""
    N = R.shape[-2]
    neg = -xp.swapaxes(R, -1, -2) + 0                                       # (G, C, N); -0.0 -> +0.0
    if dropped is not None:
        neg = xp.where(dropped[:, None, :], xp.inf, neg).astype(R.dtype)
    order = _ranked_positions(neg, xp)[..., :w]                             # (G, C, w)
    if dropped is not None and not keep_dropped:
        gone = xp.take_along_axis(xp.broadcast_to(dropped[:, None, :], neg.shape), order, axis=-1)
        order = xp.where(gone, N, order)
    order = xp.sort(order, axis=-1)
    return xp.where(order < N, order, -1).astype(xp.int64)


def route(q, k, *, mask, offset, centroids, head_of, num_clusters, assignment, window, unrouted):
    """The routing plan of flat inputs (see the module docstring)."""
    xp = xp_of(q)
    Nq, Nk = q.shape[1], k.shape[1]
    C = num_clusters
    mu = to_xp(xp, centroids, q.dtype)                                      # (H', C, D)
    head = to_xp(xp, head_of)                                               # (G,)
    RQ = routing_scores(q, mu, head, xp)                                    # (G, Nq, C)
    RK = routing_scores(k, mu, head, xp)                                    # (G, Nk, C)
    if assignment == "argmax":
        aK = xp.argmax(RK, axis=-1)                                         # (G, Nk)
        if mask is not None:
            aK = xp.where(mask, aK, -1)
        return argmax_plan(RQ, aK, first_key_of_clusters(aK, C, xp), offset, C, unrouted, xp)
    q_dropped = None if mask is None or Nq != Nk else ~mask
    qwin = _top_windows(rank_scores(RQ, xp), window[0], q_dropped, True, xp)     # (G, C, wQ)
    kwin = _top_windows(rank_scores(RK, xp), window[1], None if mask is None else ~mask, False, xp)   # (G, C, wK)
    return balanced_plan(RQ, qwin, kwin, mask, offset, Nk, C, unrouted, xp)


# --- ragged kernels -------------------------------------------------------------------


_visible_prefix = cuda.jit(device=True)(visible_prefix)


@cuda.jit(device=True)
def _stage_keys(buf, k, v, krow, kperm, g, start, count):
    """Block-cooperative load of ``count`` (key, value) rows of a segment into ``buf``."""
    D = k.shape[2]
    F = D + v.shape[2]
    for e in range(cuda.threadIdx.x, count * F, cuda.blockDim.x):
        j = krow[g, kperm[g, start + e // F]]
        f = e % F
        buf[e] = k[g, j, f] if f < D else v[g, j, f - D]


@cuda.jit(device=True)
def _task_rows(tasks, qrow, qperm, krow, kperm, koff, causal, offset, kend):
    """The block's task ``(g, c)``, its first key ``k0``, and this thread's slot, row and
    visible key count; ``kend[0]`` becomes the largest count in the block."""
    t = cuda.blockIdx.x
    g, c, a0, a1 = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
    k0 = koff[g, c]
    nk = koff[g, c + 1] - k0
    if cuda.threadIdx.x == 0:
        kend[0] = 0
    cuda.syncthreads()
    a = a0 + cuda.threadIdx.x
    slot = -1
    i = 0
    limit = 0
    if a < a1:
        slot = qperm[g, a]
        i = qrow[g, slot]
        limit = _visible_prefix(krow, kperm, g, k0, nk, i + offset) if causal else nk
        cuda.atomic.max(kend, 0, limit)
    cuda.syncthreads()
    return g, k0, slot, i, limit


@cuda.jit
def _ragged_forward(q, k, v, qrow, qperm, krow, kperm, koff, tasks, causal, offset, scale, slot_out, slot_lse):
    """Online softmax of one tile of query slots over its cluster's keys (one thread per row).

    Invariant after each key: ``l = sum exp(S_j - m)``, ``out_row = sum exp(S_j - m) v_j``.
    A NaN score makes the slot NaN; a ``+inf`` score takes the slot's weight
    (:mod:`eff_attn._cuda_device`).
    """
    buf = cuda.shared.array(_TILE_FLOATS, float64)
    kend = cuda.shared.array(1, int64)
    D, Dv = q.shape[2], v.shape[2]
    F = D + Dv
    per_tile = _TILE_FLOATS // F
    g, k0, slot, i, limit = _task_rows(tasks, qrow, qperm, krow, kperm, koff, causal, offset, kend)
    m = -math.inf
    ell = 0.0
    for j0 in range(0, kend[0], per_tile):
        count = min(per_tile, kend[0] - j0)
        _stage_keys(buf, k, v, krow, kperm, g, k0 + j0, count)
        cuda.syncthreads()
        if slot >= 0:
            for jj in range(min(count, limit - j0)):
                s = 0.0
                for d in range(D):
                    s += q[g, i, d] * buf[jj * F + d]
                s *= scale
                m_new = nan_max(m, s)
                if m_new != m:                                          # a larger max, or NaN
                    alpha = exp_shift(m, m_new)
                    ell *= alpha
                    for f in range(Dv):
                        slot_out[g, slot, f] *= alpha
                    m = m_new
                p = exp_shift(s, m)
                ell += p
                for f in range(Dv):
                    slot_out[g, slot, f] += p * buf[jj * F + D + f]
        cuda.syncthreads()
    if slot >= 0 and (ell > 0 or ell != ell):                           # a NaN row stays NaN
        for f in range(Dv):
            slot_out[g, slot, f] /= ell
        slot_lse[g, slot] = m + math.log(ell)


@cuda.jit
def _ragged_backward_q(q, k, v, qrow, qperm, krow, kperm, koff, tasks, causal, offset, scale, d_slot, slot_lse,
                       delta, dq_slot):
    """``dq = s sum_j P_ij (dO_i . v_j - delta_i) k_j`` per query slot (one thread per row)."""
    buf = cuda.shared.array(_TILE_FLOATS, float64)
    kend = cuda.shared.array(1, int64)
    D, Dv = q.shape[2], v.shape[2]
    F = D + Dv
    per_tile = _TILE_FLOATS // F
    g, k0, slot, i, limit = _task_rows(tasks, qrow, qperm, krow, kperm, koff, causal, offset, kend)
    L = slot_lse[g, slot] if slot >= 0 else -math.inf
    for j0 in range(0, kend[0], per_tile):
        count = min(per_tile, kend[0] - j0)
        _stage_keys(buf, k, v, krow, kperm, g, k0 + j0, count)
        cuda.syncthreads()
        if slot >= 0 and L != -math.inf:
            for jj in range(min(count, limit - j0)):
                s = 0.0
                for d in range(D):
                    s += q[g, i, d] * buf[jj * F + d]
                p = math.exp(s * scale - L)
                dp = 0.0
                for f in range(Dv):
                    dp += d_slot[g, slot, f] * buf[jj * F + D + f]
                ds = p * (dp - delta[g, slot]) * scale
                for d in range(D):
                    dq_slot[g, slot, d] += ds * buf[jj * F + d]
        cuda.syncthreads()


@cuda.jit
def _ragged_backward_kv(q, k, v, qrow, qperm, qstart, qstop, krow, kperm, key_tasks, causal, offset, scale,
                        d_slot, slot_lse, delta, dk_slot, dv_slot):
    """``dv_j += sum_i P_ij dO_i`` and ``dk_j += s sum_i dS_ij q_i`` per key slot (one thread per key).

    The block stages the cluster's query slots (q, dO, L, delta, last visible
    position) in shared-memory tiles; accumulates into the key slot rows.
    """
    buf = cuda.shared.array(_TILE_FLOATS, float64)
    D, Dv = q.shape[2], v.shape[2]
    F = D + Dv + 3
    per_tile = _TILE_FLOATS // F
    t = cuda.blockIdx.x
    g, c, b0, b1 = key_tasks[t, 0], key_tasks[t, 1], key_tasks[t, 2], key_tasks[t, 3]
    b = b0 + cuda.threadIdx.x
    kslot = kperm[g, b] if b < b1 else -1
    j = krow[g, kslot] if kslot >= 0 else 0
    lo, hi = qstart[g, c], qstop[g, c]
    for i0 in range(lo, hi, per_tile):
        count = min(per_tile, hi - i0)
        for e in range(cuda.threadIdx.x, count * F, cuda.blockDim.x):
            slot = qperm[g, i0 + e // F]
            f = e % F
            i = qrow[g, slot]
            if f < D:
                buf[e] = q[g, i, f]
            elif f < D + Dv:
                buf[e] = d_slot[g, slot, f - D]
            elif f == D + Dv:
                buf[e] = slot_lse[g, slot]
            elif f == D + Dv + 1:
                buf[e] = delta[g, slot]
            else:
                buf[e] = i + offset if causal else k.shape[1]                 # last visible position
        cuda.syncthreads()
        if kslot >= 0:
            for ii in range(count):
                base = ii * F
                L = buf[base + D + Dv]
                if L == -math.inf or j > buf[base + D + Dv + 2]:
                    continue
                s = 0.0
                for d in range(D):
                    s += buf[base + d] * k[g, j, d]
                p = math.exp(s * scale - L)
                dp = 0.0
                for f in range(Dv):
                    dp += buf[base + D + f] * v[g, j, f]
                    dv_slot[g, kslot, f] += p * buf[base + D + f]
                ds = p * (dp - buf[base + D + Dv + 1]) * scale
                for d in range(D):
                    dk_slot[g, kslot, d] += ds * buf[base + d]
        cuda.syncthreads()


@cuda.jit
def _combine_rows(src, weight, perm, off, dst):
    """``dst[g, i] = sum_t weight[g, s_t] src[g, s_t]`` over row ``i``'s slots, in slot order (block per row)."""
    N, F = dst.shape[1], dst.shape[2]
    g = cuda.blockIdx.x // N
    i = cuda.blockIdx.x % N
    for f in range(cuda.threadIdx.x, F, cuda.blockDim.x):
        acc = 0.0
        for u in range(off[g, i], off[g, i + 1]):
            s = perm[g, u]
            if weight[g, s] != 0:
                acc += weight[g, s] * src[g, s, f]
        dst[g, i, f] = acc


# --- host side ----------------------------------------------------------------------


def _ragged_threads():
    return threads_per_block(RAGGED_THREADS)


def _launch(kernel, tasks, *args):
    if tasks.shape[0]:
        launch_rows(kernel, int(tasks.shape[0]), *args, threads=_ragged_threads())


def _combine(xp, src, weight, perm, off, N):
    dst = xp.zeros((src.shape[0], N, src.shape[2]), dtype=src.dtype)
    launch_rows(_combine_rows, src.shape[0] * N, src, xp.ascontiguousarray(weight.astype(src.dtype)), perm, off, dst)
    return dst


def _query_ranges(layout, C, window_rows):
    """Host ``(start, stop)`` of each cluster's ragged query slots (G, C); balanced windows skip their
    ``wQ`` window slots, which run as static batched products."""
    qoff = to_host(layout.qoff)
    return qoff[:, :C] + window_rows, qoff[:, 1 : C + 1]


def _slot_weights(xp, layout, slot_lse, Nq):
    G = slot_lse.shape[0]
    served = (slot_lse != -xp.inf) & (layout.qrow >= 0)                    # (G, Sq); NaN, +inf served
    rows = xp.where(layout.qrow >= 0, layout.qrow, 0)
    flat = (xp.arange(G, dtype=xp.int64)[:, None] * Nq + rows).ravel()
    n = xp.bincount(flat, weights=served.ravel().astype(xp.float64), minlength=G * Nq).reshape(G, Nq)
    n_slot = xp.take_along_axis(n, rows, axis=-1)                           # (G, Sq)
    return xp.where(served, 1.0 / xp.where(n_slot > 0, n_slot, 1), 0.0)


def _kernel_args(offset, scale):
    return offset is not None, 0 if offset is None else int(offset), float(scale)


def forward(q, k, v, *, mask, offset, scale, assignment, num_clusters, window, unrouted, plan, centroids,
            head_of, **params):
    """Route (or replay), attend, combine; see the module docstring."""
    xp = xp_of(q)
    (G, Nq, _), (Nk, Dv), C = q.shape, v.shape[1:], num_clusters
    if plan is None:
        plan = route(q, k, mask=mask, offset=offset, centroids=centroids, head_of=head_of, num_clusters=C,
                     assignment=assignment, window=window, unrouted=unrouted)
    else:
        plan = plan.map_arrays(lambda a, t: to_xp(xp, a))
    layout = slot_layout(plan, Nq, Nk, xp)
    Sq = layout.qrow.shape[1]
    slot_out = xp.zeros((G, Sq, Dv), dtype=q.dtype)
    slot_lse = xp.full((G, Sq), -xp.inf, dtype=q.dtype)
    window_rows = 0
    if assignment == "balanced":
        window_rows = window[0]
        limits = row_limits(Nq, Nk, offset, xp)
        O, lse = window_attention(q, k, v, plan.query_windows, plan.key_windows, limits, scale, xp)
        slot_out[:, : layout.window_slots] = O.reshape(G, -1, Dv)
        slot_lse[:, : layout.window_slots] = lse.reshape(G, -1)
    start, stop = _query_ranges(layout, C, window_rows)
    k_count = np.diff(to_host(layout.koff), axis=-1)[:, :C]
    tasks = tile_tasks(start, stop - start, k_count, _ragged_threads())
    causal, off, s = _kernel_args(offset, scale)
    _launch(_ragged_forward, tasks, q, k, v, layout.qrow, layout.qperm, layout.krow, layout.kperm, layout.koff,
            to_xp(xp, tasks), causal, off, s, slot_out, slot_lse)
    weight = _slot_weights(xp, layout, slot_lse, Nq)                        # (G, Sq)
    out = _combine(xp, slot_out, weight, layout.rperm, layout.roff, Nq)     # (G, Nq, Dv)
    saved = {"layout": layout, "tasks": tasks, "ranges": (start, stop), "slot_out": slot_out,
             "slot_lse": slot_lse, "slot_weight": weight}
    stats = plan_statistics(plan, mask, offset, Nq, Nk, xp)
    return out, {**saved, "plan": plan, "stats": stats}                     # completed by routing.finish


def backward(dout, q, k, v, out, res, *, mask, offset, scale, assignment, num_clusters, **params):
    """Static window gradients (balanced) plus the two ragged passes, summed to rows."""
    xp = xp_of(q)
    (G, Nq, D), (Nk, Dv), C = q.shape, v.shape[1:], num_clusters
    layout, plan = res["layout"], res["plan"]
    slot_out, slot_lse, weight = res["slot_out"], res["slot_lse"], res["slot_weight"]
    rows = xp.where(layout.qrow >= 0, layout.qrow, 0)
    d_slot = xp.ascontiguousarray(xp.take_along_axis(dout, rows[..., None], axis=1) * weight[..., None].astype(q.dtype))
    delta = (d_slot * slot_out).sum(axis=-1)                                # (G, Sq)
    Sq, Sk = layout.qrow.shape[1], layout.krow.shape[1]
    dq_slot = xp.zeros((G, Sq, D), dtype=q.dtype)
    dk_slot = xp.zeros((G, Sk, D), dtype=q.dtype)
    dv_slot = xp.zeros((G, Sk, Dv), dtype=q.dtype)
    if assignment == "balanced":
        W = layout.window_slots
        limits = row_limits(Nq, Nk, offset, xp)
        dO = d_slot[:, :W].reshape(G, C, -1, Dv)
        O = slot_out[:, :W].reshape(G, C, -1, Dv)
        lse = slot_lse[:, :W].reshape(G, C, -1)
        dQ, dK, dV = window_backward(dO, q, k, v, O, lse, plan.query_windows, plan.key_windows, limits, scale, xp)
        dq_slot[:, :W] = dQ.reshape(G, W, D)
        dk_slot[:] = dK.reshape(G, Sk, D)
        dv_slot[:] = dV.reshape(G, Sk, Dv)
    causal, off, s = _kernel_args(offset, scale)
    start, stop = res["ranges"]
    _launch(_ragged_backward_q, res["tasks"], q, k, v, layout.qrow, layout.qperm, layout.krow, layout.kperm,
            layout.koff, to_xp(xp, res["tasks"]), causal, off, s, d_slot, slot_lse, delta, dq_slot)
    koff = to_host(layout.koff)
    key_tasks = tile_tasks(koff[:, :C], np.diff(koff, axis=-1)[:, :C], stop - start, _ragged_threads())
    _launch(_ragged_backward_kv, key_tasks, q, k, v, layout.qrow, layout.qperm, to_xp(xp, start), to_xp(xp, stop),
            layout.krow, layout.kperm, to_xp(xp, key_tasks), causal, off, s, d_slot, slot_lse, delta, dk_slot, dv_slot)
    ones_q = (layout.qrow >= 0).astype(q.dtype)
    ones_k = (layout.krow >= 0).astype(q.dtype)
    dq = _combine(xp, dq_slot, ones_q, layout.rperm, layout.roff, Nq)
    dk = _combine(xp, dk_slot, ones_k, layout.kr_perm, layout.kr_off, Nk)
    dv = _combine(xp, dv_slot, ones_k, layout.kr_perm, layout.kr_off, Nk)
    return dq, dk, dv
