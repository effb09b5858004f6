"""Fitting Treeformer's splits so routed attention approximates a target (host NumPy, float64).

Routing is piecewise constant, so the splits get no gradient from the
attention itself. The package trains them with a straight-through
surrogate in the spirit of Dense Gradient Trees (DGT):

1. **Leaf gradients.** Relax the one-hot leaf matrices ``P^q``, ``P^k``
   (TF: through ``M = P^q P^k^T * kappa gamma``; TC: through the path
   indicators ``pi = P^q A^T`` and ``C = P^k A^T``) and take
   ``g^q = dL/dP^q``, ``g^k = dL/dP^k`` (:func:`leaf_gradients`).
2. **Surrogate.** For every point ``x`` and internal node ``i``:
   ``Z = x W^T + b``, ``a = sign+(Z)``, ``u = S a``, ``p = softmax(u / tau)``;
   back-propagate ``g`` through the softmax to ``u``, through ``S`` to
   ``a``, and through the hardtanh ``a ~ clip(Z / omega_i)`` with the
   scale-free window ``omega_i = ste_window * mean_x |Z_xi|`` to ``Z``,
   then to ``(w, b)`` (:func:`tree_vjp`).
3. **Schedule.** Adam on ``w`` (and ``b`` unless re-centred), unit-norm
   rows, and median re-centring of ``b`` after each step
   (:func:`fit_tree`); the lowest-loss tree seen is returned.
   :func:`fit_tree_bootstrap` grows the tree one level at a time, fitting
   TC and then TF at each height.

Everything here is the package's reading of the paper (no public code
exists); ``docs/methods/treeformer.md`` says which parts are choices.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from ..._array import to_host as host
from ..._softmax import softmax_attend, softmax_attend_backward
from ..._validate import check_bool, check_choice, check_float, check_int
from ...masks import causal_offset, visible_pairs
from ...registry import NotSupportedError
from ._common import TC_CAUSAL_MESSAGE
from .reference import route_slices, tc_attention, tf_attention
from .state import (
    MAX_HEIGHT,
    TreeformerState,
    ancestor_matrix,
    check_tree_dim,
    init_tree_pca,
    one_hot_leaves,
    pool_slices,
    recentre,
    split_sign_matrix,
    tree_index,
    update_tree_depth,
)

__all__ = ["FitHistory", "TreeGrad", "fit_tree", "fit_tree_bootstrap", "tree_vjp", "leaf_gradients"]

#: Adam's moment decays and epsilon.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: Exponents of the relaxed-leaf gradients are clipped here, so other leaves' scores cannot overflow.
EXP_CLIP = 700.0
#: Added to the window scale ``mean |Z|`` so an all-zero node has a finite window.
WINDOW_FLOOR = 1e-12
#: The loss is normalised by ``max(||O*||^2, this)``.
LOSS_FLOOR = 1e-300

VARIANTS = ("tf", "tc")


@dataclass(frozen=True)
class FitHistory:
    """What a fit did.

    Attributes
    ----------
    loss : ndarray of shape (n,)
        ``||O - O*||_F^2 / ||O*||_F^2`` of every tree evaluated, in order
        (the start tree first, the final tree last).
    best_index : int
        Index in ``loss`` of the returned tree (the lowest loss seen in the
        last phase, or the lowest ``holdout_loss`` when there is one).
    phases : tuple of (height, variant, start, stop)
        The slice ``loss[start:stop]`` that each phase evaluated.
    holdout_loss : ndarray of shape (n,) or None
        The same trees' loss on held-out queries, when the fit selected by
        it (``tree_init="fit"`` does).
    """

    loss: np.ndarray
    best_index: int
    phases: tuple
    holdout_loss: np.ndarray | None = None

    @property
    def best_loss(self) -> float:
        return float(self.loss[self.best_index])


@dataclass(frozen=True)
class TreeGrad:
    """Surrogate gradients of a loss with respect to the tree and the routed points.

    Attributes
    ----------
    dw : ndarray of shape (*T, I, D)
    db : ndarray of shape (*T, I)
    dq_route : ndarray of the shape of q
        ``(dL/dZ)_q W``: the routing's surrogate gradient to the queries
        (``attention_vjp`` does not add it).
    dk_route : ndarray of the shape of k
        Likewise for the keys; 0 for masked keys.
    """

    dw: np.ndarray
    db: np.ndarray
    dq_route: np.ndarray
    dk_route: np.ndarray


# --- the flattened problem that a fit works on ------------------------------------------


@dataclass(frozen=True)
class FitData:
    """Float64 slices and their targets (internal).

    ``q (G, Nq, D)``, ``k (G, Nk, D)``, ``v (G, Nk, Dv)``, ``keep (G, Nk)``,
    ``visible`` (G|1, Nq, Nk) the mask and causal rule, ``target (G, Nq, Dv)``,
    ``owner (G,)`` each slice's tree in ``(num_trees, I, D)``.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    keep: np.ndarray
    visible: np.ndarray
    target: np.ndarray
    owner: np.ndarray
    num_trees: int
    scale: float
    causal: bool


