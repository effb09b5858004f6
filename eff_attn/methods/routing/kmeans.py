"""Online spherical k-means: the routing centroids and how they move.

Everything here runs on the host, in NumPy float64, whatever backend runs
the attention, so every backend sees bit-identical centroids.

Points
    Per state head ``h``, ``X_h`` pools the unit vectors ``q_i / |q_i|`` and
    ``k_j / |k_j|`` of every (batch, head) slice that the head serves: the
    queries first, then the keys, each in C order over (slice, position).
    Masked keys, zero vectors and, when ``Nq == Nk``, queries at masked
    positions are left out.

Loss
    ``L(mu; X) = mean_x min_c |x - mu_c|^2 = 2 - 2 mean_x max_c x . mu_c``.

Update (decay ``lam``)
    assign ``a(x) = argmax_c x . mu_c``; sum ``s_c = sum_{a(x) = c} x``; move
    ``mu_c <- normalize(lam mu_c + (1 - lam) s_c / |s_c|)``, keeping ``mu_c``
    when the cluster is empty or the mixed vector vanishes; track the usage
    ``u_c <- lam u_c + (1 - lam) n_c / sum n``. ``L`` cannot increase on the
    same points: the new ``mu_c`` lies on the minor arc from ``mu_c`` towards
    ``s_c``, so ``s_c . mu_c`` cannot fall, and reassignment only raises each
    ``max_c``. ``lam = 0`` is one Lloyd step.

See ``docs/methods/routing.md``, "k-means on the sphere".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..._array import to_host
from ..._heads import head_index as _head_index
from ..._validate import check_float, check_int
from ...random import as_generator

__all__ = [
    "RoutingState",
    "DEFAULT_DECAY",
    "KMEANS_ITERS",
    "COMMITMENT_BETA",
    "draw_routing_init",
    "init_centroids",
    "fit_centroids",
    "update_centroids",
    "kmeans_loss",
    "assign",
    "commitment_loss",
    "head_index",
]

#: EMA decay of the centroids (the paper's and both released codes' value).
DEFAULT_DECAY = 0.999
#: Lloyd steps of :func:`init_centroids` and :func:`fit_centroids`.
KMEANS_ITERS = 10
#: Weight of the commitment loss.
COMMITMENT_BETA = 1e-4
#: A mixed centroid shorter than this is not renormalised (the update keeps the old one).
_MIN_NORM = 1e-12
#: Tolerance of the unit-row check on user centroids.
_UNIT_TOL = 1e-6


@dataclass(frozen=True)
class RoutingState:
    """Routing centroids of every state head, and their usage.

    The arrays are stored as read-only float64 copies; the functions of this
    module return new states rather than changing one.

    Parameters
    ----------
    centroids : ndarray of shape (*H, C, D)
        Unit rows, float64. ``H`` broadcasts right-aligned against the
        leading (batch, head) axes of ``q``: ``H = ()`` shares one set of
        centroids across all slices, ``H = (heads,)`` gives one per head.
    usage : ndarray of shape (*H, C)
        EMA share of the points each cluster received (dead clusters -> 0).
    decay : float, default=0.999
        The EMA decay ``lam`` that :func:`update_centroids` uses by default.
    steps : int, default=0
        How many update or Lloyd steps this state has taken.
    """

    centroids: np.ndarray
    usage: np.ndarray
    decay: float = DEFAULT_DECAY
    steps: int = 0

    def __post_init__(self):
        mu = np.array(to_host(self.centroids), dtype=np.float64, copy=True)
        if mu.ndim < 2:
            raise ValueError(f"state.centroids must have shape (*H, C, D), got shape {mu.shape}")
        if mu.shape[-2] < 1 or mu.shape[-1] < 1:
            raise ValueError(f"state.centroids needs at least one cluster and one feature, got shape {mu.shape}")
        if not np.isfinite(mu).all():
            raise ValueError("state.centroids contains NaN or inf")
        norms = np.linalg.norm(mu, axis=-1)
        if np.abs(norms - 1).max(initial=0.0) > _UNIT_TOL:
            raise ValueError(
                "state.centroids must have unit rows (routing compares inner products with unit vectors); "
                f"row norms range over [{norms.min():.6g}, {norms.max():.6g}]"
            )
        usage = np.array(to_host(self.usage), dtype=np.float64, copy=True)
        if usage.shape != mu.shape[:-1]:
            raise ValueError(f"state.usage must have shape (*H, C) = {mu.shape[:-1]}, got {usage.shape}")
        mu.flags.writeable = False
        usage.flags.writeable = False
        object.__setattr__(self, "centroids", mu)
        object.__setattr__(self, "usage", usage)
        object.__setattr__(self, "decay", check_float("decay", self.decay, minimum=0.0, maximum=1.0))
        object.__setattr__(self, "steps", check_int("steps", self.steps, minimum=0))

    @property
    def head_shape(self) -> tuple:
        """``H``: the leading shape of the centroid sets."""
        return self.centroids.shape[:-2]

    @property
    def num_clusters(self) -> int:
        """``C``."""
        return self.centroids.shape[-2]

    @property
    def dim(self) -> int:
        """``D``."""
        return self.centroids.shape[-1]


def head_index(head_shape, batch_shape) -> np.ndarray:
    """Index of the centroid head that serves each (batch, head) slice, shape (G,).

    See :func:`eff_attn._heads.head_index`.
    """
    return _head_index(head_shape, batch_shape,
                       hint="it must broadcast right-aligned (e.g. () for one set, (heads,) for one set per head)")


def _normalize(x):
    """Rows divided by their norm; zero rows stay 0. Returns ``(unit, norm)``."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0), norm[..., 0]


