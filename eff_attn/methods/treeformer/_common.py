"""What the three Treeformer backends share: FLOP counts and the routing summary in ``res``.

FLOP convention (that of ``exact``): 2 per multiply-add, 1 per exp, compare,
add or divide; an attended (query, key-or-centroid) pair costs
``c_p = 2D + 2Dv + 5``. Routing costs ``2 h D`` per point (one dot product
per depth, path-wise, never the dense ``2**h`` form)::

    F_TF = 2 h D (Nq + n_k) + (sum_l a_l c_l) c_p
    F_TC = 2 h D (Nq + n_k) + (n_k + 3L - 2)(D + Dv) + (sum_i |P_i|) c_p

with ``a_l``, ``c_l`` the queries and kept keys in leaf ``l`` (causal TF
counts the allowed pairs instead of ``sum a_l c_l``) and ``|P_i|`` the
non-empty nodes on query ``i``'s path. Without routed counts the balanced
values ``Nq n_k / L`` and ``h + 1`` are used. See ``docs/methods/treeformer.md``.
"""

from __future__ import annotations

import numpy as np

from ... import masks
from ..._array import to_host
from ..._validate import check_int
from ...registry import NotSupportedError
from .state import MAX_HEIGHT, default_height

__all__ = ["flops_tf", "flops_tc", "node_counts_from_leaves", "leaf_counts", "finish_res", "TC_CAUSAL_MESSAGE"]

#: Why ``treeformer_tc`` refuses ``causal=True`` (the call, ``flops_tc`` and ``fit_tree`` say the same).
TC_CAUSAL_MESSAGE = (
    "treeformer_tc: causal=True is not supported: TC attends to node centroids averaging keys from all "
    "positions; no prefix-aggregate version is defined"
)


def _pair_cost(D, Dv):
    return 2 * D + 2 * Dv + 5


def _backward_pair_cost(D, Dv):
    return 6 * D + 4 * Dv + 5


def _height(height, Nk):
    return default_height(Nk) if height is None else check_int("height", height, minimum=0, maximum=MAX_HEIGHT)


def _counts(leaf_counts, L, name):
    c = np.asarray(leaf_counts, dtype=np.int64)
    if c.ndim < 1 or c.shape[-1] != L:
        raise ValueError(f"{name} must have shape (..., L) with L = 2**height = {L}, got shape {c.shape}")
    return c.reshape(-1, L)


def node_counts_from_leaves(leaf_counts, height: int):
    """Node counts in heap order, shape (..., 2L - 1), from leaf counts (..., L): parent = left + right."""
    levels = [np.asarray(leaf_counts)]
    for _ in range(height):
        below = levels[0]
        levels.insert(0, below[..., 0::2] + below[..., 1::2])
    return np.concatenate(levels, axis=-1)


def flops_tf(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, height=None,
             leaf_counts_q=None, leaf_counts_k=None, pairs=None, **params) -> int:
    """FLOPs of TF-attention (docs: methods/treeformer, "Complexity").

    ``F_TF = 2 h D (Nq + n_k) + pairs (2D + 2Dv + 5)``. With routed counts
    ``leaf_counts_q``, ``leaf_counts_k`` (..., L) (summed over their leading
    axes, then times ``batch``), ``pairs = sum_l a_l c_l``, or the given
    ``pairs`` (required with ``causal``: the allowed in-leaf pairs).
    Without counts, the balanced ``pairs = P / L`` (``P`` the visible pairs
    of exact attention). ``backward=True`` adds ``pairs (6D + 4Dv + 5)``.
    """
    Dv = D if Dv is None else Dv
    h = _height(height, Nk)
    L = 2**h
    if (leaf_counts_q is None) != (leaf_counts_k is None):
        raise ValueError("pass both leaf_counts_q and leaf_counts_k, or neither")
    if leaf_counts_k is None:
        if pairs is not None:
            raise ValueError("pairs= is only used together with routed leaf counts")
        visible = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
        queries, keys, pairs = Nq, Nk, visible / L
    else:
        a, c = _counts(leaf_counts_q, L, "leaf_counts_q"), _counts(leaf_counts_k, L, "leaf_counts_k")
        if pairs is None:
            if masks.causal_offset(causal, Nq, Nk) is not None:
                raise ValueError("causal routed counts need pairs= (the allowed in-leaf pairs)")
            pairs = int((a * c).sum())
        queries, keys = int(a.sum()), int(c.sum())
    total = 2 * h * D * (queries + keys) + pairs * _pair_cost(D, Dv)
    if backward:
        total += pairs * _backward_pair_cost(D, Dv)
    return int(round(batch * total))


