"""Sparsefinder on the GPU: count, scan, fill, then entmax's row kernel on the segments.

Matches :func:`eff_attn.methods.sparsefinder.reference.sparsefinder_reference`
without an (Nq, Nk) array; only the state crosses from the host.

Steps
    (1)-(2) array-level on ``xp`` (:func:`eff_attn.methods.sparsefinder.graph.predictor_plan`):
    projections by matmul, cluster ids by ``||mu||**2 - 2 x . mu`` and a stable
    sort, buckets by a stable (value, index) sort, and each group's key
    list (CSR) by a counting sort.
    (3) Duplicate-free candidate rows by the *first-owner rule*: a pair comes
    from the window/global source if it lies there, else only from the first
    of the query's groups that the key shares (a check over the key's own
    labels, no marker). ``_count_kernel`` (a thread per query) counts,
    ``cumsum`` gives the row offsets, ``_fill_kernel`` writes the key
    indices and their gathered scores ``s q_i . k_j``.
    (4) entmax's :func:`eff_attn._entmax_cupy.row_threshold_kernel`
    turns each row segment into weights in place (bisection, polished to
    the sort result at alpha = 1.5 and 2), and ``_output_kernel`` (a thread
    per output entry) sums ``p v`` over the segment.

Memory ``O(E + (Nq + Nk)(r + R t))``. Forward only. Runs on CuPy arrays on a
GPU and on NumPy arrays under the CUDA simulator.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ..._cuda import threads_per_block, to_xp, xp_of
from ..._entmax import DEFAULT_N_ITER, resolve_algorithm
from ..._entmax_cupy import forward as entmax_forward
from ..._entmax_cupy import run_row_threshold
from .graph import (
    COSINE,
    GRAPH,
    GROUPS,
    ORACLE,
    SQEUCLIDEAN,
    labels_from_groups,
    position_offset,
    predictor_code,
    predictor_plan,
)

__all__ = ["forward"]


@cuda.jit(device=True)
def _kept(keep, has_mask, g, j):
    return (not has_mask) or keep[g, j]


@cuda.jit(device=True)
def _in_window_or_global(j, p, window, global_tokens):
    return p < global_tokens or j < global_tokens or (window >= 0 and abs(j - p) <= window)


@cuda.jit(device=True)
def _shares_earlier_group(q_labels, k_labels, g, i, a, j):
    """True if key ``j`` shares one of the query's groups ``0..a-1`` (first-owner rule)."""
    for b in range(a):
        for c in range(k_labels.shape[2]):
            if k_labels[g, j, c] == q_labels[g, i, b]:
                return True
    return False


@cuda.jit(device=True)
def _score(q, k, g, i, j, scale):
    total = 0.0
    for d in range(q.shape[2]):
        total += q[g, i, d] * k[g, j, d]
    return total * scale


@cuda.jit(device=True)
def _distance(q_proj, k_proj, q_norm, k_norm, g, i, j, mode):
    if mode == SQEUCLIDEAN:
        total = 0.0
        for c in range(q_proj.shape[2]):
            diff = q_proj[g, i, c] - k_proj[g, j, c]
            total = total + diff * diff
        return total
    dot = 0.0
    for c in range(q_proj.shape[2]):
        dot = dot + q_proj[g, i, c] * k_proj[g, j, c]
    denom = q_norm[g, i] * k_norm[g, j]
    return 1.0 - (dot / denom if denom > 0 else 0.0)


@cuda.jit(device=True)
def _emit(write, cols, vals, at, j, q, k, g, i, scale):
    if write:
        cols[at] = j
        vals[at] = _score(q, k, g, i, j, scale)