def _float64(name, a):
    a = host(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, D), got shape {a.shape}")
    return a


def _sum_to_shape(x, shape):
    """Sum the leading axes of ``x`` that were broadcast from ``shape``."""
    extra = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(extra))) if extra else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _flatten(tree, q, k, v, mask):
    """Broadcast q, k, v, mask and the tree shape; flatten to G slices."""
    q, k, v = _float64("q", q), _float64("k", k), _float64("v", v)
    check_tree_dim(tree, q.shape[-1])
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k has D={k.shape[-1]} features but q has D={q.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v has Nk={v.shape[-2]} rows but k has Nk={k.shape[-2]}")
    shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2], tree.tree_shape]
    if mask is not None:
        mask = host(mask)
        if mask.dtype != bool or mask.shape[-1] != k.shape[-2]:
            raise ValueError(f"mask must be a bool array of shape (..., Nk) with Nk={k.shape[-2]}")
        shapes.append(mask.shape[:-1])
    try:
        lead = np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"the leading axes of q, k, v, mask and the tree shape do not broadcast: {shapes}") from None
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    G = math.prod(lead)

    def flat(a, tail):
        return np.ascontiguousarray(np.broadcast_to(a, (*lead, *tail))).reshape(G, *tail)

    keep = np.ones((G, k.shape[-2]), dtype=bool) if mask is None else flat(mask, (k.shape[-2],))
    return flat(q, q.shape[-2:]), flat(k, k.shape[-2:]), flat(v, v.shape[-2:]), keep, lead


def make_fit_data(tree, q, k, v, *, mask=None, causal=False, scale=None, target=None, variant="tf", with_target=True):
    """Validate and flatten a fit's inputs (internal; used by :func:`fit_tree` and :func:`tree_vjp`).

    ``with_target=False`` leaves ``target`` None (:func:`tree_vjp` has ``dout`` instead).
    """
    variant = check_choice("variant", variant, VARIANTS)
    qf, kf, vf, keep, lead = _flatten(tree, q, k, v, mask)
    Nq, Nk = qf.shape[1], kf.shape[1]
    offset = causal_offset(causal, Nq, Nk)
    if offset is not None and variant == "tc":
        raise NotSupportedError(TC_CAUSAL_MESSAGE)
    scale = 1.0 / math.sqrt(qf.shape[-1]) if scale is None else check_float("scale", scale)
    visible = visible_pairs(keep, offset, Nq, Nk)                           # (G, Nq, Nk)
    if not with_target:
        target = None
    elif target is None:
        target, _, _ = softmax_attend(scale * (qf @ np.swapaxes(kf, -1, -2)), visible, vf)
    else:
        target = _float64("target", target)
        if target.shape[-2:] != (Nq, vf.shape[-1]):
            raise ValueError(f"target must have shape (..., Nq, Dv) = (..., {Nq}, {vf.shape[-1]}), got {target.shape}")
        target = np.ascontiguousarray(np.broadcast_to(target, (*lead, Nq, vf.shape[-1]))).reshape(qf.shape[0], Nq, -1)
    owner = tree_index(tree.tree_shape, lead)
    return FitData(qf, kf, vf, keep, visible, target, owner, math.prod(tree.tree_shape), scale, offset is not None), lead


