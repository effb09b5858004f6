"""Treeformer on the CPU: Numba kernels over contiguous leaf ranges.

Matches :mod:`eff_attn.methods.treeformer.reference`. No (Nq, Nk) array is
ever formed.

Layout
    ``_route_kernel`` walks every point down the tree (``prange`` over
    points, ``h`` dot products each, in the input dtype). Each slice's
    queries and keys are then sorted by leaf with the shared stable key sort
    (``eff_attn._hashing``; masked keys go to a spare last bin), so every
    node's queries and keys are contiguous ranges ``[off[l0], off[l1])`` of
    the sorted order, in ascending original index within a leaf.

TF
    One task per (slice, leaf, block of ``TF_BLOCK_Q`` queries), ``prange``
    over tasks; a task scores its queries against its leaf's keys in one
    ``np.dot`` tile ``(Bq, c_l)``, takes the max-shifted softmax row by row
    (the causal rule cuts each row to a prefix of the leaf's keys, which are
    in position order), and multiplies by the leaf's values. Memory
    ``O(N (D + Dv))`` plus one tile per worker. The backward recomputes
    ``P = exp(S - lse)``: one pass over the same tasks for ``dq``, one over
    (slice, leaf, block of ``TF_BLOCK_K`` keys) for ``dk`` and ``dv``.
    No atomics: every output row is written by exactly one task.

TC
    Leaf sums of keys and values over the sorted ranges (one task per
    (slice, leaf)), then bottom-up ``parent = left + right`` (one task per
    slice), then one task per (slice, block of queries) for the ``<= h + 1``
    path scores. The backward computes ``beta`` and ``dq`` per query, then
    per node ``dkbar_m = s sum beta_it q_i`` over the node's contiguous
    query range, then gathers ``dk_j = sum_t dkbar_{m_t} / N_{m_t}`` along
    each key's path. Fixed summation order, no atomics.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..._hashing import segment_offsets, stable_key_argsort
from ..._jit import blas_single_thread, contiguous, exp_shifted, kernel, row_maximum, serial
from ..._tiles import scale_rows
from ...masks import as_kernel_mask
from . import _common

__all__ = ["forward", "backward", "TF_BLOCK_Q", "TF_BLOCK_K", "TC_BLOCK_Q"]

#: Queries per TF task: one (Bq, c_l) score tile per task. With the default ~64 keys per
#: leaf, a whole leaf is one task.
TF_BLOCK_Q = 64
#: Keys per task in the TF key-gradient pass.
TF_BLOCK_K = 64
#: Queries per TC task.
TC_BLOCK_Q = 64


# --- routing and sorting -----------------------------------------------------------------


@kernel
def _route_kernel(x, w, b, tree_of_slice, keep, height, leaf):
    """``leaf[g, n]`` by the heap walk (ties left), -1 where ``keep`` is False."""
    G, N, D = x.shape
    internal = (1 << height) - 1
    has_mask = keep.shape[0] > 0
    for p in prange(G * N):
        g = p // N
        n = p - g * N
        if has_mask and not keep[g, n]:
            leaf[g, n] = -1
            continue
        t = tree_of_slice[g]
        m = 0
        for _ in range(height):
            acc = w[t, m, 0] * x[g, n, 0]
            for d in range(1, D):
                acc += w[t, m, d] * x[g, n, d]
            z = acc + b[t, m]
            m = 2 * m + 1 + (1 if z < 0 else 0)
        leaf[g, n] = m - internal


def _route(x, w, b, tree_of_slice, keep, height):
    leaf = np.empty(x.shape[:2], dtype=np.int64)
    _route_kernel(x, w, b, tree_of_slice, keep, height, leaf)
    return leaf


def _sort_by_leaf(leaf, num_leaves):
    """Stable permutation by leaf (masked last) and CSR offsets (G, L + 2)."""
    key = np.where(leaf >= 0, leaf, num_leaves)                             # (G, N)
    perm = stable_key_argsort(key)                                          # (G, N)
    offsets = segment_offsets(np.take_along_axis(key, perm, axis=-1), num_leaves + 1)
    return np.ascontiguousarray(perm), offsets


@kernel
def _gather_rows_kernel(x, perm, out):
    """``out[g, p] = x[g, perm[g, p]]``."""
    G, N = perm.shape
    for task in prange(G * N):
        g = task // N
        p = task - g * N
        i = perm[g, p]
        for d in range(x.shape[2]):
            out[g, p, d] = x[g, i, d]


def _gather(x, perm):
    """Rows of each slice in the sorted order, (G, N, D), C-contiguous."""
    out = np.empty_like(x)
    _gather_rows_kernel(x, perm, out)
    return out


def _tasks(blocks):
    """(cell, block) of every task, for ``blocks[cell]`` blocks per (slice, leaf) cell."""
    blocks = blocks.ravel()
    cell = np.repeat(np.arange(blocks.size, dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    return cell, np.arange(cell.size, dtype=np.int64) - first


def _tree_arrays(tree, dtype):
    w, b = tree.state.flat()
    return np.ascontiguousarray(w, dtype=dtype), np.ascontiguousarray(b, dtype=dtype), tree.tree_of_slice


# --- TF -------------------------------------------------------------------------------------


@serial
def _search(a, lo, hi, x, right):
    """``lo + np.searchsorted(a[lo:hi], x, side="right" if right else "left")`` for a sorted integer ``a``.

    A plain binary search: the same answer at a fraction of ``np.searchsorted``'s compile time.
    """
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x or (right and a[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@serial
def _query_block(cell, block, block_q, off_q, off_k, perm_q, perm_k, causal, offset):
    """Slice ``g``, sorted query range ``[p0, p1)`` of a TF task and the key range ``[j0, j1)`` it may see.

    ``cell = g * L + leaf``; the queries are block ``block`` of the leaf's. Causal: keys after
    the block's last position are cut (a leaf's keys are in position order).
    """
    L = off_q.shape[1] - 2
    g = cell // L
    leaf = cell - g * L
    p0 = off_q[g, leaf] + block * block_q
    p1 = min(off_q[g, leaf + 1], p0 + block_q)
    j0, j1 = off_k[g, leaf], off_k[g, leaf + 1]
    if causal:
        j1 = _search(perm_k[g], j0, j1, perm_q[g, p1 - 1] + offset, True)
    return g, p0, p1, j0, j1


@serial
def _key_block(cell, block, block_k, off_q, off_k, perm_q, perm_k, causal, offset):
    """Slice ``g``, sorted key range ``[j0, j1)`` of a TF key-gradient task and the queries ``[p0, p1)`` that see it.

    Causal: queries before the block's first key position see none of it.
    """
    L = off_q.shape[1] - 2
    g = cell // L
    leaf = cell - g * L
    j0 = off_k[g, leaf] + block * block_k
    j1 = min(off_k[g, leaf + 1], j0 + block_k)
    p0, p1 = off_q[g, leaf], off_q[g, leaf + 1]
    if causal:
        p0 = _search(perm_q[g], p0, p1, perm_k[g, j0] - offset, False)
    return g, j0, j1, p0, p1


@kernel
def _tf_forward_kernel(qs, ks, vs, perm_q, perm_k, off_q, off_k, task_cell, task_block,
                       causal, offset, scale, block_q, out, lse, keys_per_row):
    Dv = vs.shape[2]
    for task in prange(task_cell.shape[0]):
        g, p0, p1, j0, j1 = _query_block(task_cell[task], task_block[task], block_q, off_q, off_k, perm_q, perm_k,
                                         causal, offset)
        bq, c = p1 - p0, j1 - j0
        if c == 0:
            for r in range(bq):
                i = perm_q[g, p0 + r]
                for d in range(Dv):
                    out[g, i, d] = 0
                lse[g, i] = -np.inf
                keys_per_row[g, i] = 0
            continue
        qb = np.empty((bq, qs.shape[2]), dtype=qs.dtype)                   # (Bq, D)
        scale_rows(qs, g, p0, scale, qb)                                   # a loop: cheaper to compile than * scale
        s = np.empty((bq, c), dtype=qs.dtype)                              # (Bq, c)
        np.dot(qb, ks[g, j0:j1].T, s)
        ell = np.empty(bq, dtype=qs.dtype)
        bits = np.empty(c, dtype=np.int32)
        # Row r sees the leaf keys [j0, j0 + visible): all of them, or a causal prefix.
        for r in range(bq):
            i = perm_q[g, p0 + r]
            ell[r] = 0
            visible = c
            if causal:
                visible = _search(perm_k[g], j0, j1, i + offset, True) - j0
                for col in range(visible, c):
                    s[r, col] = -np.inf
            keys_per_row[g, i] = visible
            if visible == 0:
                for col in range(c):
                    s[r, col] = 0
                lse[g, i] = -np.inf
                continue
            mu = row_maximum(s[r])
            ell[r] = exp_shifted(s[r], mu, bits)
            lse[g, i] = mu + np.log(ell[r])
        pv = np.empty((bq, Dv), dtype=qs.dtype)
        np.dot(s, vs[g, j0:j1], pv)                                        # (Bq, Dv)
        for r in range(bq):
            i = perm_q[g, p0 + r]
            for d in range(Dv):                                            # NaN scores propagate
                out[g, i, d] = pv[r, d] / ell[r] if ell[r] != 0 else 0


@serial
def _tile_gradients(qs, ks, vs, dos, perm_q, perm_k, g, p0, p1, j0, j1, lse, delta, causal, offset, scale):
    """``P`` and ``dS = P (dP - delta)`` of sorted queries ``[p0, p1)`` against sorted keys ``[j0, j1)`` of one leaf.

    ``P = exp(s q . k - lse)`` on the causally visible pairs, 0 elsewhere and on empty rows.
    """
    rows, cols = p1 - p0, j1 - j0
    p = np.empty((rows, cols), dtype=qs.dtype)                             # scores, then P
    ds = np.empty((rows, cols), dtype=qs.dtype)                            # dP, then dS
    qb = np.empty((rows, qs.shape[2]), dtype=qs.dtype)                     # (rows, D)
    scale_rows(qs, g, p0, scale, qb)
    np.dot(qb, ks[g, j0:j1].T, p)
    np.dot(dos[g, p0:p1], vs[g, j0:j1].T, ds)
    bits = np.empty(cols, dtype=np.int32)
    for r in range(rows):
        i = perm_q[g, p0 + r]
        if causal:
            for col in range(_search(perm_k[g], j0, j1, i + offset, True) - j0, cols):
                p[r, col] = -np.inf
        if lse[g, i] == -np.inf:
            for col in range(cols):
                p[r, col] = 0
        else:
            exp_shifted(p[r], lse[g, i], bits)
        for col in range(cols):
            ds[r, col] = p[r, col] * (ds[r, col] - delta[g, i])
    return p, ds


@kernel
def _tf_backward_q_kernel(qs, ks, vs, dos, perm_q, perm_k, off_q, off_k, task_cell, task_block,
                          lse, delta, causal, offset, scale, block_q, dq):
    """``dq = s dS k`` per (slice, leaf, query block) task."""
    D = qs.shape[2]
    for task in prange(task_cell.shape[0]):
        g, p0, p1, j0, j1 = _query_block(task_cell[task], task_block[task], block_q, off_q, off_k, perm_q, perm_k,
                                         causal, offset)
        if j1 == j0:
            for r in range(p1 - p0):
                for d in range(D):
                    dq[g, perm_q[g, p0 + r], d] = 0
            continue
        _, ds = _tile_gradients(qs, ks, vs, dos, perm_q, perm_k, g, p0, p1, j0, j1, lse, delta, causal, offset,
                                scale)
        dqb = np.empty((p1 - p0, D), dtype=qs.dtype)
        np.dot(ds, ks[g, j0:j1], dqb)                                      # (Bq, D)
        for r in range(p1 - p0):
            for d in range(D):
                dq[g, perm_q[g, p0 + r], d] = dqb[r, d] * scale


@kernel
def _tf_backward_kv_kernel(qs, ks, vs, dos, perm_q, perm_k, off_q, off_k, task_cell, task_block,
                           lse, delta, causal, offset, scale, block_k, dk, dv):
    """``dv = P^T dO`` and ``dk = s dS^T q`` per (slice, leaf, key block) task."""
    D, Dv = qs.shape[2], vs.shape[2]
    for task in prange(task_cell.shape[0]):
        g, j0, j1, p0, p1 = _key_block(task_cell[task], task_block[task], block_k, off_q, off_k, perm_q, perm_k,
                                       causal, offset)
        if p1 == p0:
            for col in range(j1 - j0):
                j = perm_k[g, j0 + col]
                for d in range(D):
                    dk[g, j, d] = 0
                for d in range(Dv):
                    dv[g, j, d] = 0
            continue
        p, ds = _tile_gradients(qs, ks, vs, dos, perm_q, perm_k, g, p0, p1, j0, j1, lse, delta, causal, offset,
                                scale)
        dvb = np.empty((j1 - j0, Dv), dtype=qs.dtype)
        dkb = np.empty((j1 - j0, D), dtype=qs.dtype)
        np.dot(p.T, dos[g, p0:p1], dvb)                                    # (Bk, Dv)
        np.dot(ds.T, qs[g, p0:p1], dkb)                                    # (Bk, D)
        for col in range(j1 - j0):
            j = perm_k[g, j0 + col]
            for d in range(D):
                dk[g, j, d] = dkb[col, d] * scale
            for d in range(Dv):
                dv[g, j, d] = dvb[col, d]


def _leaf_sizes(off, L):
    return off[:, 1:L + 1] - off[:, :L]                                     # (G, L)


def _tf_layout(q, k, mask, tree, height):
    """Leaves, stable leaf order and offsets of queries and keys."""
    L = 2**height
    w, b, tree_of_slice = _tree_arrays(tree, q.dtype)
    leaf_q = _route(q, w, b, tree_of_slice, as_kernel_mask(None), height)
    leaf_k = _route(k, w, b, tree_of_slice, as_kernel_mask(mask), height)
    perm_q, off_q = _sort_by_leaf(leaf_q, L)
    perm_k, off_k = _sort_by_leaf(leaf_k, L)
    return leaf_q, leaf_k, perm_q, off_q, perm_k, off_k


def _tf_forward(q, k, v, mask, offset, scale, tree, height):
    L = 2**height
    leaf_q, leaf_k, perm_q, off_q, perm_k, off_k = _tf_layout(q, k, mask, tree, height)
    a = _leaf_sizes(off_q, L)
    cell, block = _tasks(-(-a // TF_BLOCK_Q))
    G, Nq = leaf_q.shape
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((G, Nq), dtype=q.dtype)
    keys_per_row = np.empty((G, Nq), dtype=np.int64)
    with blas_single_thread():
        _tf_forward_kernel(_gather(q, perm_q), _gather(k, perm_k), _gather(v, perm_k), perm_q, perm_k, off_q, off_k,
                           cell, block, offset is not None, 0 if offset is None else int(offset),
                           q.dtype.type(scale), TF_BLOCK_Q, out, lse, keys_per_row)
    return out, {"leaf_q": leaf_q, "leaf_k": leaf_k, "lse": lse, "keys_per_row": keys_per_row}


def _tf_backward(dout, q, k, v, out, res, mask, offset, scale, tree, height):
    L = 2**height
    leaf_q, leaf_k = res["leaf_q"], res["leaf_k"]
    perm_q, off_q = _sort_by_leaf(leaf_q, L)
    perm_k, off_k = _sort_by_leaf(leaf_k, L)
    a, c = _leaf_sizes(off_q, L), _leaf_sizes(off_k, L)
    delta = np.einsum("gid,gid->gi", dout, out)                             # (G, Nq)
    qs, ks, vs, dos = _gather(q, perm_q), _gather(k, perm_k), _gather(v, perm_k), _gather(dout, perm_q)
    causal, off = offset is not None, 0 if offset is None else int(offset)
    s = q.dtype.type(scale)
    dq = np.empty_like(q)
    dk = np.zeros_like(k)                                                   # masked keys stay 0
    dv = np.zeros_like(v)
    q_cell, q_block = _tasks(-(-a // TF_BLOCK_Q))
    k_cell, k_block = _tasks(-(-c // TF_BLOCK_K))
    with blas_single_thread():
        _tf_backward_q_kernel(qs, ks, vs, dos, perm_q, perm_k, off_q, off_k, q_cell, q_block, res["lse"], delta,
                              causal, off, s, TF_BLOCK_Q, dq)
        _tf_backward_kv_kernel(qs, ks, vs, dos, perm_q, perm_k, off_q, off_k, k_cell, k_block, res["lse"], delta,
                               causal, off, s, TF_BLOCK_K, dk, dv)
    return dq, dk, dv


# --- TC -------------------------------------------------------------------------------------


@kernel
def _tc_leaf_sums_kernel(k, v, perm_k, off_k, node_k, node_v, counts):
    """Node ``I + l`` of slice ``g``: sums of the keys and values in leaf ``l``'s sorted range."""
    G, L = off_k.shape[0], off_k.shape[1] - 2
    internal = L - 1
    for cell in prange(G * L):
        g = cell // L
        leaf = cell - g * L
        m = internal + leaf
        for d in range(k.shape[2]):                                        # loops, not array expressions:
            node_k[g, m, d] = 0                                            # far cheaper to compile
        for d in range(v.shape[2]):
            node_v[g, m, d] = 0
        for p in range(off_k[g, leaf], off_k[g, leaf + 1]):
            j = perm_k[g, p]
            for d in range(k.shape[2]):
                node_k[g, m, d] += k[g, j, d]
            for d in range(v.shape[2]):
                node_v[g, m, d] += v[g, j, d]
        counts[g, m] = off_k[g, leaf + 1] - off_k[g, leaf]


