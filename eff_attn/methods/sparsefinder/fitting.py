"""Fitting Sparsefinder's state on the host (NumPy, float64).

Training arrays are ``q (S, *H, Nq, D)`` and ``k (S, *H, Nk, D)``: ``S``
sequences of the ``*H`` heads a state describes, with an optional key
keep-mask broadcastable to ``(S, *H, Nk)``. Every random draw comes from one
Generator, in this order:

1. :func:`init_sparsefinder`: ``W, b ~ U(-1/sqrt D, 1/sqrt D)`` (q, then k);
2. :func:`fit_projections`: per epoch ``rng.permutation(S)``, per batch one
   multinomial draw of negatives (:func:`draw_sparsefinder_negatives`);
3. :func:`fit_centroids`: per head a subsample of at most 100 000 points
   (``rng.choice``, only when there are more), then per round k-means++.

So a seed gives a bit-identical state.

**Loss** (one hinge on per-query sums): for a query with gold keys ``P_i``
and non-gold visible keys, draw ``C_i ~ Multinomial(|P_i|, uniform over the
non-gold keys)`` and, with ``d_ij = ||q'_i - k'_j||**2`` and ``M = 1[gold] - C``::

    l_i = [margin + sum_j M_ij d_ij]_+,     L_h = sum_{seq, i} l_i / (|B| Nq)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...masks import causal_offset, visible_pairs
from ...random import as_generator
from .graph import gold_graph, pair_distances
from .state import SparsefinderState

__all__ = [
    "init_sparsefinder",
    "draw_sparsefinder_negatives",
    "sparsefinder_loss",
    "fit_projections",
    "kmeans",
    "fit_centroids",
    "fit_threshold",
    "fit_sparsefinder",
]

#: At most this many points per head enter k-means.
MAX_KMEANS_POINTS = 100_000
#: ``epochs=None`` runs the official code's 3 epochs, or more where a small training set would give
#: fewer than this many Adam steps (3 steps on 2 sequences leave the graph dense).
MIN_FIT_STEPS = 10
#: ``fit_projections`` keeps every sequence's gold graph (bool, ``S * H * Nq * Nk``
#: bytes) across epochs when it is at most this large, instead of recomputing it per batch.
GOLD_CACHE_BYTES = 1 << 28
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def init_sparsefinder(D, r=4, *, head_shape=(), shared=False, rng=None) -> SparsefinderState:
    """Untrained projections, ``W, b ~ U(-1/sqrt(D), 1/sqrt(D))``.

    Parameters
    ----------
    D : int
        Head dimension of q and k.
    r : int, default=4
        Projected dimension.
    head_shape : tuple of int, default=()
        ``*H``: one predictor per head.
    shared : bool, default=False
        One projection for queries and keys (``W_k = W_q``).
    rng : None, int or Generator

    Returns
    -------
    SparsefinderState
        Without centroids, threshold, alpha or scale.
    """
    if int(D) < 1 or int(r) < 1:
        raise ValueError(f"D and r must be at least 1, got D={D}, r={r}")
    gen = as_generator(rng)
    H = tuple(int(h) for h in head_shape)
    bound = 1 / np.sqrt(D)
    w_q = gen.uniform(-bound, bound, (*H, r, D))
    b_q = gen.uniform(-bound, bound, (*H, r))
    if shared:
        w_k, b_k = w_q, b_q
    else:
        w_k = gen.uniform(-bound, bound, (*H, r, D))
        b_k = gen.uniform(-bound, bound, (*H, r))
    return SparsefinderState(w_q=w_q, w_k=w_k, b_q=b_q, b_k=b_k, shared=bool(shared))


def _training_arrays(state, q, k, mask):
    """Check ``q (S, *H, Nq, D)``, ``k (S, *H, Nk, D)`` and broadcast the mask to (S, *H, Nk)."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    H = state.head_shape
    for name, x in (("q", q), ("k", k)):
        if x.ndim != len(H) + 3 or tuple(x.shape[1:-2]) != H or x.shape[-1] != state.D:
            raise ValueError(f"{name} must have shape (S, *H, N, D) = (S, {', '.join(map(str, H + ('N', state.D)))}) "
                             f"for a state with head shape {H}; got {x.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must hold the same number of sequences, got {q.shape[0]} and {k.shape[0]}")
    if mask is not None:
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), (*k.shape[:-2], k.shape[-2]))
    return q, k, mask