@dataclass(frozen=True)
class _Points:
    """The pooled k-means points of a batch: ``x`` (P, D) unit rows (zero rows
    where dropped), ``keep`` (P,), ``head`` (P,) and the count per head."""

    x: np.ndarray
    keep: np.ndarray
    head: np.ndarray
    counts: np.ndarray
    norms: np.ndarray
    batch_shape: tuple
    shapes: tuple


def _host_batch(q, k, mask):
    """Float64 host copies of q, k (and a bool mask) broadcast over the leading axes."""
    q = np.asarray(to_host(q), dtype=np.float64)
    k = np.asarray(to_host(k), dtype=np.float64)
    for name, a in (("q", q), ("k", k)):
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., N, D), got shape {a.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k has D={k.shape[-1]} features but q has D={q.shape[-1]}")
    Nk = k.shape[-2]
    shapes = [q.shape[:-2], k.shape[:-2]]
    if mask is not None:
        mask = np.asarray(to_host(mask))
        if mask.dtype != np.bool_ or mask.ndim < 1 or mask.shape[-1] != Nk:
            raise ValueError(f"mask must be a bool array of shape (..., Nk) with Nk={Nk}, got {mask.dtype} {mask.shape}")
        shapes.append(mask.shape[:-1])
    try:
        batch = np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"the leading axes of q, k and mask do not broadcast: {shapes}") from None
    q = np.broadcast_to(q, (*batch, *q.shape[-2:]))
    k = np.broadcast_to(k, (*batch, *k.shape[-2:]))
    if mask is not None:
        mask = np.broadcast_to(mask, (*batch, Nk))
    return q, k, mask, tuple(batch), (q.shape, k.shape)


def _pool(q, k, mask, head_shape) -> _Points:
    """Pool the points of every slice by state head (see the module docstring)."""
    q, k, mask, batch, shapes = _host_batch(q, k, mask)
    (Nq, D), Nk = q.shape[-2:], k.shape[-2]
    G = math.prod(batch)
    head_of = head_index(head_shape, batch)                                  # (G,)
    qhat, qnorm = _normalize(q.reshape(G, Nq, D))                            # (G, Nq, D), (G, Nq)
    khat, knorm = _normalize(k.reshape(G, Nk, D))                            # (G, Nk, D), (G, Nk)
    keep_q = qnorm > 0                                                       # (G, Nq)
    keep_k = knorm > 0                                                       # (G, Nk)
    if mask is not None:
        m = mask.reshape(G, Nk)
        keep_k &= m
        if Nq == Nk:
            keep_q &= m
    x = np.concatenate([qhat.reshape(-1, D), khat.reshape(-1, D)])          # (P, D) queries first
    keep = np.concatenate([keep_q.ravel(), keep_k.ravel()])                  # (P,)
    head = np.concatenate([np.repeat(head_of, Nq), np.repeat(head_of, Nk)])  # (P,)
    norms = np.concatenate([qnorm.ravel(), knorm.ravel()])                   # (P,)
    counts = np.bincount(head[keep], minlength=math.prod(head_shape))        # (H',)
    return _Points(x, keep, head, counts, norms, batch, shapes)