@kernel
def _tc_bottom_up_kernel(node_k, node_v, counts):
    """``parent = left + right`` from the last internal node up to the root, per slice."""
    G = node_k.shape[0]
    internal = (node_k.shape[1] - 1) // 2
    for g in prange(G):
        for m in range(internal - 1, -1, -1):
            for d in range(node_k.shape[2]):
                node_k[g, m, d] = node_k[g, 2 * m + 1, d] + node_k[g, 2 * m + 2, d]
            for d in range(node_v.shape[2]):
                node_v[g, m, d] = node_v[g, 2 * m + 1, d] + node_v[g, 2 * m + 2, d]
            counts[g, m] = counts[g, 2 * m + 1] + counts[g, 2 * m + 2]


@serial
def _dot(a, b):
    """``a . b`` of two 1-D rows, accumulated in their dtype."""
    acc = a[0] * b[0]
    for d in range(1, a.shape[0]):
        acc += a[d] * b[d]
    return acc


@kernel
def _tc_forward_kernel(q, kbar, vbar, counts, leaf_q, height, scale, block_q, out, lse, path_len, alpha_root,
                       alpha_leaf):
    """Softmax of ``s q_i . kbar_m`` over the non-empty nodes ``m`` of query ``i``'s path."""
    G, Nq, D = q.shape
    Dv = vbar.shape[2]
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task - g * n_blocks) * block_q
        sc = np.empty(height + 1, dtype=q.dtype)                          # scores, then weights
        node = np.empty(height + 1, dtype=np.int64)
        for i in range(i0, min(Nq, i0 + block_q)):
            leaf = leaf_q[g, i]
            mu = -np.inf
            for t in range(height + 1):
                node[t] = (1 << t) - 1 + (leaf >> (height - t))
                sc[t] = scale * _dot(q[g, i], kbar[g, node[t]]) if counts[g, node[t]] > 0 else -np.inf
                mu = max(mu, sc[t])
            for d in range(Dv):
                out[g, i, d] = 0
            if mu == -np.inf:                                              # the slice has no kept key
                lse[g, i] = -np.inf
                path_len[g, i] = 0
                alpha_root[g, i] = 0
                alpha_leaf[g, i] = 0
                continue
            total = sc[0] * 0
            n = 0
            for t in range(height + 1):
                n += counts[g, node[t]] > 0
                sc[t] = np.exp(sc[t] - mu)                                 # 0 for empty nodes
                total += sc[t]
            for t in range(height + 1):
                weight = sc[t] / total
                for d in range(Dv):
                    out[g, i, d] += weight * vbar[g, node[t], d]
            lse[g, i] = mu + np.log(total)
            path_len[g, i] = n
            alpha_root[g, i] = sc[0] / total
            alpha_leaf[g, i] = sc[height] / total