# --- step 1: leaf gradients ---------------------------------------------------------------


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


def leaf_gradients(q, k, v, leaf_q, leaf_k, dout, *, variant, height, scale, visible=None):
    """Straight-through gradients of a loss with respect to the one-hot leaf matrices.

    **TF** relaxes ``M = P^q P^k^T * kappa gamma``. On a row with allowed
    keys, ``dL/dM_ij = exp(s_ij - Lambda_i)(dO_i . v_j - delta_i)`` with
    ``Lambda_i`` the log-sum-exp over the own-leaf allowed keys and
    ``delta_i = dO_i . o_i``; on an empty row ``Lambda_i`` runs over all
    visible keys and ``delta_i = 0``. Then ``g^q = dL/dM P^k`` and
    ``g^k = dL/dM^T P^q``. The own-leaf entry of ``g^q`` is identically 0.

    **TC** relaxes ``pi = P^q A^T`` and ``C = P^k A^T`` with node emptiness
    frozen: ``dL/dpi_im = exp(s(q_i, kbar_m) - Lambda_i)(dO_i . vbar_m - delta_i)``
    over non-empty ``m``, and
    ``dL/dC_jm = kappa_j [dkbar_m . (k_j - kbar_m) + dvbar_m . (v_j - vbar_m)] / N_m``;
    ``g^q = dL/dpi A``, ``g^k = dL/dC A``.

    Exponents are clipped at 700. Time ``O(Nq Nk (D + Dv))`` (TF) or
    ``O((Nq + Nk) L (D + Dv))`` (TC): for small fitting problems.

    Parameters
    ----------
    q : ndarray of shape (G, Nq, D)
    k : ndarray of shape (G, Nk, D)
    v : ndarray of shape (G, Nk, Dv)
    leaf_q : int ndarray of shape (G, Nq)
    leaf_k : int ndarray of shape (G, Nk), -1 for masked keys
    dout : ndarray of shape (G, Nq, Dv)
        ``dL/dO``.
    variant : {"tf", "tc"}
    height : int
    scale : float
    visible : bool ndarray broadcastable to (G, Nq, Nk)
        The mask and causal rule (TF only; default all visible).

    Returns
    -------
    g_q : ndarray of shape (G, Nq, L)
    g_k : ndarray of shape (G, Nk, L)
    """
    if variant == "tf":
        visible = np.ones((1, 1, 1), dtype=bool) if visible is None else visible
        visible = visible & (leaf_k >= 0)[..., None, :]                     # (G, Nq, Nk) kept and visible
        out, lse, _, allowed = tf_attention(q, k, v, leaf_q, leaf_k, visible, scale)
        return _tf_leaf_gradients(q, k, v, leaf_q, leaf_k, visible, scale, dout, out, lse, allowed, height)
    out, lse, P, nodes = tc_attention(q, k, v, leaf_q, leaf_k, height, scale)
    return _tc_leaf_gradients(q, k, v, leaf_q, leaf_k, scale, dout, out, lse, P, nodes, height)


def _tf_leaf_gradients(q, k, v, leaf_q, leaf_k, visible, scale, dout, out, lse, allowed, height):
    """TF's ``(g^q, g^k)`` from the routed forward's ``out``, ``lse`` and allowed pairs."""
    L = 2**height
    scores = scale * (q @ np.swapaxes(k, -1, -2))                           # (G, Nq, Nk)
    empty = ~allowed.any(axis=-1)                                           # (G, Nq)
    Lam = lse                                                               # (G, Nq)
    if empty.any():                                                         # empty rows: over all visible keys
        Lam = np.where(empty, softmax_attend(scores, visible, v)[1], lse)
    Lam = _finite(Lam)[..., None]                                           # (G, Nq, 1)
    delta = np.where(empty, 0.0, (dout * out).sum(axis=-1))[..., None]      # (G, Nq, 1)
    E = np.where(visible, np.exp(np.minimum(scores - Lam, EXP_CLIP)), 0.0)  # (G, Nq, Nk)
    dM = E * (dout @ np.swapaxes(v, -1, -2) - delta)                        # (G, Nq, Nk)
    Pq = one_hot_leaves(leaf_q, L)                                          # (G, Nq, L)
    Pk = one_hot_leaves(leaf_k, L)                                          # (G, Nk, L)
    return dM @ Pk, np.swapaxes(dM, -1, -2) @ Pq                            # (G, Nq, L), (G, Nk, L)


