"""Routing attention in NumPy: the textbook, and the oracle of every test.

Per (batch, head) slice with centroids ``mu`` (C, D) of unit rows:

Routing
    ``R^Q = qhat mu^T`` (Nq, C) and ``R^K = khat mu^T`` (Nk, C), with
    ``xhat = x / |x|`` (0 for a zero vector), in the input dtype.

``assignment="argmax"``
    ``a^K_j = argmax_c R^K_jc`` (-1 for a masked key), ``f_c`` the first key
    of cluster ``c``; cluster ``c`` is *open* to row ``i`` when ``f_c <= p_i``
    (causal) or non-empty. The raw cluster ``argmax_c R^Q_ic`` serves row
    ``i`` if open; otherwise the row is *unrouted* and ``"nearest"`` moves it
    to its best open cluster. ``out_i = softmax_j(S_ij) v_j`` over the
    visible keys of its cluster, a dense masked softmax here: time and
    memory ``O(Nq Nk)`` in the oracle.

``assignment="balanced"``
    Window ``c`` takes the top ``wQ`` queries and top ``wK`` kept keys by
    ``R_:,c`` (ties to the lower position). Each window runs a softmax of
    its queries over its visible keys, gathered to static
    ``(C, wQ, wK)`` tiles: time ``O(C wQ wK (D + Dv))``. A row averages its
    serving windows (ascending ``c``); unrouted rows stay 0 or, with
    ``"nearest"``, use the best window that holds a visible key.

The backward replays the plan (piecewise constant in q, k): exact softmax
gradients on the routed pattern.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._softmax import softmax_attend, softmax_attend_backward
from ...masks import visible_pairs
from .plan import argmax_plan, balanced_plan, rank_scores, row_limits

__all__ = [
    "routing_scores",
    "top_windows",
    "route",
    "argmax_attention",
    "argmax_backward",
    "window_attention",
    "window_backward",
    "balanced_attention",
    "balanced_backward",
    "routed_support",
    "attention_matrix",
    "forward",
    "backward",
]


def routing_scores(x, centroids, head_of, xp=np):
    """``R = xhat mu^T`` per slice, in the input dtype.

    Parameters
    ----------
    x : array of shape (G, N, D)
    centroids : array of shape (H', C, D), unit rows, in x's dtype
    head_of : int array of shape (G,)
        The centroid set of each slice.

    Returns
    -------
    array of shape (G, N, C). A zero row scores 0 everywhere (cluster 0).
    """
    norm = xp.sqrt((x * x).sum(axis=-1, keepdims=True))                    # (G, N, 1)
    xhat = x / xp.where(norm > 0, norm, 1)                                  # (G, N, D)
    mu = centroids[head_of]                                                 # (G, C, D)
    return xhat @ swap_last(mu)                                             # (G, N, C)


def top_windows(R, w, dropped, keep_dropped):
    """Top-``w`` positions of each cluster column, ascending, -1 padded.

    Ranks by ``(-R, position)``: a stable sort of ``-R`` along the sequence.
    ``dropped`` positions (masked) rank last; with ``keep_dropped=False``
    they are removed from the window (the -1 padding).

    Parameters
    ----------
    R : array of shape (G, N, C)
    w : int
    dropped : bool array of shape (G, N), or None
    keep_dropped : bool

    Returns
    -------
    int64 array of shape (G, C, w)
    """
    N = R.shape[-2]
    neg = -swap_last(R) + 0.0                                               # (G, C, N); -0.0 -> +0.0
    if dropped is not None:
        neg = np.where(dropped[:, None, :], np.inf, neg)                    # (G, C, N)
    order = np.argsort(neg, axis=-1, kind="stable")[..., :w]                # (G, C, w) best first
    if dropped is not None and not keep_dropped:
        gone = np.take_along_axis(np.broadcast_to(dropped[:, None, :], neg.shape), order, axis=-1)
        order = np.where(gone, N, order)                                    # (G, C, w) sentinel N
    order = np.sort(order, axis=-1)                                         # (G, C, w) ascending
    return np.where(order < N, order, -1).astype(np.int64)                  # (G, C, w)


def _route_argmax(q, k, mask, offset, centroids, head_of, C, unrouted):
    Nk = k.shape[1]
    RQ = routing_scores(q, centroids, head_of)                              # (G, Nq, C)
    RK = routing_scores(k, centroids, head_of)                              # (G, Nk, C)
    aK = RK.argmax(axis=-1)                                                 # (G, Nk) a^K
    if mask is not None:
        aK = np.where(mask, aK, -1)                                         # (G, Nk) masked: no cluster
    members = aK[:, None, :] == np.arange(C)[None, :, None]                 # (G, C, Nk)
    first_key = np.where(members, np.arange(Nk), Nk).min(axis=-1)           # (G, C) f_c (Nk: empty)
    return argmax_plan(RQ, aK, first_key, offset, C, unrouted)


def _route_balanced(q, k, mask, offset, centroids, head_of, C, window, unrouted):
    Nq, Nk = q.shape[1], k.shape[1]
    wQ, wK = window
    RQ = routing_scores(q, centroids, head_of)                              # (G, Nq, C)
    RK = routing_scores(k, centroids, head_of)                              # (G, Nk, C)
    q_dropped = None if mask is None or Nq != Nk else ~mask                 # masked positions rank last
    k_dropped = None if mask is None else ~mask
    qwin = top_windows(rank_scores(RQ), wQ, q_dropped, keep_dropped=True)   # (G, C, wQ) W^Q
    kwin = top_windows(rank_scores(RK), wK, k_dropped, keep_dropped=False)  # (G, C, wK) W^K
    return balanced_plan(RQ, qwin, kwin, mask, offset, Nk, C, unrouted)


def route(q, k, *, mask, offset, centroids, head_of, num_clusters, assignment, window, unrouted):
    """The routing plan of flat inputs (backend entry point of :func:`eff_attn.methods.routing.route`)."""
    centroids = centroids.astype(q.dtype)
    if assignment == "argmax":
        return _route_argmax(q, k, mask, offset, centroids, head_of, num_clusters, unrouted)
    return _route_balanced(q, k, mask, offset, centroids, head_of, num_clusters, window, unrouted)


# --- argmax mode: the definition, a dense masked softmax ------------------------------


def argmax_pattern(plan, mask, offset, Nq, Nk):
    """``M_ij = [a^Q_i = a^K_j >= 0] and j in V_i``, shape (G, Nq, Nk)."""
    aQ, aK = plan.query_cluster, plan.key_cluster                           # (G, Nq), (G, Nk)
    same = (aQ[:, :, None] == aK[:, None, :]) & (aQ >= 0)[:, :, None]       # (G, Nq, Nk)
    return same & visible_pairs(mask, offset, Nq, Nk)                       # (G, Nq, Nk)


def argmax_attention(q, k, v, plan, *, mask, offset, scale):
    """``out_i = sum_{j in V_i, a^K_j = a^Q_i} softmax_j(S_ij) v_j``; returns (out, lse)."""
    M = argmax_pattern(plan, mask, offset, q.shape[1], k.shape[1])          # (G, Nq, Nk)
    scores = scale * (q @ swap_last(k))                                     # (G, Nq, Nk)
    out, lse, _ = softmax_attend(scores, M, v)                              # (G, Nq, Dv), (G, Nq)
    return out, lse


def argmax_backward(dout, q, k, v, out, lse, plan, *, mask, offset, scale):
    """exact's backward on the routed pattern ``M``: ``P = exp(S - L)`` on ``M``,
    ``dS = P (dO v^T - delta)``, ``dq = s dS k``, ``dk = s dS^T q``, ``dv = P^T dO``."""
    M = argmax_pattern(plan, mask, offset, q.shape[1], k.shape[1])          # (G, Nq, Nk)
    scores = np.where(M, scale * (q @ swap_last(k)), -np.inf)               # (G, Nq, Nk)
    L = np.where(np.isfinite(lse), lse, 0.0)[..., None]                     # (G, Nq, 1)
    P = np.exp(scores - L)                                                  # (G, Nq, Nk); 0 off M
    dS, dv = softmax_attend_backward(dout, out, P, v)                       # (G, Nq, Nk), (G, Nk, Dv)
    return scale * (dS @ k), scale * (swap_last(dS) @ q), dv


# --- balanced mode: static windows -------------------------------------------------


def _gather(x, index, xp=np):
    """Rows ``x[g, index]`` of shape (*index.shape, F); -1 entries read row 0."""
    g = xp.arange(x.shape[0]).reshape((-1,) + (1,) * (index.ndim - 1))     # (G, 1, ...)
    return x[g, xp.where(index >= 0, index, 0)]                             # (*index.shape, F)


def _window_tiles(q, k, v, qwin, kwin, limits, scale, xp=np):
    """Gathered window tiles: ``Qc, Kc, Vc``, scores ``S`` (G, C, wQ, wK) and visibility."""
    Qc = _gather(q, qwin, xp)                                               # (G, C, wQ, D)
    Kc = _gather(k, kwin, xp)                                               # (G, C, wK, D)
    Vc = _gather(v, kwin, xp)                                               # (G, C, wK, Dv)
    S = scale * (Qc @ swap_last(Kc))                                        # (G, C, wQ, wK)
    visible = (kwin >= 0)[..., None, :] & (kwin[..., None, :] <= limits[qwin][..., None])   # (G, C, wQ, wK)
    return Qc, Kc, Vc, S, visible


def window_attention(q, k, v, qwin, kwin, limits, scale, xp=np):
    """``O^c_i = softmax_{j in W^K_c, j <= l_i}(S_ij) v_j`` for every window slot.

    Returns ``O`` (G, C, wQ, Dv) and ``lse`` (G, C, wQ) (``-inf``: window does
    not serve the slot's row). Memory ``O(C wQ wK)`` per slice.
    """
    _, _, Vc, S, visible = _window_tiles(q, k, v, qwin, kwin, limits, scale, xp)
    O, lse, _ = softmax_attend(S, visible, Vc, xp)                          # (G, C, wQ, Dv), (G, C, wQ)
    return O, lse


def window_backward(dO, q, k, v, O, lse, qwin, kwin, limits, scale, xp=np):
    """Gradients of the window slots: ``dQ`` (G, C, wQ, D), ``dK`` (G, C, wK, D), ``dV`` (G, C, wK, Dv).

    ``dO`` (G, C, wQ, Dv) is the gradient reaching each slot's output.
    """
    Qc, Kc, Vc, S, visible = _window_tiles(q, k, v, qwin, kwin, limits, scale, xp)
    L = xp.where(xp.isfinite(lse), lse, 0)[..., None]                       # (G, C, wQ, 1)
    P = xp.exp(xp.where(visible, S - L, -xp.inf))                           # (G, C, wQ, wK); 0 off the window
    dS, dV = softmax_attend_backward(dO, O, P, Vc, xp)                      # (G, C, wQ, wK), (G, C, wK, Dv)
    return scale * (dS @ Kc), scale * (swap_last(dS) @ Qc), dV


def _fallback_windows(plan):
    """Each row's fallback key window ``W^K_{fc_i}`` (G, Nq, wK); -1 where there is none."""
    fc = plan.query_cluster                                                 # (G, Nq)
    kwin = np.take_along_axis(plan.key_windows, np.where(fc >= 0, fc, 0)[..., None], axis=1)  # (G, Nq, wK)
    return np.where((fc >= 0)[..., None], kwin, -1)                         # (G, Nq, wK)


def balanced_attention(q, k, v, plan, *, offset, scale):
    """Windows, fallback and the combine ``o_i = |C^+_i|^{-1} sum_{c in C^+_i} O^c_i``.

    Returns ``out`` (G, Nq, Dv) and the saved window quantities.
    """
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    limits = row_limits(Nq, Nk, offset)                                     # (Nq,)
    qwin, kwin = plan.query_windows, plan.key_windows                       # (G, C, wQ), (G, C, wK)
    O, lse = window_attention(q, k, v, qwin, kwin, limits, scale)           # (G, C, wQ, Dv), (G, C, wQ)
    rows = np.arange(Nq)[None, :, None]                                     # (1, Nq, 1) fallback "windows" of one row
    fwin = _fallback_windows(plan)                                          # (G, Nq, wK): one window per row
    Of, lse_f = window_attention(q, k, v, np.broadcast_to(rows, (G, Nq, 1)), fwin, limits, scale)  # (G, Nq, 1, Dv)
    g3 = np.arange(G)[:, None, None]                                        # (G, 1, 1)
    acc = np.zeros((G, Nq, Dv), dtype=q.dtype)                              # (G, Nq, Dv)
    np.add.at(acc, (g3, qwin), O)                                           # in index order: ascending c
    acc += Of[:, :, 0]                                                      # (G, Nq, Dv) 0 without fallback
    n = np.zeros((G, Nq), dtype=np.int64)                                   # (G, Nq) |C^+_i|
    np.add.at(n, (g3, qwin), np.isfinite(lse))
    n += np.isfinite(lse_f[:, :, 0])
    out = acc / np.where(n > 0, n, 1).astype(q.dtype)[..., None]            # (G, Nq, Dv); unserved rows 0
    return out, {"window_out": O, "window_lse": lse, "fallback_out": Of, "fallback_lse": lse_f, "served": n}


def balanced_backward(dout, q, k, v, saved, plan, *, offset, scale):
    """Per served window: ``dO^c_i = dO_i / |C^+_i|``, then each window's softmax
    backward, scattered back to q, k and v. Tokens in no served window get 0."""
    G, Nq, _ = q.shape
    Nk = k.shape[1]
    limits = row_limits(Nq, Nk, offset)                                     # (Nq,)
    n = saved["served"]                                                     # (G, Nq)
    d_row = dout / np.where(n > 0, n, 1).astype(q.dtype)[..., None]         # (G, Nq, Dv)
    g3 = np.arange(G)[:, None, None]                                        # (G, 1, 1)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    rows = np.broadcast_to(np.arange(Nq)[None, :, None], (G, Nq, 1))        # (G, Nq, 1)
    parts = (
        (plan.query_windows, plan.key_windows, saved["window_out"], saved["window_lse"]),
        (rows, _fallback_windows(plan), saved["fallback_out"], saved["fallback_lse"]),
    )
    for qwin, kwin, O, lse in parts:
        dO = np.where(np.isfinite(lse)[..., None], d_row[g3, qwin], 0)    # (G, C', wQ, Dv)
        dQ, dK, dV = window_backward(dO, q, k, v, O, lse, qwin, kwin, limits, scale)
        np.add.at(dq, (g3, qwin), dQ)
        valid = kwin >= 0                                                   # (G, C', wK)
        g_k = np.broadcast_to(g3, kwin.shape)[valid]
        np.add.at(dk, (g_k, kwin[valid]), dK[valid])
        np.add.at(dv, (g_k, kwin[valid]), dV[valid])
    return dq, dk, dv


# --- dense views of a plan (tests, figures, info) ------------------------------------


def routed_support(plan, mask, offset, Nq, Nk):
    """Visible keys each row attends through its served windows, (G, Nq, Nk) bool."""
    if plan.assignment == "argmax":
        return argmax_pattern(plan, mask, offset, Nq, Nk)
    G = plan.query_windows.shape[0]
    support = np.zeros((G, Nq, Nk), dtype=bool)                             # (G, Nq, Nk)
    g2 = np.arange(G)[:, None]                                              # (G, 1)
    for c in range(plan.num_clusters):
        in_q = np.zeros((G, Nq), dtype=bool)
        in_q[g2, plan.query_windows[:, c]] = True                           # (G, Nq)
        in_k = _window_members(plan.key_windows[:, c], Nk)                  # (G, Nk)
        support |= in_q[:, :, None] & in_k[:, None, :]
    fwin = _fallback_windows(plan)                                          # (G, Nq, wK)
    support |= _window_members(fwin, Nk)                                    # (G, Nq, Nk)
    return support & visible_pairs(mask, offset, Nq, Nk)


def _window_members(win, Nk):
    """Membership of -1-padded windows ``(..., w)`` over keys: (..., Nk) bool."""
    hit = np.zeros((*win.shape[:-1], Nk + 1), dtype=bool)                  # (..., Nk + 1); slot Nk: padding
    np.put_along_axis(hit, np.where(win >= 0, win, Nk), True, axis=-1)
    return hit[..., :Nk]


def attention_matrix(q, k, plan, *, mask, offset, scale):
    """The dense weights ``A`` (G, Nq, Nk) with ``out = A v``.

    argmax: the softmax over the routed pattern. balanced: the average over
    the serving windows of each window's softmax (one window at a time, so
    memory stays ``O(Nq Nk)``).
    """
    G, Nq, Nk = q.shape[0], q.shape[1], k.shape[1]
    scores = scale * (q @ swap_last(k))                                     # (G, Nq, Nk)
    visible = visible_pairs(mask, offset, Nq, Nk)                           # (..., Nq, Nk)
    eye = np.eye(Nk, dtype=q.dtype)                                         # (Nk, Nk): A = softmax-weights of v = I
    if plan.assignment == "argmax":
        M = argmax_pattern(plan, mask, offset, Nq, Nk)                      # (G, Nq, Nk)
        return softmax_attend(scores, M, np.broadcast_to(eye, (G, Nk, Nk)))[0]
    total = np.zeros((G, Nq, Nk), dtype=q.dtype)                            # (G, Nq, Nk)
    n = np.zeros((G, Nq, 1), dtype=q.dtype)                                 # (G, Nq, 1)
    g2 = np.arange(G)[:, None]
    for c in range(plan.num_clusters):
        qw, kw = plan.query_windows[:, c], plan.key_windows[:, c]           # (G, wQ), (G, wK)
        in_q = np.zeros((G, Nq), dtype=bool)
        in_q[g2, qw] = True                                                 # (G, Nq)
        M = in_q[:, :, None] & _window_members(kw, Nk)[:, None, :] & visible   # (G, Nq, Nk)
        A_c = softmax_attend(scores, M, np.broadcast_to(eye, (G, Nk, Nk)))[0]  # (G, Nq, Nk)
        total += A_c
        n += M.any(axis=-1, keepdims=True)
    fwin = _fallback_windows(plan)                                          # (G, Nq, wK)
    M = _window_members(fwin, Nk) & visible                                 # (G, Nq, Nk)
    total += softmax_attend(scores, M, np.broadcast_to(eye, (G, Nk, Nk)))[0]
    n += M.any(axis=-1, keepdims=True)
    return total / np.where(n > 0, n, 1).astype(q.dtype)


# --- backend entry points ----------------------------------------------------------


def forward(q, k, v, *, mask, offset, scale, assignment, num_clusters, window, unrouted, plan, centroids,
            head_of, **params):
    """Route (unless a plan is given), attend, and collect the residuals."""
    if plan is None:
        plan = route(q, k, mask=mask, offset=offset, centroids=centroids, head_of=head_of,
                     num_clusters=num_clusters, assignment=assignment, window=window, unrouted=unrouted)
    if assignment == "argmax":
        out, lse = argmax_attention(q, k, v, plan, mask=mask, offset=offset, scale=scale)
        saved = {"lse": lse}
    else:
        out, saved = balanced_attention(q, k, v, plan, offset=offset, scale=scale)
    return out, {**saved, "plan": plan}                                     # completed by routing.finish


def backward(dout, q, k, v, out, res, *, mask, offset, scale, assignment, **params):
    """Replay the forward's plan: exact softmax gradients on the routed pattern."""
    plan = res["plan"]
    if assignment == "argmax":
        return argmax_backward(dout, q, k, v, out, res["lse"], plan, mask=mask, offset=offset, scale=scale)
    return balanced_backward(dout, q, k, v, res, plan, offset=offset, scale=scale)