def _tc_means(k, v, leaf_k, height):
    """Node means ``kbar``, ``vbar`` (G, 2L - 1, .) and counts (0 rows for empty nodes)."""
    G, L = k.shape[0], 2**height
    perm_k, off_k = _sort_by_leaf(leaf_k, L)
    node_k = np.empty((G, 2 * L - 1, k.shape[2]), dtype=k.dtype)
    node_v = np.empty((G, 2 * L - 1, v.shape[2]), dtype=k.dtype)
    counts = np.empty((G, 2 * L - 1), dtype=np.int64)
    _tc_leaf_sums_kernel(k, v, perm_k, off_k, node_k, node_v, counts)
    _tc_bottom_up_kernel(node_k, node_v, counts)
    per_node = np.maximum(counts, 1).astype(k.dtype)[..., None]             # (G, 2L-1, 1)
    return node_k / per_node, node_v / per_node, counts


def _tc_forward(q, k, v, mask, scale, tree, height):
    w, b, tree_of_slice = _tree_arrays(tree, q.dtype)
    leaf_q = _route(q, w, b, tree_of_slice, as_kernel_mask(None), height)
    leaf_k = _route(k, w, b, tree_of_slice, as_kernel_mask(mask), height)
    kbar, vbar, counts = _tc_means(k, v, leaf_k, height)
    G, Nq = leaf_q.shape
    out = np.empty((G, Nq, v.shape[2]), dtype=q.dtype)
    lse = np.empty((G, Nq), dtype=q.dtype)
    path_len = np.empty((G, Nq), dtype=np.int64)
    alpha_root = np.empty((G, Nq), dtype=q.dtype)
    alpha_leaf = np.empty((G, Nq), dtype=q.dtype)
    _tc_forward_kernel(q, kbar, vbar, counts, leaf_q, height, q.dtype.type(scale), TC_BLOCK_Q, out, lse, path_len,
                       alpha_root, alpha_leaf)
    res = {"leaf_q": leaf_q, "leaf_k": leaf_k, "lse": lse, "node_counts": counts, "path_len": path_len,
           "root_weight": alpha_root, "leaf_weight": alpha_leaf}
    return out, res