def _project(state, q, k):
    """``q' (S, *H, Nq, r)`` and ``k' (S, *H, Nk, r)``."""
    q_proj = q @ np.swapaxes(state.w_q, -1, -2) + state.b_q[..., None, :]
    k_proj = k @ np.swapaxes(state.w_k, -1, -2) + state.b_k[..., None, :]
    return q_proj, k_proj


def _visible(mask, causal, Nq, Nk):
    return visible_pairs(mask, causal_offset(causal, Nq, Nk), Nq, Nk)


def draw_sparsefinder_negatives(gold, visible, rng):
    """Negative counts of the loss: ``C_i ~ Multinomial(|P_i|, uniform over V_i minus gold)``.

    Drawn with replacement from the true negatives, for the queries that have
    both gold and non-gold visible keys (other rows get 0), in one
    ``rng.multinomial`` call.

    Parameters
    ----------
    gold : bool ndarray of shape (..., Nq, Nk)
    visible : bool ndarray broadcastable to (..., Nq, Nk)
    rng : None, int or Generator

    Returns
    -------
    int64 ndarray of shape (..., Nq, Nk)
    """
    gold = np.asarray(gold, dtype=bool)
    visible = np.broadcast_to(visible, gold.shape)
    negatives = visible & ~gold                                                      # (..., Nq, Nk)
    n_pos = (gold & visible).sum(axis=-1)                                            # (..., Nq)
    n_neg = negatives.sum(axis=-1)                                                   # (..., Nq)
    valid = (n_pos > 0) & (n_neg > 0)                                                # (..., Nq)
    Nk = gold.shape[-1]
    pvals = np.where(valid[..., None], negatives / np.maximum(n_neg, 1)[..., None], 1 / Nk)   # (..., Nq, Nk)
    counts = as_generator(rng).multinomial(np.where(valid, n_pos, 0), pvals)
    return counts.astype(np.int64)


def _reduce_to(grad, shape):
    """Sum a gradient over the leading sequence axis down to the state's ``shape``."""
    return grad.sum(axis=0).reshape(shape)


def sparsefinder_loss(state, q, k, *, counts, gold=None, alpha=1.5, scale=None, mask=None, causal=False, margin=1.0):
    """The hinge loss of the projections and its gradient, at fixed negative ``counts``.

    Parameters
    ----------
    state : SparsefinderState
    q : ndarray of shape (S, *H, Nq, D)
    k : ndarray of shape (S, *H, Nk, D)
    counts : int ndarray of shape (S, *H, Nq, Nk)
        Negative counts ``C`` (:func:`draw_sparsefinder_negatives`).
    gold : bool ndarray of shape (S, *H, Nq, Nk), optional
        The gold graph; computed by :func:`gold_graph` when not given.
    alpha, scale, mask, causal
        Of the gold graph.
    margin : float, default=1.0
        ``omega``.

    Returns
    -------
    loss : ndarray of shape (*H,)
        ``L_h``.
    grads : dict
        ``w_q``, ``b_q``, ``w_k``, ``b_k`` in the state's shapes; with
        ``shared=True`` the ``w_q``/``w_k`` (and ``b``) entries are the same
        summed gradient of the tied parameter.
    """
    q, k, mask = _training_arrays(state, q, k, mask)
    S, Nq, Nk = q.shape[0], q.shape[-2], k.shape[-2]
    if gold is None:
        gold = gold_graph(q, k, alpha=alpha, scale=scale, mask=mask, causal=causal)  # (S, *H, Nq, Nk)
    visible = _visible(mask, causal, Nq, Nk)                                         # (S|1, *H|1, Nq, Nk)
    gold = gold & visible
    q_proj, k_proj = _project(state, q, k)                                           # (S, *H, N, r)
    has_negative = (visible & ~gold).any(axis=-1)                                    # (S, *H, Nq)
    valid = gold.any(axis=-1) & has_negative                                         # (S, *H, Nq)
    M = (gold.astype(np.float64) - counts) * valid[..., None]                        # (S, *H, Nq, Nk)
    # sum_j M_ij d_ij with d_ij = |q'_i|^2 + |k'_j|^2 - 2 q'_i . k'_j, by one matrix product
    # instead of the dense (Nq, Nk) distances.
    k_ext = np.concatenate([k_proj, (k_proj * k_proj).sum(axis=-1, keepdims=True)], axis=-1)   # (S, *H, Nk, r+1)
    Mk = M @ k_ext                                                                   # (S, *H, Nq, r+1)
    Md = (M.sum(axis=-1) * (q_proj * q_proj).sum(axis=-1) + Mk[..., -1]
          - 2 * (q_proj * Mk[..., :-1]).sum(axis=-1))                                # (S, *H, Nq)
    ell = np.where(valid, margin + Md, 0.0)                                          # (S, *H, Nq)
    norm = S * Nq
    loss = np.maximum(ell, 0.0).sum(axis=(0, -1)) / norm                             # (*H,)
    active = (ell > 0) / norm                                                        # (S, *H, Nq) hinge open
    dq_proj = 2 * active[..., None] * (M.sum(axis=-1)[..., None] * q_proj - Mk[..., :-1])      # (S, *H, Nq, r)
    Mt_q = np.swapaxes(M, -1, -2) @ (active[..., None] * q_proj)                     # (S, *H, Nk, r)
    Mt_1 = np.swapaxes(M, -1, -2) @ active[..., None]                                # (S, *H, Nk, 1)
    dk_proj = 2 * (Mt_1 * k_proj - Mt_q)                                             # (S, *H, Nk, r)
    H, r, D = state.head_shape, state.r, state.D
    grads = {
        "w_q": _reduce_to(np.swapaxes(dq_proj, -1, -2) @ q, (*H, r, D)),
        "b_q": _reduce_to(dq_proj.sum(axis=-2), (*H, r)),
        "w_k": _reduce_to(np.swapaxes(dk_proj, -1, -2) @ k, (*H, r, D)),
        "b_k": _reduce_to(dk_proj.sum(axis=-2), (*H, r)),
    }
    if state.shared:
        w, b = grads["w_q"] + grads["w_k"], grads["b_q"] + grads["b_k"]
        grads = {"w_q": w, "b_q": b, "w_k": w, "b_k": b}
    return loss, grads


