"""Treeformer TF- and TC-attention in NumPy: the textbook, and the oracle of every test.

Per (batch, head) slice, with leaves ``l(q_i)``, ``l(k_j)`` from the tree
walk (masked keys get leaf -1):

**TF** (softmax within the query's leaf)::

    M_ij  = [l(q_i) = l(k_j)] kappa_j gamma_ij        same leaf, kept, causally visible
    out_i = sum_j M_ij exp(s_ij - mu_i) v_j / sum_j M_ij exp(s_ij - mu_i)   (0 if row i is empty)

This is exact attention with the additive mask ``log M``: the scores are
dense here (O(Nq Nk)), which is the definition, not the fast path.

**TC** (softmax over the means of the nodes on the query's path)::

    C_jm  = [node m on key j's path] kappa_j          (Nk, 2L - 1)
    N_m   = sum_j C_jm,  kbar_m = sum_j C_jm k_j / N_m,  vbar_m likewise
    pi_im = [node m on query i's path]                (Nq, 2L - 1)
    out_i = softmax over {m : pi_im = 1, N_m > 0} of s q_i . kbar_m, applied to vbar_m

Both backward passes freeze the routing (its derivative is 0 almost
everywhere) and differentiate the rest exactly.
"""

from __future__ import annotations

import numpy as np

from ..._array import swap_last
from ..._softmax import softmax_attend, softmax_attend_backward
from ...masks import visible_pairs
from . import _common
from .state import path_nodes, walk

__all__ = [
    "route_slices",
    "tf_attention",
    "tf_backward",
    "tc_attention",
    "tc_backward",
    "forward",
    "backward",
]


def route_slices(x, w, b, tree_of_slice, height, keep=None):
    """Leaves of flattened slices, shape (G, N), int64; -1 where ``keep`` is False.

    Parameters
    ----------
    x : ndarray of shape (G, N, D)
    w : ndarray of shape (T, I, D), b : ndarray of shape (T, I)
        Cast to ``x.dtype``: ``z`` is computed in the input dtype.
    tree_of_slice : int ndarray of shape (G,)
    keep : bool ndarray of shape (G, N), optional
    """
    W = w[tree_of_slice].astype(x.dtype)                                    # (G, I, D)
    B = b[tree_of_slice].astype(x.dtype)                                    # (G, I)
    leaf = walk(x, W, B, height)                                            # (G, N)
    return leaf if keep is None else np.where(keep, leaf, -1)


def tf_attention(q, k, v, leaf_q, leaf_k, visible, scale):
    """TF-attention: exact softmax restricted to the keys in the query's leaf.

    Time and memory ``O(Nq Nk (D + Dv))`` (dense masked scores).

    Parameters
    ----------
    q : ndarray of shape (G, Nq, D)
    k : ndarray of shape (G, Nk, D)
    v : ndarray of shape (G, Nk, Dv)
    leaf_q : int ndarray of shape (G, Nq)
    leaf_k : int ndarray of shape (G, Nk), -1 for masked keys
    visible : bool ndarray broadcastable to (G, Nq, Nk)
        The mask and causal rule (``eff_attn.masks.visible_pairs``).
    scale : float

    Returns
    -------
    out : ndarray of shape (G, Nq, Dv)
        0 on rows with no allowed key.
    lse : ndarray of shape (G, Nq)
        Log-sum-exp over the allowed keys, ``-inf`` on empty rows.
    P : ndarray of shape (G, Nq, Nk)
        The attention weights.
    allowed : bool ndarray of shape (G, Nq, Nk)
        ``M``: same leaf, kept and visible.
    """
    same_leaf = leaf_q[..., :, None] == leaf_k[..., None, :]                # (G, Nq, Nk)
    allowed = same_leaf & (leaf_k >= 0)[..., None, :] & visible             # (G, Nq, Nk) M
    scores = scale * (q @ swap_last(k))                                     # (G, Nq, Nk)
    out, lse, P = softmax_attend(scores, allowed, v)                        # (G, Nq, Dv), (G, Nq), (G, Nq, Nk)
    return out, lse, P, allowed


def tf_backward(dout, q, k, v, out, P, scale):
    """Pullback of :func:`tf_attention` with the leaves frozen.

    ``dS = P * (dO v^T - delta)``, ``dq = s dS k``, ``dk = s dS^T q``,
    ``dv = P^T dO``. Time ``O(Nq Nk (D + Dv))``.
    """
    dS, dv = softmax_attend_backward(dout, out, P, v)                       # (G, Nq, Nk), (G, Nk, Dv)
    dq = scale * (dS @ k)                                                   # (G, Nq, D)
    dk = scale * (swap_last(dS) @ q)                                        # (G, Nk, D)
    return dq, dk, dv


def on_path(leaf, height, dtype=np.float64):
    """``[node m on the path of point n's leaf]``, shape (G, N, 2L - 1); zero rows where ``leaf = -1``.

    Built from the ``h + 1`` path nodes of each point: memory ``O(N L)``.
    """
    G, N = leaf.shape
    nodes = path_nodes(leaf, height)                                        # (G, N, h+1), -1 if masked
    C = np.zeros((G, N, 2 ** (height + 1)), dtype=dtype)                    # (G, N, 2L); last column: masked
    np.put_along_axis(C, np.where(nodes >= 0, nodes, 2 ** (height + 1) - 1), 1, axis=-1)
    return C[..., :-1]                                                      # (G, N, 2L-1)