@kernel
def _tc_backward_q_kernel(q, dout, out, kbar, vbar, counts, leaf_q, lse, height, scale, block_q, dq, alpha, beta):
    """Per query: ``alpha_t = exp(s_t - lse)``, ``beta_t = alpha_t (dO . vbar - delta)``, ``dq = s sum beta kbar``."""
    G, Nq, D = q.shape
    n_blocks = (Nq + block_q - 1) // block_q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task - g * n_blocks) * block_q
        for i in range(i0, min(Nq, i0 + block_q)):
            leaf = leaf_q[g, i]
            delta = _dot(dout[g, i], out[g, i])
            dq[g, i, :] = 0
            for t in range(height + 1):
                m = (1 << t) - 1 + (leaf >> (height - t))
                if counts[g, m] == 0 or lse[g, i] == -np.inf:
                    alpha[g, i, t] = 0
                    beta[g, i, t] = 0
                    continue
                a = np.exp(scale * _dot(q[g, i], kbar[g, m]) - lse[g, i])
                alpha[g, i, t] = a
                beta[g, i, t] = a * (_dot(dout[g, i], vbar[g, m]) - delta)
                for d in range(D):
                    dq[g, i, d] += scale * beta[g, i, t] * kbar[g, m, d]


@kernel
def _tc_node_grads_kernel(q, dout, alpha, beta, perm_q, off_q, counts, height, scale, dkbar, dvbar):
    """``dkbar_m = s sum beta_{i,t(m)} q_i / N_m`` over node ``m``'s contiguous query range; ``dvbar`` likewise."""
    G, num_nodes = counts.shape
    for task in prange(G * num_nodes):
        g = task // num_nodes
        m = task - g * num_nodes
        t = 0
        while (1 << (t + 1)) - 1 <= m:
            t += 1
        first_leaf = (m - ((1 << t) - 1)) << (height - t)
        last_leaf = first_leaf + (1 << (height - t))
        dkbar[g, m, :] = 0
        dvbar[g, m, :] = 0
        if counts[g, m] == 0:
            continue
        for p in range(off_q[g, first_leaf], off_q[g, last_leaf]):
            i = perm_q[g, p]
            for d in range(q.shape[2]):
                dkbar[g, m, d] += beta[g, i, t] * q[g, i, d]
            for d in range(dout.shape[2]):
                dvbar[g, m, d] += alpha[g, i, t] * dout[g, i, d]
        for d in range(q.shape[2]):
            dkbar[g, m, d] *= scale / counts[g, m]
        for d in range(dout.shape[2]):
            dvbar[g, m, d] /= counts[g, m]


