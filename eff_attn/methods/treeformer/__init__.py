"""Treeformer (Madaan et al., ICLR 2023): attention routed by a decision tree.

One binary tree with hyperplane splits sends every query and key to a leaf.
Two methods are built on it, registered separately:

- ``treeformer_tf`` (TF-attention): softmax over the keys in the query's
  own leaf; a query whose leaf holds no allowed key returns 0 (flagged in
  ``info["empty_rows"]``). At height 0 it is exact attention.
- ``treeformer_tc`` (TC-attention): softmax over the mean keys and values of
  the (at most ``h + 1``) non-empty nodes on the query's root-to-leaf path.
  At height 0 it is ``mean(v)``.

The tree is a :class:`TreeformerState`; ``state=None`` builds one per call
(see ``tree_init``). :func:`fit_tree` and :func:`fit_tree_bootstrap` train
the splits; an untrained tree approximates exact attention poorly. See
``docs/methods/treeformer.md`` for the derivation and the package choices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ... import masks
from ..._array import to_host
from ..._softmax import softmax_attend
from ..._validate import check_choice, check_int, check_memory
from ...random import as_generator
from ...registry import Impl, Method, NotSupportedError, Sharding
from ._common import TC_CAUSAL_MESSAGE, flops_tc, flops_tf, node_counts_from_leaves
from .fit import (
    FitData,
    _blas_single_thread,
    FitHistory,
    TreeGrad,
    fit_on_data,
    fit_tree,
    fit_tree_bootstrap,
    leaf_gradients,
    tree_vjp,
)
from .state import (
    MAX_HEIGHT,
    BoundTree,
    TreeformerState,
    ancestor_matrix,
    check_tree_dim,
    default_height,
    draw_treeformer_directions,
    init_tree,
    init_tree_pca,
    path_nodes,
    pool_slices,
    route,
    split_sign_matrix,
    tree_index,
    update_tree_bias,
    update_tree_depth,
)

__all__ = [
    "treeformer_tf_attention",
    "treeformer_tc_attention",
    "TF_METHOD",
    "TC_METHOD",
    "TreeformerState",
    "FitHistory",
    "TreeGrad",
    "draw_treeformer_directions",
    "init_tree",
    "init_tree_pca",
    "update_tree_bias",
    "update_tree_depth",
    "route",
    "path_nodes",
    "split_sign_matrix",
    "ancestor_matrix",
    "fit_tree",
    "fit_tree_bootstrap",
    "tree_vjp",
    "leaf_gradients",
    "flops_tf",
    "flops_tc",
    "default_height",
    "node_counts_from_leaves",
    "MAX_HEIGHT",
    "TREE_INITS",
    "FIT_STEPS",
    "FIT_MAX_QUERIES",
]

#: How a call with ``state=None`` builds its tree.
TREE_INITS = ("pca_median", "random", "fit")
#: ``tree_init="fit"``: Adam steps of :func:`fit_tree` on the call's own inputs. 20 rather than 50: on
#: clustered N = 2048, 8 heads, height 5, TC reaches error 0.614 after 20 steps and 0.606 after 50 (PCA
#: start 0.700, random tree 1.023), TF 1.497 both (random tree 2.343), at 40 % of the fitting time.
FIT_STEPS = 20
#: ``tree_init="fit"`` fits on at most this many queries per slice against every key (a TF step
#: costs ``O(n_q Nk (D + Dv))``; sampling keys instead would change the target rows). With more
#: queries than this, it draws two disjoint samples of this size with ``rng``: one to fit on, one
#: to choose the returned tree by its loss (a tree fitted on few queries overfits them).
FIT_MAX_QUERIES = 128


def _resolve(variant, problem, state, height, tree_init) -> dict:
    if variant == "tc" and problem.causal:
        raise NotSupportedError(TC_CAUSAL_MESSAGE)
    if state is not None:
        check_tree_dim(state, problem.D)
        tree_index(state.tree_shape, problem.batch_shape)
        if height is not None and check_int("height", height, minimum=0, maximum=MAX_HEIGHT) != state.height:
            raise ValueError(f"height={height} does not match the given state's height {state.height}")
        if tree_init is not None:
            raise ValueError(f"tree_init={tree_init!r} is only used when the call builds the tree (state=None)")
        _check_tree_memory(problem, variant, state.height, None)
        return {"variant": variant, "state": state, "height": state.height, "tree_init": None}
    height = default_height(problem.Nk) if height is None else check_int(
        "height", height, minimum=0, maximum=MAX_HEIGHT)
    tree_init = "pca_median" if tree_init is None else check_choice("tree_init", tree_init, TREE_INITS)
    points = problem.Nq + problem.Nk
    useful = (points - 1).bit_length()                                      # ceil(log2(points))
    if height > useful:
        raise ValueError(
            f"height={height} is too large for a tree built from this call's Nq + Nk = {points} points: "
            f"height {useful} already gives {2**useful} >= {points} leaves, and the arrays grow as 2**height; "
            f"pass height <= {useful}, or a state= grown on more data"
        )
    _check_tree_memory(problem, variant, height, tree_init)
    return {"variant": variant, "state": None, "height": height, "tree_init": tree_init}


def _check_tree_memory(problem, variant, height, tree_init):
    """Refuse a ``height`` whose arrays cannot fit, before the tree is built.

    The tree itself holds ``(2**h - 1, D)`` floats per slice; TC's node
    means and node indicators ``(G, Nq + Nk + D + Dv, 2**(h+1))`` (the
    reference's, the largest); the fit's dense split and ancestor matrices
    ``(2**h, 2**(h+1))``, quadratic in the leaves.
    """
    L = 2**height
    check_memory("height", height, (problem.G, L, problem.D), what="the tree's split directions")
    if variant == "tc":
        rows = problem.Nq + problem.Nk + problem.D + problem.Dv
        check_memory("height", height, (problem.G, rows, 2 * L), what="TC's node means and indicators")
    if tree_init == "fit":
        check_memory("height", height, (L, 2 * L), what="the fit's dense split and ancestor matrices")


def resolve_tf(problem, *, state=None, height=None, tree_init=None) -> dict:
    """Check TF's parameters; see :func:`treeformer_tf_attention`."""
    return _resolve("tf", problem, state, height, tree_init)


def resolve_tc(problem, *, state=None, height=None, tree_init=None) -> dict:
    """Check TC's parameters; see :func:`treeformer_tc_attention`."""
    return _resolve("tc", problem, state, height, tree_init)


def _fit_rows(rng, Nq):
    """Query rows to fit on and to select by: all rows and none, or two disjoint sorted samples drawn with ``rng``."""
    if Nq <= FIT_MAX_QUERIES:
        return np.arange(Nq), None
    order = as_generator(rng).permutation(Nq)
    return np.sort(order[:FIT_MAX_QUERIES]), np.sort(order[FIT_MAX_QUERIES:2 * FIT_MAX_QUERIES])


def _fit_data(problem, q_all, k, v, keep, rows):
    """:class:`FitData` of the queries ``rows`` against every key, target exact attention."""
    q = q_all[:, rows]                                                       # (G, nq, D)
    visible = keep[:, None, :]                                               # (G, 1, Nk)
    if problem.causal:                                                       # the rows' own positions
        visible = visible & (np.arange(problem.Nk)[None, None, :] <= rows[None, :, None] + problem.offset)
    target, _, _ = softmax_attend(problem.scale * (q @ np.swapaxes(k, -1, -2)), visible, v)
    G = problem.G
    return FitData(q, k, v, keep, visible, target, np.arange(G), G, problem.scale, problem.causal)


def _fit_for_call(problem, params, rng):
    """``tree_init="fit"``: the PCA-median tree, then :func:`fit_tree` on sampled queries of the call's inputs.

    The start tree and the median re-centring use every query and kept key.
    The loss and its gradient use at most ``FIT_MAX_QUERIES`` sampled queries
    per slice against every key; with more queries than that, a second,
    disjoint sample chooses the returned tree.
    """
    q_all, k, v = (to_host(a).astype(np.float64) for a in (problem.q, problem.k, problem.v))   # (G, N, .)
    keep = np.ones(k.shape[:2], dtype=bool) if problem.mask is None else to_host(problem.mask)
    fit_rows, select_rows = _fit_rows(rng, problem.Nq)
    G = problem.G
    start = init_tree_pca(problem.unflatten(q_all), problem.unflatten(k), params["height"],
                          mask=problem.unflatten(keep), tree_shape=problem.batch_shape)
    holdout = None if select_rows is None else _fit_data(problem, q_all, k, v, keep, select_rows)
    return fit_on_data(start, _fit_data(problem, q_all, k, v, keep, fit_rows), variant=params["variant"],
                       steps=FIT_STEPS, lr=0.05, temperature=1.0, ste_window=1.0, recenter=True, progress=False,
                       label="tree_init='fit'", points=pool_slices(q_all, k, keep, np.arange(G), G), holdout=holdout)


def _fits(problem, params) -> bool:
    """The call builds its tree from its own inputs: no ``state=`` given."""
    return params["state"] is None


def draw(rng, problem, params) -> dict:
    """A given state bound to the call's slices; nothing to draw when the call builds its tree (:func:`fit`)."""
    state = params["state"]
    if state is None:
        return {}
    if rng is not None:
        raise ValueError("rng is unused when state= is given (the tree is fixed); pass rng=None")
    return {"tree": BoundTree(state, tree_index(state.tree_shape, problem.batch_shape), "given")}


def fit(rng, problem, params) -> dict:
    """The call's tree, built per leading index from its own q and k (no ``state=`` given).

    ``tree_init="pca_median"`` and ``"random"`` place the splits at medians
    of the inputs' projections; ``"fit"`` then trains the tree on them. ``rng``
    is used only by ``tree_init="random"`` (the split directions) and
    ``tree_init="fit"`` (which queries the fit samples, when there are more
    than ``FIT_MAX_QUERIES``).
    """
    init, h, T = params["tree_init"], params["height"], problem.batch_shape
    q, k = problem.unflatten(to_host(problem.q)), problem.unflatten(to_host(problem.k))
    mask = None if problem.mask is None else problem.unflatten(to_host(problem.mask))
    history = None
    with _blas_single_thread():          # one small SVD per node: BLAS threads make it ten times slower
        if init == "pca_median":
            tree = init_tree_pca(q, k, h, mask=mask, tree_shape=T)
        elif init == "random":
            tree = init_tree(problem.D, h, tree_shape=T, rng=rng, q=q, k=k, mask=mask)
        else:
            tree, history = _fit_for_call(problem, params, rng)
    return {"tree": BoundTree(tree, np.arange(problem.G, dtype=np.int64), init, history)}


def _exact_pairs(problem) -> int:
    counts = masks.visible_counts(problem.mask, problem.offset, problem.Nq, problem.Nk, problem.xp)
    total = int(counts.sum())
    return total if problem.mask is not None else total * problem.G


def _info_common(problem, params, res) -> dict:
    tree = res["tree"]
    flops_exact = _exact_pairs(problem) * (2 * problem.D + 2 * problem.Dv + 5)
    info = {
        "height": params["height"],
        "state": tree.state,
        "state_source": tree.source,
        "leaf_q": problem.unflatten(res["leaf_q"]),
        "leaf_k": problem.unflatten(res["leaf_k"]),
        "leaf_counts_q": problem.unflatten(res["leaf_counts_q"]),
        "leaf_counts_k": problem.unflatten(res["leaf_counts_k"]),
        "flops_exact": flops_exact,
        "flop_ratio": flops_exact / res["flops"] if res["flops"] else float("inf"),
    }
    if tree.history is not None:
        info["fit_history"] = tree.history
    return info


def info_tf(problem, params, res) -> dict:
    """TF diagnostics: the common keys plus ``frac_empty_rows``, ``pairs``, ``density``, ``balance``."""
    info = _info_common(problem, params, res)
    L = 2 ** params["height"]
    a, c = res["leaf_counts_q"], res["leaf_counts_k"]
    pairs = int(res["keys_per_row"].sum())
    balanced = float(problem.Nq * c.sum()) / L                              # sum_g Nq n_k,g / L
    exact = _exact_pairs(problem)
    info.update(
        frac_empty_rows=float(res["empty_rows"].mean()),
        pairs=pairs,
        density=pairs / exact if exact else 0.0,
        balance=float((a * c).sum()) / balanced if balanced else float("nan"),
    )
    if "pair_efficiency" in res:
        info["pair_efficiency"] = res["pair_efficiency"]
    return info


def info_tc(problem, params, res) -> dict:
    """TC diagnostics: the common keys plus ``node_counts``, ``mean_path_len``, root and leaf weights."""
    info = _info_common(problem, params, res)
    served = ~res["empty_rows"]                                             # (G, Nq)
    rows = int(served.sum())
    info.update(
        node_counts=problem.unflatten(res["node_counts"]),
        mean_path_len=float(res["path_len"].mean()),
        mean_root_weight=float((res["root_weight"] * served).sum()) / rows if rows else 0.0,
        mean_leaf_weight=float((res["leaf_weight"] * served).sum()) / rows if rows else 0.0,
    )
    return info


def _sweep(Nk: int) -> tuple[dict, ...]:
    """Heights whose leaves hold about 32 to 256 keys at ``Nk`` keys, cheapest first: 6, 5, 4, 3 at 2048.

    A fixed sweep would spend most of its fitting time, at short lengths, on
    trees with a handful of keys per leaf (height 6 at 512 keys: 8).
    """
    top = default_height(Nk) + 1                                            # leaves of about 32 keys
    heights = {min(MAX_HEIGHT, max(1, h)) for h in range(top - 3, top + 1)}
    return tuple({"height": h, "tree_init": "fit"} for h in sorted(heights, reverse=True))


def _impls(supports_causal: bool):
    return (
        Impl("numpy", "eff_attn.methods.treeformer.reference", supports_causal=supports_causal),
        Impl("numba", "eff_attn.methods.treeformer.numba", supports_causal=supports_causal),
        Impl("cupy", "eff_attn.methods.treeformer.cupy", supports_causal=supports_causal),
    )


def _tree_part(tree, part):
    """The bound tree of the slices a distributed task owns (the trees themselves are shared)."""
    return dataclasses.replace(tree, tree_of_slice=tree.tree_of_slice[part.slices])


#: Distributed execution: trees are bound once on the client and cut per slice;
#: each query is routed and attended independently given all keys.
_SHARDING = Sharding(split={"tree": _tree_part}, shared=("state",), reads_data=False, queries=True)

TF_METHOD = Method(
    name="treeformer_tf",
    summary="Treeformer TF: softmax over the keys in the query's leaf of a hyperplane tree",
    resolve=resolve_tf,
    flops=flops_tf,
    draw=draw,
    fit=fit,
    fit_when=_fits,
    info=info_tf,
    impls=_impls(True),
    budgets=_sweep,
    budget_name="height",
    sharding=_SHARDING,
)

TC_METHOD = Method(
    name="treeformer_tc",
    summary="Treeformer TC: softmax over the mean keys/values of the nodes on the query's tree path",
    resolve=resolve_tc,
    flops=flops_tc,
    draw=draw,
    fit=fit,
    fit_when=_fits,
    info=info_tc,
    impls=_impls(False),
    budgets=_sweep,
    budget_name="height",
    sharding=_SHARDING,
)


def treeformer_tf_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                            return_info=False, state=None, height=None, tree_init=None):
    """TF-attention: exact softmax over the keys in the query's leaf of a hyperplane tree.

    ``out_i = sum_j M_ij exp(s_ij) v_j / sum_j M_ij exp(s_ij)`` with
    ``M_ij = [leaf(q_i) = leaf(k_j)]`` times the mask and causal rule. A row
    whose leaf holds no allowed key returns 0 and is flagged in
    ``info["empty_rows"]``. At height 0 it is exact attention. Time
    ``O((Nq + Nk) h D + sum_l a_l c_l (D + Dv))`` for ``a_l`` queries and
    ``c_l`` keys in leaf ``l``, i.e. ``O(N D (h + N / 2**h))`` when balanced;
    memory ``O(N (D + Dv))`` on the Numba backend (the NumPy reference is
    dense, ``O(Nq Nk)``).

    The backward pass (``attention_vjp``) freezes the routing: that is the
    true derivative almost everywhere, since routing is piecewise constant,
    and it drops the boundary terms. The splits get no gradient from it;
    train them with ``eff_attn.methods.treeformer.fit_tree``.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended). Masked keys get leaf -1 and
        are left out of every count, mean and fit.
    causal : bool, "bottom_right" or "top_left", default=False
        Applied within each leaf (the package causal rule).
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Used only when the call builds the tree: by ``tree_init="random"``
        (split directions) and ``tree_init="fit"`` (which queries the fit
        samples, when there are more than 128). Must be None with
        ``state=``.
    return_info : bool, default=False
    state : TreeformerState, optional
        The tree. Its tree shape broadcasts right-aligned against the
        leading axes (``()`` one shared tree, ``(H,)`` one per head); its
        ``dim`` must equal D. None builds one tree per leading index on the
        host, as ``tree_init`` says, and returns it as ``info["state"]``.
    height : int, optional
        ``0 <= height <= 20``. With ``state``: None or ``state.height``.
        Default ``min(20, max(0, floor(log2(Nk / 64))))``: leaves of about
        64 keys.
    tree_init : {"pca_median", "random", "fit"}, optional
        How ``state=None`` builds the tree (must be None with ``state``).
        ``"pca_median"`` (the default) splits every node at the median of
        its points along their top principal direction: balanced and
        data-adapted, but *not trained*. ``"random"`` draws unit directions
        with ``rng`` and centres them on the medians. ``"fit"`` starts from
        ``"pca_median"`` and runs ``fit_tree`` for ``FIT_STEPS`` (20) steps against exact
        attention on the call's own inputs: the loss uses at most 128
        queries per slice against all keys, and with more queries a second
        sample of 128 picks the returned tree (both drawn with ``rng``); the
        splits stay centred on all points. A trained tree, fitted on the
        inputs it then approximates, whose fitting cost is not part of the
        attention.
        ``info["state_source"]`` says which one ran.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``height``, ``state``, ``state_source``
        (``"given"``, ``"pca_median"``, ``"random"`` or ``"fit"``),
        ``leaf_q`` (..., Nq), ``leaf_k`` (..., Nk) (-1 masked),
        ``leaf_counts_q``, ``leaf_counts_k`` (..., L), ``flops_exact``,
        ``flop_ratio`` and, after ``tree_init="fit"``, ``fit_history``.
        TF also: ``frac_empty_rows``, ``pairs`` (allowed in-leaf pairs),
        ``density`` (pairs / exact's pairs), ``balance``
        (``sum a_l c_l / (Nq n_k / L)``, 1 = balanced) and, on CuPy,
        ``pair_efficiency`` (real / padded pairs).
    """
    from ...api import attention

    return attention(q, k, v, method="treeformer_tf", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, state=state, height=height, tree_init=tree_init)