def _tc_leaf_gradients(q, k, v, leaf_q, leaf_k, scale, dout, out, lse, P, nodes, height):
    """TC's ``(g^q, g^k)`` from the routed forward's ``out``, ``lse``, weights and node means."""
    A = ancestor_matrix(height)                                             # (2L-1, L)
    counts, kbar, vbar = nodes["counts"], nodes["kbar"], nodes["vbar"]
    nonempty = (counts > 0)[..., None, :]                                   # (G, 1, 2L-1)
    scores = scale * (q @ np.swapaxes(kbar, -1, -2))                        # (G, Nq, 2L-1)
    Lam = _finite(lse)[..., None]                                           # (G, Nq, 1)
    delta = (dout * out).sum(axis=-1, keepdims=True)                        # (G, Nq, 1)
    E = np.where(nonempty, np.exp(np.minimum(scores - Lam, EXP_CLIP)), 0.0)  # (G, Nq, 2L-1)
    dpi = E * (dout @ np.swapaxes(vbar, -1, -2) - delta)                    # (G, Nq, 2L-1)
    dS, dvbar = softmax_attend_backward(dout, out, P, vbar)                 # (G, Nq, 2L-1), (G, 2L-1, Dv)
    dkbar = scale * (np.swapaxes(dS, -1, -2) @ q)                           # (G, 2L-1, D)
    keep = (leaf_k >= 0)[..., None]                                         # (G, Nk, 1)
    per_node = np.where(counts > 0, counts, 1)[..., None, :]                # (G, 1, 2L-1)
    dC = (k @ np.swapaxes(dkbar, -1, -2) - (dkbar * kbar).sum(-1)[..., None, :]
          + v @ np.swapaxes(dvbar, -1, -2) - (dvbar * vbar).sum(-1)[..., None, :])  # (G, Nk, 2L-1)
    dC = np.where(keep & nonempty, dC / per_node, 0.0)                      # (G, Nk, 2L-1)
    return dpi @ A, dC @ A                                                  # (G, Nq, L), (G, Nk, L)


# --- step 2: the tree surrogate -------------------------------------------------------------


def _split_scores(x, W, B):
    """``Z = x W^T + b`` for every internal node: (G, N, I)."""
    return x @ np.swapaxes(W, -1, -2) + B[..., None, :]


def _dz(Z, g, S, temperature, omega):
    """``dL/dZ`` from leaf gradients ``g`` (G, N, L) through softmax(S sign+(Z) / tau) and the hardtanh."""
    a = np.where(Z >= 0, 1.0, -1.0)                                         # (G, N, I) sign+
    u = a @ S.T                                                             # (G, N, L)
    e = np.exp((u - u.max(axis=-1, keepdims=True)) / temperature)           # (G, N, L)
    p = e / e.sum(axis=-1, keepdims=True)                                   # (G, N, L) p~
    du = p * (g - (p * g).sum(axis=-1, keepdims=True)) / temperature        # (G, N, L)
    da = du @ S                                                             # (G, N, I)
    return np.where(np.abs(Z) <= omega, da / omega, 0.0)                    # (G, N, I)