def tc_attention(q, k, v, leaf_q, leaf_k, height, scale):
    """TC-attention: softmax over the non-empty path nodes' mean keys and values.

    Time ``O((Nq + Nk) L (D + Dv))`` and memory ``O((Nq + Nk) L)`` here
    (dense node indicators, for reading); the fast backends are
    ``O(N (h + 1) (D + Dv))``.

    Parameters
    ----------
    q, k, v, leaf_q, leaf_k, scale : as in :func:`tf_attention`
    height : int

    Returns
    -------
    out : ndarray of shape (G, Nq, Dv)
        0 when the slice has no kept key.
    lse : ndarray of shape (G, Nq)
    P : ndarray of shape (G, Nq, 2L - 1)
        ``alpha``: the weight of each node (0 off the path and on empty nodes).
    nodes : dict
        ``C`` (G, Nk, 2L-1) key-in-node, ``counts`` (G, 2L-1) ``N_m``,
        ``kbar`` (G, 2L-1, D), ``vbar`` (G, 2L-1, Dv), ``allowed``
        (G, Nq, 2L-1) the non-empty path nodes.
    """
    C = on_path(leaf_k, height, q.dtype)                                    # (G, Nk, 2L-1); 0 rows if masked
    counts = C.sum(axis=-2)                                                 # (G, 2L-1) N_m
    nonempty = counts > 0                                                   # (G, 2L-1)
    per_node = np.where(nonempty, counts, 1)[..., None]                     # (G, 2L-1, 1)
    kbar = (swap_last(C) @ k) / per_node                                    # (G, 2L-1, D)
    vbar = (swap_last(C) @ v) / per_node                                    # (G, 2L-1, Dv)
    pi = on_path(leaf_q, height) > 0                                        # (G, Nq, 2L-1)
    allowed = pi & nonempty[..., None, :]                                   # (G, Nq, 2L-1)
    scores = scale * (q @ swap_last(kbar))                                  # (G, Nq, 2L-1)
    out, lse, P = softmax_attend(scores, allowed, vbar)                     # (G, Nq, Dv), (G, Nq), (G, Nq, 2L-1)
    nodes = {"C": C, "counts": counts, "kbar": kbar, "vbar": vbar, "allowed": allowed}
    return out, lse, P, nodes


def tc_backward(dout, q, k, v, out, P, nodes, scale):
    """Pullback of :func:`tc_attention` with the routing frozen.

    With ``dS = P * (dO vbar^T - delta)`` (``beta`` on the path)::

        dq      = s dS kbar
        dkbar_m = s sum_i dS_im q_i,      dvbar_m = sum_i P_im dO_i
        dk_j    = kappa_j sum_{m on j's path} dkbar_m / N_m   = C (dkbar / N)

    and ``dv`` likewise. Time ``O((Nq + Nk) L (D + Dv))`` here.
    """
    C, counts, kbar, vbar = nodes["C"], nodes["counts"], nodes["kbar"], nodes["vbar"]
    dS, dvbar = softmax_attend_backward(dout, out, P, vbar)                 # (G, Nq, 2L-1), (G, 2L-1, Dv)
    dq = scale * (dS @ kbar)                                                # (G, Nq, D)
    dkbar = scale * (swap_last(dS) @ q)                                     # (G, 2L-1, D)
    per_node = np.where(counts > 0, counts, 1)[..., None]                   # (G, 2L-1, 1)
    dk = C @ (dkbar / per_node)                                             # (G, Nk, D)
    dv = C @ (dvbar / per_node)                                             # (G, Nk, Dv)
    return dq, dk, dv


def _route(q, k, mask, tree, height):
    w, b = tree.state.flat()
    leaf_q = route_slices(q, w, b, tree.tree_of_slice, height)              # (G, Nq)
    leaf_k = route_slices(k, w, b, tree.tree_of_slice, height, keep=mask)   # (G, Nk)
    return leaf_q, leaf_k


def forward(q, k, v, *, mask, offset, scale, variant, height, tree, **params):
    """Backend entry point: route, then TF or TC attention."""
    Nq, Nk = q.shape[1], k.shape[1]
    leaf_q, leaf_k = _route(q, k, mask, tree, height)
    if variant == "tf":
        visible = visible_pairs(mask, offset, Nq, Nk)                       # (G|1, Nq, Nk)
        out, lse, P, allowed = tf_attention(q, k, v, leaf_q, leaf_k, visible, scale)
        res = {"keys_per_row": allowed.sum(axis=-1)}                        # (G, Nq)
    else:
        out, lse, P, nodes = tc_attention(q, k, v, leaf_q, leaf_k, height, scale)
        L = 2**height
        res = {
            "node_counts": nodes["counts"].astype(np.int64),                # (G, 2L-1)
            "path_len": nodes["allowed"].sum(axis=-1),                      # (G, Nq)
            "root_weight": P[..., 0],                                       # (G, Nq)
            "leaf_weight": np.take_along_axis(P, (L - 1 + np.maximum(leaf_q, 0))[..., None], axis=-1)[..., 0],
        }
    res.update(leaf_q=leaf_q, leaf_k=leaf_k, lse=lse)
    return out, _common.finish_res(np, res, variant=variant, tree=tree, height=height, D=q.shape[2], Dv=v.shape[2])


def backward(dout, q, k, v, out, res, *, mask, offset, scale, variant, height, tree, **params):
    """Backend entry point for the pullback (routing frozen)."""
    leaf_q, leaf_k = res["leaf_q"], res["leaf_k"]
    if variant == "tf":
        visible = visible_pairs(mask, offset, q.shape[1], k.shape[1])
        _, _, P, _ = tf_attention(q, k, v, leaf_q, leaf_k, visible, scale)
        return tf_backward(dout, q, k, v, out, P, scale)
    _, _, P, nodes = tc_attention(q, k, v, leaf_q, leaf_k, height, scale)
    return tc_backward(dout, q, k, v, out, P, nodes, scale)
