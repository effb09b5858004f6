"""Sparsefinder on the CPU: per-row candidate lists, gathered scores, entmax on the list.

Matches :func:`eff_attn.methods.sparsefinder.reference.sparsefinder_reference`
without ever forming an (Nq, Nk) array.

Steps
    (1)-(2) on the host, vectorised and shared with the reference
    (:func:`eff_attn.methods.sparsefinder.graph.predictor_plan`):
    projections, cluster or bucket labels, and one CSR key list per group.
    (3)-(4) in one kernel, ``prange`` over (slice, block of 32 queries). A
    task owns a length-``Nk`` *marker* array: query ``i`` stamps ``i`` on
    every key it adds, so a key reached through the window, a global token
    and several groups enters the row once. The row's candidates are, in
    order, window and global keys, then the keys of each of the query's
    groups (``distance`` scans every visible key in ``r`` dimensions;
    ``oracle`` keeps the keys of the dense entmax support). Their scores
    are gathered dot products; the threshold is entmax's row kernel
    (:func:`eff_attn._entmax_numba.row_threshold`, the sort path at
    alpha = 1.5 and 2); the output sums ``p_j v_j`` over the support.

Memory ``O(E + (Nq + Nk)(r + R t))`` for the plan and ``O(Nk)`` per task.
Forward only: the backward is the NumPy reference's.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba import prange

from ..._entmax import DEFAULT_N_ITER, resolve_algorithm
from ..._entmax_numba import accumulate_support, row_threshold, row_weights
from ..._entmax_numba import forward as entmax_forward
from ..._jit import blas_single_thread, contiguous, kernel, serial
from ...masks import as_kernel_mask
from .graph import COSINE, GRAPH, GROUPS, ORACLE, SQEUCLIDEAN, position_offset, predictor_code, predictor_plan

__all__ = ["forward"]

#: Queries per task: a task's buffers are O(Nk) whatever this is.
BLOCK_Q = 32


@nb.njit(cache=True)
def _distance_row(q_proj, k_proj_t, g, i, end, metric, q_norm, k_norm, dist):
    """``dist[:end]``: projected distances of query ``i`` to keys ``0 .. end - 1`` of slice ``g``.

    Coordinate-outer, key-inner over the transposed keys ``k_proj_t`` (G, r, Nk):
    each key's sum still runs over the coordinates in order, like the reference's
    :func:`~eff_attn.methods.sparsefinder.graph.pair_distances` (no fast-math, so
    no fused multiply-add), while the key loop is contiguous and vectorises.
    """
    r = k_proj_t.shape[1]
    for j in range(end):
        dist[j] = 0.0
    for c in range(r):
        qc = q_proj[g, i, c]
        if metric == SQEUCLIDEAN:
            for j in range(end):
                diff = qc - k_proj_t[g, c, j]
                dist[j] = dist[j] + diff * diff
        else:
            for j in range(end):
                dist[j] = dist[j] + qc * k_proj_t[g, c, j]
    if metric != SQEUCLIDEAN:
        for j in range(end):
            denom = q_norm[g, i] * k_norm[g, j]
            dist[j] = 1.0 - (dist[j] / denom if denom > 0 else 0.0)


@serial
def _dot(q, k, g, i, j):
    """``q[g, i] . k[g, j]`` inline, in the input dtype (a BLAS call per pair costs more than the pair)."""
    total = q.dtype.type(0)
    for d in range(q.shape[2]):
        total += q[g, i, d] * k[g, j, d]
    return total


@serial
def _add(j, stamp, marker, cand, n):
    """Append key ``j`` to the row unless already stamped; returns the new length."""
    if marker[j] != stamp:
        marker[j] = stamp
        cand[n] = j
        n += 1
    return n


@kernel
def _sparsefinder_kernel(q, k, v, keep, causal, offset, pos_offset, scale, alpha, use_sort, n_iter, mode, window,
                         global_tokens, q_labels, members, offsets, q_proj, k_proj_t, q_norm, k_norm, threshold,
                         graph, dense_z_max, dense_tau, recall, out, keys_per_query, support_out, gold_hits):
    G, Nq, D = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    has_mask = keep.shape[0] > 0
    n_blocks = (Nq + BLOCK_Q - 1) // BLOCK_Q
    for task in prange(G * n_blocks):
        g = task // n_blocks
        i0 = (task % n_blocks) * BLOCK_Q
        marker = np.empty(Nk, dtype=np.int64)
        for j in range(Nk):
            marker[j] = -1
        cand = np.empty(Nk, dtype=np.int64)
        z = np.empty(Nk, dtype=q.dtype)
        inner = np.empty(Nk, dtype=np.int64)
        xc = np.empty(Nk, dtype=np.float64)
        dist = np.empty(Nk, dtype=np.float64)
        work = np.empty(2 * Nk, dtype=np.float64)
        acc = np.empty(Dv, dtype=np.float64)
        for i in range(i0, min(Nq, i0 + BLOCK_Q)):
            end = Nk if not causal else min(Nk, max(0, i + offset + 1))   # keys < end may be visible
            p = i + pos_offset
            n = 0
            # (3) candidates: window and global keys, then the predictor's, each key once
            if mode == GRAPH:
                for j in range(end):
                    if graph[g, i, j] and (not has_mask or keep[g, j]):
                        n = _add(j, i, marker, cand, n)
            else:
                if p < global_tokens:
                    for j in range(end):
                        if not has_mask or keep[g, j]:
                            n = _add(j, i, marker, cand, n)
                for j in range(min(global_tokens, end)):
                    if not has_mask or keep[g, j]:
                        n = _add(j, i, marker, cand, n)
                if window >= 0:
                    for j in range(max(0, p - window), min(end, p + window + 1)):
                        if not has_mask or keep[g, j]:
                            n = _add(j, i, marker, cand, n)
                if mode == GROUPS:
                    for a in range(q_labels.shape[2]):
                        label = q_labels[g, i, a]
                        for e in range(offsets[g, label], offsets[g, label + 1]):
                            j = members[g, e]
                            if j >= end:                                   # lists are sorted by key
                                break
                            n = _add(j, i, marker, cand, n)
                elif mode == SQEUCLIDEAN or mode == COSINE:
                    _distance_row(q_proj, k_proj_t, g, i, end, mode, q_norm, k_norm, dist)
                    for j in range(end):
                        if (not has_mask or keep[g, j]) and marker[j] != i and dist[j] <= threshold[g]:
                            n = _add(j, i, marker, cand, n)
                elif mode == ORACLE and dense_tau[g, i] != np.inf:
                    for j in range(end):
                        if (not has_mask or keep[g, j]) and marker[j] != i:
                            s = _dot(q, k, g, i, j) * scale
                            if (alpha - 1.0) * (np.float64(s) - dense_z_max[g, i]) > dense_tau[g, i]:
                                n = _add(j, i, marker, cand, n)
            keys_per_query[g, i] = n
            for d in range(Dv):
                out[g, i, d] = 0
            support_out[g, i] = 0
            gold_hits[g, i] = 0
            if n == 0:
                continue
            # (4) gathered scores, entmax's row threshold, output over the support
            for c in range(n):
                z[c] = _dot(q, k, g, i, cand[c]) * scale
            if recall:
                hits = 0
                for c in range(n):
                    if (alpha - 1.0) * (np.float64(z[c]) - dense_z_max[g, i]) > dense_tau[g, i]:
                        hits += 1
                gold_hits[g, i] = hits
            nc, z_max, tau = row_threshold(z, n, alpha, use_sort, n_iter, inner, xc, work)
            _, support = row_weights(xc, nc, tau, alpha, not use_sort)
            accumulate_support(xc, nc, inner, cand, v, g, acc)
            for d in range(Dv):
                out[g, i, d] = acc[d]
            support_out[g, i] = support


def _or_empty(a, ndim, dtype):
    return np.empty((0,) * ndim, dtype=dtype) if a is None else np.ascontiguousarray(a, dtype=dtype)


def forward(q, k, v, *, mask, offset, scale, **params):
    """Candidate lists and restricted entmax; see the module docstring."""
    q, k, v = contiguous(q, k, v)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    alpha, heads, graph = params["alpha"], params.get("heads"), params.get("graph")
    plan = predictor_plan(q, k, mask, predictor=params["predictor"], heads=heads, top_clusters=params["top_clusters"],
                          bucket_size=params["bucket_size"], metric=params["metric"])
    dense = None
    if params["predictor"] == "oracle" or params["compute_recall"]:
        dense_out, dense = entmax_forward(q, k, v, mask=mask, offset=offset, scale=scale, alpha=alpha,
                                          algorithm=resolve_algorithm(alpha, "auto"), n_iter=DEFAULT_N_ITER)
    out = np.empty((G, Nq, Dv), dtype=q.dtype)
    keys_per_query = np.empty((G, Nq), dtype=np.int64)
    support = np.empty((G, Nq), dtype=np.int64)
    gold_hits = np.empty((G, Nq), dtype=np.int64)
    keep = as_kernel_mask(mask)
    window = params["window"]
    with blas_single_thread():
        _sparsefinder_kernel(
            q, k, v, keep, offset is not None, 0 if offset is None else int(offset),
            position_offset(offset, Nq, Nk), q.dtype.type(scale), float(alpha), alpha in (1.5, 2.0), DEFAULT_N_ITER,
            predictor_code(params["predictor"], params["metric"], graph), -1 if window is None else int(window),
            int(params["global_tokens"]),
            _or_empty(plan["q_labels"], 3, np.int64), _or_empty(plan["members"], 2, np.int64),
            _or_empty(plan["offsets"], 2, np.int64), _or_empty(plan["q_proj"], 3, np.float64),
            _or_empty(None if plan["k_proj"] is None else plan["k_proj"].transpose(0, 2, 1), 3, np.float64),
            _or_empty(plan["q_norm"], 2, np.float64),
            _or_empty(plan["k_norm"], 2, np.float64),
            _or_empty(None if heads is None else heads.threshold, 1, np.float64), _or_empty(graph, 3, np.bool_),
            _or_empty(None if dense is None else dense["z_max"], 2, np.float64),
            _or_empty(None if dense is None else dense["tau_shifted"], 2, np.float64),
            params["compute_recall"], out, keys_per_query, support, gold_hits)
    res = {"support_size": support, "keys_per_query": keys_per_query, "query_groups": plan["query_groups"],
           "key_groups": plan["key_groups"]}
    if params["compute_recall"]:
        res.update(gold_hits=gold_hits, gold_support=dense["support_size"], out_dense=dense_out)
    return out, res                                                          # completed by sparsefinder.finish
