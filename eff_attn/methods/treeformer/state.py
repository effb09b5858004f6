"""Treeformer's tree: the frozen state, its initialisers and the routing walk.

A tree of height ``h`` has ``I = 2**h - 1`` internal nodes and ``L = 2**h``
leaves in heap order: the root is node 0, the children of node ``i`` are
``2i + 1`` (left) and ``2i + 2`` (right), and leaf ``l`` is node ``I + l``.
Internal node ``i`` scores a point as ``z_i(x) = w_i . x + b_i``; the walk
goes left when ``z >= 0`` (ties go left) and right when ``z < 0``::

    m_0 = 0,   m_{t+1} = 2 m_t + 1 + [z_{m_t}(x) < 0],   leaf(x) = m_h - I

The path node at depth ``t`` of leaf ``l`` is ``(2**t - 1) + (l >> (h - t))``.
Routing depends only on the sign of ``z``, so it is invariant to
``(w_i, b_i) -> lambda (w_i, b_i)`` for ``lambda > 0``.

Every split built from data (:func:`split_thresholds`, the one rule that
:func:`init_tree_pca`, :func:`update_tree_bias`, :func:`update_tree_depth`
and the fits use) sends the lower half of the points' projections by rank
right and the upper half left, and puts the hyperplane midway across a gap
between two projections that is wider than twice the rounding bound of a
float32 walk. No point used to build the tree lies within that bound of a
hyperplane, so NumPy, Numba and CuPy, which round ``z`` differently, send it
the same way.

Everything here runs on the host in NumPy; the initialisers and
:func:`update_tree_bias` / :func:`update_tree_depth` pool the points (queries
and unmasked keys) of every slice that shares a tree, and loop over the
nodes of one level at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..._array import to_host
from ..._heads import head_index
from ..._validate import check_int
from ...random import as_generator

__all__ = [
    "MAX_HEIGHT",
    "TreeformerState",
    "BoundTree",
    "default_height",
    "draw_treeformer_directions",
    "init_tree",
    "init_tree_pca",
    "update_tree_bias",
    "update_tree_depth",
    "route",
    "path_nodes",
    "split_sign_matrix",
    "ancestor_matrix",
    "one_hot_leaves",
    "tree_index",
    "pooled_points",
    "pool_slices",
    "split_thresholds",
    "WALK_ROUNDOFF",
]

#: Largest supported height (2**20 leaves).
MAX_HEIGHT = 20
#: Keys per leaf that the default height aims at: a GEMM-sized block.
DEFAULT_LEAF_KEYS = 64
#: Unit roundoff of the coarsest walk (float32): the rounding bound of ``z`` that
#: a split built from data keeps its points away from.
WALK_ROUNDOFF = 2.0**-24


@dataclass(frozen=True)
class TreeformerState:
    """A complete binary tree with oblique (hyperplane) splits.

    ``T`` (``tree_shape``) is ``()`` for one tree shared by every (batch,
    head) slice, or e.g. ``(H,)`` for one tree per head; it broadcasts
    right-aligned against the inputs' leading axes.

    Parameters
    ----------
    w : ndarray of shape (*T, I, D)
        Split directions in heap order, ``I = 2**height - 1`` (may be 0).
        Stored as a read-only float64 copy.
    b : ndarray of shape (*T, I)
        Split offsets.
    height : int
        ``0 <= height <= 20``.

    Raises
    ------
    ValueError
        Height out of range, shapes that do not fit the height, or
        non-finite entries.
    """

    w: np.ndarray
    b: np.ndarray
    height: int

    def __post_init__(self):
        height = check_int("height", self.height, minimum=0, maximum=MAX_HEIGHT)
        w = np.array(self.w, dtype=np.float64)
        b = np.array(self.b, dtype=np.float64)
        internal = 2**height - 1
        if w.ndim < 2 or w.shape[-2] != internal or w.shape[-1] < 1:
            raise ValueError(
                f"w must have shape (*T, I, D) with I = 2**height - 1 = {internal} and D >= 1 "
                f"for height={height}, got shape {w.shape}"
            )
        if b.shape != w.shape[:-1]:
            raise ValueError(f"b must have shape {w.shape[:-1]} to match w {w.shape}, got shape {b.shape}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError("the tree's w and b must be finite")
        w.flags.writeable = False
        b.flags.writeable = False
        object.__setattr__(self, "w", w)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "height", height)

    @property
    def num_internal(self) -> int:
        return 2**self.height - 1

    @property
    def num_leaves(self) -> int:
        return 2**self.height

    @property
    def num_nodes(self) -> int:
        return 2 * self.num_leaves - 1

    @property
    def dim(self) -> int:
        return self.w.shape[-1]

    @property
    def tree_shape(self) -> tuple:
        return tuple(self.w.shape[:-2])

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """``w`` as (prod T, I, D) and ``b`` as (prod T, I), float64 views."""
        T = math.prod(self.tree_shape)
        return self.w.reshape(T, self.num_internal, self.dim), self.b.reshape(T, self.num_internal)


@dataclass(frozen=True)
class BoundTree:
    """A tree bound to one call's flattened (G) slices: what the backends receive.

    Attributes
    ----------
    state : TreeformerState
    tree_of_slice : int64 ndarray of shape (G,)
        Index of slice ``g``'s tree in ``state.flat()``.
    source : {"given", "pca_median", "random", "fit"}
        Where the tree came from (``info["state_source"]``).
    history : FitHistory or None
        The fit's loss history when ``source == "fit"``.
    """

    state: TreeformerState
    tree_of_slice: np.ndarray
    source: str
    history: object = None


def default_height(Nk: int) -> int:
    """``min(20, max(0, floor(log2(Nk / 64))))``: leaves of about 64 keys."""
    if Nk < 2 * DEFAULT_LEAF_KEYS:
        return 0
    return min(MAX_HEIGHT, int(Nk // DEFAULT_LEAF_KEYS).bit_length() - 1)


def tree_index(tree_shape: tuple, batch_shape: tuple) -> np.ndarray:
    """Tree of each flattened slice: ``arange(prod T)`` broadcast right-aligned to ``batch_shape``
    (:func:`eff_attn._heads.head_index`)."""
    return head_index(tree_shape, batch_shape, what="state: the tree shape",
                      hint="each tree axis must be 1 or equal the aligned input axis")


# --- dense forms of the tree (surrogate gradients, reference TC) --------------------


def split_sign_matrix(height: int) -> np.ndarray:
    """``S`` of shape (L, I): ``+1``/``-1`` if leaf ``l`` is in node ``i``'s left/right subtree, else 0.

    With ``a = sign+(z)`` (``sign+(0) = +1``) and ``u = S a``, the routed
    leaf has ``u = h`` and every other leaf ``u <= h - 2``.
    """
    L, internal = 2**height, 2**height - 1
    S = np.zeros((L, internal))                                             # (L, I)
    leaves = np.arange(L)                                                   # (L,)
    for t in range(height):
        node = (2**t - 1) + (leaves >> (height - t))                        # (L,) path node at depth t
        goes_right = (leaves >> (height - t - 1)) & 1                       # (L,)
        S[leaves, node] = np.where(goes_right == 1, -1.0, 1.0)
    return S


def ancestor_matrix(height: int) -> np.ndarray:
    """``A`` of shape (2L - 1, L): ``A[m, l] = 1`` if node ``m`` is on leaf ``l``'s path (root and leaf included)."""
    L = 2**height
    A = np.zeros((2 * L - 1, L))                                            # (2L-1, L)
    leaves = np.arange(L)
    for t in range(height + 1):
        A[(2**t - 1) + (leaves >> (height - t)), leaves] = 1.0
    return A