def _nearest(points: _Points, mu):
    """``a(x) = argmax_c x . mu_c`` (lower index on ties) and ``max_c x . mu_c``, each (P,).

    ``mu`` is the flat (H', C, D) centroid array; dropped points get cluster 0, score 0.
    """
    a = np.zeros(points.x.shape[0], dtype=np.int64)                          # (P,)
    best = np.zeros(points.x.shape[0])                                       # (P,)
    for h in range(mu.shape[0]):
        rows = np.flatnonzero(points.keep & (points.head == h))              # (n_h,)
        if rows.size:
            scores = points.x[rows] @ mu[h].T                                # (n_h, C)
            a[rows] = scores.argmax(axis=-1)
            best[rows] = scores.max(axis=-1)
    return a, best


def _cluster_sums(points: _Points, a, H, C):
    """``s[h, c] = sum_{a(x) = c} x`` (H', C, D) and ``n[h, c]`` (H', C) over kept points."""
    sel = np.flatnonzero(points.keep)
    flat = points.head[sel] * C + a[sel]                                     # (n,)
    s = np.zeros((H * C, points.x.shape[1]))                                 # (H' C, D)
    np.add.at(s, flat, points.x[sel])
    n = np.bincount(flat, minlength=H * C)                                   # (H' C,)
    return s.reshape(H, C, -1), n.reshape(H, C)


def _update_step(points: _Points, mu, usage, decay):
    """One EMA step on flat (H', C, D) centroids; returns new (mu, usage) arrays."""
    H, C, _ = mu.shape
    if decay == 1.0:
        return mu.copy(), usage.copy()
    a, _ = _nearest(points, mu)                                              # (P,)
    s, n = _cluster_sums(points, a, H, C)                                    # (H', C, D), (H', C)
    s_unit, s_norm = _normalize(s)                                           # (H', C, D), (H', C)
    mixed = decay * mu + (1.0 - decay) * s_unit                              # (H', C, D)
    mixed_unit, m_norm = _normalize(mixed)                                   # (H', C, D), (H', C)
    moved = (n > 0) & (s_norm > 0) & (m_norm >= _MIN_NORM)                   # (H', C)
    new_mu = np.where(moved[..., None], mixed_unit, mu)                      # (H', C, D)
    total = n.sum(axis=-1, keepdims=True)                                    # (H', 1)
    share = n / np.where(total > 0, total, 1)                                # (H', C)
    new_usage = np.where(total > 0, decay * usage + (1.0 - decay) * share, usage)
    return new_mu, new_usage


def _flat(state: RoutingState):
    H = math.prod(state.head_shape)
    return state.centroids.reshape(H, state.num_clusters, state.dim), state.usage.reshape(H, state.num_clusters)


def _check_state(state, q=None):
    if not isinstance(state, RoutingState):
        raise TypeError(f"state must be a RoutingState, got {type(state).__name__}")
    if q is not None and np.shape(q)[-1] != state.dim:
        raise ValueError(f"state has centroids of dimension D={state.dim} but q has D={np.shape(q)[-1]}")


def draw_routing_init(rng, head_shape, num_clusters, dim, n_points=None):
    """The only random draws of routing: initial directions and data picks.

    Draws ``G = rng.standard_normal((*H, C, D))``, then, when ``n_points`` is
    given, for each head in ``np.ndindex(H)`` order the picks
    ``rng.permutation(n_h)[:C]``.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
    head_shape : tuple of int
    num_clusters, dim : int
    n_points : array of int of shape ``head_shape``, optional
        The number of pooled points of each head.

    Returns
    -------
    gaussian : ndarray of shape (*H, C, D)
    picks : list of int64 ndarrays (one per head, in ``np.ndindex`` order), or None
    """
    gen = as_generator(rng)
    head_shape = tuple(head_shape)
    gaussian = gen.standard_normal((*head_shape, num_clusters, dim))
    if n_points is None:
        return gaussian, None
    counts = np.broadcast_to(np.asarray(n_points, dtype=np.int64), head_shape)
    picks = [gen.permutation(int(counts[h]))[:num_clusters] for h in np.ndindex(head_shape)]
    return gaussian, picks