@cuda.jit(device=True)
def _row_pairs(q, k, keep, has_mask, causal, offset, pos_offset, scale, alpha, mode, window, global_tokens,
               q_labels, k_labels, members, offsets, q_proj, k_proj, q_norm, k_norm, threshold, graph, dense_z_max,
               dense_tau, g, i, write, cols, vals, start):
    """Enumerate row ``i``'s predicted keys, each once; write them at ``start`` if ``write``. Returns the count."""
    Nk = k.shape[1]
    end = Nk if not causal else min(Nk, max(0, i + offset + 1))
    p = i + pos_offset
    n = 0
    if mode == GRAPH:
        for j in range(end):
            if graph[g, i, j] and _kept(keep, has_mask, g, j):
                _emit(write, cols, vals, start + n, j, q, k, g, i, scale)
                n += 1
        return n
    first_window = max(global_tokens, p - window) if window >= 0 else end
    last_window = min(end, p + window + 1) if window >= 0 else end
    if p < global_tokens:                                                  # a global query sees every key
        first_window, last_window = global_tokens, end
    for j in range(min(global_tokens, end)):                               # global keys, then the window
        if _kept(keep, has_mask, g, j):
            _emit(write, cols, vals, start + n, j, q, k, g, i, scale)
            n += 1
    for j in range(max(0, first_window), last_window):
        if _kept(keep, has_mask, g, j):
            _emit(write, cols, vals, start + n, j, q, k, g, i, scale)
            n += 1
    if mode == GROUPS:
        for a in range(q_labels.shape[2]):
            label = q_labels[g, i, a]
            for e in range(offsets[g, label], offsets[g, label + 1]):
                j = members[g, e]
                if j >= end:                                               # lists are sorted by key
                    break
                if _in_window_or_global(j, p, window, global_tokens) or _shares_earlier_group(
                        q_labels, k_labels, g, i, a, j):
                    continue
                _emit(write, cols, vals, start + n, j, q, k, g, i, scale)
                n += 1
    elif mode == SQEUCLIDEAN or mode == COSINE or mode == ORACLE:
        if mode == ORACLE and dense_tau[g, i] == math.inf:
            return n
        for j in range(end):
            if not _kept(keep, has_mask, g, j) or _in_window_or_global(j, p, window, global_tokens):
                continue
            if mode == ORACLE:
                hit = (alpha - 1.0) * (_score(q, k, g, i, j, scale) - dense_z_max[g, i]) > dense_tau[g, i]
            else:
                hit = _distance(q_proj, k_proj, q_norm, k_norm, g, i, j, mode) <= threshold[g]
            if hit:
                _emit(write, cols, vals, start + n, j, q, k, g, i, scale)
                n += 1
    return n