def one_hot_leaves(leaf, num_leaves: int, dtype=np.float64):
    """``P`` of shape (..., N, L) with ``P[n, leaf[n]] = 1``; zero rows where ``leaf = -1``."""
    return (leaf[..., None] == np.arange(num_leaves)).astype(dtype)        # (..., N, L)


def path_nodes(leaf, height: int):
    """Nodes on the root-to-leaf path, shape (..., N, h + 1); -1 where ``leaf = -1``.

    ``m_t = (2**t - 1) + (leaf >> (h - t))`` for ``t = 0..h``.
    """
    leaf = np.asarray(leaf)
    depth = np.arange(height + 1)                                           # (h+1,)
    nodes = (2**depth - 1) + (np.maximum(leaf, 0)[..., None] >> (height - depth))  # (..., N, h+1)
    return np.where(leaf[..., None] >= 0, nodes, -1).astype(np.int64)


# --- routing ---------------------------------------------------------------------------


def walk(x, w, b, height: int):
    """Leaf of every point by the heap walk, shape (..., N), int64.

    Parameters
    ----------
    x : ndarray of shape (..., N, D)
    w : ndarray of shape (..., I, D), broadcast against ``x``'s leading axes
    b : ndarray of shape (..., I)

    ``z`` is computed in the dtype of ``x`` (cast ``w``, ``b`` first).
    Time ``O(N h D)``.
    """
    node = np.zeros(x.shape[:-1], dtype=np.int64)                           # (..., N)
    for _ in range(height):
        w_m = np.take_along_axis(w, node[..., None], axis=-2)               # (..., N, D)
        b_m = np.take_along_axis(b, node, axis=-1)                          # (..., N)
        z = np.einsum("...nd,...nd->...n", x, w_m) + b_m                    # (..., N)
        node = 2 * node + 1 + (z < 0)                                       # (..., N); ties go left
    return node - (2**height - 1)