def treeformer_tc_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                            return_info=False, state=None, height=None, tree_init=None):
    """TC-attention: softmax over the mean keys and values of the nodes on the query's path.

    ``out_i = sum_t alpha_it vbar_{m_t}`` with
    ``alpha_i = softmax_t(s q_i . kbar_{m_t})`` over the non-empty nodes
    ``m_0`` (root) to ``m_h`` (leaf) of query ``i``'s path, where ``kbar_m``
    and ``vbar_m`` average the kept keys and values routed through node
    ``m``. Every output is a convex combination of at most ``h + 1`` means;
    at height 0 it is ``mean(v)``. The root covers every key, so every key
    gets a gradient. Time ``O((Nq + Nk)(h + 1)(D + Dv))``, memory
    ``O(L (D + Dv) + N h)`` on the Numba backend.

    The backward pass (``attention_vjp``) freezes the routing, as for TF.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended). Masked keys get leaf -1 and
        are left out of every count, mean and fit.
    causal : bool, "bottom_right" or "top_left", default=False
        ``True`` raises NotSupportedError: node means average keys from
        every position, and no prefix version is defined.
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Used only when the call builds the tree: by ``tree_init="random"``
        (split directions) and ``tree_init="fit"`` (which queries the fit
        samples, when there are more than 128). Must be None with
        ``state=``.
    return_info : bool, default=False
    state : TreeformerState, optional
        The tree. Its tree shape broadcasts right-aligned against the
        leading axes (``()`` one shared tree, ``(H,)`` one per head); its
        ``dim`` must equal D. None builds one tree per leading index on the
        host, as ``tree_init`` says, and returns it as ``info["state"]``.
    height : int, optional
        ``0 <= height <= 20``. With ``state``: None or ``state.height``.
        Default ``min(20, max(0, floor(log2(Nk / 64))))``: leaves of about
        64 keys.
    tree_init : {"pca_median", "random", "fit"}, optional
        How ``state=None`` builds the tree (must be None with ``state``).
        ``"pca_median"`` (the default) splits every node at the median of
        its points along their top principal direction: balanced and
        data-adapted, but *not trained*. ``"random"`` draws unit directions
        with ``rng`` and centres them on the medians. ``"fit"`` starts from
        ``"pca_median"`` and runs ``fit_tree`` for ``FIT_STEPS`` (20) steps against exact
        attention on the call's own inputs: the loss uses at most 128
        queries per slice against all keys, and with more queries a second
        sample of 128 picks the returned tree (both drawn with ``rng``); the
        splits stay centred on all points. A trained tree, fitted on the
        inputs it then approximates, whose fitting cost is not part of the
        attention.
        ``info["state_source"]`` says which one ran.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``height``, ``state``, ``state_source``
        (``"given"``, ``"pca_median"``, ``"random"`` or ``"fit"``),
        ``leaf_q`` (..., Nq), ``leaf_k`` (..., Nk) (-1 masked),
        ``leaf_counts_q``, ``leaf_counts_k`` (..., L), ``flops_exact``,
        ``flop_ratio`` and, after ``tree_init="fit"``, ``fit_history``.
        TC also: ``node_counts`` (..., 2L-1) (kept keys per node, heap
        order), ``mean_path_len`` (non-empty path nodes per query),
        ``mean_root_weight`` and ``mean_leaf_weight`` (the average alpha of
        the root and of the leaf over rows that see a key).
    """
    from ...api import attention

    return attention(q, k, v, method="treeformer_tc", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, state=state, height=height, tree_init=tree_init)
