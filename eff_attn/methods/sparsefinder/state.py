"""The learned state of Sparsefinder: per-head projections, centroids and a threshold.

A :class:`SparsefinderState` is a frozen dataclass of NumPy arrays, made by
``init_sparsefinder`` and the ``fit_*`` functions of :mod:`.fitting`. Its head
axes ``*H`` broadcast right-aligned against the leading axes of ``q``;
:func:`state_for_batch` does that broadcast once per call and flattens the
result to the ``G`` slices the backends see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..._heads import check_head_shape

__all__ = ["SparsefinderState", "HeadArrays", "state_for_batch"]


@dataclass(frozen=True)
class SparsefinderState:
    """Learned Sparsefinder predictor of one or more attention heads.

    Attributes
    ----------
    w_q, w_k : ndarray of shape (*H, r, D)
        Projections ``q' = W_q q + b_q`` and ``k' = W_k k + b_k`` of the
        *unscaled* queries and keys (the same array when ``shared``).
    b_q, b_k : ndarray of shape (*H, r)
    centroids : ndarray of shape (*H, R, K, r), or None
        ``R`` rounds of ``K`` k-means centroids in the projected space.
    threshold : ndarray of shape (*H,), or None
        Distance threshold of the ``"distance"`` predictor.
    threshold_metric : {"sqeuclidean", "cosine"} or None
        The metric ``threshold`` was calibrated for.
    alpha : float or None
        The entmax alpha whose support the projections were fitted to.
    scale : float or None
        The score scale of that fit.
    shared : bool
        ``W_k is W_q`` and ``b_k is b_q``.
    """

    w_q: np.ndarray
    w_k: np.ndarray
    b_q: np.ndarray
    b_k: np.ndarray
    centroids: np.ndarray | None = None
    threshold: np.ndarray | None = None
    threshold_metric: str | None = None
    alpha: float | None = None
    scale: float | None = None
    shared: bool = False

    @property
    def head_shape(self) -> tuple:
        return tuple(self.w_q.shape[:-2])

    @property
    def r(self) -> int:
        return int(self.w_q.shape[-2])

    @property
    def D(self) -> int:
        return int(self.w_q.shape[-1])

    @property
    def n_rounds(self) -> int:
        return 0 if self.centroids is None else int(self.centroids.shape[-3])

    @property
    def num_clusters(self) -> int:
        return 0 if self.centroids is None else int(self.centroids.shape[-2])

    def __post_init__(self):
        H, r, D = self.head_shape, self.r, self.D
        for name, shape in (("w_k", (*H, r, D)), ("b_q", (*H, r)), ("b_k", (*H, r))):
            if tuple(np.shape(getattr(self, name))) != shape:
                raise ValueError(f"SparsefinderState.{name} must have shape {shape}, "
                                 f"got {np.shape(getattr(self, name))}")
        if self.centroids is not None and (self.centroids.ndim != len(H) + 3 or self.centroids.shape[:len(H)] != H
                                           or self.centroids.shape[-1] != r):
            raise ValueError(f"SparsefinderState.centroids must have shape {(*H, 'R', 'K', r)}, "
                             f"got {self.centroids.shape}")
        if self.threshold is not None and tuple(np.shape(self.threshold)) != H:
            raise ValueError(f"SparsefinderState.threshold must have shape {H}, got {np.shape(self.threshold)}")


@dataclass(frozen=True)
class HeadArrays:
    """A state broadcast to the ``G`` slices of one call (float64, host).

    Attributes
    ----------
    w_q, w_k : ndarray of shape (G, r, D)
    b_q, b_k : ndarray of shape (G, r)
    centroids : ndarray of shape (G, R, K, r) or None
    threshold : ndarray of shape (G,) or None
    """

    w_q: np.ndarray
    w_k: np.ndarray
    b_q: np.ndarray
    b_k: np.ndarray
    centroids: np.ndarray | None
    threshold: np.ndarray | None


def state_for_batch(state: SparsefinderState, batch_shape: tuple, threshold=None) -> HeadArrays:
    """Broadcast ``state``'s heads to ``batch_shape`` and flatten them to ``G`` slices.

    ``threshold`` (a float) overrides the state's calibrated one.

    Raises
    ------
    ValueError
        If the state's head shape does not broadcast to ``batch_shape``.
    """
    check_head_shape(state.head_shape, batch_shape)
    G = math.prod(batch_shape)

    def flat(a, tail):
        a = np.asarray(a, dtype=np.float64)
        return np.ascontiguousarray(np.broadcast_to(a, (*batch_shape, *tail)).reshape(G, *tail))

    r, D = state.r, state.D
    centroids = None
    if state.centroids is not None:
        centroids = flat(state.centroids, state.centroids.shape[-3:])
    if threshold is not None:
        thresholds = np.full(G, float(threshold))
    else:
        thresholds = None if state.threshold is None else flat(state.threshold, ())
    return HeadArrays(
        w_q=flat(state.w_q, (r, D)), w_k=flat(state.w_k, (r, D)), b_q=flat(state.b_q, (r,)), b_k=flat(state.b_k, (r,)),
        centroids=centroids, threshold=thresholds,
    )
