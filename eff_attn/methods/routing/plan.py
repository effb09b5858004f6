"""The routing plan and the index arithmetic every backend shares.

A :class:`RoutingPlan` says which keys each query attends; given the plan,
the attention is fully determined. Every function here takes the array
module ``xp`` (NumPy, or CuPy on a GPU) and works on the flattened
``(G, ...)`` layout of the backends.

Positions and visibility
    Query ``i`` sits at ``p_i = i + o``; it may see kept keys ``j <= p_i``
    when causal. :func:`row_limits` gives ``l_i = min(p_i, Nk - 1)`` (or
    ``Nk - 1`` when not causal), so "key ``j`` is visible" is ``j <= l_i``
    and a mask check. Clusters and windows hold kept keys only.

Slots
    The Numba and CuPy kernels compute one output *slot* per (query,
    window) pair and combine the slots of each row afterwards
    (:func:`slot_layout`). In argmax mode a row has one slot; in balanced
    mode one per window membership, plus one for the fallback window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ... import masks
from ..._hashing import segment_offsets, stable_key_argsort

__all__ = [
    "RoutingPlan",
    "ASSIGNMENTS",
    "row_limits",
    "argmax_query_clusters",
    "argmax_plan",
    "balanced_plan",
    "first_key_of_clusters",
    "first_key_of_windows",
    "balanced_served_counts",
    "nearest_open_cluster",
    "plan_statistics",
    "slot_layout",
    "SlotLayout",
    "tile_tasks",
    "visible_prefix",
]

ASSIGNMENTS = ("argmax", "balanced")


@dataclass(frozen=True)
class RoutingPlan:
    """Which keys each query attends: the routing decisions of one call.

    Attributes
    ----------
    assignment : {"argmax", "balanced"}
    num_clusters : int
    causal : bool or "top_left"
        The causal setting the plan was made for.
    query_cluster : int64 array of shape (..., Nq)
        argmax: the final cluster ``a^Q_i`` (-1: none). balanced: the
        fallback window of an unrouted row, or -1.
    key_cluster : int64 array of shape (..., Nk), or None
        argmax: ``a^K_j`` (-1: masked key). None in balanced mode.
    query_windows : int64 array of shape (..., C, wQ), or None
        balanced: the queries of each window, ascending positions.
    key_windows : int64 array of shape (..., C, wK), or None
        balanced: the kept keys of each window, ascending, padded with -1.
    unrouted : bool array of shape (..., Nq)
        Rows that see a key but whose own cluster or windows serve them
        nothing, before the fallback.
    """

    assignment: str
    num_clusters: int
    causal: object
    query_cluster: object
    key_cluster: object
    query_windows: object
    key_windows: object
    unrouted: object

    _ARRAYS = ("query_cluster", "key_cluster", "query_windows", "key_windows", "unrouted")

    @property
    def batch_shape(self) -> tuple:
        return tuple(self.query_cluster.shape[:-1])

    @property
    def window(self):
        """``(wQ, wK)`` in balanced mode, else None."""
        if self.query_windows is None:
            return None
        return int(self.query_windows.shape[-1]), int(self.key_windows.shape[-1])

    def map_arrays(self, fn) -> "RoutingPlan":
        """A copy with ``fn(array, tail_ndim)`` applied to every array field."""
        tails = {"query_cluster": 1, "key_cluster": 1, "query_windows": 2, "key_windows": 2, "unrouted": 1}
        return replace(self, **{
            name: None if getattr(self, name) is None else fn(getattr(self, name), tails[name])
            for name in self._ARRAYS
        })

    def flatten(self) -> "RoutingPlan":
        """The plan with its leading axes flattened to one ``G`` axis."""
        return self.map_arrays(lambda a, t: a.reshape(-1, *a.shape[a.ndim - t:]))

    def unflatten(self, batch_shape) -> "RoutingPlan":
        """The plan with its ``G`` axis reshaped to ``batch_shape``."""
        return self.map_arrays(lambda a, t: a.reshape(*batch_shape, *a.shape[1:]))


#: Balanced windows rank scores snapped to multiples of ``2**-bits`` (scores are cosines in
#: [-1, 1]): far coarser than the backends' rounding differences (a few ulps), so scores that
#: are equal in exact arithmetic (one-dimensional heads, repeated directions) rank by position
#: on every backend instead of by a last-bit difference.
RANK_BITS = {4: 14, 8: 32}


def rank_scores(R, xp=np):
    """``R`` snapped to the ranking grid of :data:`RANK_BITS` (exact: a power-of-two scale and a round)."""
    scale = float(2 ** RANK_BITS[R.dtype.itemsize])
    return (xp.round(R * scale) / scale).astype(R.dtype, copy=False)


def row_limits(Nq: int, Nk: int, offset, xp=np):
    """Last key position each query may see, shape (Nq,) int64, in ``[-1, Nk - 1]``."""
    if offset is None:
        return xp.full(Nq, Nk - 1, dtype=np.int64)
    return xp.clip(masks.query_positions(Nq, offset, xp), -1, Nk - 1).astype(np.int64)


def argmax_query_clusters(RQ, first_key, limits, unrouted_mode, xp=np):
    """Final query clusters of argmax mode, and the unrouted rows.

    Parameters
    ----------
    RQ : array of shape (G, Nq, C)
        Routing scores of the queries.
    first_key : int array of shape (G, C)
        ``f_c``, the first kept key of each cluster (``Nk`` when empty).
    limits : int array of shape (Nq,)
        From :func:`row_limits`; cluster ``c`` is open to row ``i`` when ``f_c <= l_i``.
    unrouted_mode : {"nearest", "zero"}

    Returns
    -------
    query_cluster : int64 array of shape (G, Nq)
        ``"nearest"``: ``argmax_{c open to i} RQ_ic`` (-1 if no cluster is
        open, i.e. ``V_i`` is empty); ``"zero"``: the raw ``argmax_c RQ_ic``.
    unrouted : bool array of shape (G, Nq)
        ``V_i`` non-empty and the raw cluster not open to row ``i``.
    """
    raw = xp.argmax(RQ, axis=-1).astype(np.int64)                           # (G, Nq) a^{Q,0}
    sees_any = first_key.min(axis=-1)[:, None] <= limits[None, :]           # (G, Nq) some cluster open
    raw_open = xp.take_along_axis(first_key, raw, axis=-1) <= limits[None, :]   # (G, Nq)
    unrouted = sees_any & ~raw_open                                         # (G, Nq)
    if unrouted_mode == "zero":
        return raw, unrouted
    # A routed row's raw cluster is open and the overall argmax, so it is also the best open one.
    return nearest_open_cluster(RQ, first_key, limits, unrouted, xp.where(sees_any, raw, -1), xp), unrouted


def nearest_open_cluster(RQ, first_key, limits, rows, fill, xp=np):
    """``fill`` with the rows where ``rows`` is True set to ``argmax_{c: f_c <= l_i} RQ_ic``
    (-1 where no cluster is open); (G, Nq) int64. Costs ``O(C)`` per selected row only."""
    g, i = xp.nonzero(rows)                                                 # (U,), (U,)
    open_ = first_key[g] <= limits[i][:, None]                              # (U, C)
    best = xp.argmax(xp.where(open_, RQ[g, i], -xp.inf), axis=-1)           # (U,)
    out = fill.astype(np.int64)                                             # (G, Nq) copy
    out[g, i] = xp.where(open_.any(axis=-1), best, -1)
    return out


def first_key_of_windows(key_windows, Nk: int, xp=np):
    """First (lowest) key of each window, ``Nk`` for an empty one, shape (G, C)."""
    first = key_windows[..., 0]                                             # (G, C)
    return xp.where(first >= 0, first, Nk).astype(np.int64)


def balanced_served_counts(query_windows, first_key, limits, Nq: int, xp=np):
    """Windows serving each row: ``|C^+_i| = #{c : i in W^Q_c, W^K_c and V_i meet}``.

    A window serves row ``i`` iff its first key is visible to ``i`` (keys
    are ascending and all kept). Returns int64 (G, Nq).
    """
    G = query_windows.shape[0]
    served = first_key[:, :, None] <= limits[query_windows]                 # (G, C, wQ)
    flat = (xp.arange(G, dtype=np.int64)[:, None, None] * Nq + query_windows).ravel()
    counts = xp.bincount(flat, weights=served.ravel().astype(np.float64), minlength=G * Nq)
    return counts.reshape(G, Nq).astype(np.int64)


def first_key_of_clusters(key_cluster, C: int, xp=np):
    """``f_c``: the first key of each cluster, ``Nk`` for an empty one, shape (G, C).

    Through the stable (cluster, position) sort that also gives the CSR.
    """
    Nk = key_cluster.shape[-1]
    perm, off = _csr(key_cluster, C + 1, xp)                                # (G, Nk), (G, C + 2)
    start = off[:, :C]                                                      # (G, C)
    first = xp.take_along_axis(perm, xp.minimum(start, Nk - 1), axis=-1)    # (G, C)
    return xp.where(off[:, 1 : C + 1] > start, first, Nk).astype(np.int64)


def argmax_plan(RQ, key_cluster, first_key, offset, C, unrouted_mode, xp=np) -> "RoutingPlan":
    """The argmax plan from the query scores and the key clusters (see :func:`argmax_query_clusters`)."""
    Nq, Nk = RQ.shape[1], key_cluster.shape[1]
    limits = row_limits(Nq, Nk, offset, xp)                                 # (Nq,)
    aQ, unrouted = argmax_query_clusters(RQ, first_key, limits, unrouted_mode, xp)
    return RoutingPlan("argmax", C, masks.causal_argument(offset, Nq, Nk), aQ,
                       key_cluster.astype(np.int64), None, None, unrouted)


def balanced_plan(RQ, query_windows, key_windows, mask, offset, Nk, C, unrouted_mode, xp=np) -> "RoutingPlan":
    """The balanced plan from the windows: unrouted rows and their fallback windows.

    Row ``i`` is unrouted when it sees a key but none of its windows holds
    a visible key; ``"nearest"`` gives it ``argmax_c RQ_ic`` over the windows
    whose first key is visible to it (-1 if none).
    """
    G, Nq, _ = RQ.shape
    limits = row_limits(Nq, Nk, offset, xp)                                 # (Nq,)
    first_key = first_key_of_windows(key_windows, Nk, xp)                   # (G, C)
    served = balanced_served_counts(query_windows, first_key, limits, Nq, xp)   # (G, Nq)
    sees_any = xp.broadcast_to(masks.visible_counts(mask, offset, Nq, Nk, xp) > 0, (G, Nq))
    unrouted = sees_any & (served == 0)                                     # (G, Nq)
    fallback = xp.full((G, Nq), -1, dtype=np.int64)                         # (G, Nq)
    if unrouted_mode == "nearest":
        fallback = nearest_open_cluster(RQ, first_key, limits, unrouted, fallback, xp)
    return RoutingPlan("balanced", C, masks.causal_argument(offset, Nq, Nk), fallback, None,
                       query_windows, key_windows, unrouted)


def _segment_key(g, c, C, Nk):
    """Composite key ``(g C + c)(Nk + 1)`` that puts each (slice, cluster) segment in its own range."""
    return (g * C + c) * (Nk + 1)


def _visible_in_segments(key_comp, g, c, limit, C, Nk, xp):
    """How many keys of segment (g, c) lie at positions ``<= limit`` (element-wise).

    ``key_comp`` is the sorted 1-D array of ``_segment_key(g, c) + position``
    over every kept key of every segment.
    """
    base = _segment_key(g, c, C, Nk)
    hi = xp.searchsorted(key_comp, base + limit, side="right")
    lo = xp.searchsorted(key_comp, base, side="left")
    return (hi - lo).astype(np.int64)


def plan_statistics(plan: RoutingPlan, mask, offset, Nq: int, Nk: int, xp=np) -> dict:
    """Counts that describe a flat plan: pairs, served windows, sizes, coverage.

    Returns a dict of arrays over the flat ``G`` axis: ``pairs_row`` (G, Nq)
    routed visible pairs, ``served`` (G, Nq) ``|C^+_i|`` after the fallback,
    ``memberships`` (G, Nq) ``|C_i|``, ``sees_any`` (G, Nq) ``V_i`` non-empty,
    ``query_sizes`` and ``key_sizes`` (G, C), and the scalars ``visible_pairs``,
    ``keys_kept`` and ``keys_covered``. Time ``O((Nq + Nk) log Nk + C wQ)``
    per slice; no (Nq, Nk) array.
    """
    C = plan.num_clusters
    G = plan.query_cluster.shape[0]
    limits = row_limits(Nq, Nk, offset, xp)                                 # (Nq,)
    counts = masks.visible_counts(mask, offset, Nq, Nk, xp)                 # (G|1, Nq)
    sees_any = xp.broadcast_to(counts > 0, (G, Nq))
    visible_pairs = int(xp.broadcast_to(counts, (G, Nq)).sum())
    kept = xp.ones((G, Nk), dtype=bool) if mask is None else mask
    g_q = xp.arange(G, dtype=np.int64)[:, None]                             # (G, 1)
    aQ = plan.query_cluster                                                 # (G, Nq)
    if plan.assignment == "argmax":
        aK = plan.key_cluster                                               # (G, Nk)
        g_k = xp.broadcast_to(g_q, aK.shape)
        in_cluster = aK >= 0
        key_comp = xp.sort((_segment_key(g_k, aK, C, Nk) + xp.arange(Nk))[in_cluster])
        routed = aQ >= 0
        c_q = xp.where(routed, aQ, 0)
        pairs_row = xp.where(routed, _visible_in_segments(key_comp, g_q, c_q, limits, C, Nk, xp), 0)
        served = (pairs_row > 0).astype(np.int64)
        memberships = routed.astype(np.int64)
        query_sizes = _per_cluster(g_q, aQ, G, C, xp)
        key_sizes = _per_cluster(g_k, aK, G, C, xp)
        keys_covered = int(in_cluster.sum())
    else:
        qwin, kwin = plan.query_windows, plan.key_windows                   # (G, C, wQ), (G, C, wK)
        wQ = qwin.shape[-1]
        g3 = xp.arange(G, dtype=np.int64)[:, None, None]
        c3 = xp.arange(C, dtype=np.int64)[None, :, None]
        valid = kwin >= 0
        key_comp = (_segment_key(g3, c3, C, Nk) + kwin)[valid]              # already ascending
        slot_pairs = _visible_in_segments(key_comp, g3, c3, limits[qwin], C, Nk, xp)   # (G, C, wQ)
        fallback = aQ >= 0
        fb_pairs = xp.where(fallback, _visible_in_segments(key_comp, g_q, xp.where(fallback, aQ, 0), limits,
                                                           C, Nk, xp), 0)    # (G, Nq)
        rows = (g3 * Nq + qwin).ravel()
        pairs_row = _bincount(rows, slot_pairs.ravel(), G * Nq, xp).reshape(G, Nq) + fb_pairs
        served = _bincount(rows, (slot_pairs > 0).ravel(), G * Nq, xp).reshape(G, Nq) + (fb_pairs > 0)
        memberships = _bincount(rows, None, G * Nq, xp).reshape(G, Nq)
        query_sizes = wQ + _per_cluster(g_q, aQ, G, C, xp)
        key_sizes = valid.sum(axis=-1).astype(np.int64)
        hit = _bincount((g3 * Nk + kwin)[valid], None, G * Nk, xp).reshape(G, Nk)
        keys_covered = int((hit > 0).sum())
    return {
        "pairs_row": pairs_row.astype(np.int64),
        "served": served.astype(np.int64),
        "memberships": memberships.astype(np.int64),
        "sees_any": sees_any,
        "query_sizes": query_sizes.astype(np.int64),
        "key_sizes": key_sizes.astype(np.int64),
        "visible_pairs": visible_pairs,
        "keys_kept": int(xp.broadcast_to(kept, (G, Nk)).sum()),
        "keys_covered": keys_covered,
    }


def _bincount(index, weights, length, xp):
    if weights is None:
        return xp.bincount(index, minlength=length).astype(np.int64)
    return xp.rint(xp.bincount(index, weights=weights.astype(np.float64), minlength=length)).astype(np.int64)


def _per_cluster(g, a, G, C, xp):
    """Members of each cluster per slice, (G, C), ignoring ``a < 0``."""
    flat = (g * C + a)[a >= 0]
    return _bincount(flat, None, G * C, xp).reshape(G, C)


# --- the slot layout of the Numba and CuPy kernels ------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """Where each slot's query and keys come from, as CSR lists per segment.

    Attributes
    ----------
    qrow : int64 (G, Sq)
        Query row of each slot (-1: unused slot).
    qperm, qoff : int64 (G, Sq), (G, C + 2)
        Slots sorted by (segment, slot); segment ``c`` is
        ``qperm[g, qoff[g, c]:qoff[g, c + 1]]``; segment ``C`` holds the
        slots that attend nothing.
    krow, kperm, koff : the same for key slots (ascending positions per segment).
    rperm, roff : int64 (G, Sq), (G, Nq + 2)
        Inverse lists: the slots of row ``i`` are ``rperm[g, roff[g, i]:roff[g, i + 1]]``,
        in ascending slot order (ascending window).
    kr_perm, kr_off : the same for keys, (G, Sk), (G, Nk + 2).
    window_slots : int
        Slots ``[0, window_slots)`` are balanced windows (0 in argmax mode).
    """

    qrow: object
    qperm: object
    qoff: object
    krow: object
    kperm: object
    koff: object
    rperm: object
    roff: object
    kr_perm: object
    kr_off: object
    window_slots: int


def _csr(segment, num_segments, xp):
    """Stable sort of slots by segment (ids < 0 go to the last segment) and its offsets."""
    key = xp.where(segment >= 0, segment, num_segments - 1)
    perm = stable_key_argsort(key, xp)                                      # (G, S)
    off = segment_offsets(xp.take_along_axis(key, perm, axis=-1), num_segments, xp)
    return perm, off


def slot_layout(plan: RoutingPlan, Nq: int, Nk: int, xp=np) -> SlotLayout:
    """The slot layout of a flat plan (see :class:`SlotLayout`).

    argmax: slot ``i`` is row ``i`` in segment ``a^Q_i``; key slot ``j`` is key
    ``j`` in segment ``a^K_j``. balanced: slots ``c wQ + s`` hold
    ``W^Q_c[s]`` in segment ``c``, then slot ``C wQ + i`` holds row ``i`` in its
    fallback segment (or none); key slots ``c wK + s`` hold ``W^K_c[s]``.
    """
    C = plan.num_clusters
    G = plan.query_cluster.shape[0]
    if plan.assignment == "argmax":
        qrow = xp.broadcast_to(xp.arange(Nq, dtype=np.int64), (G, Nq))
        qseg = plan.query_cluster
        krow = xp.broadcast_to(xp.arange(Nk, dtype=np.int64), (G, Nk))
        kseg = plan.key_cluster
        window_slots = 0
    else:
        qwin, kwin = plan.query_windows, plan.key_windows
        wQ, wK = qwin.shape[-1], kwin.shape[-1]
        fallback = plan.query_cluster                                       # (G, Nq)
        win_seg = xp.broadcast_to(xp.repeat(xp.arange(C, dtype=np.int64), wQ), (G, C * wQ))
        qrow = xp.concatenate([qwin.reshape(G, C * wQ), xp.where(fallback >= 0, xp.arange(Nq), -1)], axis=1)
        qseg = xp.concatenate([win_seg, fallback], axis=1)
        krow = kwin.reshape(G, C * wK)
        kseg = xp.where(krow >= 0, xp.broadcast_to(xp.repeat(xp.arange(C, dtype=np.int64), wK), (G, C * wK)), -1)
        window_slots = C * wQ
    qrow, krow = (xp.ascontiguousarray(a.astype(np.int64)) for a in (qrow, krow))
    qperm, qoff = _csr(qseg, C + 1, xp)
    kperm, koff = _csr(kseg, C + 1, xp)
    rperm, roff = _csr(qrow, Nq + 1, xp)
    kr_perm, kr_off = _csr(krow, Nk + 1, xp)
    return SlotLayout(qrow, qperm, qoff, krow, kperm, koff, rperm, roff, kr_perm, kr_off, window_slots)


def visible_prefix(krow, kperm, g, k0, nk, limit):
    """How many keys of the segment ``kperm[g, k0:k0 + nk]`` (ascending positions) lie at ``<= limit``.

    A binary search; plain Python so that the Numba CPU kernels and the
    numba.cuda kernels compile the same code.
    """
    lo = 0
    hi = nk
    while lo < hi:
        mid = (lo + hi) // 2
        if krow[g, kperm[g, k0 + mid]] <= limit:
            lo = mid + 1
        else:
            hi = mid
    return lo


def tile_tasks(first, count, other_count, tile: int) -> np.ndarray:
    """Tiles of ``tile`` entries over CSR segments, heaviest first (host NumPy).

    Parameters
    ----------
    first, count : int arrays of shape (G, C)
        Segment ``(g, c)`` covers entries ``[first, first + count)``.
    other_count : int array of shape (G, C)
        Size of the partner list (keys for query tiles, queries for key
        tiles); segments with none are skipped. The work of a tile is its
        size times this.
    tile : int

    Returns
    -------
    int64 array of shape (T, 4)
        Rows ``(g, c, start, stop)``, sorted by decreasing work.
    """
    first, count, other_count = (np.asarray(a, dtype=np.int64) for a in (first, count, other_count))
    live = (count > 0) & (other_count > 0)                                  # (G, C)
    g, c = np.nonzero(live)
    n_tiles = (count[g, c] + tile - 1) // tile                              # (S,)
    seg = np.repeat(np.arange(g.size), n_tiles)                             # (T,)
    within = np.arange(seg.size) - np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
    start = first[g, c][seg] + within * tile
    stop = np.minimum(start + tile, first[g, c][seg] + count[g, c][seg])
    tasks = np.stack([g[seg], c[seg], start, stop], axis=1).astype(np.int64)
    work = (stop - start) * other_count[g, c][seg]
    return np.ascontiguousarray(tasks[np.argsort(-work, kind="stable")])
