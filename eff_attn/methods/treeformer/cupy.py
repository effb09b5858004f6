"""Treeformer on the GPU: batched GEMMs over packed leaves, numba.cuda segment sums.

Matches :mod:`eff_attn.methods.treeformer.reference`. Written against the
array namespace ``xp`` (CuPy on a GPU, NumPy when emulated).

Layout
    Routing is a gather of each point's node split from the contiguous
    (T * I, D) tree plus one ``einsum`` per depth (the tree is never copied
    per slice). Each slice's queries and keys are sorted by leaf with the
    shared stable key sort (``eff_attn._hashing``), so every node's points are
    a contiguous range of the sorted order.

TF
    The (slice, leaf) cells are grouped into size classes
    ``(ceil_pow2(a_l), ceil_pow2(c_l))``; one host sync reads the leaf sizes
    that decide these shapes. Each class is packed into zero-padded
    ``(n, A, D)`` query and ``(n, C, D)`` key blocks, and runs as one batched
    GEMM, the shared masked softmax and one more GEMM; results go back by
    assignment to unique rows (padding rows land in a spare row that is
    dropped). Padding wastes at most 4x (``info["pair_efficiency"]``).

TC
    ``_segment_sums`` (numba.cuda, one thread block per (slice, segment),
    threads over features, a fixed loop over the segment's sorted range)
    gives the leaf sums; ``parent = left + right`` level by level; each query
    gathers its ``h + 1`` path means. The backward sums ``beta q`` and
    ``alpha dO`` over each node's query range with the same kernel, and
    gathers ``dk``, ``dv`` along each key's path. No ``scatter_add`` and no
    atomics, so the results are deterministic.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from ..._array import to_host
from ..._cuda import launch_rows, to_xp, xp_of
from ..._hashing import segment_offsets, stable_key_argsort
from ..._softmax import softmax_attend, softmax_attend_backward
from . import _common

__all__ = ["forward", "backward"]


# --- routing, sorting, segment sums -----------------------------------------------------------


def _route(xp, x, w, b, tree_of_slice, height, keep=None):
    """Leaves (G, N) by the heap walk; ``w`` (T, I, D), ``b`` (T, I) on the device."""
    G, N, D = x.shape
    internal = 2**height - 1
    flat_w, flat_b = w.reshape(-1, D), b.reshape(-1)                        # (T*I, D), (T*I,)
    base = (tree_of_slice * internal)[:, None]                              # (G, 1) first row of g's tree
    node = xp.zeros((G, N), dtype=np.int64)                                 # (G, N)
    for _ in range(height):
        rows = base + node                                                  # (G, N)
        z = xp.einsum("gnd,gnd->gn", x, flat_w[rows]) + flat_b[rows]        # (G, N)
        node = 2 * node + 1 + (z < 0)                                       # (G, N); ties go left
    leaf = node - internal
    return leaf if keep is None else xp.where(keep, leaf, -1)


def _sort_by_leaf(xp, leaf, num_leaves):
    """Stable permutation by leaf (masked last) and CSR offsets (G, L + 2)."""
    key = xp.where(leaf >= 0, leaf, num_leaves)                             # (G, N)
    perm = stable_key_argsort(key, xp)                                      # (G, N)
    return perm, segment_offsets(xp.take_along_axis(key, perm, axis=-1), num_leaves + 1, xp)


@cuda.jit
def _segment_sums(x, perm, weights, has_weights, starts, ends, cols, out):
    """``out[g, s] = sum_{p in [starts[g, s], ends[g, s])} w[g, perm[g, p], cols[s]] x[g, perm[g, p]]``.

    One thread block per (slice, segment), threads over the features; the
    loop runs over the segment in sorted order, so the sum is deterministic.
    ``w`` is 1 when ``has_weights`` is False.
    """
    S = out.shape[1]
    g = cuda.blockIdx.x // S
    s = cuda.blockIdx.x - g * S
    col = cols[s]
    for d in range(cuda.threadIdx.x, x.shape[2], cuda.blockDim.x):
        acc = 0.0
        for p in range(starts[g, s], ends[g, s]):
            i = perm[g, p]
            if has_weights:
                acc += weights[g, i, col] * x[g, i, d]
            else:
                acc += x[g, i, d]
        out[g, s, d] = acc


def _segment_sum(xp, x, perm, starts, ends, weights=None, cols=None):
    """(G, S, Dx) sums of ``x`` rows over sorted ranges; see :func:`_segment_sums`."""
    G, S = starts.shape
    out = xp.empty((G, S, x.shape[2]), dtype=x.dtype)
    has_weights = weights is not None
    if not has_weights:
        weights = xp.zeros((1, 1, 1), dtype=x.dtype)
        cols = xp.zeros(S, dtype=np.int64)
    launch_rows(_segment_sums, G * S, x, perm, weights, has_weights, xp.ascontiguousarray(starts),
                xp.ascontiguousarray(ends), cols, out)
    return out


def _path_nodes(xp, leaf, height):
    """(G, N, h + 1) heap indices of each point's path; leaf -1 maps to the root (callers mask it)."""
    depth = xp.arange(height + 1)                                           # (h+1,)
    return (2**depth - 1) + (xp.maximum(leaf, 0)[..., None] >> (height - depth))