def init_centroids(q=None, k=None, *, num_clusters, dim=None, head_shape=None, mask=None, rng=None,
                   kmeans_iters=KMEANS_ITERS, decay=DEFAULT_DECAY) -> RoutingState:
    """A fresh :class:`RoutingState`, seeded from the data when it is given.

    With data, each head's centroid ``r`` starts at the pooled point
    ``X[pi_r]`` for ``r < min(C, |X|)`` and at a normalised Gaussian
    direction for the rest; ``kmeans_iters`` Lloyd steps follow, and
    ``usage`` is the cluster shares of the last assignment. Without data the
    centroids are normalised Gaussian directions with ``usage = 1/C``.
    Time ``O(kmeans_iters (Nq + Nk) C D)`` per slice.

    Parameters
    ----------
    q : array of shape (..., Nq, D), optional
    k : array of shape (..., Nk, D), optional
        Give both or neither.
    num_clusters : int
        ``C``, at least 1.
    dim : int, optional
        ``D``; required without data, checked against the data otherwise.
    head_shape : tuple of int, optional
        ``H``. Default: one centroid set per leading index of the data
        (``()`` without data).
    mask : bool array of shape (..., Nk), optional
        Masked keys (and, when ``Nq == Nk``, queries at masked positions)
        are left out of the points.
    rng : None, int or numpy.random.Generator
        Drawn through :func:`draw_routing_init`.
    kmeans_iters : int, default=10
    decay : float, default=0.999
        Stored in the state for later :func:`update_centroids` calls.

    Returns
    -------
    RoutingState
    """
    C = check_int("num_clusters", num_clusters, minimum=1)
    iters = check_int("kmeans_iters", kmeans_iters, minimum=0)
    decay = check_float("decay", decay, minimum=0.0, maximum=1.0)
    if (q is None) != (k is None):
        raise ValueError("init_centroids needs both q and k, or neither (data-free directions)")
    if q is None:
        if dim is None:
            raise ValueError("init_centroids without data needs dim=")
        D = check_int("dim", dim, minimum=1)
        H = () if head_shape is None else tuple(head_shape)
        gaussian, _ = draw_routing_init(rng, H, C, D)
        mu, _ = _normalize(gaussian)
        return RoutingState(mu, np.full((*H, C), 1.0 / C), decay=decay, steps=0)
    D = np.shape(q)[-1]
    if dim is not None and check_int("dim", dim, minimum=1) != D:
        raise ValueError(f"dim={dim} but q has D={D}")
    if head_shape is None:
        head_shape = _host_batch(q, k, mask)[3]
    H = tuple(head_shape)
    points = _pool(q, k, mask, H)
    gaussian, picks = draw_routing_init(rng, H, C, D, points.counts.reshape(H))
    mu, _ = _normalize(gaussian.reshape(-1, C, D))                           # (H', C, D)
    for h, pick in enumerate(picks):
        x_h = points.x[points.keep & (points.head == h)]                     # (n_h, D) in pooled order
        mu[h, : pick.size] = x_h[pick]
    usage = np.zeros(mu.shape[:-1])
    for _ in range(iters):
        mu, usage = _update_step(points, mu, usage, 0.0)
    if iters == 0:
        a, _ = _nearest(points, mu)
        _, n = _cluster_sums(points, a, *mu.shape[:2])
        total = n.sum(axis=-1, keepdims=True)
        usage = n / np.where(total > 0, total, 1)
    return RoutingState(mu.reshape(*H, C, D), usage.reshape(*H, C), decay=decay, steps=0)


def update_centroids(state: RoutingState, q, k, *, mask=None, decay=None) -> RoutingState:
    """One online spherical k-means step (the EMA of the module docstring).

    Parameters
    ----------
    state : RoutingState
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    mask : bool array of shape (..., Nk), optional
    decay : float in [0, 1], optional
        Default ``state.decay``. ``1`` leaves the centroids bitwise
        unchanged; ``0`` is one Lloyd step.

    Returns
    -------
    RoutingState
        New centroids and usage, ``steps + 1``. Time ``O((Nq + Nk) C D)`` per slice.
    """
    _check_state(state, q)
    lam = state.decay if decay is None else check_float("decay", decay, minimum=0.0, maximum=1.0)
    points = _pool(q, k, mask, state.head_shape)
    mu, usage = _flat(state)
    mu, usage = _update_step(points, mu, usage, lam)
    return RoutingState(mu.reshape(state.centroids.shape), usage.reshape(state.usage.shape),
                        decay=state.decay, steps=state.steps + 1)


def fit_centroids(state: RoutingState, q, k, *, iters=KMEANS_ITERS, mask=None) -> RoutingState:
    """``iters`` Lloyd steps (:func:`update_centroids` with ``decay=0``).

    Returns
    -------
    RoutingState
        ``steps + iters``; ``decay`` is kept.
    """
    _check_state(state, q)
    iters = check_int("iters", iters, minimum=0)
    points = _pool(q, k, mask, state.head_shape)
    mu, usage = _flat(state)
    for _ in range(iters):
        mu, usage = _update_step(points, mu, usage, 0.0)
    return RoutingState(mu.reshape(state.centroids.shape), usage.reshape(state.usage.shape),
                        decay=state.decay, steps=state.steps + iters)