def _aligned(tree: TreeformerState, ndim_lead: int, dtype):
    """The tree's arrays with its axes right-aligned to ``ndim_lead`` leading axes, in ``dtype``."""
    T = tree.tree_shape
    if len(T) > ndim_lead:
        raise ValueError(f"state: the tree shape {T} has more axes than the inputs' leading shape")
    ones = (1,) * (ndim_lead - len(T))
    w = tree.w.reshape(*ones, *T, tree.num_internal, tree.dim).astype(dtype)
    b = tree.b.reshape(*ones, *T, tree.num_internal).astype(dtype)
    return w, b


def check_tree_dim(tree: TreeformerState, D: int):
    if not isinstance(tree, TreeformerState):
        raise TypeError(f"state must be a TreeformerState, got {type(tree).__name__}")
    if tree.dim != D:
        raise ValueError(f"state: the tree was built for D={tree.dim} features but the inputs have D={D}")


def route(x, tree: TreeformerState, *, mask=None):
    """Leaf of every point, -1 where masked.

    Parameters
    ----------
    x : array of shape (..., N, D)
        Queries or keys (NumPy or CuPy; CuPy is copied to the host).
    tree : TreeformerState
        Its tree shape broadcasts right-aligned against ``x``'s leading axes.
    mask : bool array of shape (..., N), optional
        Keep-mask; masked points get leaf -1.

    Returns
    -------
    int64 ndarray of shape (..., N)
        The walk computes ``z`` in ``x``'s dtype (float32 or float64).
    """
    x = to_host(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    check_tree_dim(tree, x.shape[-1])
    lead = x.shape[:-2]
    if mask is not None:
        lead = np.broadcast_shapes(lead, to_host(mask).shape[:-1])
    ndim = max(len(lead), len(tree.tree_shape))
    x = x.reshape((1,) * (ndim - (x.ndim - 2)) + x.shape)
    w, b = _aligned(tree, ndim, x.dtype)
    leaf = walk(x, w, b, tree.height)                                       # (..., N)
    if mask is not None:
        leaf = np.where(to_host(mask), leaf, -1)
    return leaf.astype(np.int64)


# --- pooled points of the slices that share a tree --------------------------------------


def pooled_points(q, k, mask=None, tree_shape=None):
    """Float64 points per tree: the queries and unmasked keys of every slice that uses it.

    Returns
    -------
    points : list of ndarray of shape (n_t, D), one per tree (``prod T`` of them)
    tree_shape : tuple
        ``T``, the broadcast leading shape when ``tree_shape`` is None.
    """
    q = to_host(q).astype(np.float64)
    k = to_host(k).astype(np.float64)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k has D={k.shape[-1]} features but q has D={q.shape[-1]}")
    shapes = [q.shape[:-2], k.shape[:-2]]
    if mask is not None:
        mask = to_host(mask).astype(bool)
        if mask.shape[-1] != k.shape[-2]:
            raise ValueError(f"mask must have shape (..., Nk) with Nk={k.shape[-2]}, got shape {mask.shape}")
        shapes.append(mask.shape[:-1])
    data_lead = np.broadcast_shapes(*shapes)
    T = tuple(data_lead if tree_shape is None else tree_shape)
    try:
        lead = np.broadcast_shapes(data_lead, T)
    except ValueError:
        raise ValueError(f"tree_shape {T} does not broadcast against the inputs' leading shape {data_lead}") from None
    G = math.prod(lead)
    qf = np.broadcast_to(q, (*lead, *q.shape[-2:])).reshape(G, *q.shape[-2:])
    kf = np.broadcast_to(k, (*lead, *k.shape[-2:])).reshape(G, *k.shape[-2:])
    keep = None if mask is None else np.broadcast_to(mask, (*lead, k.shape[-2])).reshape(G, -1)
    owner = tree_index(T, lead)                                             # (G,)
    return pool_slices(qf, kf, keep, owner, math.prod(T)), T


def pool_slices(q, k, keep, owner, num_trees: int):
    """Per tree, the queries and kept keys of its slices, stacked: a list of (n_t, D) arrays.

    ``q (G, Nq, D)``, ``k (G, Nk, D)``, ``keep (G, Nk)`` or None, ``owner (G,)``.
    Points with a NaN or inf entry (``check_finite=False``) place no split;
    the walk still routes them, and their non-finite values reach the output.
    """
    points = []
    for t in range(num_trees):
        parts = []
        for g in np.flatnonzero(owner == t):
            parts.append(q[g])
            parts.append(k[g] if keep is None else k[g][keep[g]])
        X = np.concatenate(parts, axis=0)                                   # (n_t, D)
        points.append(X[np.isfinite(X).all(axis=-1)])
    return points


def _principal_direction(X):
    """Top right-singular vector of ``X - mean``, signed so its largest-|.| entry (first on ties) is positive.

    ``e_0`` when there are fewer than 2 points or no spread.
    """
    D = X.shape[-1]
    e0 = np.zeros(D)
    e0[0] = 1.0
    if X.shape[0] < 2:
        return e0
    centred = X - X.mean(axis=0)                                            # (n, D)
    spread = np.abs(centred).max()
    if not spread > 0 or not np.isfinite(spread):
        return e0
    _, _, vt = np.linalg.svd(centred / spread, full_matrices=False)         # unit scale: no overflow
    direction = vt[0]                                                       # (D,)
    return direction if direction[np.argmax(np.abs(direction))] > 0 else -direction


def _advance(X, node, w, b):
    """One level of the walk for points ``X`` (n, D) at nodes ``node`` (n,)."""
    z = np.einsum("nd,nd->n", X, w[node]) + b[node]                        # (n,)
    return 2 * node + 1 + (z < 0)


def split_thresholds(proj, size, groups, num_groups: int, dim: int):
    """The split of each group of points: the threshold ``t`` (``b = -t``), NaN for an empty group.

    The one split rule of every tree built from data. In each group, sort
    the projections ``p`` (``z = p - t``; ``z >= 0`` goes left). The split
    sends the ``floor(n/2)`` lowest by rank right and the rest left, and
    sits midway across the gap between the two middle ranks, so for even
    ``n`` it is the median. A gap is usable only if it is wider than
    ``2 tol``, with ``tol = u ((D + 4) max |x|.|w| + 3 max |p|)`` (``u``
    the float32 unit roundoff) bounding the rounding of ``z`` in any walk;
    when the middle gap is narrower (tied or nearly tied points), the
    nearest usable gap is taken (the lower on a tie), and with none every
    point goes left (``t = min p - 2 tol``). So a point that built the tree
    is never within ``tol`` of its hyperplane, and every backend routes it
    the same way.

    Parameters
    ----------
    proj : ndarray of shape (n,)
        ``p = x . w`` of each point with its group's direction, float64.
    size : ndarray of shape (n,)
        ``|x| . |w|``, which bounds the dot product's rounding.
    groups : int ndarray of shape (n,)
        The group (node) of each point, in ``[0, num_groups)``.
    num_groups : int
    dim : int
        ``D``, the length of the dot products.

    Returns
    -------
    ndarray of shape (num_groups,)
    """
    order = np.lexsort((proj, groups))                                      # by group, then value
    p, g = proj[order], groups[order]                                       # (n,)
    counts = np.bincount(groups, minlength=num_groups)                      # (groups,)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])                   # (groups,)
    biggest, extent = np.zeros(num_groups), np.zeros(num_groups)            # (groups,)
    np.maximum.at(biggest, groups, size)
    np.maximum.at(extent, groups, np.abs(proj))
    tol = WALK_ROUNDOFF * ((dim + 4) * biggest + 3 * extent)                # (groups,)
    cut = np.arange(1, len(p))                                              # (n-1,) gap below sorted position
    usable = (g[1:] == g[:-1]) & (p[1:] - p[:-1] > 2 * tol[g[1:]])          # (n-1,)
    target = start + counts // 2                                            # (groups,) first point sent left
    far = np.iinfo(np.int64).max
    dist = np.where(usable, np.abs(cut - target[g[1:]]), far)               # (n-1,)
    pick = np.lexsort((cut, dist, g[1:]))                                   # best gap of each group first
    first_of_group = np.unique(g[1:][pick], return_index=True)
    t = np.full(num_groups, np.nan)
    nonempty = counts > 0
    t[nonempty] = p[start[nonempty]] - 2 * tol[nonempty]                     # no usable gap: all left
    best = pick[first_of_group[1]]                                          # (groups with >= 2 points,)
    ok = dist[best] != far
    c = cut[best[ok]]
    t[g[c]] = (p[c - 1] + p[c]) / 2
    return t


def _sizes(X, w):
    """``|x| . |w|`` of each point with its own direction, shape (n,): the scale of ``z``'s rounding."""
    return np.einsum("nd,nd->n", np.abs(X), np.abs(w))


def _grow_level(X, node, w, b, level_nodes):
    """PCA split (:func:`split_thresholds`) for every node of ``level_nodes``, in place, from its points."""
    D = X.shape[-1]
    level_nodes = np.asarray(level_nodes)
    w[level_nodes] = np.eye(D)[0]                                           # unreached nodes: e_0, bias 0
    b[level_nodes] = 0.0
    for m in np.intersect1d(level_nodes, node):                             # at most n reached nodes
        Xm = X[node == m]                                                   # (n_m, D)
        w[m] = _principal_direction(Xm)
        W = np.broadcast_to(w[m], Xm.shape)                                 # (n_m, D)
        b[m] = -split_thresholds(Xm @ w[m], _sizes(Xm, W), np.zeros(len(Xm), np.int64), 1, D)[0]


def _level(t: int) -> np.ndarray:
    """Heap indices of the nodes at depth ``t``."""
    return np.arange(2**t - 1, 2 ** (t + 1) - 1)


def init_tree_pca(q, k, height: int, *, mask=None, tree_shape=None) -> TreeformerState:
    """Deterministic, balanced tree: top-down PCA directions split at the median.

    For each node ``i``, with ``X_i`` the pooled float64 points (queries and
    unmasked keys) that reach it: ``w_i`` is the top right-singular vector of
    ``X_i - mean(X_i)`` (largest-magnitude entry positive; ``e_0`` if fewer
    than 2 points or no spread) and ``b_i = -t_i``, the rank-median split of
    :func:`split_thresholds` (the median for an even count; 0 if empty).

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    height : int
    mask : bool array of shape (..., Nk), optional
    tree_shape : tuple, optional
        Default: the broadcast leading shape (one tree per slice). Slices that
        share a tree pool their points.

    Returns
    -------
    TreeformerState
    """
    height = check_int("height", height, minimum=0, maximum=MAX_HEIGHT)
    points, T = pooled_points(q, k, mask, tree_shape)
    D = points[0].shape[-1]
    internal = 2**height - 1
    w = np.zeros((len(points), internal, D))
    b = np.zeros((len(points), internal))
    for t, X in enumerate(points):
        node = np.zeros(len(X), dtype=np.int64)
        for depth in range(height):
            _grow_level(X, node, w[t], b[t], _level(depth))
            node = _advance(X, node, w[t], b[t])
    return TreeformerState(w.reshape(*T, internal, D), b.reshape(*T, internal), height)


def draw_treeformer_directions(rng, tree_shape, num_internal: int, dim: int) -> np.ndarray:
    """Row-normalised ``standard_normal((*T, I, D))``: the only random draw of Treeformer."""
    w = as_generator(rng).standard_normal((*tuple(tree_shape), num_internal, dim))  # (*T, I, D)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def init_tree(d: int, height: int, *, tree_shape=(), rng=None, q=None, k=None, mask=None) -> TreeformerState:
    """Random unit split directions; bias 0, or the median re-centring when data are given.

    Parameters
    ----------
    d : int
        Feature size D.
    height : int
    tree_shape : tuple, default=()
    rng : None, int or Generator
        Draws the directions (:func:`draw_treeformer_directions`).
    q, k : arrays of shape (..., N, D), optional
        Both or neither. When given, ``b`` comes from
        :func:`update_tree_bias`, so the leaves are balanced.
    mask : bool array of shape (..., Nk), optional

    Returns
    -------
    TreeformerState
    """
    height = check_int("height", height, minimum=0, maximum=MAX_HEIGHT)
    d = check_int("d", d, minimum=1)
    if (q is None) != (k is None):
        raise ValueError("init_tree: pass both q and k to centre the splits on data, or neither")
    internal = 2**height - 1
    tree_shape = tuple(tree_shape)
    w = draw_treeformer_directions(rng, tree_shape, internal, d)
    tree = TreeformerState(w, np.zeros((*tree_shape, internal)), height)
    return tree if q is None else update_tree_bias(tree, q, k, mask=mask)


def recentre(points, w, b, height: int):
    """In place, top-down: ``b_i = -t_i``, the split of :func:`split_thresholds` over the points reaching node ``i``.

    ``points`` is one (n_t, D) array per tree; ``w`` (T, I, D), ``b`` (T, I).
    Unreached nodes keep their ``b_i``.
    """
    for t, X in enumerate(points):
        node = np.zeros(len(X), dtype=np.int64)
        for depth in range(height):
            W = w[t][node]                                                  # (n, D)
            proj = np.einsum("nd,nd->n", X, W)                              # (n,)
            med = split_thresholds(proj, _sizes(X, W), node, 2 ** (depth + 1) - 1, X.shape[-1])[2**depth - 1:]
            level = np.arange(2**depth - 1, 2 ** (depth + 1) - 1)
            reached = ~np.isnan(med)
            b[t, level[reached]] = -med[reached]
            node = _advance(X, node, w[t], b[t])


def update_tree_bias(tree: TreeformerState, q, k, *, mask=None) -> TreeformerState:
    """Median re-centring: each split halves the points that reach it by rank.

    Top-down, ``b_i = -t_i`` (:func:`split_thresholds`, the median for an
    even count) over the pooled queries and unmasked keys reaching node
    ``i``; unreached nodes keep ``b_i``.
    This balances the leaves without changing the directions.
    """
    points, _ = pooled_points(q, k, mask, tree.tree_shape)
    check_tree_dim(tree, points[0].shape[-1])
    w, b = (a.copy() for a in tree.flat())
    recentre(points, w, b, tree.height)
    return TreeformerState(tree.w, b.reshape(tree.b.shape), tree.height)


def update_tree_depth(tree: TreeformerState, q, k, *, mask=None) -> TreeformerState:
    """Grow the tree by one level, keeping every existing node's index and split.

    Old leaf ``l`` becomes internal node ``I + l``, initialised by the
    PCA-median rule (:func:`init_tree_pca`) on the points routed to it.
    """
    if tree.height >= MAX_HEIGHT:
        raise ValueError(f"height={tree.height + 1} is too large; it must be at most {MAX_HEIGHT}")
    points, _ = pooled_points(q, k, mask, tree.tree_shape)
    check_tree_dim(tree, points[0].shape[-1])
    w_old, b_old = tree.flat()
    h, I, D = tree.height, tree.num_internal, tree.dim
    w = np.zeros((len(points), 2 ** (h + 1) - 1, D))
    b = np.zeros((len(points), 2 ** (h + 1) - 1))
    w[:, :I], b[:, :I] = w_old, b_old
    for t, X in enumerate(points):
        node = np.zeros(len(X), dtype=np.int64)
        for _ in range(h):
            node = _advance(X, node, w[t], b[t])
        _grow_level(X, node, w[t], b[t], _level(h))
    T = tree.tree_shape
    return TreeformerState(w.reshape(*T, -1, D), b.reshape(*T, -1), h + 1)
