"""The pieces of Sparsefinder's predicted graph, shared by every backend.

Array-level steps written against ``xp`` (NumPy or CuPy), on flat ``(G, ...)``
slices:

- :func:`project`: ``x' = W x + b`` in float64;
- :func:`cluster_ids`: the ``top`` nearest centroids per round, by
  ``||mu||**2 - 2 x . mu`` and a stable sort (ties to the lower index);
- :func:`bucket_ids`: per coordinate, rank by (value, index) and cut into
  ``n_b = max(1, ceil(n_k / B))`` equal buckets;
- :func:`group_labels`: both as integer group labels per token, -1 for
  masked keys, so that a query and a key share a group iff they share a label;
- :func:`window_global_counts` and :func:`grouped_pair_count`: the pair counts
  of the compute-efficiency metric, in ``O((Nq + Nk) log Nk)``;
- :func:`pair_distances` and the dense graphs of the NumPy reference.

The public :func:`gold_graph` and :func:`graph_metrics` (with the package's
``predict_graph``) are the dense, readable definitions used by the tests and the
fitting code.
"""

from __future__ import annotations

import numpy as np

from ..._entmax import entmax_rows, resolve_algorithm
from ..._hashing import inverse_permutation, segment_offsets, stable_key_argsort
from ...masks import visible_pairs

__all__ = [
    "predictor_code",
    "position_offset",
    "project",
    "cluster_ids",
    "bucket_ids",
    "group_labels",
    "labels_from_groups",
    "key_lists",
    "predictor_plan",
    "window_global_pairs",
    "window_global_counts",
    "grouped_pair_count",
    "pair_distances",
    "gold_pairs",
    "gold_graph",
    "graph_metrics",
]


#: Predictor codes of the Numba and CuPy kernels.
NONE, GROUPS, SQEUCLIDEAN, COSINE, ORACLE, GRAPH = range(6)


def predictor_code(predictor: str, metric: str, graph) -> int:
    """The kernels' code for a predictor: kmeans and quantize both enumerate groups."""
    if graph is not None:
        return GRAPH
    if predictor in ("kmeans", "quantize"):
        return GROUPS
    if predictor == "distance":
        return SQEUCLIDEAN if metric == "sqeuclidean" else COSINE
    return ORACLE if predictor == "oracle" else NONE


def position_offset(offset, Nq: int, Nk: int) -> int:
    """Offset ``o`` of the query positions ``p_i = i + o``: the causal one, else bottom-right ``Nk - Nq``."""
    return Nk - Nq if offset is None else offset


def project(x, w, b, xp=np):
    """``x' = x W^T + b`` in float64: x (G, N, D), w (G, r, D), b (G, r) -> (G, N, r)."""
    return xp.matmul(x.astype(np.float64), xp.swapaxes(w, -1, -2)) + b[:, None, :]


def _stable_argsort(x, axis, xp):
    """A stable argsort on NumPy; CuPy's argsort is always stable (and takes no ``kind``)."""
    return xp.argsort(x, axis=axis, kind="stable") if xp is np else xp.argsort(x, axis=axis)


def cluster_ids(x, centroids, top: int, xp=np):
    """The ``top`` nearest centroids of every point, per round.

    Distances are ``||mu||**2 - 2 x . mu`` (``||x||**2`` is common to all
    centroids); ties go to the lower centroid index.

    Parameters
    ----------
    x : array of shape (G, N, r), float64
    centroids : array of shape (G, R, K, r)

    Returns
    -------
    int64 array of shape (G, N, R, top)
    """
    norms = (centroids * centroids).sum(axis=-1)                                # (G, R, K)
    dots = xp.einsum("gnc,grkc->gnrk", x, centroids)                            # (G, N, R, K)
    dist = norms[:, None, :, :] - 2 * dots                                      # (G, N, R, K)
    return _stable_argsort(dist, -1, xp)[..., :top].astype(np.int64)            # (G, N, R, top)


def _ranks(values, xp):
    """Rank of every entry along axis 1 by (value, index): values (G, N, r) -> int64 (G, N, r)."""
    order = _stable_argsort(xp.swapaxes(values, 1, 2), -1, xp)                  # (G, r, N)
    return xp.swapaxes(inverse_permutation(order, xp), 1, 2)                    # (G, N, r)