def _tree(xp, tree, dtype):
    w, b = tree.state.flat()
    return to_xp(xp, w, dtype), to_xp(xp, b, dtype), to_xp(xp, tree.tree_of_slice)


# --- TF: size classes ------------------------------------------------------------------------


def _ceil_pow2(n):
    """Smallest power of two >= n, elementwise (host int arrays, n >= 1)."""
    p = np.ones_like(n)
    while (p < n).any():
        p = np.where(p < n, 2 * p, p)
    return p


def _size_classes(a, c):
    """Cells (g * L + l) with queries and keys, grouped by padded shape: ``[(A, C, cells), ...]``."""
    a, c = a.ravel(), c.ravel()
    cells = np.flatnonzero((a > 0) & (c > 0))
    A, C = _ceil_pow2(a[cells]), _ceil_pow2(c[cells])
    classes = []
    for Acap, Ccap in sorted(set(zip(A.tolist(), C.tolist()))):
        classes.append((Acap, Ccap, cells[(A == Acap) & (C == Ccap)]))
    return classes


def _slots(xp, perm, off, sizes, g, leaf, cap):
    """Original indices (n, cap) of each cell's sorted points, padded by repeating the first; and the valid mask."""
    start = off[g, leaf]                                                    # (n,)
    size = sizes[g, leaf]                                                   # (n,)
    r = xp.arange(cap)                                                      # (cap,)
    valid = r[None, :] < size[:, None]                                      # (n, cap)
    pos = start[:, None] + xp.where(valid, r[None, :], 0)                   # (n, cap)
    return perm[g[:, None], pos], valid