@cuda.jit
def _count_kernel(q, k, keep, has_mask, causal, offset, pos_offset, scale, alpha, mode, window, global_tokens,
                  q_labels, k_labels, members, offsets, q_proj, k_proj, q_norm, k_norm, threshold, graph,
                  dense_z_max, dense_tau, counts, cols, vals):
    row = cuda.grid(1)
    G, Nq = q.shape[0], q.shape[1]
    if row < G * Nq:
        counts[row] = _row_pairs(q, k, keep, has_mask, causal, offset, pos_offset, scale, alpha, mode, window,
                                 global_tokens, q_labels, k_labels, members, offsets, q_proj, k_proj, q_norm, k_norm,
                                 threshold, graph, dense_z_max, dense_tau, row // Nq, row % Nq, False, cols, vals, 0)


@cuda.jit
def _fill_kernel(q, k, keep, has_mask, causal, offset, pos_offset, scale, alpha, mode, window, global_tokens,
                 q_labels, k_labels, members, offsets, q_proj, k_proj, q_norm, k_norm, threshold, graph,
                 dense_z_max, dense_tau, row_start, cols, vals):
    row = cuda.grid(1)
    G, Nq = q.shape[0], q.shape[1]
    if row < G * Nq:
        _row_pairs(q, k, keep, has_mask, causal, offset, pos_offset, scale, alpha, mode, window, global_tokens,
                   q_labels, k_labels, members, offsets, q_proj, k_proj, q_norm, k_norm, threshold, graph,
                   dense_z_max, dense_tau, row // Nq, row % Nq, True, cols, vals, row_start[row])


@cuda.jit
def _output_kernel(p, cols, row_start, v, Nq, out):
    """``out[row, d] = sum_e p[e] v[g, cols[e], d]`` over the row's segment (a thread per entry)."""
    t = cuda.grid(1)
    Dv = v.shape[2]
    if t < out.shape[0] * Dv:
        row, d = t // Dv, t % Dv
        g = row // Nq
        total = 0.0
        for e in range(row_start[row], row_start[row + 1]):
            total += p[e] * v[g, cols[e], d]
        out[row, d] = total


@cuda.jit
def _gold_hits_kernel(scores, row_start, alpha, Nq, dense_z_max, dense_tau, hits):
    """Predicted pairs of each row that lie in the dense entmax support."""
    row = cuda.grid(1)
    if row < hits.shape[0]:
        g, i = row // Nq, row % Nq
        n = 0
        for e in range(row_start[row], row_start[row + 1]):
            if (alpha - 1.0) * (scores[e] - dense_z_max[g, i]) > dense_tau[g, i]:
                n += 1
        hits[row] = n


def _launch(kernel, n, *args):
    """One thread per item."""
    if n == 0:
        return
    threads = threads_per_block()
    kernel[(n + threads - 1) // threads, threads](*args)


def _or_placeholder(xp, a, ndim, dtype):
    """``a`` contiguous on the device, or a one-element stand-in of the right rank for an unused argument.

    Under the simulator, read-only host arrays (broadcast views) are copied:
    it writes every argument back after a launch.
    """
    if a is None:
        return xp.zeros((1,) * ndim, dtype=dtype)
    a = xp.ascontiguousarray(to_xp(xp, a, dtype))
    return a.copy() if isinstance(a, np.ndarray) and not a.flags.writeable else a


def forward(q, k, v, *, mask, offset, scale, **params):
    """Count, scan, fill, row threshold, output; see the module docstring."""
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    alpha, heads, graph = params["alpha"], params.get("heads"), params.get("graph")
    predictor, metric = params["predictor"], params["metric"]
    plan = predictor_plan(q, k, mask, predictor=predictor, heads=heads, top_clusters=params["top_clusters"],
                          bucket_size=params["bucket_size"], metric=metric, xp=xp)
    k_labels = None
    if plan["key_groups"] is not None:
        space = heads.centroids.shape[2] if predictor == "kmeans" else int(max(plan["query_groups"].max(),
                                                                                plan["key_groups"].max())) + 1
        _, k_labels, _ = labels_from_groups(plan["query_groups"], plan["key_groups"], space, xp)
    dense = None
    if predictor == "oracle" or params["compute_recall"]:
        dense_out, dense = entmax_forward(q, k, v, mask=mask, offset=offset, scale=scale, alpha=alpha,
                                          algorithm=resolve_algorithm(alpha, "auto"), n_iter=DEFAULT_N_ITER)
    window = params["window"]
    q, k, v = (_or_placeholder(xp, a, 3, a.dtype) for a in (q, k, v))
    args = (
        q, k, _or_placeholder(xp, mask, 2, np.bool_), mask is not None, offset is not None,
        0 if offset is None else int(offset), position_offset(offset, Nq, Nk), float(scale), float(alpha),
        predictor_code(predictor, metric, graph), -1 if window is None else int(window),
        int(params["global_tokens"]),
        _or_placeholder(xp, plan["q_labels"], 3, np.int64), _or_placeholder(xp, k_labels, 3, np.int64),
        _or_placeholder(xp, plan["members"], 2, np.int64), _or_placeholder(xp, plan["offsets"], 2, np.int64),
        _or_placeholder(xp, plan["q_proj"], 3, np.float64), _or_placeholder(xp, plan["k_proj"], 3, np.float64),
        _or_placeholder(xp, plan["q_norm"], 2, np.float64), _or_placeholder(xp, plan["k_norm"], 2, np.float64),
        _or_placeholder(xp, None if heads is None else heads.threshold, 1, np.float64),
        _or_placeholder(xp, graph, 3, np.bool_),
        _or_placeholder(xp, None if dense is None else dense["z_max"], 2, np.float64),
        _or_placeholder(xp, None if dense is None else dense["tau_shifted"], 2, np.float64),
    )
    rows = G * Nq
    counts = xp.zeros(rows, dtype=np.int64)
    _launch(_count_kernel, rows, *args, counts, xp.zeros(1, dtype=np.int64), xp.zeros(1, dtype=q.dtype))
    row_start = xp.zeros(rows + 1, dtype=np.int64)
    row_start[1:] = xp.cumsum(counts)
    E = int(row_start[-1])
    cols = xp.zeros(max(E, 1), dtype=np.int64)
    vals = xp.zeros(max(E, 1), dtype=q.dtype)
    _launch(_fill_kernel, rows, *args, row_start, cols, vals)
    scores = vals.copy() if params["compute_recall"] else None
    alphas = to_xp(xp, np.full(G, float(alpha)))
    weights = run_row_threshold(xp, vals, row_start[:-1], counts, alphas, Nq, use_sort=alpha in (1.5, 2.0),
                                n_iter=DEFAULT_N_ITER, ensure_sum_one=True)
    out = xp.zeros((rows, Dv), dtype=q.dtype)
    _launch(_output_kernel, rows * Dv, vals, cols, row_start, v, Nq, out)
    out = out.reshape(G, Nq, Dv)
    res = {"support_size": weights["support"].reshape(G, Nq), "keys_per_query": counts.reshape(G, Nq),
           "query_groups": plan["query_groups"], "key_groups": plan["key_groups"]}
    if params["compute_recall"]:
        hits = xp.zeros(rows, dtype=np.int64)
        _launch(_gold_hits_kernel, rows, scores, row_start, float(alpha), Nq, dense["z_max"], dense["tau_shifted"],
                hits)
        res.update(gold_hits=hits.reshape(G, Nq), gold_support=dense["support_size"], out_dense=dense_out)
    return out, res                                                          # completed by sparsefinder.finish