def kmeans_loss(state: RoutingState, q, k, *, mask=None) -> np.ndarray:
    """``L(mu; X_h) = 2 - 2 mean_x max_c x . mu_c`` per state head, shape (*H,).

    A head with no points has loss 0.
    """
    _check_state(state, q)
    points = _pool(q, k, mask, state.head_shape)
    mu, _ = _flat(state)
    _, best = _nearest(points, mu)                                           # (P,)
    total = np.bincount(points.head[points.keep], weights=best[points.keep], minlength=mu.shape[0])
    n = points.counts
    loss = np.where(n > 0, 2.0 - 2.0 * total / np.where(n > 0, n, 1), 0.0)   # (H',)
    return loss.reshape(state.head_shape)


def assign(state: RoutingState, x) -> np.ndarray:
    """Nearest centroid ``argmax_c (x / |x|) . mu_c`` of each row, in float64.

    Parameters
    ----------
    state : RoutingState
    x : array of shape (..., N, D)
        Its leading axes must accept the state's head shape.

    Returns
    -------
    int64 ndarray of shape (..., N)
        Zero vectors go to cluster 0; ties to the lower index.
    """
    _check_state(state, x)
    x = np.asarray(to_host(x), dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., N, D), got shape {x.shape}")
    batch = np.broadcast_shapes(x.shape[:-2], state.head_shape)
    x = np.broadcast_to(x, (*batch, *x.shape[-2:]))
    head_of = head_index(state.head_shape, batch)                            # (G,)
    mu, _ = _flat(state)
    xhat, _ = _normalize(x.reshape(head_of.size, *x.shape[-2:]))             # (G, N, D)
    scores = xhat @ np.swapaxes(mu[head_of], -1, -2)                         # (G, N, C)
    return scores.argmax(axis=-1).reshape(*batch, x.shape[-2])


def commitment_loss(q, k, state: RoutingState, *, mask=None, beta=COMMITMENT_BETA):
    """The commitment loss and its gradient to q and k (assignments held fixed).

    ``L_h = beta mean_{x in X_h} |x/|x| - mu_{a(x)}|^2`` per state head, with
    ``a(x)`` the nearest centroid. Its gradient at a point is
    ``-2 beta / (|X_h| |x|) (mu_a - (xhat . mu_a) xhat)``; dropped points
    (masked, zero) get 0.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    state : RoutingState
    mask : bool array of shape (..., Nk), optional
    beta : float, default=1e-4

    Returns
    -------
    loss : ndarray of shape (*H,)
    dq : ndarray of q's shape
        Gradient of ``loss.sum()``, summed over axes that were broadcast.
    dk : ndarray of k's shape
    """
    _check_state(state, q)
    beta = check_float("beta", beta, minimum=0.0)
    q_shape, k_shape = np.shape(q), np.shape(k)
    points = _pool(q, k, mask, state.head_shape)
    mu, _ = _flat(state)
    a, best = _nearest(points, mu)                                           # (P,)
    n = points.counts[points.head]                                           # (P,) |X_h| of each point
    weight = np.where(points.keep, beta / np.where(n > 0, n, 1), 0.0)        # (P,)
    loss_h = np.bincount(points.head, weights=weight * (2.0 - 2.0 * best), minlength=mu.shape[0])
    mu_a = mu[points.head, a]                                                # (P, D)
    tangent = mu_a - best[:, None] * points.x                                # (P, D) mu_a - (xhat . mu_a) xhat
    scale = -2.0 * weight / np.where(points.norms > 0, points.norms, 1.0)    # (P,)
    grad = scale[:, None] * tangent                                          # (P, D)
    (qb_shape, kb_shape) = points.shapes
    n_q = math.prod(qb_shape[:-1])
    dq = _sum_to_shape(grad[:n_q].reshape(qb_shape), q_shape)
    dk = _sum_to_shape(grad[n_q:].reshape(kb_shape), k_shape)
    return loss_h.reshape(state.head_shape), dq, dk


def _sum_to_shape(g, shape):
    """Sum ``g`` over the leading axes that broadcasting added to ``shape``."""
    extra = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(extra))) if extra else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g