class _Packing:
    """The TF size classes of one call, with each class's gather indices on the device."""

    def __init__(self, xp, leaf_q, leaf_k, num_leaves):
        L = num_leaves
        perm_q, off_q = _sort_by_leaf(xp, leaf_q, L)
        perm_k, off_k = _sort_by_leaf(xp, leaf_k, L)
        a = off_q[:, 1:L + 1] - off_q[:, :L]                                # (G, L)
        c = off_k[:, 1:L + 1] - off_k[:, :L]                                # (G, L)
        a_host, c_host = to_host(a), to_host(c)                             # the one host sync
        self.classes = []
        real = padded = 0
        for Acap, Ccap, cells in _size_classes(a_host, c_host):
            g, leaf = to_xp(xp, cells // L), to_xp(xp, cells % L)
            rows, row_ok = _slots(xp, perm_q, off_q, a, g, leaf, Acap)      # (n, A)
            cols, col_ok = _slots(xp, perm_k, off_k, c, g, leaf, Ccap)      # (n, C)
            self.classes.append((g[:, None], rows, row_ok, cols, col_ok))
            real += int((a_host.ravel()[cells] * c_host.ravel()[cells]).sum())
            padded += len(cells) * Acap * Ccap
        self.pair_efficiency = real / padded if padded else 1.0


def _visible(rows, row_ok, cols, col_ok, offset):
    visible = row_ok[:, :, None] & col_ok[:, None, :]                       # (n, A, C)
    if offset is not None:
        visible = visible & (cols[:, None, :] <= rows[:, :, None] + offset)
    return visible


def _pack(xp, x, g, index, ok):
    return xp.where(ok[..., None], x[g, index], 0)                          # (n, cap, Dx)


def _tf_forward(xp, q, k, v, mask, offset, scale, tree, height):
    G, Nq, _ = q.shape
    w, b, tree_of_slice = _tree(xp, tree, q.dtype)
    leaf_q = _route(xp, q, w, b, tree_of_slice, height)
    leaf_k = _route(xp, k, w, b, tree_of_slice, height, keep=mask)
    packing = _Packing(xp, leaf_q, leaf_k, 2**height)
    out = xp.zeros((G, Nq + 1, v.shape[2]), dtype=q.dtype)                  # row Nq takes the padding
    lse = xp.full((G, Nq + 1), -xp.inf, dtype=q.dtype)
    keys_per_row = xp.zeros((G, Nq + 1), dtype=np.int64)
    for g, rows, row_ok, cols, col_ok in packing.classes:
        visible = _visible(rows, row_ok, cols, col_ok, offset)             # (n, A, C)
        Qp, Kp, Vp = _pack(xp, q, g, rows, row_ok), _pack(xp, k, g, cols, col_ok), _pack(xp, v, g, cols, col_ok)
        scores = q.dtype.type(scale) * xp.matmul(Qp, xp.swapaxes(Kp, -1, -2))  # (n, A, C)
        O, lse_p, _ = softmax_attend(scores, visible, Vp, xp)               # (n, A, Dv), (n, A)
        dest = xp.where(row_ok, rows, Nq)                                   # (n, A)
        out[g, dest] = O
        lse[g, dest] = lse_p
        keys_per_row[g, dest] = visible.sum(axis=-1)
    res = {"leaf_q": leaf_q, "leaf_k": leaf_k, "lse": lse[:, :Nq], "keys_per_row": keys_per_row[:, :Nq],
           "pair_efficiency": packing.pair_efficiency}
    return xp.ascontiguousarray(out[:, :Nq]), res


def _tf_backward(xp, dout, q, k, v, out, res, offset, scale, height):
    G, Nq, D = q.shape
    Nk = k.shape[1]
    packing = _Packing(xp, res["leaf_q"], res["leaf_k"], 2**height)
    s = q.dtype.type(scale)
    lse = res["lse"]
    dq = xp.zeros((G, Nq + 1, D), dtype=q.dtype)                            # spare rows take the padding
    dk = xp.zeros((G, Nk + 1, D), dtype=q.dtype)
    dv = xp.zeros((G, Nk + 1, v.shape[2]), dtype=q.dtype)
    for g, rows, row_ok, cols, col_ok in packing.classes:
        visible = _visible(rows, row_ok, cols, col_ok, offset)             # (n, A, C)
        Qp, Kp, Vp = _pack(xp, q, g, rows, row_ok), _pack(xp, k, g, cols, col_ok), _pack(xp, v, g, cols, col_ok)
        dOp, Op = _pack(xp, dout, g, rows, row_ok), _pack(xp, out, g, rows, row_ok)   # (n, A, Dv)
        L = lse[g, rows]                                                    # (n, A)
        seen = xp.isfinite(L)[..., None] & visible                          # (n, A, C)
        scores = s * xp.matmul(Qp, xp.swapaxes(Kp, -1, -2))                 # (n, A, C)
        P = xp.where(seen, xp.exp(scores - xp.where(xp.isfinite(L), L, 0)[..., None]), 0)  # (n, A, C)
        dS, dVp = softmax_attend_backward(dOp, Op, P, Vp, xp)               # (n, A, C), (n, C, Dv)
        dq[g, xp.where(row_ok, rows, Nq)] = s * xp.matmul(dS, Kp)
        dest = xp.where(col_ok, cols, Nk)                                   # (n, C)
        dk[g, dest] = s * xp.matmul(xp.swapaxes(dS, -1, -2), Qp)
        dv[g, dest] = dVp
    return (xp.ascontiguousarray(dq[:, :Nq]), xp.ascontiguousarray(dk[:, :Nk]), xp.ascontiguousarray(dv[:, :Nk]))


# --- TC -----------------------------------------------------------------------------------------


def _tc_means(xp, k, v, leaf_k, height):
    """Node means ``kbar`` (G, 2L-1, D), ``vbar`` (G, 2L-1, Dv) and counts (G, 2L-1)."""
    L, D = 2**height, k.shape[2]
    perm_k, off_k = _sort_by_leaf(xp, leaf_k, L)
    sums = _segment_sum(xp, xp.concatenate([k, v], axis=-1), perm_k, off_k[:, :L], off_k[:, 1:L + 1])  # (G, L, D+Dv)
    counts = off_k[:, 1:L + 1] - off_k[:, :L]                               # (G, L)
    levels, level_counts = [sums], [counts]
    for _ in range(height):                                                 # parent = left + right
        levels.insert(0, levels[0][:, 0::2] + levels[0][:, 1::2])
        level_counts.insert(0, level_counts[0][:, 0::2] + level_counts[0][:, 1::2])
    sums = xp.concatenate(levels, axis=1)                                   # (G, 2L-1, D+Dv) heap order
    counts = xp.concatenate(level_counts, axis=1)                           # (G, 2L-1)
    means = sums / xp.maximum(counts, 1).astype(k.dtype)[..., None]
    return means[..., :D], means[..., D:], counts


def _tc_paths(xp, q, kbar, vbar, counts, leaf_q, height, scale):
    """Each query's path: node means (G, Nq, h+1, .), the non-empty mask and the scores."""
    G = q.shape[0]
    path = _path_nodes(xp, leaf_q, height)                                  # (G, Nq, h+1)
    g = xp.arange(G)[:, None, None]
    Kp, Vp = kbar[g, path], vbar[g, path]                                   # (G, Nq, h+1, D), (G, Nq, h+1, Dv)
    ok = counts[g, path] > 0                                                # (G, Nq, h+1)
    scores = q.dtype.type(scale) * xp.einsum("gid,gitd->git", q, Kp)        # (G, Nq, h+1)
    return Kp, Vp, ok, scores


def _tc_forward(xp, q, k, v, mask, scale, tree, height):
    w, b, tree_of_slice = _tree(xp, tree, q.dtype)
    leaf_q = _route(xp, q, w, b, tree_of_slice, height)
    leaf_k = _route(xp, k, w, b, tree_of_slice, height, keep=mask)
    kbar, vbar, counts = _tc_means(xp, k, v, leaf_k, height)
    _, Vp, ok, scores = _tc_paths(xp, q, kbar, vbar, counts, leaf_q, height, scale)
    out, lse, alpha = softmax_attend(scores[..., None, :], ok[..., None, :], Vp, xp)  # (G, Nq, 1, .)
    alpha = alpha[..., 0, :]                                                # (G, Nq, h+1)
    res = {"leaf_q": leaf_q, "leaf_k": leaf_k, "lse": lse[..., 0], "node_counts": counts.astype(np.int64),
           "path_len": ok.sum(axis=-1), "root_weight": alpha[..., 0], "leaf_weight": alpha[..., -1]}
    return xp.ascontiguousarray(out[..., 0, :]), res


def _tc_backward(xp, dout, q, k, v, out, res, scale, height):
    L = 2**height
    leaf_q, leaf_k = res["leaf_q"], res["leaf_k"]
    kbar, vbar, counts = _tc_means(xp, k, v, leaf_k, height)
    Kp, Vp, ok, scores = _tc_paths(xp, q, kbar, vbar, counts, leaf_q, height, scale)
    lse = res["lse"][..., None]                                             # (G, Nq, 1)
    seen = ok & xp.isfinite(lse)                                            # (G, Nq, h+1)
    alpha = xp.where(seen, xp.exp(scores - xp.where(xp.isfinite(lse), lse, 0)), 0)  # (G, Nq, h+1)
    beta, _ = softmax_attend_backward(dout[..., None, :], out[..., None, :], alpha[..., None, :], Vp, xp)
    beta = beta[..., 0, :]                                                  # (G, Nq, h+1)
    s = q.dtype.type(scale)
    dq = s * xp.einsum("git,gitd->gid", beta, Kp)                           # (G, Nq, D)
    # Node m at depth t covers leaves [l0, l1): a contiguous range of the leaf-sorted queries.
    depth = np.repeat(np.arange(height + 1), 2 ** np.arange(height + 1))    # (2L-1,) host
    first = (np.arange(2 * L - 1) - (2**depth - 1)) << (height - depth)
    last = first + 2 ** (height - depth)
    perm_q, off_q = _sort_by_leaf(xp, leaf_q, L)
    starts, ends = off_q[:, to_xp(xp, first)], off_q[:, to_xp(xp, last)]   # (G, 2L-1)
    cols = to_xp(xp, depth)
    per_node = xp.maximum(counts, 1).astype(q.dtype)[..., None]             # (G, 2L-1, 1)
    dkbar = s * _segment_sum(xp, q, perm_q, starts, ends, beta, cols) / per_node     # (G, 2L-1, D)
    dvbar = _segment_sum(xp, dout, perm_q, starts, ends, alpha, cols) / per_node     # (G, 2L-1, Dv)
    path_k = _path_nodes(xp, leaf_k, height)                                # (G, Nk, h+1)
    g = xp.arange(q.shape[0])[:, None, None]
    kept = (leaf_k >= 0)[..., None]                                         # (G, Nk, 1)
    dk = xp.where(kept, dkbar[g, path_k].sum(axis=2), 0)                    # (G, Nk, D)
    dv = xp.where(kept, dvbar[g, path_k].sum(axis=2), 0)                    # (G, Nk, Dv)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


# --- entry points ---------------------------------------------------------------------------


def forward(q, k, v, *, mask, offset, scale, variant, height, tree, **params):
    """Route, sort by leaf, then packed TF or segment-summed TC; see the module docstring."""
    xp = xp_of(q)
    if variant == "tf":
        out, res = _tf_forward(xp, q, k, v, mask, offset, scale, tree, height)
    else:
        out, res = _tc_forward(xp, q, k, v, mask, scale, tree, height)
    return out, _common.finish_res(xp, res, variant=variant, tree=tree, height=height, D=q.shape[2], Dv=v.shape[2])


def backward(dout, q, k, v, out, res, *, mask, offset, scale, variant, height, tree, **params):
    """Pullback with the routing frozen (the forward's leaves)."""
    xp = xp_of(q)
    if variant == "tf":
        return _tf_backward(xp, dout, q, k, v, out, res, offset, scale, height)
    return _tc_backward(xp, dout, q, k, v, out, res, scale, height)
