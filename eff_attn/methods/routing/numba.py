"""Routing attention on the CPU: sort by cluster, then blocked attention per cluster.

Matches :mod:`eff_attn.methods.routing.reference`. No (Nq, Nk) array is ever
formed: memory is ``O(N (D + Dv) + N C)`` in argmax mode.

Route
    ``_route_kernel``: ``prange`` over (slice, row block); each task
    normalises its rows, multiplies them by ``mu^T`` with ``np.dot`` and
    takes the argmax. Balanced windows come from ``_top_windows_kernel``,
    one task per (slice, cluster): a stable mergesort of ``-R`` along the
    sequence, the first ``w``, sorted back to positions.

Segments
    The plan becomes query and key *slots* grouped by cluster
    (:func:`eff_attn.methods.routing.plan.slot_layout`: the shared
    ``stable_key_argsort`` / ``segment_offsets`` CSR). A host-built task list
    ``(g, c, first, last)`` covers each cluster's query slots in tiles of
    ``Bq``, heaviest first.

Attention
    ``_segment_forward``: ``prange`` over tasks. A task gathers its query
    tile and streams the cluster's keys in tiles of ``Bk`` with the online
    softmax. Keys are in ascending position, so under causal masking row
    ``i`` sees a prefix of them, found by binary search. The rows' slots are
    then combined, each row averaging its served slots in ascending window
    order (``_combine_rows``, through the inverse CSR; no atomics).

Backward
    Two atomic-free passes that recompute ``P = exp(S - L)`` from the saved
    logsumexp: query tiles give ``dq`` per slot, key tiles (streaming the
    cluster's query slots) give ``dk`` and ``dv`` per key slot; both are
    then summed to rows through the inverse CSRs.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, serial
from ..._tiles import finish_row, online_softmax_step
from ..._tile_sizes import CPU_TILE_MACS, cpu_blocks
from ...masks import as_kernel_mask
from .plan import (
    argmax_plan,
    balanced_plan,
    first_key_of_clusters,
    plan_statistics,
    rank_scores,
    slot_layout,
    tile_tasks,
    visible_prefix,
)

__all__ = ["route", "forward", "backward"]

#: Most rows per routing task; fewer when ``rows * C * D`` would exceed exact's
#: ``CPU_TILE_MACS`` (the tiles stay in a core's L2 cache).
MAX_ROUTE_BLOCK = 256


def route_block(C: int, D: int) -> int:
    """Largest power of two ``<= 256`` with ``block * C * D <= CPU_TILE_MACS`` (at least 8)."""
    block = MAX_ROUTE_BLOCK
    while block > 8 and block * C * D > CPU_TILE_MACS:
        block //= 2
    return block


# --- routing --------------------------------------------------------------------------


@kernel
def _route_kernel(x, mu, head_of, block, R, best):
    """``R[g] = (x[g] / |x[g]|) mu[head_of[g]]^T`` and its row argmax (lower index on ties)."""
    G, N, D = x.shape
    C = mu.shape[1]
    n_blocks = (N + block - 1) // block
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * block
        i1 = min(N, i0 + block)
        xb = np.empty((i1 - i0, D), dtype=x.dtype)                         # (B, D) unit rows
        for r in range(i1 - i0):
            norm = np.sqrt(np.dot(x[g, i0 + r], x[g, i0 + r]))
            for d in range(D):
                xb[r, d] = x[g, i0 + r, d] / norm if norm > 0 else x[g, i0 + r, d]
        np.dot(xb, mu[head_of[g]].T, R[g, i0:i1])                          # (B, C)
        for r in range(i1 - i0):
            arg = 0
            for c in range(1, C):
                if R[g, i0 + r, c] > R[g, i0 + r, arg]:
                    arg = c
            best[g, i0 + r] = arg


@serial
def _kth_smallest(a, n, kth):
    """The ``kth`` smallest (0-based) of ``a[:n]``, which holds no NaN; reorders ``a[:n]``.

    Quickselect with a median-of-three pivot and a three-way partition
    (``< pivot | == pivot | > pivot``), so runs of equal values (dropped
    rows at ``+inf``) cost one pass. Expected O(n).
    """
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))                          # the median of the three
        lt, i, gt = lo, lo, hi
        while i <= gt:
            if a[i] < pivot:
                a[lt], a[i] = a[i], a[lt]
                lt += 1
                i += 1
            elif a[i] > pivot:
                a[i], a[gt] = a[gt], a[i]
                gt -= 1
            else:
                i += 1
        if kth < lt:
            hi = lt - 1
        elif kth > gt:
            lo = gt + 1
        else:
            return pivot
    return a[kth]


@kernel
def _top_windows_kernel(R, dropped, keep_dropped, w, out):
    """Window ``(g, c)``: the first ``w`` positions by ``(-R[:, c], position)``, ascending, -1 padded.

    Selection in O(N) instead of a sort: ``tau`` is the w-th smallest ``-R``
    (:func:`_kth_smallest`, a quickselect); a scan in position order then takes every entry
    below ``tau`` and the first ``w - #{below}`` entries equal to it, which
    is exactly the top ``w`` of the ``(-R, position)`` order, already ascending.
    NaN scores rank after every number (as in the reference's sort): they
    enter a window only when fewer than ``w`` numbers exist, first by position.
    """
    G, N, C = R.shape
    has_drop = dropped.shape[0] > 0
    for task in prange(G * C):
        g = task // C
        c = task % C
        neg = np.empty(N, dtype=R.dtype)                                   # (N,) -R, +inf if dropped
        numbers = np.empty(N, dtype=R.dtype)                               # (m,) the non-NaN entries of neg
        m = 0
        for i in range(N):
            neg[i] = -R[g, i, c]
            if has_drop and dropped[g, i]:
                neg[i] = np.inf
            if neg[i] == neg[i]:                                           # NaN ranks last, as in a sort
                numbers[m] = neg[i]
                m += 1
        nan_left = max(0, w - m)                                           # NaN entries the window takes
        if nan_left == 0:
            tau = _kth_smallest(numbers, m, w - 1)
            ties = w
            for i in range(N):
                if neg[i] < tau:
                    ties -= 1
        else:                                                              # every number fits in the window
            tau = np.inf
            ties = N
        n = 0
        for i in range(N):
            if np.isnan(neg[i]):
                take = nan_left > 0
                nan_left -= 1
            else:
                take = neg[i] < tau or (neg[i] == tau and ties > 0)
                if take and neg[i] == tau:
                    ties -= 1
            if take and not (has_drop and not keep_dropped and dropped[g, i]):
                out[g, c, n] = i
                n += 1
        for s in range(n, w):
            out[g, c, s] = -1


def _scores(x, mu, head_of):
    G, N, _ = x.shape
    R = np.empty((G, N, mu.shape[1]), dtype=x.dtype)
    best = np.empty((G, N), dtype=np.int64)
    _route_kernel(x, mu, head_of, route_block(mu.shape[1], x.shape[2]), R, best)
    return R, best


def _windows(R, w, dropped, keep_dropped):
    G, _, C = R.shape
    out = np.empty((G, C, w), dtype=np.int64)
    drop = as_kernel_mask(dropped)
    _top_windows_kernel(R, drop, keep_dropped, w, out)
    return out


def route(q, k, *, mask, offset, centroids, head_of, num_clusters, assignment, window, unrouted):
    """The routing plan of flat inputs (see the module docstring)."""
    q, k = contiguous(q, k)
    mu = np.ascontiguousarray(centroids, dtype=q.dtype)                      # (H', C, D)
    head_of = np.ascontiguousarray(head_of, dtype=np.int64)
    Nq, Nk = q.shape[1], k.shape[1]
    C = num_clusters
    with blas_single_thread():
        RQ, _ = _scores(q, mu, head_of)                                      # (G, Nq, C)
        RK, aK = _scores(k, mu, head_of)                                     # (G, Nk, C), (G, Nk)
        if assignment == "argmax":
            if mask is not None:
                aK = np.where(mask, aK, -1)                                  # (G, Nk)
            return argmax_plan(RQ, aK, first_key_of_clusters(aK, C), offset, C, unrouted)
        q_dropped = None if mask is None or Nq != Nk else ~mask
        qwin = _windows(rank_scores(RQ), window[0], q_dropped, True)         # (G, C, wQ)
        kwin = _windows(rank_scores(RK), window[1], None if mask is None else ~mask, False)   # (G, C, wK)
    return balanced_plan(RQ, qwin, kwin, mask, offset, Nk, C, unrouted)


# --- attention over segments ---------------------------------------------------------


_visible_prefix = serial(visible_prefix)


@serial
def _query_tile(q, qrow, qperm, krow, kperm, g, a0, a1, k0, nk, causal, offset, scale, qs, limit):
    """Gather the scaled query tile into ``qs`` and each row's visible key count into ``limit``;
    returns the largest count (the keys the tile must stream)."""
    kend = 0
    for r in range(a1 - a0):
        i = qrow[g, qperm[g, a0 + r]]
        for d in range(qs.shape[1]):
            qs[r, d] = q[g, i, d] * scale
        limit[r] = _visible_prefix(krow, kperm, g, k0, nk, i + offset) if causal else nk
        kend = max(kend, limit[r])
    return kend


@serial
def _key_tile(k, v, krow, kperm, g, k0, j0, j1, kt, vt):
    """Gather keys ``j0..j1`` of the segment starting at ``k0`` into ``kt``, ``vt``."""
    for c in range(j1 - j0):
        j = krow[g, kperm[g, k0 + j0 + c]]
        for d in range(kt.shape[1]):
            kt[c, d] = k[g, j, d]
        for d in range(vt.shape[1]):
            vt[c, d] = v[g, j, d]


@serial
def _mask_beyond(s, limit, j0):
    """Scores of keys a row may not see (index >= its visible count) become -inf."""
    for r in range(s.shape[0]):
        for c in range(max(0, limit[r] - j0), s.shape[1]):
            s[r, c] = -np.inf


@kernel
def _segment_forward(q, k, v, qrow, qperm, krow, kperm, koff, tasks, causal, offset, scale, block_k,
                     slot_out, slot_lse):
    D, Dv = q.shape[2], v.shape[2]
    for t in prange(tasks.shape[0]):
        g, c, a0, a1 = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
        bq = a1 - a0
        k0 = koff[g, c]
        qs = np.empty((bq, D), dtype=q.dtype)                              # (Bq, D) s q
        limit = np.empty(bq, dtype=np.int64)                               # (Bq,) visible keys per row
        kend = _query_tile(q, qrow, qperm, krow, kperm, g, a0, a1, k0, koff[g, c + 1] - k0, causal, offset,
                           scale, qs, limit)
        mu = np.empty(bq, dtype=q.dtype)                                   # (Bq,) running max, -inf
        ell = np.empty(bq, dtype=q.dtype)                                  # (Bq,) running sum, 0
        acc = np.empty((bq, Dv), dtype=q.dtype)                            # (Bq, Dv) running P v, 0
        for r in range(bq):
            mu[r] = -np.inf
            ell[r] = 0
            for d in range(Dv):
                acc[r, d] = 0
        pv = np.empty((bq, Dv), dtype=q.dtype)
        kt = np.empty((block_k, D), dtype=q.dtype)
        vt = np.empty((block_k, Dv), dtype=q.dtype)
        tile = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        for j0 in range(0, kend, block_k):
            j1 = min(kend, j0 + block_k)
            _key_tile(k, v, krow, kperm, g, k0, j0, j1, kt, vt)
            s = tile[: bq * (j1 - j0)].reshape((bq, j1 - j0))              # (Bq, Bk)
            np.dot(qs, kt[: j1 - j0].T, s)                                 # (Bq, Bk) scores
            _mask_beyond(s, limit, j0)
            online_softmax_step(s, mu, ell, acc, bits)
            np.dot(s, vt[: j1 - j0], pv)                                   # (Bq, Dv) P_J v_J
            for r in range(bq):
                for d in range(Dv):
                    acc[r, d] += pv[r, d]
        for r in range(bq):
            slot = qperm[g, a0 + r]
            slot_lse[g, slot] = finish_row(acc[r], ell[r], mu[r], slot_out[g, slot])


@serial
def _probabilities(s, lse_rows, bits):
    """In place ``s <- exp(s - L_r)`` (0 for rows with ``L = -inf``)."""
    for r in range(s.shape[0]):
        if lse_rows[r] == -np.inf:
            for c in range(s.shape[1]):
                s[r, c] = 0
        else:
            exp_shifted(s[r], lse_rows[r], bits)


@serial
def _score_gradient(p, dp, delta):
    """In place ``dp <- p (dp - delta_r)``: the gradient of the scores."""
    for r in range(p.shape[0]):
        for c in range(p.shape[1]):
            dp[r, c] = p[r, c] * (dp[r, c] - delta[r])


@kernel
def _segment_backward_q(q, k, v, qrow, qperm, krow, kperm, koff, tasks, causal, offset, scale, block_k,
                        d_slot, slot_lse, delta, dq_slot):
    D, Dv = q.shape[2], v.shape[2]
    for t in prange(tasks.shape[0]):
        g, c, a0, a1 = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
        bq = a1 - a0
        k0 = koff[g, c]
        qs = np.empty((bq, D), dtype=q.dtype)
        limit = np.empty(bq, dtype=np.int64)
        kend = _query_tile(q, qrow, qperm, krow, kperm, g, a0, a1, k0, koff[g, c + 1] - k0, causal, offset,
                           scale, qs, limit)
        do = np.empty((bq, Dv), dtype=q.dtype)                             # (Bq, Dv) slot gradients
        L = np.empty(bq, dtype=q.dtype)
        dl = np.empty(bq, dtype=q.dtype)
        for r in range(bq):
            slot = qperm[g, a0 + r]
            do[r] = d_slot[g, slot]
            L[r] = slot_lse[g, slot]
            dl[r] = delta[g, slot]
        dq_acc = np.zeros((bq, D), dtype=q.dtype)                          # (Bq, D)
        dq_part = np.empty((bq, D), dtype=q.dtype)
        kt = np.empty((block_k, D), dtype=q.dtype)
        vt = np.empty((block_k, Dv), dtype=q.dtype)
        p_buf = np.empty(bq * block_k, dtype=q.dtype)
        ds_buf = np.empty(bq * block_k, dtype=q.dtype)
        bits = np.empty(block_k, dtype=np.int32)
        for j0 in range(0, kend, block_k):
            j1 = min(kend, j0 + block_k)
            bk = j1 - j0
            _key_tile(k, v, krow, kperm, g, k0, j0, j1, kt, vt)
            p = p_buf[: bq * bk].reshape((bq, bk))
            ds = ds_buf[: bq * bk].reshape((bq, bk))
            np.dot(qs, kt[:bk].T, p)                                       # (Bq, Bk) scores
            _mask_beyond(p, limit, j0)
            _probabilities(p, L, bits)                                     # (Bq, Bk) P
            np.dot(do, vt[:bk].T, ds)                                      # (Bq, Bk) dP
            _score_gradient(p, ds, dl)                                     # (Bq, Bk) dS
            np.dot(ds, kt[:bk], dq_part)                                   # (Bq, D)
            dq_acc += dq_part
        for r in range(bq):
            dq_slot[g, qperm[g, a0 + r]] = dq_acc[r] * scale


@kernel
def _segment_backward_kv(q, k, v, qrow, qperm, qoff, krow, kperm, key_tasks, causal, offset, scale, block_q,
                         d_slot, slot_lse, delta, dk_slot, dv_slot):
    D, Dv = q.shape[2], v.shape[2]
    for t in prange(key_tasks.shape[0]):
        g, c, b0, b1 = key_tasks[t, 0], key_tasks[t, 1], key_tasks[t, 2], key_tasks[t, 3]
        bk = b1 - b0
        ks = np.empty((bk, D), dtype=q.dtype)                              # (Bk, D) s k
        vt = np.empty((bk, Dv), dtype=q.dtype)                             # (Bk, Dv)
        kpos = np.empty(bk, dtype=np.int64)
        for cc in range(bk):
            j = krow[g, kperm[g, b0 + cc]]
            kpos[cc] = j
            ks[cc] = k[g, j] * scale
            vt[cc] = v[g, j]
        dk_acc = np.zeros((bk, D), dtype=q.dtype)
        dv_acc = np.zeros((bk, Dv), dtype=q.dtype)
        dk_part = np.empty((bk, D), dtype=q.dtype)
        dv_part = np.empty((bk, Dv), dtype=q.dtype)
        qt = np.empty((block_q, D), dtype=q.dtype)
        do = np.empty((block_q, Dv), dtype=q.dtype)
        L = np.empty(block_q, dtype=q.dtype)
        dl = np.empty(block_q, dtype=q.dtype)
        last = np.empty(block_q, dtype=np.int64)
        p_buf = np.empty(block_q * bk, dtype=q.dtype)
        ds_buf = np.empty(block_q * bk, dtype=q.dtype)
        bits = np.empty(bk, dtype=np.int32)
        a_start, a_stop = qoff[g, c], qoff[g, c + 1]
        for i0 in range(a_start, a_stop, block_q):
            i1 = min(a_stop, i0 + block_q)
            bq = i1 - i0
            reach = -1
            for r in range(bq):
                slot = qperm[g, i0 + r]
                i = qrow[g, slot]
                qt[r] = q[g, i]
                do[r] = d_slot[g, slot]
                L[r] = slot_lse[g, slot]
                dl[r] = delta[g, slot]
                last[r] = i + offset if causal else kpos[bk - 1]
                reach = max(reach, last[r])
            if reach < kpos[0]:                                            # the tile sees none of these keys
                continue
            p = p_buf[: bq * bk].reshape((bq, bk))
            ds = ds_buf[: bq * bk].reshape((bq, bk))
            np.dot(qt[:bq], ks.T, p)                                       # (Bq, Bk) scores
            for r in range(bq):
                for cc in range(bk):
                    if kpos[cc] > last[r]:
                        p[r, cc] = -np.inf
            _probabilities(p, L[:bq], bits)                                # (Bq, Bk) P
            np.dot(p.T, do[:bq], dv_part)                                  # (Bk, Dv)
            dv_acc += dv_part
            np.dot(do[:bq], vt.T, ds)                                      # (Bq, Bk) dP
            _score_gradient(p, ds, dl[:bq])                                # (Bq, Bk) dS
            np.dot(ds.T, qt[:bq], dk_part)                                 # (Bk, D)
            dk_acc += dk_part
        for cc in range(bk):
            slot = kperm[g, b0 + cc]
            dk_slot[g, slot] = dk_acc[cc] * scale
            dv_slot[g, slot] = dv_acc[cc]


@kernel
def _combine_rows(src, weight, perm, off, dst):
    """``dst[g, i] = sum_t weight[g, s_t] src[g, s_t]`` over the slots ``s_t`` of row ``i``, in slot order."""
    G, N, F = dst.shape
    for task in prange(G * N):
        g = task // N
        i = task % N
        for f in range(F):
            dst[g, i, f] = 0
        for u in range(off[g, i], off[g, i + 1]):
            s = perm[g, u]
            w = weight[g, s]
            if w != 0:
                for f in range(F):
                    dst[g, i, f] += w * src[g, s, f]


def _combine(src, weight, perm, off, N):
    dst = np.empty((src.shape[0], N, src.shape[2]), dtype=src.dtype)
    _combine_rows(src, np.ascontiguousarray(weight, dtype=src.dtype), perm, off, dst)
    return dst


def _segment_sizes(off, C):
    return off[:, :C], np.diff(off, axis=-1)[:, :C]


def _slot_weights(layout, slot_lse, Nq):
    """Forward weight of each slot: ``1 / |C^+_i|`` if it serves its row, else 0 (G, Sq)."""
    G = slot_lse.shape[0]
    served = ~np.isneginf(slot_lse) & (layout.qrow >= 0)                    # (G, Sq); NaN, +inf served
    rows = np.where(layout.qrow >= 0, layout.qrow, 0)
    n = np.zeros((G, Nq), dtype=np.int64)
    np.add.at(n, (np.arange(G)[:, None], rows), served)
    n_slot = np.take_along_axis(n, rows, axis=-1)                           # (G, Sq)
    return np.where(served, 1.0 / np.where(n_slot > 0, n_slot, 1), 0.0)


def _kernel_args(offset, scale, dtype):
    return offset is not None, 0 if offset is None else int(offset), dtype.type(scale)


def forward(q, k, v, *, mask, offset, scale, assignment, num_clusters, window, unrouted, plan, centroids,
            head_of, **params):
    """Route (unless replaying ``plan``), attend per cluster, combine; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    (G, Nq, D), (Nk, Dv), C = q.shape, v.shape[1:], num_clusters
    if plan is None:
        plan = route(q, k, mask=mask, offset=offset, centroids=centroids, head_of=head_of, num_clusters=C,
                     assignment=assignment, window=window, unrouted=unrouted)
    layout = slot_layout(plan, Nq, Nk)
    block_q, block_k = cpu_blocks(D, Dv)
    q_first, q_count = _segment_sizes(layout.qoff, C)
    k_first, k_count = _segment_sizes(layout.koff, C)
    tasks = tile_tasks(q_first, q_count, k_count, block_q)
    Sq = layout.qrow.shape[1]
    slot_out = np.zeros((G, Sq, Dv), dtype=q.dtype)
    slot_lse = np.full((G, Sq), -np.inf, dtype=q.dtype)
    causal, off, s = _kernel_args(offset, scale, q.dtype)
    with blas_single_thread():
        _segment_forward(q, k, v, layout.qrow, layout.qperm, layout.krow, layout.kperm, layout.koff, tasks,
                         causal, off, s, block_k, slot_out, slot_lse)
    weight = _slot_weights(layout, slot_lse, Nq)                             # (G, Sq)
    out = _combine(slot_out, weight, layout.rperm, layout.roff, Nq)          # (G, Nq, Dv)
    saved = {"layout": layout, "tasks": tasks, "slot_out": slot_out, "slot_lse": slot_lse, "slot_weight": weight}
    return out, {**saved, "plan": plan}                                     # completed by routing.finish


def backward(dout, q, k, v, out, res, *, mask, offset, scale, num_clusters, **params):
    """Two atomic-free passes per segment, then the slot gradients summed to rows."""
    q, k, v, dout = contiguous(q, k, v, dout)
    (G, Nq, D), (Nk, Dv), C = q.shape, v.shape[1:], num_clusters
    layout = res["layout"]
    slot_out, slot_lse, weight = res["slot_out"], res["slot_lse"], res["slot_weight"]
    block_q, block_k = cpu_blocks(D, Dv)
    rows = np.where(layout.qrow >= 0, layout.qrow, 0)
    d_slot = np.take_along_axis(dout, rows[..., None], axis=1) * weight[..., None].astype(q.dtype)  # (G, Sq, Dv)
    d_slot = np.ascontiguousarray(d_slot, dtype=q.dtype)
    delta = np.einsum("gsd,gsd->gs", d_slot, slot_out)                       # (G, Sq)
    q_first, q_count = _segment_sizes(layout.qoff, C)
    k_first, k_count = _segment_sizes(layout.koff, C)
    key_tasks = tile_tasks(k_first, k_count, q_count, block_k)
    dq_slot = np.zeros((G, layout.qrow.shape[1], D), dtype=q.dtype)
    dk_slot = np.zeros((G, layout.krow.shape[1], D), dtype=q.dtype)
    dv_slot = np.zeros((G, layout.krow.shape[1], Dv), dtype=q.dtype)
    causal, off, s = _kernel_args(offset, scale, q.dtype)
    with blas_single_thread():
        _segment_backward_q(q, k, v, layout.qrow, layout.qperm, layout.krow, layout.kperm, layout.koff,
                            res["tasks"], causal, off, s, block_k, d_slot, slot_lse, delta, dq_slot)
        _segment_backward_kv(q, k, v, layout.qrow, layout.qperm, layout.qoff, layout.krow, layout.kperm,
                             key_tasks, causal, off, s, block_q, d_slot, slot_lse, delta, dk_slot, dv_slot)
    ones_q = (layout.qrow >= 0).astype(q.dtype)
    ones_k = (layout.krow >= 0).astype(q.dtype)
    dq = _combine(dq_slot, ones_q, layout.rperm, layout.roff, Nq)
    dk = _combine(dk_slot, ones_k, layout.kr_perm, layout.kr_off, Nk)
    dv = _combine(dv_slot, ones_k, layout.kr_perm, layout.kr_off, Nk)
    return dq, dk, dv