def bucket_ids(q_proj, k_proj, keep, bucket_size: int, xp=np):
    """Equal-size quantization buckets per coordinate.

    Queries and kept keys are ranked separately by (value, index) on each
    coordinate; with ``n_b = max(1, ceil(n_k / B))`` buckets, an entry of rank
    ``rank`` among ``n`` goes to bucket ``floor(rank * n_b / n)``.

    Parameters
    ----------
    q_proj : array of shape (G, Nq, r)
    k_proj : array of shape (G, Nk, r)
    keep : bool array of shape (G, Nk), or None
    bucket_size : int
        Tokens per bucket ``B``.

    Returns
    -------
    q_bucket : int64 array of shape (G, Nq, r)
    k_bucket : int64 array of shape (G, Nk, r)
        -1 for masked keys.
    n_buckets : int64 array of shape (G,)
    """
    G, Nq, _ = q_proj.shape
    Nk = k_proj.shape[1]
    n_kept = xp.full(G, Nk, dtype=np.int64) if keep is None else keep.sum(axis=-1).astype(np.int64)   # (G,)
    n_buckets = xp.maximum(1, -(-n_kept // bucket_size))                        # (G,)
    q_bucket = _ranks(q_proj, xp) * n_buckets[:, None, None] // Nq              # (G, Nq, r)
    if keep is None:
        return q_bucket, _ranks(k_proj, xp) * n_buckets[:, None, None] // Nk, n_buckets
    k_values = xp.where(keep[:, :, None], k_proj, xp.inf)                       # (G, Nk, r) masked last
    k_rank = _ranks(k_values, xp)                                               # (G, Nk, r)
    k_bucket = k_rank * n_buckets[:, None, None] // xp.maximum(n_kept, 1)[:, None, None]
    return q_bucket, xp.where(keep[:, :, None], k_bucket, -1), n_buckets


def group_labels(predictor, q_proj, k_proj, keep, *, centroids=None, top_clusters=1, bucket_size=16, xp=np):
    """Group labels of every token: a query and a key share a group iff they share a label.

    kmeans: label ``round * K + cluster`` for each of the ``top`` clusters of
    each round; quantize: ``coordinate * n_b + bucket``. Masked keys get -1.

    Returns
    -------
    q_labels : int64 array of shape (G, Nq, m)
    k_labels : int64 array of shape (G, Nk, m)
    n_groups : int
        Labels lie in ``[0, n_groups)``.
    query_groups, key_groups : int64 arrays
        The cluster ids (G, N, R, top) or bucket ids (G, N, r), for ``info``.
    """
    if predictor == "kmeans":
        query_groups = cluster_ids(q_proj, centroids, top_clusters, xp)         # (G, Nq, R, t)
        key_groups = cluster_ids(k_proj, centroids, top_clusters, xp)           # (G, Nk, R, t)
        if keep is not None:
            key_groups = xp.where(keep[:, :, None, None], key_groups, -1)
        group_space = centroids.shape[2]
    else:
        query_groups, key_groups, n_buckets = bucket_ids(q_proj, k_proj, keep, bucket_size, xp)   # (G, N, r)
        group_space = int(n_buckets.max())
    return (*labels_from_groups(query_groups, key_groups, group_space, xp), query_groups, key_groups)


def labels_from_groups(query_groups, key_groups, group_space: int, xp=np):
    """Integer labels from group ids: ``round * K + cluster`` or ``coordinate * n_b + bucket``.

    Parameters
    ----------
    query_groups, key_groups : int arrays of shape (G, N, R, t) (clusters) or (G, N, r) (buckets)
        -1 marks a masked key.
    group_space : int
        ``K`` or ``n_b``: ids lie in ``[0, group_space)``.

    Returns
    -------
    q_labels (G, Nq, m), k_labels (G, Nk, m), n_groups
    """
    G, Nq = query_groups.shape[:2]
    Nk = key_groups.shape[1]
    span = query_groups.shape[2]                                                # R rounds or r coordinates
    base = xp.arange(span, dtype=np.int64) * group_space                        # (span,)
    base = base.reshape((1, 1, span) + (1,) * (query_groups.ndim - 3))
    q_labels = (query_groups + base).reshape(G, Nq, -1)
    k_labels = xp.where(key_groups >= 0, key_groups + base, -1).reshape(G, Nk, -1)
    return q_labels, k_labels, span * group_space


def key_lists(k_labels, n_groups, xp=np):
    """CSR lists of the keys of every group, sorted by key index (a counting sort by label).

    Parameters
    ----------
    k_labels : int64 array of shape (G, Nk, m)
        -1 for masked keys, which go to a spare last segment.

    Returns
    -------
    members : int64 array of shape (G, Nk m)
        Key indices; group ``l`` of slice ``g`` is ``members[g, offsets[g, l]:offsets[g, l + 1]]``.
    offsets : int64 array of shape (G, n_groups + 2)
    """
    G, Nk, m = k_labels.shape
    labels = xp.where(k_labels >= 0, k_labels, n_groups).reshape(G, Nk * m)      # (G, Nk m)
    order = stable_key_argsort(labels, xp)                                       # (G, Nk m) by (label, key)
    sorted_labels = xp.take_along_axis(labels, order, axis=-1)                   # (G, Nk m)
    return order // m, segment_offsets(sorted_labels, n_groups + 1, xp)


def predictor_plan(q, k, mask, *, predictor, heads, top_clusters, bucket_size, metric, xp=np):
    """What a kernel needs to enumerate the predictor's pairs ``Pi_i`` without an (Nq, Nk) matrix.

    Steps (1)-(2) of the backends: projections; for kmeans and quantize the
    group labels and the CSR key list of every group; for cosine distance the
    norms of the projections.

    Returns
    -------
    dict with ``q_proj``/``k_proj`` (G, N, r), ``q_labels`` (G, Nq, m),
    ``members``/``offsets`` (:func:`key_lists`), ``query_groups``/``key_groups``,
    ``q_norm``/``k_norm`` (G, N); entries a predictor does not use are None.
    """
    plan = dict.fromkeys(("q_proj", "k_proj", "q_labels", "members", "offsets", "query_groups", "key_groups",
                          "q_norm", "k_norm"))
    if heads is None:
        return plan
    plan["q_proj"] = project(q, heads.w_q, heads.b_q, xp)                       # (G, Nq, r)
    plan["k_proj"] = project(k, heads.w_k, heads.b_k, xp)                       # (G, Nk, r)
    if predictor in ("kmeans", "quantize"):
        q_labels, k_labels, n_groups, plan["query_groups"], plan["key_groups"] = group_labels(
            predictor, plan["q_proj"], plan["k_proj"], mask, centroids=heads.centroids, top_clusters=top_clusters,
            bucket_size=bucket_size, xp=xp)
        plan["q_labels"] = q_labels
        plan["members"], plan["offsets"] = key_lists(k_labels, n_groups, xp)
    if predictor == "distance" and metric == "cosine":
        plan["q_norm"] = xp.sqrt(_sum_of_squares(plan["q_proj"]))
        plan["k_norm"] = xp.sqrt(_sum_of_squares(plan["k_proj"]))
    return plan


def window_global_pairs(Nq, Nk, o, window, global_tokens, xp=np):
    """``W_i u Gamma_i`` as a dense (Nq, Nk) boolean (before the visible set).

    ``W_i = {j : |j - p_i| <= w}`` (empty for ``window=None``), ``Gamma_i =
    {j < g}``, plus every key when ``p_i < g``.
    """
    p = xp.arange(Nq)[:, None] + o                                             # (Nq, 1)
    j = xp.arange(Nk)[None, :]                                                 # (1, Nk)
    pairs = (j < global_tokens) | (p < global_tokens)                           # (Nq, Nk)
    if window is not None:
        pairs = pairs | (xp.abs(j - p) <= window)                               # (Nq, Nk)
    return pairs


def window_global_counts(mask, offset, Nq, Nk, window, global_tokens, xp=np):
    """``|(W_i u Gamma_i) n V_i|`` per query from prefix sums of the mask, int64 (G|1, Nq).

    Computed in ``O(Nq + Nk)`` per slice, without the (Nq, Nk) matrix.
    """
    p = xp.arange(Nq, dtype=np.int64) + position_offset(offset, Nq, Nk)        # (Nq,)
    last = xp.full(Nq, Nk - 1, dtype=np.int64) if offset is None else xp.clip(p, -1, Nk - 1)   # (Nq,)
    keep = xp.ones((1, Nk), dtype=np.int64) if mask is None else mask.astype(np.int64)
    prefix = xp.concatenate([xp.zeros((keep.shape[0], 1), dtype=np.int64), xp.cumsum(keep, axis=-1)], axis=-1)

    def kept(lo, hi):                                                           # kept keys in [lo, hi]
        lo = xp.clip(lo, 0, Nk)
        hi = xp.maximum(xp.clip(hi, -1, Nk - 1), lo - 1)
        top = xp.take(prefix, hi + 1, axis=-1)
        return top - xp.take(prefix, lo, axis=-1)                               # (G|1, Nq)

    zero = xp.zeros(Nq, dtype=np.int64)
    heads = kept(zero, xp.minimum(global_tokens - 1, last))                     # Gamma part {j < g}
    if window is None:
        count = heads
    else:
        lo, hi = p - window, xp.minimum(p + window, last)
        count = heads + kept(lo, hi) - kept(lo, xp.minimum(hi, global_tokens - 1))
    return xp.where(p < global_tokens, kept(zero, last), count)                 # (G|1, Nq)


def grouped_pair_count(q_labels, k_labels, n_groups, offset, xp=np):
    """``sum_gamma |Q_gamma x K_gamma n V|`` per slice: visible pairs counted once per shared group.

    Sorts the key memberships by (label, key) and counts, for each query
    membership, the keys of its group up to the query's last visible
    position by two binary searches. int64 (G,).
    """
    G, Nq, m = q_labels.shape
    Nk = k_labels.shape[1]
    span = (n_groups + 1) * Nk
    slice_base = (xp.arange(G, dtype=np.int64) * span)[:, None, None]          # (G, 1, 1)
    key_lab = xp.where(k_labels >= 0, k_labels, n_groups)                       # (G, Nk, m) masked -> spare group
    key_code = slice_base + key_lab * Nk + xp.arange(Nk, dtype=np.int64)[None, :, None]
    key_code = xp.sort(key_code.ravel())                                        # (G Nk m,)
    p = xp.arange(Nq, dtype=np.int64) + position_offset(offset, Nq, Nk)
    last = xp.full(Nq, Nk - 1, dtype=np.int64) if offset is None else xp.clip(p, -1, Nk - 1)
    start = slice_base + q_labels * Nk                                          # (G, Nq, m)
    lo = xp.searchsorted(key_code, start.ravel(), side="left")
    hi = xp.searchsorted(key_code, (start + last[None, :, None]).ravel(), side="right")
    return (hi - lo).reshape(G, Nq * m).sum(axis=-1)                            # (G,)


def pair_distances(q_proj, k_proj, metric, xp=np):
    """Distances between every projected query and key, (G, Nq, Nk) float64.

    ``"sqeuclidean"``: ``sum_c (q'_c - k'_c)**2``; ``"cosine"``: ``1 - cos`` with
    ``cos = 0`` for a zero vector. Coordinates are summed in order, as the
    kernels do.
    """
    r = q_proj.shape[-1]
    if metric == "sqeuclidean":
        d = xp.zeros((q_proj.shape[0], q_proj.shape[1], k_proj.shape[1]))      # (G, Nq, Nk)
        for c in range(r):
            diff = q_proj[:, :, None, c] - k_proj[:, None, :, c]                # (G, Nq, Nk)
            d = d + diff * diff
        return d
    dot = xp.zeros((q_proj.shape[0], q_proj.shape[1], k_proj.shape[1]))        # (G, Nq, Nk)
    for c in range(r):
        dot = dot + q_proj[:, :, None, c] * k_proj[:, None, :, c]
    norm_q = xp.sqrt(_sum_of_squares(q_proj))                                   # (G, Nq)
    norm_k = xp.sqrt(_sum_of_squares(k_proj))                                   # (G, Nk)
    denom = norm_q[:, :, None] * norm_k[:, None, :]                             # (G, Nq, Nk)
    cos = xp.where(denom > 0, dot / xp.where(denom > 0, denom, 1), 0)           # (G, Nq, Nk)
    return 1 - cos


def _sum_of_squares(x):
    total = x[..., 0] * x[..., 0]
    for c in range(1, x.shape[-1]):
        total = total + x[..., c] * x[..., c]
    return total


def gold_pairs(scores, visible, alpha):
    """The support of alpha-entmax of each visible row, bool of ``scores``' shape."""
    algorithm = resolve_algorithm(float(alpha), "auto")
    p, _, _ = entmax_rows(scores, visible, float(alpha), algorithm=algorithm)   # (..., Nq, Nk)
    return p > 0


# --- the public dense definitions -----------------------------------------------------


def _default_scale(q, scale):
    return 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)


def gold_graph(q, k, *, alpha=1.5, scale=None, mask=None, causal=False):
    """The gold graph ``{(i, j) : P_ij > 0}`` of alpha-entmax attention (NumPy, dense).

    Parameters
    ----------
    q : ndarray of shape (..., Nq, D)
    k : ndarray of shape (..., Nk, D)
    alpha : float, default=1.5
        Greater than 1.
    scale : float, optional
        Default ``1/sqrt(D)``.
    mask : bool ndarray of shape (..., Nk), optional
    causal : bool, "bottom_right" or "top_left", default=False

    Returns
    -------
    bool ndarray of shape (..., Nq, Nk)
    """
    from ...masks import causal_offset

    q, k = np.asarray(q), np.asarray(k)
    Nq, Nk = q.shape[-2], k.shape[-2]
    scores = _default_scale(q, scale) * (q @ np.swapaxes(k, -1, -2))           # (..., Nq, Nk)
    visible = visible_pairs(mask, causal_offset(causal, Nq, Nk), Nq, Nk)        # (..., Nq, Nk)
    return gold_pairs(scores, visible, alpha)


def _slice_mean(num, den):
    """Mean over slices of ``num / den``, skipping slices with ``den == 0``; NaN if none."""
    num, den = np.asarray(num, dtype=np.float64).ravel(), np.asarray(den, dtype=np.float64).ravel()
    ok = den > 0
    return float((num[ok] / den[ok]).mean()) if ok.any() else float("nan")


def graph_metrics(pred, gold, *, mask=None, causal=False):
    """Recall, precision, sparsity and exact fraction of a predicted graph.

    Computed per slice (leading index), then averaged without weights; a
    slice where a term is undefined (e.g. no gold pair) is skipped for it.

    Parameters
    ----------
    pred, gold : bool ndarray of shape (..., Nq, Nk)
    mask : bool ndarray of shape (..., Nk), optional
    causal : bool, "bottom_right" or "top_left", default=False

    Returns
    -------
    dict
        ``recall`` ``|pred n gold| / |gold|``, ``precision``
        ``|pred n gold| / |pred|``, ``sparsity`` ``1 - |pred n V| / |V|``,
        ``gold_sparsity`` likewise, and ``exact_fraction``, the share of rows
        with a non-empty gold row contained in the predicted row.
    """
    from ...masks import causal_offset

    pred, gold = np.asarray(pred, dtype=bool), np.asarray(gold, dtype=bool)
    Nq, Nk = pred.shape[-2:]
    visible = visible_pairs(mask, causal_offset(causal, Nq, Nk), Nq, Nk)        # (..., Nq, Nk)
    shape = np.broadcast_shapes(pred.shape, gold.shape, np.shape(visible))
    pred, gold, visible = (np.broadcast_to(a, shape).reshape(-1, Nq, Nk) for a in (pred, gold, visible))
    pred, gold = pred & visible, gold & visible
    hits = (pred & gold).sum(axis=(-2, -1))                                     # (G,)
    n_visible = visible.sum(axis=(-2, -1))                                      # (G,)
    gold_rows = gold.any(axis=-1)                                               # (G, Nq)
    exact_rows = gold_rows & ~(gold & ~pred).any(axis=-1)                       # (G, Nq)
    return {
        "recall": _slice_mean(hits, gold.sum(axis=(-2, -1))),
        "precision": _slice_mean(hits, pred.sum(axis=(-2, -1))),
        "sparsity": 1 - _slice_mean(pred.sum(axis=(-2, -1)), n_visible),
        "gold_sparsity": 1 - _slice_mean(gold.sum(axis=(-2, -1)), n_visible),
        "exact_fraction": _slice_mean(exact_rows.sum(axis=-1), gold_rows.sum(axis=-1)),
    }
