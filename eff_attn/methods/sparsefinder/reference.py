"""Sparsefinder in NumPy: the predicted graph, then entmax restricted to it.

Per slice, with ``S = s q k^T``, the visible set ``V_i`` and the predicted
graph ``G^_i = V_i n (W_i u Gamma_i u Pi_i)``::

    P^_i  = entmax_alpha(S_i restricted to G^_i)      (0 on an empty row)
    out_i = sum_j P^_ij v_j

By the restriction lemma a row is exact whenever ``G^_i`` contains the true
support. This file builds the graph densely, (Nq, Nk), for reading and for
the tests; the Numba and CuPy backends never do. Time ``O(Nq Nk (D + r))``,
memory ``O(Nq Nk)``.
"""

from __future__ import annotations

import numpy as np

from ...masks import visible_pairs
from ..._entmax import entmax_attention_backward, entmax_rows, resolve_algorithm
from .graph import (
    gold_pairs,
    group_labels,
    pair_distances,
    position_offset,
    project,
    window_global_pairs,
)

__all__ = ["shares_label", "dense_predicted_graph", "sparsefinder_reference", "forward", "backward"]


def shares_label(q_labels, k_labels):
    """``Pi_ij``: query ``i`` and key ``j`` share a group label, bool (G, Nq, Nk)."""
    pi = np.zeros((q_labels.shape[0], q_labels.shape[1], k_labels.shape[1]), dtype=bool)   # (G, Nq, Nk)
    for a in range(q_labels.shape[-1]):
        same = q_labels[:, :, None, a, None] == k_labels[:, None, :, :]                      # (G, Nq, Nk, m)
        pi |= (same & (k_labels[:, None, :, :] >= 0)).any(axis=-1)                           # (G, Nq, Nk)
    return pi


def dense_predicted_graph(q, k, *, mask, offset, scale, alpha, predictor, top_clusters, metric, bucket_size, window,
                          global_tokens, graph=None, heads=None, **params):
    """The predicted graph of every slice, dense.

    Parameters
    ----------
    q : ndarray of shape (G, Nq, D)
    k : ndarray of shape (G, Nk, D)
    heads : HeadArrays or None
        The state broadcast to the slices (None for "oracle"/"none"/``graph``).
    graph : bool ndarray of shape (G, Nq, Nk), or None
        Replaces window, global tokens and predictor.

    Returns
    -------
    graph : bool ndarray of shape (G, Nq, Nk)
    query_groups, key_groups : int64 ndarrays or None
        Cluster ids (G, N, R, t) or bucket ids (G, N, r) of the grouping predictors.
    """
    Nq, Nk = q.shape[1], k.shape[1]
    visible = visible_pairs(mask, offset, Nq, Nk)                                           # (G|1, Nq, Nk)
    if graph is not None:
        return graph & visible, None, None                                                  # (G, Nq, Nk)
    pairs = window_global_pairs(Nq, Nk, position_offset(offset, Nq, Nk), window, global_tokens)   # (Nq, Nk)
    query_groups = key_groups = None
    if predictor == "oracle":
        pi = gold_pairs(scale * (q @ np.swapaxes(k, -1, -2)), visible, alpha)                # (G, Nq, Nk)
    elif predictor == "none":
        pi = False
    else:
        q_proj = project(q, heads.w_q, heads.b_q)                                           # (G, Nq, r)
        k_proj = project(k, heads.w_k, heads.b_k)                                           # (G, Nk, r)
        if predictor == "distance":
            pi = pair_distances(q_proj, k_proj, metric) <= heads.threshold[:, None, None]    # (G, Nq, Nk)
        else:
            q_labels, k_labels, _, query_groups, key_groups = group_labels(
                predictor, q_proj, k_proj, mask, centroids=heads.centroids, top_clusters=top_clusters,
                bucket_size=bucket_size)                                                    # (G, N, m)
            pi = shares_label(q_labels, k_labels)                                           # (G, Nq, Nk)
    graph = np.broadcast_to(visible & (pairs | pi), (q.shape[0], Nq, Nk))                  # (G, Nq, Nk)
    return graph, query_groups, key_groups


def sparsefinder_reference(q, k, v, *, mask, offset, scale, alpha, **params):
    """Sparsefinder attention: entmax over the predicted graph only.

    Returns
    -------
    out : ndarray of shape (G, Nq, Dv)
    P : ndarray of shape (G, Nq, Nk)
    graph : bool ndarray of shape (G, Nq, Nk)
    support : int64 ndarray of shape (G, Nq)
    query_groups, key_groups : int64 ndarrays or None
    """
    graph, query_groups, key_groups = dense_predicted_graph(q, k, mask=mask, offset=offset, scale=scale, alpha=alpha,
                                                            **params)                     # (G, Nq, Nk)
    scores = scale * (q @ np.swapaxes(k, -1, -2))                                           # (G, Nq, Nk)
    algorithm = resolve_algorithm(alpha, "auto")                                            # sort at 1.5 and 2
    P, _, support = entmax_rows(scores, graph, alpha, algorithm=algorithm)                  # (G, Nq, Nk)
    out = P @ v                                                                             # (G, Nq, Dv)
    return out, P, graph, support, query_groups, key_groups


def forward(q, k, v, *, mask, offset, scale, **params):
    """Backend entry point."""
    alpha = params["alpha"]
    out, P, graph, support, query_groups, key_groups = sparsefinder_reference(
        q, k, v, mask=mask, offset=offset, scale=scale, **params)
    res = {"P": P, "support_size": support, "keys_per_query": graph.sum(axis=-1),
           "query_groups": query_groups, "key_groups": key_groups}
    if params["compute_recall"]:
        Nq, Nk = q.shape[1], k.shape[1]
        dense_scores = scale * (q @ np.swapaxes(k, -1, -2))                                 # (G, Nq, Nk)
        visible = visible_pairs(mask, offset, Nq, Nk)                                       # (G|1, Nq, Nk)
        P_dense, _, _ = entmax_rows(dense_scores, visible, alpha, algorithm=resolve_algorithm(alpha, "auto"))
        gold = P_dense > 0                                                                  # (G, Nq, Nk)
        res.update(gold_hits=(gold & graph).sum(axis=-1), gold_support=gold.sum(axis=-1), out_dense=P_dense @ v)
    return out, res                                                          # completed by sparsefinder.finish


def backward(dout, q, k, v, out, res, *, mask, offset, scale, alpha, **params):
    """The entmax pullback with the forward's graph held fixed (exact almost everywhere)."""
    return entmax_attention_backward(dout, q, k, v, res["P"], scale=scale, alpha=alpha)