def surrogate_gradients(data: FitData, w, b, g_q, g_k, *, height, temperature, ste_window):
    """``(dw, db, dZ_q, dZ_k)`` of the DGT-style surrogate, pooled over the slices sharing a tree.

    ``omega_i = ste_window * (mean_x |Z_xi| + 1e-12)`` with the mean over
    every pooled point of the tree (queries, then kept keys).
    """
    S = split_sign_matrix(height)                                           # (L, I)
    W, B = w[data.owner], b[data.owner]                                     # (G, I, D), (G, I)
    keep = data.keep[..., None]                                             # (G, Nk, 1)
    Zq = _split_scores(data.q, W, B)                                        # (G, Nq, I)
    Zk = _split_scores(data.k, W, B)                                        # (G, Nk, I)
    abs_sum = np.zeros(b.shape)                                             # (T, I)
    np.add.at(abs_sum, data.owner, np.abs(Zq).sum(axis=1) + np.where(keep, np.abs(Zk), 0.0).sum(axis=1))
    points = np.bincount(data.owner, data.q.shape[1] + data.keep.sum(axis=1), minlength=data.num_trees)
    sigma = abs_sum / np.maximum(points, 1)[:, None] + WINDOW_FLOOR         # (T, I)
    omega = (ste_window * sigma)[data.owner][:, None, :]                    # (G, 1, I)
    dZq = _dz(Zq, g_q, S, temperature, omega)                               # (G, Nq, I)
    dZk = np.where(keep, _dz(Zk, g_k, S, temperature, omega), 0.0)          # (G, Nk, I)
    dw = np.zeros(w.shape)                                                  # (T, I, D)
    db = np.zeros(b.shape)                                                  # (T, I)
    np.add.at(dw, data.owner, np.swapaxes(dZq, -1, -2) @ data.q + np.swapaxes(dZk, -1, -2) @ data.k)
    np.add.at(db, data.owner, dZq.sum(axis=1) + dZk.sum(axis=1))
    return dw, db, dZq @ W, dZk @ W


# --- the objective --------------------------------------------------------------------------


def _objective(data: FitData, w, b, height, variant, *, need_grad, temperature=1.0, ste_window=1.0):
    """The loss ``||O - O*||^2 / ||O*||^2`` and, if asked, the surrogate ``(dw, db)``; one routed forward."""
    leaf_q = route_slices(data.q, w, b, data.owner, height)                 # (G, Nq)
    leaf_k = route_slices(data.k, w, b, data.owner, height, keep=data.keep)  # (G, Nk)
    if variant == "tf":
        out, lse, _, allowed = tf_attention(data.q, data.k, data.v, leaf_q, leaf_k, data.visible, data.scale)
    else:
        out, lse, P, nodes = tc_attention(data.q, data.k, data.v, leaf_q, leaf_k, height, data.scale)
    norm = max(float((data.target**2).sum()), LOSS_FLOOR)
    diff = out - data.target                                                # (G, Nq, Dv)
    loss = float((diff**2).sum()) / norm
    if not need_grad:
        return loss, None
    dout = 2.0 * diff / norm                                                # (G, Nq, Dv)
    if variant == "tf":
        g_q, g_k = _tf_leaf_gradients(data.q, data.k, data.v, leaf_q, leaf_k, data.visible, data.scale, dout, out,
                                      lse, allowed, height)
    else:
        g_q, g_k = _tc_leaf_gradients(data.q, data.k, data.v, leaf_q, leaf_k, data.scale, dout, out, lse, P, nodes,
                                      height)
    dw, db, _, _ = surrogate_gradients(data, w, b, g_q, g_k, height=height, temperature=temperature,
                                       ste_window=ste_window)
    return loss, (dw, db)


# --- step 3: the schedule -------------------------------------------------------------------


class _Adam:
    """Adam with bias correction; one instance per parameter array."""

    def __init__(self, shape, lr):
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.t = 0
        self.lr = lr

    def step(self, grad):
        b1, b2 = ADAM_BETAS
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad**2
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)


def _normalise(w, b, *, scale_bias):
    """In place: unit-norm split directions (zero rows stay); routing is unchanged when ``scale_bias``."""
    norms = np.linalg.norm(w, axis=-1)                                      # (T, I)
    safe = np.where(norms > 0, norms, 1.0)
    w /= safe[..., None]
    if scale_bias:
        b /= safe