@kernel
def _tc_key_grads_kernel(leaf_k, dkbar, dvbar, height, dk, dv):
    """``dk_j = sum_t dkbar_{m_t(j)}`` (already divided by ``N_m``) along each kept key's path; 0 if masked."""
    G, Nk = leaf_k.shape
    for p in prange(G * Nk):
        g = p // Nk
        j = p - g * Nk
        dk[g, j, :] = 0
        dv[g, j, :] = 0
        leaf = leaf_k[g, j]
        if leaf < 0:
            continue
        for t in range(height + 1):
            m = (1 << t) - 1 + (leaf >> (height - t))
            for d in range(dk.shape[2]):
                dk[g, j, d] += dkbar[g, m, d]
            for d in range(dv.shape[2]):
                dv[g, j, d] += dvbar[g, m, d]


def _tc_backward(dout, q, k, v, out, res, scale, height):
    L = 2**height
    leaf_q, leaf_k = res["leaf_q"], res["leaf_k"]
    kbar, vbar, counts = _tc_means(k, v, leaf_k, height)
    G, Nq = leaf_q.shape
    s = q.dtype.type(scale)
    dq = np.empty_like(q)
    alpha = np.empty((G, Nq, height + 1), dtype=q.dtype)
    beta = np.empty((G, Nq, height + 1), dtype=q.dtype)
    _tc_backward_q_kernel(q, dout, out, kbar, vbar, counts, leaf_q, res["lse"], height, s, TC_BLOCK_Q, dq, alpha,
                          beta)
    perm_q, off_q = _sort_by_leaf(leaf_q, L)
    dkbar = np.empty_like(kbar)
    dvbar = np.empty_like(vbar)
    _tc_node_grads_kernel(q, dout, alpha, beta, perm_q, off_q, counts, height, s, dkbar, dvbar)
    dk, dv = np.empty_like(k), np.empty_like(v)
    _tc_key_grads_kernel(leaf_k, dkbar, dvbar, height, dk, dv)
    return dq, dk, dv


# --- entry points ---------------------------------------------------------------------------


def forward(q, k, v, *, mask, offset, scale, variant, height, tree, **params):
    """Route, sort by leaf, then the TF or TC kernels; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    if variant == "tf":
        out, res = _tf_forward(q, k, v, mask, offset, scale, tree, height)
    else:
        out, res = _tc_forward(q, k, v, mask, scale, tree, height)
    return out, _common.finish_res(np, res, variant=variant, tree=tree, height=height, D=q.shape[2], Dv=v.shape[2])


def backward(dout, q, k, v, out, res, *, mask, offset, scale, variant, height, tree, **params):
    """Pullback with the routing frozen (the forward's leaves)."""
    q, k, v, dout = contiguous(q, k, v, dout)
    if variant == "tf":
        return _tf_backward(dout, q, k, v, out, res, mask, offset, scale, tree, height)
    return _tc_backward(dout, q, k, v, out, res, scale, height)