def _head_norms(arrays, n_head_axes):
    """Global L2 norm per head over several parameter arrays, shape (*H,)."""
    total = 0.0
    for a in arrays:
        total = total + (a * a).reshape(*a.shape[:n_head_axes], -1).sum(axis=-1)
    return np.sqrt(total)


def fit_projections(state, q, k, *, alpha=1.5, scale=None, mask=None, causal=False, margin=1.0, lr=1e-2,
                    epochs=None, batch_size=16, grad_clip=1.0, rng=None):
    """Train the projections so that gold pairs come closer than sampled non-gold ones.

    Adam (0.9, 0.999, 1e-8) on :func:`sparsefinder_loss`, one step per batch
    of ``batch_size`` sequences, with each head's gradient clipped to global
    norm ``grad_clip``. Gold graphs use ``alpha`` and ``scale``, which the
    returned state records.

    Parameters
    ----------
    state : SparsefinderState
    q : ndarray of shape (S, *H, Nq, D)
    k : ndarray of shape (S, *H, Nk, D)
    alpha : float, default=1.5
    scale : float, optional
        Default ``1/sqrt(D)``.
    mask : bool ndarray broadcastable to (S, *H, Nk), optional
    causal : bool, "bottom_right" or "top_left", default=False
    margin, lr : float
    epochs : int, optional
        Passes over the sequences. Default: 3 (the official code's), raised to
        ``ceil(MIN_FIT_STEPS / batches)`` when that is more, so a small
        training set still gets ``MIN_FIT_STEPS = 10`` Adam steps.
    batch_size : int
    grad_clip : float
    rng : None, int or Generator

    Returns
    -------
    state : SparsefinderState
    history : dict
        ``loss`` (steps, *H): the batch loss before each step.
    """
    if not alpha > 1:
        raise ValueError(f"alpha={alpha} must be greater than 1")
    if (epochs is not None and int(epochs) < 0) or int(batch_size) < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs}, {batch_size}")
    gen = as_generator(rng)
    q, k, mask = _training_arrays(state, q, k, mask)
    if epochs is None:
        batches = -(-q.shape[0] // int(batch_size))
        epochs = max(3, -(-MIN_FIT_STEPS // batches))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    names = ("w_q", "b_q") if state.shared else ("w_q", "b_q", "w_k", "b_k")
    moments = {name: (np.zeros_like(getattr(state, name)), np.zeros_like(getattr(state, name))) for name in names}
    n_head_axes = len(state.head_shape)
    beta1, beta2 = _ADAM_BETAS
    losses, step = [], 0
    S = q.shape[0]
    cached = None
    if int(epochs) > 1 and S * q[0, ..., 0].size * k.shape[-2] <= GOLD_CACHE_BYTES:
        cached = _gold_graphs(q, k, alpha=alpha, scale=scale, mask=mask, causal=causal,
                              batch_size=int(batch_size))                                   # (S, *H, Nq, Nk)
    for _ in range(int(epochs)):
        order = gen.permutation(S)
        for start in range(0, S, int(batch_size)):
            batch = order[start:start + int(batch_size)]
            qb, kb = q[batch], k[batch]
            mb = None if mask is None else mask[batch]
            if cached is None:
                gold = gold_graph(qb, kb, alpha=alpha, scale=scale, mask=mb, causal=causal)   # (B, *H, Nq, Nk)
            else:
                gold = cached[batch]                                                          # (B, *H, Nq, Nk)
            visible = _visible(mb, causal, qb.shape[-2], kb.shape[-2])
            counts = draw_sparsefinder_negatives(gold, visible, gen)
            loss, grads = sparsefinder_loss(state, qb, kb, counts=counts, gold=gold, alpha=alpha, scale=scale,
                                            mask=mb, causal=causal, margin=margin)
            losses.append(loss)
            norms = _head_norms([grads[name] for name in names], n_head_axes)              # (*H,)
            factor = np.minimum(1.0, grad_clip / np.maximum(norms, 1e-300))                  # (*H,)
            step += 1
            updated = {}
            for name in names:
                g = grads[name] * factor.reshape(factor.shape + (1,) * (grads[name].ndim - n_head_axes))
                m, v = moments[name]
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                moments[name] = (m, v)
                m_hat = m / (1 - beta1 ** step)
                v_hat = v / (1 - beta2 ** step)
                updated[name] = getattr(state, name) - lr * m_hat / (np.sqrt(v_hat) + _ADAM_EPS)
            if state.shared:
                updated.update(w_k=updated["w_q"], b_k=updated["b_q"])
            state = dataclasses.replace(state, **updated)
    state = dataclasses.replace(state, alpha=float(alpha), scale=scale)
    history = {"loss": np.array(losses).reshape(len(losses), *state.head_shape)}
    return state, history


def _gold_graphs(q, k, *, alpha, scale, mask, causal, batch_size):
    """The gold graph of every training sequence, computed ``batch_size`` sequences at a time."""
    parts = []
    for start in range(0, q.shape[0], batch_size):
        mb = None if mask is None else mask[start:start + batch_size]
        parts.append(gold_graph(q[start:start + batch_size], k[start:start + batch_size], alpha=alpha,
                                scale=scale, mask=mb, causal=causal))                    # (B, *H, Nq, Nk)
    return np.concatenate(parts)                                                     # (S, *H, Nq, Nk)


def _sq_dist_to(points, centres):
    """``||x - mu||**2`` of every point to every centre, (n, K)."""
    diff = points[:, None, :] - centres[None, :, :]                                   # (n, K, r)
    return (diff * diff).sum(axis=-1)


def kmeans(points, num_clusters, *, max_iter=100, rng=None):
    """k-means++ seeding, then Lloyd iterations until the assignment stops changing.

    An empty cluster is re-seeded at the point farthest from its centre.

    Parameters
    ----------
    points : ndarray of shape (n, r)
    num_clusters : int
        ``K <= n``.
    max_iter : int, default=100
    rng : None, int or Generator

    Returns
    -------
    centroids : ndarray of shape (K, r)
    labels : int64 ndarray of shape (n,)
    objective : ndarray
        ``sum ||x - mu_label||**2`` after seeding and after each iteration;
        non-increasing.
    """
    gen = as_generator(rng)
    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of points ({n})")
    chosen = [int(gen.integers(n))]
    closest = _sq_dist_to(points, points[chosen])[:, 0]                              # (n,)
    for _ in range(1, num_clusters):                                                  # k-means++ seeding
        total = closest.sum()
        if total > 0:
            pick = int(np.searchsorted(np.cumsum(closest), gen.random() * total, side="right"))
            pick = min(pick, n - 1)
        else:
            pick = int(gen.integers(n))
        chosen.append(pick)
        closest = np.minimum(closest, _sq_dist_to(points, points[pick:pick + 1])[:, 0])
    centres = points[chosen].copy()                                                   # (K, r)
    dist = _sq_dist_to(points, centres)                                               # (n, K)
    labels = np.argmin(dist, axis=-1)                                                 # (n,)
    objective = [dist[np.arange(n), labels].sum()]
    for _ in range(int(max_iter)):
        own = dist[np.arange(n), labels]                                              # (n,) to own centre
        counts = np.bincount(labels, minlength=num_clusters)
        for c in np.flatnonzero(counts == 0):                                         # re-seed empty clusters
            far = int(np.argmax(own))
            labels[far] = c
            own[far] = -1.0
        counts = np.bincount(labels, minlength=num_clusters)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, points)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        dist = _sq_dist_to(points, centres)
        new = np.argmin(dist, axis=-1)
        objective.append(dist[np.arange(n), new].sum())
        if np.array_equal(new, labels):
            break
        labels = new
    return centres, labels, np.array(objective)


def fit_centroids(state, q, k, *, num_clusters=16, n_rounds=1, max_iter=100, mask=None, rng=None):
    """k-means centroids of the projected tokens, per head and round.

    Per head the points are ``[q'; k']`` over all sequences (kept keys only),
    subsampled to 100 000 by ``rng.choice`` when there are more; each of the
    ``n_rounds`` rounds then runs :func:`kmeans` on them, in order.

    A head with fewer points ``n`` than ``num_clusters`` (a short or
    mostly masked input) runs k-means with ``n`` clusters and repeats its
    last centroid in the remaining slots: a repeated centroid is never any
    token's first nearest (ties go to the lower index), so those slots stay
    empty and the state keeps its shape. A head without any point keeps
    zero centroids.

    Returns
    -------
    SparsefinderState
        With ``centroids`` of shape (*H, n_rounds, num_clusters, r).
    """
    gen = as_generator(rng)
    q, k, mask = _training_arrays(state, q, k, mask)
    q_proj, k_proj = _project(state, q, k)                                           # (S, *H, N, r)
    H, r = state.head_shape, state.r
    centroids = np.empty((*H, int(n_rounds), int(num_clusters), r))
    for h in np.ndindex(*H):
        index = (slice(None), *h)
        keys = k_proj[index]                                                          # (S, Nk, r)
        if mask is not None:
            keys = keys[mask[index]]
        points = np.concatenate([q_proj[index].reshape(-1, r), keys.reshape(-1, r)])   # (n, r)
        if points.shape[0] > MAX_KMEANS_POINTS:
            points = points[gen.choice(points.shape[0], MAX_KMEANS_POINTS, replace=False)]
        usable = min(int(num_clusters), points.shape[0])
        for round_ in range(int(n_rounds)):
            if usable == 0:
                centroids[(*h, round_)] = 0.0
                continue
            found, _, _ = kmeans(points, usable, max_iter=max_iter, rng=gen)            # (usable, r)
            centroids[(*h, round_)] = np.concatenate([found, np.repeat(found[-1:], int(num_clusters) - usable, 0)])
    return dataclasses.replace(state, centroids=centroids)


def gap_threshold(values, target_recall: float) -> float:
    """The ``target_recall`` quantile ``d_k`` of ``values`` (``method="higher"``), moved midway to the next larger value.

    ``d <= t`` then keeps exactly the values ``<= d_k``, and the nearest value
    is half a gap away from ``t``. Past the largest value, ``t = d_k + 2^-10 max(|d_k|, 1)``;
    ``+inf`` for no values.
    """
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())           # (n,)
    if values.size == 0:
        return np.inf
    d_k = values[int(np.ceil(target_recall * (values.size - 1)))]           # np.quantile's "higher"
    above = values[values > d_k]
    if above.size == 0:
        return float(d_k + 2.0**-10 * max(abs(d_k), 1.0))
    return float((d_k + above[0]) / 2)


def fit_threshold(state, q, k, *, target_recall=0.95, metric="sqeuclidean", alpha=None, scale=None, mask=None,
                  causal=False, batch_size=16):
    """Per head, the distance under which ``target_recall`` of the gold pairs fall.

    The ``target_recall`` quantile (``method="higher"``) ``d_k`` of the
    projected distances of all gold pairs, moved midway to the next larger
    gold distance (:func:`gap_threshold`), so that no gold pair of the
    training data sits on the threshold, where the rounding of a float32
    distance would decide whether it is kept (the backends round
    differently); the recall on the training data is the same. ``alpha`` and ``scale`` default to the
    state's (else 1.5 and ``1/sqrt(D)``). A head whose training data hold no
    gold pair (every key masked: a row that sees a key always has one) gets
    the threshold ``+inf``: nothing was learned to drop a pair, so the
    predictor keeps every visible pair of that head.

    Returns
    -------
    SparsefinderState
        With ``threshold`` (*H,) and ``threshold_metric``.
    """
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall={target_recall} must be in (0, 1]")
    if metric not in ("sqeuclidean", "cosine"):
        raise ValueError(f"metric={metric!r} is not 'sqeuclidean' or 'cosine'")
    alpha = (state.alpha if state.alpha is not None else 1.5) if alpha is None else alpha
    scale = state.scale if scale is None else scale
    q, k, mask = _training_arrays(state, q, k, mask)
    H = state.head_shape
    pooled = {h: [] for h in np.ndindex(*H)}
    for start in range(0, q.shape[0], int(batch_size)):
        qb, kb = q[start:start + batch_size], k[start:start + batch_size]
        mb = None if mask is None else mask[start:start + batch_size]
        gold = gold_graph(qb, kb, alpha=alpha, scale=scale, mask=mb, causal=causal)   # (B, *H, Nq, Nk)
        q_proj, k_proj = _project(state, qb, kb)
        lead = q_proj.shape[:-2]
        d = pair_distances(q_proj.reshape(-1, *q_proj.shape[-2:]), k_proj.reshape(-1, *k_proj.shape[-2:]), metric)
        d = d.reshape(*lead, *d.shape[-2:])                                           # (B, *H, Nq, Nk)
        for h in pooled:
            index = (slice(None), *h)
            pooled[h].append(d[index][gold[index]])
    threshold = np.empty(H)
    for h, parts in pooled.items():
        values = np.concatenate(parts)
        threshold[h] = gap_threshold(values, target_recall)
    return dataclasses.replace(state, threshold=threshold, threshold_metric=metric)


def fit_sparsefinder(q, k, *, r=8, alpha=1.5, scale=None, mask=None, causal=False, shared=False, margin=1.0, lr=1e-2,
                     epochs=None, batch_size=16, grad_clip=1.0, num_clusters=16, n_rounds=1, max_iter=100,
                     target_recall=0.95, metric="sqeuclidean", rng=None):
    """Fit every part of a Sparsefinder state: projections, centroids, threshold.

    :func:`init_sparsefinder` (head shape ``q.shape[1:-2]``), then
    :func:`fit_projections`, :func:`fit_centroids` and :func:`fit_threshold`,
    all drawing from one Generator made from ``rng``.

    Parameters
    ----------
    q : ndarray of shape (S, *H, Nq, D)
    k : ndarray of shape (S, *H, Nk, D)
    r : int, default=8
        Projected dimension. 8 rather than the paper's 4: on real attention
        heads the distance predictor then recalls 95 % of the gold pairs at
        a sparser graph (docs: methods/sparsefinder, "Defaults").
    alpha, scale, mask, causal
        Of the gold graphs (:func:`fit_projections`).
    shared, margin, lr, epochs, batch_size, grad_clip
        As in :func:`init_sparsefinder` and :func:`fit_projections`.
    num_clusters, n_rounds, max_iter
        As in :func:`fit_centroids`; ``num_clusters=None`` fits no centroids
        (only the ``kmeans`` predictor reads them).
    target_recall, metric
        As in :func:`fit_threshold`; ``target_recall=None`` calibrates no
        threshold (only the ``distance`` predictor reads it).
    rng : None, int or Generator

    Returns
    -------
    state : SparsefinderState
    history : dict
        ``fit_projections``'s history.
    """
    gen = as_generator(rng)
    q = np.asarray(q)
    if q.ndim < 3:
        raise ValueError(f"q must have shape (S, *H, N, D), got {q.shape}")
    state = init_sparsefinder(q.shape[-1], r, head_shape=q.shape[1:-2], shared=shared, rng=gen)
    state, history = fit_projections(state, q, k, alpha=alpha, scale=scale, mask=mask, causal=causal, margin=margin,
                                     lr=lr, epochs=epochs, batch_size=batch_size, grad_clip=grad_clip, rng=gen)
    if num_clusters is not None:
        state = fit_centroids(state, q, k, num_clusters=num_clusters, n_rounds=n_rounds, max_iter=max_iter,
                              mask=mask, rng=gen)
    if target_recall is not None:
        state = fit_threshold(state, q, k, target_recall=target_recall, metric=metric, mask=mask, causal=causal,
                              batch_size=batch_size)
    return state, history