@contextlib.contextmanager
def _blas_single_thread():
    """One BLAS thread while fitting: its products are small, and threads only add overhead there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with the numba extra; run unlimited without it
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), disable=not enabled,
    )


def fit_on_data(tree: TreeformerState, data: FitData, *, variant, steps, lr, temperature, ste_window, recenter,
                progress, label="fit_tree", points=None, holdout=None):
    """The fitting loop on flattened data (internal); see :func:`fit_tree`.

    ``points`` (one (n_t, D) array per tree) are re-centred on; default the
    queries and kept keys of ``data``. With ``holdout`` (a second
    :class:`FitData`), every evaluated tree is also scored there, and the
    returned tree is the one with the lowest held-out loss.
    """
    h = tree.height
    w, b = (a.copy() for a in tree.flat())
    if points is None:
        points = pool_slices(data.q, data.k, data.keep, data.owner, data.num_trees)
    _normalise(w, b, scale_bias=not recenter)
    if recenter:
        recentre(points, w, b, h)
    steps = steps if h > 0 else 0
    adam_w, adam_b = _Adam(w.shape, lr), _Adam(b.shape, lr)
    losses, held_out = [], []
    best = (math.inf, 0, w.copy(), b.copy())
    with _progress(progress) as bar, _blas_single_thread():
        task = bar.add_task(f"{label} (h={h}, {variant})", total=steps, loss=math.nan)
        for step in range(steps + 1):
            loss, grads = _objective(data, w, b, h, variant, need_grad=step < steps, temperature=temperature,
                                     ste_window=ste_window)
            losses.append(loss)
            score = loss
            if holdout is not None:
                score = _objective(holdout, w, b, h, variant, need_grad=False)[0]
                held_out.append(score)
            if score < best[0]:
                best = (score, step, w.copy(), b.copy())
            if step == steps:
                break
            dw, db = grads
            w -= adam_w.step(dw)
            if not recenter:
                b -= adam_b.step(db)
            _normalise(w, b, scale_bias=not recenter)
            if recenter:
                recentre(points, w, b, h)
            bar.update(task, advance=1, loss=loss)
    _, best_index, w, b = best
    T = tree.tree_shape
    fitted = TreeformerState(w.reshape(*T, *w.shape[1:]), b.reshape(*T, *b.shape[1:]), h)
    history = FitHistory(np.array(losses), best_index, ((h, variant, 0, len(losses)),),
                         None if holdout is None else np.array(held_out))
    return fitted, history


def _check_fit_options(variant, steps, lr, temperature, ste_window, recenter, progress):
    check_choice("variant", variant, VARIANTS)
    check_int("steps", steps, minimum=0)
    check_float("lr", lr, minimum=0.0, open_min=True)
    check_float("temperature", temperature, minimum=0.0, open_min=True)
    check_float("ste_window", ste_window, minimum=0.0, open_min=True)
    check_bool("recenter", recenter)
    check_bool("progress", progress)


def fit_tree(tree, q, k, v, *, variant="tf", target=None, mask=None, causal=False, scale=None, steps=200,
             lr=0.05, temperature=1.0, ste_window=1.0, recenter=True, progress=True):
    """Learn the splits so routed attention approximates ``target`` on ``q, k, v``.

    Minimises ``L = ||O - O*||_F^2 / max(||O*||_F^2, 1e-300)`` jointly over
    every slice, on the host in float64. Each step hard-routes and records
    ``L``, forms the leaf gradients (:func:`leaf_gradients`) and the
    surrogate ``(dw, db)`` (:func:`tree_vjp`), takes an Adam step on ``w``
    (and on ``b`` if not ``recenter``), renormalises every ``w_i`` to unit
    norm, and, if ``recenter``, re-centres every split on the median of the
    points that reach it (this keeps the leaves balanced; without it TF
    collapses towards one leaf, which *is* exact attention). The start tree
    (normalised and re-centred) and the final tree are evaluated too, and
    the lowest-loss tree seen is returned. Time per step
    ``O(Nq Nk (D + Dv) + N L I)`` for TF.

    Parameters
    ----------
    tree : TreeformerState
        The start (e.g. :func:`init_tree_pca`). Its tree shape broadcasts
        against the inputs; slices that share a tree are fitted jointly.
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    variant : {"tf", "tc"}, default="tf"
        The operator whose output is fitted.
    target : array of shape (..., Nq, Dv), optional
        ``O*``; default exact softmax attention with the same mask, causal
        rule and scale.
    mask : bool array of shape (..., Nk), optional
    causal : bool, "bottom_right" or "top_left", default=False
        TF only (``NotSupportedError`` for TC).
    scale : float, optional
        Default ``1/sqrt(D)``.
    steps : int, default=200
        Adam steps (``steps + 1`` trees are evaluated). A height-0 tree has
        nothing to fit: one evaluation, and the tree is returned unchanged.
    lr : float, default=0.05
    temperature : float, default=1.0
        ``tau`` of the leaf softmax; a leaf one split away keeps weight
        ``exp(-2 / tau)`` relative to the routed one.
    ste_window : float, default=1.0
        The hardtanh window ``omega_i`` in units of ``mean_x |Z_xi|``.
    recenter : bool, default=True
    progress : bool, default=True
        Show a rich progress bar with the current loss.

    Returns
    -------
    tree : TreeformerState
        The lowest-loss tree seen.
    history : FitHistory
    """
    _check_fit_options(variant, steps, lr, temperature, ste_window, recenter, progress)
    data, _ = make_fit_data(tree, q, k, v, mask=mask, causal=causal, scale=scale, target=target, variant=variant)
    return fit_on_data(tree, data, variant=variant, steps=steps, lr=lr, temperature=temperature,
                       ste_window=ste_window, recenter=recenter, progress=progress)


def fit_tree_bootstrap(q, k, v, height, *, variant="tf", start_height=1, tc_steps=100, tf_steps=100, target=None,
                       mask=None, causal=False, scale=None, lr=0.05, temperature=1.0, ste_window=1.0, recenter=True,
                       tree_shape=None, progress=True):
    """Two-level bootstrap: grow the tree one level at a time, fitting TC then TF at each height.

    *Depth level*: start from :func:`init_tree_pca` at ``min(start_height,
    height)`` and add one level at a time (:func:`update_tree_depth`).
    *Operator level*: at each height fit TC for ``tc_steps`` and then, for a
    TF target, TF for ``tf_steps`` (:func:`fit_tree`; Adam restarts each
    phase). TC has no causal form: with ``causal=True`` the TC phases fit
    non-causal TC to non-causal exact attention (``target`` is used only by
    the TF phases then). This is the package's reading of an unpublished
    schedule.

    Parameters
    ----------
    q, k, v, target, mask, causal, scale, lr, temperature, ste_window, recenter, progress
        As in :func:`fit_tree`.
    height : int
        The final height.
    variant : {"tf", "tc"}, default="tf"
    start_height : int, default=1
    tc_steps, tf_steps : int, default=100
    tree_shape : tuple, optional
        Default one tree per leading index (see :func:`init_tree_pca`).

    Returns
    -------
    tree : TreeformerState
        The best tree of the last phase.
    history : FitHistory
        Every phase's losses, concatenated; ``phases`` says which is which.
    """
    height = check_int("height", height, minimum=0, maximum=MAX_HEIGHT)
    start_height = check_int("start_height", start_height, minimum=0, maximum=MAX_HEIGHT)
    check_int("tc_steps", tc_steps, minimum=0)
    check_int("tf_steps", tf_steps, minimum=0)
    _check_fit_options(variant, 0, lr, temperature, ste_window, recenter, progress)
    h0 = min(start_height, height)
    tree = init_tree_pca(q, k, h0, mask=mask, tree_shape=tree_shape)
    losses, phases, best_index = [], [], 0
    options = dict(mask=mask, scale=scale, lr=lr, temperature=temperature, ste_window=ste_window,
                   recenter=recenter, progress=progress)
    causal_run = causal_offset(causal, host(q).shape[-2], host(k).shape[-2]) is not None
    for h in range(h0, height + 1):
        if h > h0:
            tree = update_tree_depth(tree, q, k, mask=mask)
        schedule = [("tc", tc_steps)] + ([("tf", tf_steps)] if variant == "tf" else [])
        for phase, steps in schedule:
            if phase == "tc" and causal_run:
                tree, hist = fit_tree(tree, q, k, v, variant="tc", steps=steps, **options)
            else:
                tree, hist = fit_tree(tree, q, k, v, variant=phase, steps=steps, target=target, causal=causal,
                                      **options)
            best_index = len(losses) + hist.best_index
            phases.append((h, phase, len(losses), len(losses) + len(hist.loss)))
            losses.extend(hist.loss)
    return tree, FitHistory(np.array(losses), best_index, tuple(phases))


def tree_vjp(q, k, v, tree, dout, *, variant, mask=None, causal=False, scale=None, temperature=1.0, ste_window=1.0):
    """Surrogate gradient of ``<dout, O>`` with respect to the splits and the routed points.

    ``O`` is TF or TC attention through ``tree``. The leaf gradients
    (:func:`leaf_gradients`) go through the DGT-style surrogate: with the
    pooled points ``X`` (queries, then kept keys) and ``Z = X W^T + b``,
    ``a = sign+(Z)``, ``u = a S^T``, ``p = softmax(u / tau)``,
    ``dL/du = p (g - <p, g>) / tau``, ``dL/da = dL/du S``,
    ``dL/dZ = dL/da [|Z| <= omega] / omega`` with
    ``omega_i = ste_window (mean_x |Z_xi| + 1e-12)``; then
    ``dw_i = sum_x dL/dZ_xi x`` and ``db_i = sum_x dL/dZ_xi``. Scaling
    ``(w, b)`` by ``lambda > 0`` scales ``(dw, db)`` by ``1 / lambda``.

    Parameters
    ----------
    q, k, v, mask, causal, scale
        As in :func:`fit_tree` (host arrays; computed in float64).
    tree : TreeformerState
    dout : array of shape (..., Nq, Dv)
        ``dL/dO``.
    variant : {"tf", "tc"}
    temperature, ste_window : float
        As in :func:`fit_tree`.

    Returns
    -------
    TreeGrad
    """
    check_float("temperature", temperature, minimum=0.0, open_min=True)
    check_float("ste_window", ste_window, minimum=0.0, open_min=True)
    data, lead = make_fit_data(tree, q, k, v, mask=mask, causal=causal, scale=scale, variant=variant,
                               with_target=False)
    dout = _float64("dout", dout)
    G, Nq, Dv = data.q.shape[0], data.q.shape[1], data.v.shape[2]
    if dout.shape[-2:] != (Nq, Dv):
        raise ValueError(f"dout must have shape (..., Nq, Dv) = (..., {Nq}, {Dv}), got {dout.shape}")
    dout = np.ascontiguousarray(np.broadcast_to(dout, (*lead, Nq, Dv))).reshape(G, Nq, Dv)
    w, b = tree.flat()
    h = tree.height
    leaf_q = route_slices(data.q, w, b, data.owner, h)
    leaf_k = route_slices(data.k, w, b, data.owner, h, keep=data.keep)
    g_q, g_k = leaf_gradients(data.q, data.k, data.v, leaf_q, leaf_k, dout, variant=variant, height=h,
                              scale=data.scale, visible=data.visible)
    dw, db, dq, dk = surrogate_gradients(data, w, b, g_q, g_k, height=h, temperature=temperature,
                                         ste_window=ste_window)
    T = tree.tree_shape
    dq = _sum_to_shape(dq.reshape(*lead, *dq.shape[1:]), host(q).shape)
    dk = _sum_to_shape(dk.reshape(*lead, *dk.shape[1:]), host(k).shape)
    return TreeGrad(dw.reshape(*T, *dw.shape[1:]), db.reshape(*T, *db.shape[1:]), dq, dk)