def flops_tc(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, height=None,
             leaf_counts_q=None, leaf_counts_k=None, **params) -> int:
    """FLOPs of TC-attention (docs: methods/treeformer, "Complexity").

    ``F_TC = 2 h D (Nq + n_k) + (n_k + 3L - 2)(D + Dv) + (sum_i |P_i|) c_p``:
    routing, the leaf sums plus the ``L - 1`` parent additions and the
    ``2L - 1`` divisions of both means, and one pair per non-empty path
    node. With routed counts, ``|P_i|`` counts the non-empty nodes on the
    path of query ``i``'s leaf; without, ``h + 1`` and ``n_k = Nk``.
    ``backward=True`` adds ``(sum |P_i|)(6D + 4Dv + 5) + (n_k (h + 1) + 2L - 1)(D + Dv)``
    (the path gathers of ``dk``, ``dv`` and the per-node divisions).
    """
    if masks.causal_offset(causal, Nq, Nk) is not None:
        raise NotSupportedError(TC_CAUSAL_MESSAGE)
    Dv = D if Dv is None else Dv
    h = _height(height, Nk)
    L = 2**h
    if (leaf_counts_q is None) != (leaf_counts_k is None):
        raise ValueError("pass both leaf_counts_q and leaf_counts_k, or neither")
    if leaf_counts_k is None:
        slices, queries, keys, path_pairs = 1, Nq, Nk, Nq * (h + 1)
    else:
        a, c = _counts(leaf_counts_q, L, "leaf_counts_q"), _counts(leaf_counts_k, L, "leaf_counts_k")
        nonempty = node_counts_from_leaves(c, h) > 0                         # (S, 2L-1)
        path_len = np.zeros_like(a)                                          # (S, L)
        for t in range(h + 1):
            level = nonempty[:, 2**t - 1:2 ** (t + 1) - 1]                   # (S, 2**t)
            path_len += np.repeat(level, 2 ** (h - t), axis=-1)
        slices, queries, keys, path_pairs = a.shape[0], int(a.sum()), int(c.sum()), int((a * path_len).sum())
    total = (2 * h * D * (queries + keys) + (keys + slices * (3 * L - 2)) * (D + Dv)
             + path_pairs * _pair_cost(D, Dv))
    if backward:
        total += path_pairs * _backward_pair_cost(D, Dv) + (keys * (h + 1) + slices * (2 * L - 1)) * (D + Dv)
    return int(batch * total)


def leaf_counts(xp, leaf, num_leaves: int):
    """Points per leaf of each slice, shape (G, L), int64; leaf -1 is not counted. No host sync."""
    G = leaf.shape[0]
    width = num_leaves + 1                                                  # one spare bin for -1
    bins = xp.where(leaf >= 0, leaf, num_leaves) + width * xp.arange(G, dtype=np.int64)[:, None]
    counts = xp.bincount(bins.ravel(), minlength=G * width).reshape(G, width)
    return counts[:, :num_leaves].astype(np.int64)


def finish_res(xp, res, *, variant, tree, height, D, Dv):
    """Complete a backend's ``res``: leaf counts, empty rows, the routed FLOP count, the tree.

    Expects ``leaf_q``, ``leaf_k`` and, for TF, ``keys_per_row`` (allowed keys
    of each row) or, for TC, ``path_len`` (non-empty path nodes of each row).
    """
    L = 2**height
    Nq, Nk = res["leaf_q"].shape[1], res["leaf_k"].shape[1]
    res["leaf_counts_q"] = leaf_counts(xp, res["leaf_q"], L)               # (G, L)
    res["leaf_counts_k"] = leaf_counts(xp, res["leaf_k"], L)               # (G, L)
    counts = dict(height=height, leaf_counts_q=to_host(res["leaf_counts_q"]),
                  leaf_counts_k=to_host(res["leaf_counts_k"]))
    if variant == "tf":
        res["empty_rows"] = res["keys_per_row"] == 0                         # (G, Nq)
        res["flops"] = flops_tf(Nq, Nk, D, Dv, pairs=int(res["keys_per_row"].sum()), **counts)
    else:
        res["empty_rows"] = res["path_len"] == 0                             # (G, Nq)
        res["flops"] = flops_tc(Nq, Nk, D, Dv, **counts)
    res["tree"] = tree
    return res
