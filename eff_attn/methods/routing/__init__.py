"""``routing``: Routing Transformer attention (Roy, Saffar, Vaswani & Grangier, TACL 2021).

Each head keeps ``C`` unit centroids, maintained by online spherical k-means
(:mod:`.kmeans`). Queries and keys are routed to their centroids and a query
attends only to the keys of its cluster, so the cost is
``O(N C D + N^2 D / C)``: ``O(N^1.5 D)`` at ``C = sqrt(N)``.

Two assignments:

- ``"argmax"`` (the default for causal calls): every query and key goes to
  its nearest centroid; every query is in exactly one cluster, and the mode
  is strictly causal.
- ``"balanced"`` (the paper's; the default for non-causal calls): each
  centroid takes its top-``w`` queries and top-``w`` keys. Static shapes and
  bounded memory; top-``w`` selection leaks the future under causal masking.

In both, a query whose cluster or windows hold no visible key moves to the
nearest cluster or window that does (``unrouted="nearest"``, the default),
so no row is silently zero. The per-call default follows measurement on real
attention heads (``docs/methods/routing.md``, "Defaults"): there argmax
clusters miss the keys that carry the mass (error >= 1.0 at 2 to 16
clusters), while balanced windows with the fallback beat the released
code's ``KmeansAttention`` at every cluster count.

See ``docs/methods/routing.md``.
"""

from __future__ import annotations

import math

import numpy as np

from ... import masks
from ..._array import to_host
from ..._dispatch import helper_impl
from ..._validate import check_bool, check_choice, check_inputs, check_int, check_memory
from ...registry import Impl, Method, Sharding
from .kmeans import (
    COMMITMENT_BETA,
    DEFAULT_DECAY,
    KMEANS_ITERS,
    RoutingState,
    assign,
    commitment_loss,
    draw_routing_init,
    fit_centroids,
    head_index,
    init_centroids,
    kmeans_loss,
    update_centroids,
)
from .plan import ASSIGNMENTS, RoutingPlan, plan_statistics

__all__ = [
    "routing_attention",
    "RoutingState",
    "RoutingPlan",
    "draw_routing_init",
    "init_centroids",
    "fit_centroids",
    "update_centroids",
    "kmeans_loss",
    "assign",
    "commitment_loss",
    "route",
    "routing_attention_matrix",
    "flops",
    "resolve",
    "METHOD",
    "DEFAULT_DECAY",
    "KMEANS_ITERS",
    "COMMITMENT_BETA",
]

UNROUTED = ("nearest", "zero")
#: Largest ``D + Dv`` of the CuPy ragged kernel (its shared-memory key tile).
CUDA_MAX_FEATURES = 1024


def default_num_clusters(Nk: int) -> int:
    """``ceil(sqrt(Nk))``, the FLOP optimum (docs: "Complexity")."""
    return max(1, math.isqrt(Nk - 1) + 1) if Nk > 1 else 1


def window_sizes(window, Nq: int, Nk: int, C: int) -> tuple[int, int]:
    """``(wQ, wK)`` of balanced mode.

    ``None``: ``(ceil(Nq / C), ceil(Nk / C))``, so ``C w >= N``. An int sets
    both, clipped to each sequence (it may not exceed the longer one); a
    pair sets each, at most its sequence's length.
    """
    if window is None:
        return -(-Nq // C), -(-Nk // C)
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a pair (wQ, wK), got {window!r}")
        return (check_int("window[0] (wQ)", window[0], minimum=1, maximum=Nq),
                check_int("window[1] (wK)", window[1], minimum=1, maximum=Nk))
    w = check_int("window", window, minimum=1, maximum=max(Nq, Nk))
    return min(w, Nq), min(w, Nk)


def default_assignment(causal) -> str:
    """``"argmax"`` for a causal call (strictly causal), ``"balanced"`` otherwise.

    Balanced windows with the nearest fallback are the more accurate mode on
    real attention heads (docs: methods/routing, "Defaults"), but top-``w``
    selection ranks tokens over the whole sequence, so it is not causal.
    """
    return "argmax" if causal else "balanced"


def resolve(problem, *, state=None, num_clusters=None, assignment=None, window=None, unrouted=None,
            allow_causal_leak=False, plan=None, compute_exact=False) -> dict:
    """Check the parameters and fill in the defaults (``ValueError`` for bad values).

    ``assignment=None`` is the plan's assignment when a plan is given, else
    :func:`default_assignment` of the call; ``unrouted=None`` is ``"nearest"``.
    """
    assignment = check_choice("assignment", assignment, (None, *ASSIGNMENTS))
    if assignment is None:
        assignment = plan.assignment if isinstance(plan, RoutingPlan) else default_assignment(problem.causal)
    unrouted = check_choice("unrouted", unrouted, (None, *UNROUTED))
    if unrouted is None:
        unrouted = "nearest"
    C = check_int("num_clusters", num_clusters, minimum=1, allow_none=True)
    if state is not None:
        if not isinstance(state, RoutingState):
            raise TypeError(f"state must be a RoutingState (see init_centroids), got {type(state).__name__}")
        if state.dim != problem.D:
            raise ValueError(f"state has centroids of dimension D={state.dim} but q has D={problem.D}")
        head_index(state.head_shape, problem.batch_shape)
        if C is not None and C != state.num_clusters:
            raise ValueError(f"num_clusters={C} conflicts with the state's {state.num_clusters} clusters")
        C = state.num_clusters
    if plan is not None:
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a RoutingPlan (see route), got {type(plan).__name__}")
        if C is not None and C != plan.num_clusters:
            raise ValueError(f"num_clusters={C} conflicts with the plan's {plan.num_clusters} clusters")
        C = plan.num_clusters
    if C is None:
        C = default_num_clusters(problem.Nk)
    check_memory("num_clusters", C, (problem.G, problem.Nq + problem.Nk + problem.D, C), device=problem.device,
                 what="the centroids and centroid scores")
    if assignment == "argmax":
        if window is not None:
            raise ValueError("window= sets the balanced windows; it has no meaning with assignment='argmax'")
        windows = None
    else:
        windows = window_sizes(window, problem.Nq, problem.Nk, C)
    if plan is not None:
        plan = _checked_flat_plan(plan, problem, assignment, C, windows)
    return {
        "state": state,
        "num_clusters": C,
        "assignment": assignment,
        "window": windows,
        "unrouted": unrouted,
        "allow_causal_leak": check_bool("allow_causal_leak", allow_causal_leak),
        "plan": plan,
        "compute_exact": check_bool("compute_exact", compute_exact),
    }


def _checked_flat_plan(plan, problem, assignment, C, windows) -> RoutingPlan:
    """Check an injected plan against the call and return it flat, on the host, int64."""
    if plan.assignment != assignment:
        raise ValueError(f"the plan was made with assignment={plan.assignment!r}, not {assignment!r}")
    if plan.num_clusters != C:
        raise ValueError(f"the plan has {plan.num_clusters} clusters but this call uses {C}")
    Nq, Nk, B = problem.Nq, problem.Nk, problem.batch_shape
    if masks.causal_offset(plan.causal, Nq, Nk) != problem.offset:
        raise ValueError(f"the plan was made with causal={plan.causal!r}, which does not match this call")
    host = plan.map_arrays(lambda a, t: np.asarray(to_host(a)))
    want = {"query_cluster": (*B, Nq), "unrouted": (*B, Nq)}
    if assignment == "argmax":
        want["key_cluster"] = (*B, Nk)
    else:
        want["query_windows"] = (*B, C, windows[0])
        want["key_windows"] = (*B, C, windows[1])
    for name, shape in want.items():
        a = getattr(host, name)
        if a is None or a.shape != shape:
            raise ValueError(f"plan.{name} must have shape {shape} for these inputs, got "
                             f"{None if a is None else a.shape}")
    host = host.map_arrays(lambda a, t: a.astype(bool if a.dtype == np.bool_ else np.int64))
    flat = host.flatten()
    kept = np.ones((problem.G, Nk), dtype=bool) if problem.mask is None else to_host(problem.mask)
    if assignment == "argmax":
        ok = _in_range(flat.query_cluster, C) and _in_range(flat.key_cluster, C)
        if ok and not np.array_equal(flat.key_cluster >= 0, kept):
            raise ValueError("the plan's key clusters do not match this call's mask (a masked key must have -1)")
    else:
        ok = (_in_range(flat.query_cluster, C) and _in_range(flat.query_windows, Nq, allow_none=False)
              and _in_range(flat.key_windows, Nk))
        if ok:
            kw = flat.key_windows
            g = np.broadcast_to(np.arange(problem.G)[:, None, None], kw.shape)
            if not kept[g[kw >= 0], kw[kw >= 0]].all():
                raise ValueError("the plan's key windows hold a key that this call's mask removes")
    if not ok:
        raise ValueError("the plan holds cluster or position ids out of range for these inputs")
    return flat


def _in_range(a, n, allow_none=True) -> bool:
    return bool(((a >= (-1 if allow_none else 0)) & (a < n)).all())


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, num_clusters=None, window=None,
          assignment="argmax", pairs=None, **params) -> int:
    """FLOPs of routing attention (docs: methods/routing, "Complexity").

    Per slice: ``3(Nq + Nk)D`` to normalise, ``2(Nq + Nk)CD`` for the
    routing scores, ``(Nq + Nk)C`` for the argmax, and in balanced mode
    ``C(Nq ceil(log2 Nq) + Nk ceil(log2 Nk))`` sort comparisons. Attention
    costs ``P_r (2D + 2Dv + 5)`` over ``P_r`` routed pairs and the combine
    ``R Dv`` over ``R`` (row, window) pairs (``Nq`` for argmax, ``C wQ`` for
    balanced). ``backward=True`` adds ``P_r (6D + 4Dv + 5)``.

    ``pairs`` is the true total of routed pairs over the batch
    (``info["pairs"]``); without it ``P_r`` is estimated from the ``P``
    visible pairs: ``P / C`` (argmax) or ``C wQ wK P / (Nq Nk)`` (balanced).
    """
    Dv = D if Dv is None else Dv
    C = default_num_clusters(Nk) if num_clusters is None else int(num_clusters)
    visible = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    routing = 3 * (Nq + Nk) * D + 2 * (Nq + Nk) * C * D + (Nq + Nk) * C
    if assignment == "balanced":
        wQ, wK = window_sizes(window, Nq, Nk, C)
        routing += C * (Nq * math.ceil(math.log2(Nq)) + Nk * math.ceil(math.log2(Nk)))
        estimate = C * wQ * wK * visible / (Nq * Nk)
        combine = C * wQ * Dv
    else:
        estimate = visible / C
        combine = Nq * Dv
    routed = batch * estimate if pairs is None else pairs
    total = batch * (routing + combine) + routed * (2 * D + 2 * Dv + 5)
    if backward:
        total += routed * (6 * D + 4 * Dv + 5)
    return int(round(total))


def flops_fit(G, Nq, Nk, D, C, iters=KMEANS_ITERS) -> int:
    """About ``iters * 2 (Nq + Nk) C D`` per slice: the k-means fit on the input."""
    return int(iters * 2 * (Nq + Nk) * C * D * G)


def finish(problem, params, out, res) -> dict:
    """Complete a backend's residuals (``plan``, optionally ``stats``, and what its
    backward needs): the plan's statistics, the true FLOP count, the empty rows
    and the state. The API calls it after every forward (``Method.finish``)."""
    G, Nq, Nk, D, Dv = problem.G, problem.Nq, problem.Nk, problem.D, problem.Dv
    plan, offset = res["plan"], problem.offset
    stats = res.get("stats")
    if stats is None:
        stats = plan_statistics(plan, problem.mask, offset, Nq, Nk, problem.xp)
    pairs = int(stats["pairs_row"].sum())
    res = dict(res)
    res.update(
        stats=stats,
        empty_rows=stats["served"] == 0,
        flops=flops(Nq, Nk, D, Dv, batch=G, causal=masks.causal_argument(offset, Nq, Nk),
                    num_clusters=plan.num_clusters, window=params["window"], assignment=params["assignment"],
                    pairs=pairs),
        state=params.get("state"),
        state_source=params.get("state_source"),
    )
    if params.get("compute_exact"):
        res["out"] = out
    return res


def _fraction(count, total) -> float:
    return float(count) / total if total else 0.0


def info(problem, params, res) -> dict:
    plan, stats, state = res["plan"], res["stats"], res["state"]
    G, Nq, Nk, C = problem.G, problem.Nq, problem.Nk, plan.num_clusters
    sees_any = stats["sees_any"]
    rows = int(sees_any.sum())
    pairs = int(stats["pairs_row"].sum())
    product = int((stats["query_sizes"] * stats["key_sizes"]).sum())
    fitted = res["state_source"] == "fitted_on_input"
    out = {
        "assignment": params["assignment"],
        "num_clusters": C,
        "window": params["window"],
        "plan": plan.unflatten(problem.batch_shape),
        "state": state,
        "state_source": res["state_source"],
        "flops_fit": flops_fit(G, Nq, Nk, problem.D, C) if fitted else 0,
        "unrouted": problem.unflatten(plan.unrouted),
        "unrouted_fraction": _fraction(int(plan.unrouted.sum()), rows),
        "zero_output_fraction": _fraction(int((sees_any & (stats["served"] == 0)).sum()), rows),
        "memberships": problem.unflatten(stats["memberships"]),
        "mean_memberships": float(stats["memberships"].mean()),
        "query_cluster_sizes": problem.unflatten(stats["query_sizes"]),
        "key_cluster_sizes": problem.unflatten(stats["key_sizes"]),
        "key_coverage": _fraction(stats["keys_covered"], stats["keys_kept"]),
        "pairs": pairs,
        "density": _fraction(pairs, stats["visible_pairs"]),
        "balance": product / (G * Nq * Nk / C),
        "kmeans_loss": None if state is None else _loss_on_input(state, problem),
        "strictly_causal": bool(problem.causal and params["assignment"] == "argmax" and not fitted),
    }
    if params["compute_exact"]:
        out.update(_compare_with_exact(problem, plan, res["out"]))
    return out


def _host_inputs(problem):
    """q and k with the user's leading shape on the host, and the mask keyword."""
    q, k = (to_host(problem.unflatten(a)) for a in (problem.q, problem.k))
    mask = None if problem.mask is None else to_host(problem.unflatten(problem.mask))
    return q, k, mask


def _loss_on_input(state, problem):
    q, k, mask = _host_inputs(problem)
    return kmeans_loss(state, q, k, mask=mask)


def _compare_with_exact(problem, plan, out) -> dict:
    """``captured_mass`` (exact softmax mass on the routed keys) and the max error (dense)."""
    from ..._softmax import softmax_attend
    from .reference import routed_support

    q, k, v = (np.asarray(to_host(a), dtype=np.float64) for a in (problem.q, problem.k, problem.v))
    mask = None if problem.mask is None else to_host(problem.mask)
    host_plan = plan.map_arrays(lambda a, t: np.asarray(to_host(a)))
    visible = masks.visible_pairs(mask, problem.offset, problem.Nq, problem.Nk)
    exact, _, P = softmax_attend(problem.scale * (q @ np.swapaxes(k, -1, -2)), visible, v)
    support = routed_support(host_plan, mask, problem.offset, problem.Nq, problem.Nk)
    return {
        "captured_mass": problem.unflatten((P * support).sum(axis=-1)),
        "max_abs_err_vs_exact": float(np.abs(to_host(out).astype(np.float64) - exact).max(initial=0.0)),
    }


def _fits(problem, params) -> bool:
    """The centroids are fitted on the call's own inputs: neither ``state=`` nor ``plan=`` given."""
    return params["state"] is None and params["plan"] is None


def _bound(state, source, problem) -> dict:
    """The backend's entries of ``state``: its centroids ``(H, C, D)`` and each slice's head."""
    centroids = head_of = None
    if state is not None:
        centroids = np.ascontiguousarray(state.centroids.reshape(-1, state.num_clusters, state.dim))
        head_of = head_index(state.head_shape, problem.batch_shape)
    return {"state": state, "state_source": source, "centroids": centroids, "head_of": head_of}


def draw(rng, problem, params) -> dict:
    """The given state (or plan) bound to the call's slices; nothing to draw when the call fits.

    ``rng`` is used only by :func:`fit`, so passing it with ``state=`` or
    ``plan=`` is an error.
    """
    if _fits(problem, params):
        return {}
    if rng is not None:
        raise ValueError("rng is used only to fit centroids when neither state= nor plan= is given; "
                         "drop rng= or state=")
    state = params["state"]
    return _bound(state, "given" if state is not None else "plan", problem)


def fit(rng, problem, params) -> dict:
    """Centroids fitted on the call's own q and k (neither ``state=`` nor ``plan=`` given).

    :func:`init_centroids` with ``rng``, one set per leading index; that is
    the only use of ``rng``.
    """
    q, k, mask = _host_inputs(problem)
    state = init_centroids(q, k, num_clusters=params["num_clusters"], mask=mask, rng=rng)
    return _bound(state, "fitted_on_input", problem)


def _causality_reasons(problem, params) -> list[str]:
    """Why causal routing attention would not be strictly causal here."""
    if not problem.causal or params["allow_causal_leak"]:
        return []
    reasons = []
    if params["assignment"] == "balanced":
        reasons.append(
            "causal=True with assignment='balanced' is not strictly causal: top-w selection ranks tokens "
            "across the whole sequence, so a future token changes which past tokens share a window; use "
            "assignment='argmax' or pass allow_causal_leak=True"
        )
    if params["state"] is None and params["plan"] is None:
        reasons.append(
            "causal=True with state=None fits the centroids on the whole input, future included; pass a "
            "state= fitted elsewhere (init_centroids / fit_centroids) or allow_causal_leak=True"
        )
    return reasons


def _cupy_reasons(problem, params) -> list[str]:
    reasons = _causality_reasons(problem, params)
    if problem.D + problem.Dv > CUDA_MAX_FEATURES:
        reasons.append(f"D + Dv = {problem.D + problem.Dv} exceeds the ragged kernel's {CUDA_MAX_FEATURES}")
    return reasons


def _routing_plan_part(plan, part):
    """The routing plan of the slices a distributed task owns."""
    return plan.map_arrays(lambda a, t: a[part.slices])


METHOD = Method(
    name="routing",
    summary="Routing Transformer: online spherical k-means clusters, softmax within each cluster",
    resolve=resolve,
    flops=flops,
    info=info,
    finish=finish,
    draw=draw,
    fit=fit,
    fit_when=_fits,
    impls=(
        Impl("numpy", "eff_attn.methods.routing.reference", check=_causality_reasons),
        Impl("numba", "eff_attn.methods.routing.numba", check=_causality_reasons),
        Impl("cupy", "eff_attn.methods.routing.cupy", check=_cupy_reasons),
    ),
    budgets=({"num_clusters": 64}, {"num_clusters": 32}, {"num_clusters": 16}, {"num_clusters": 8}),
    budget_name="num_clusters",
    sharding=Sharding(split={"head_of": ("slice",), "plan": _routing_plan_part}, shared=("state", "centroids"), reads_data=False),
)


def routing_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                      return_info=False, state=None, num_clusters=None, assignment=None, window=None,
                      unrouted=None, allow_causal_leak=False, plan=None, compute_exact=False):
    """Routing attention: softmax within content-based clusters of queries and keys.

    Queries and keys are routed to the nearest of ``C`` unit centroids
    (``R = (x / |x|) mu^T``) and each query attends to the keys of its
    cluster: ``out_i = sum_{j in V_i, a^K_j = a^Q_i} softmax_j(s q_i . k_j) v_j``.
    Time ``O((Nq + Nk) C D + P_r (D + Dv))`` with ``P_r ~ Nq Nk / C`` routed
    pairs, ``O(N^1.5 D)`` at ``C = sqrt(N)``; memory ``O(N (D + Dv) + N C)``
    (argmax) or ``O(N^2 / C)`` (balanced windows).

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask. Masked keys enter no cluster or window; when
        ``Nq == Nk``, queries at masked positions rank last in balanced windows.
    causal : bool, "bottom_right" or "top_left", default=False
        Strictly causal with ``assignment="argmax"`` (the causal default)
        and a given ``state``; otherwise refused unless
        ``allow_causal_leak=True``.
    scale : float, optional
        Score scale ``s``, default ``1/sqrt(D)``.
    rng : None, int or Generator
        Only used with ``state=None``: seeds the k-means fit on the input.
    return_info : bool, default=False
    state : RoutingState, optional
        Centroids ``(*H, C, D)``; ``H`` broadcasts against the leading axes.
        None fits one set per leading index on this call's q and k
        (:func:`eff_attn.methods.routing.init_centroids`, 10 Lloyd steps).
    num_clusters : int, optional
        ``C``: from the state, else ``ceil(sqrt(Nk))``.
    assignment : {"argmax", "balanced"}, optional
        ``"argmax"``: every query and key in its nearest cluster.
        ``"balanced"``: each centroid takes its top-``wQ`` queries and
        top-``wK`` keys (the paper's). Default: ``"balanced"`` for a
        non-causal call (the more accurate mode on real heads), ``"argmax"``
        for a causal one (the strictly causal mode); with ``plan=``, the
        plan's.
    window : int or (int, int), optional
        Balanced window sizes ``(wQ, wK)``; default ``(ceil(Nq/C), ceil(Nk/C))``.
        An int sets both (clipped to each sequence; at most ``max(Nq, Nk)``).
        Not allowed with argmax.
    unrouted : {"nearest", "zero"}, optional
        What an unrouted row gets (its cluster or windows hold no visible
        key): ``"nearest"`` (default), the best cluster or window that does;
        ``"zero"``, output 0 (what the released codes do).
    allow_causal_leak : bool, default=False
        Accept ``causal=True`` where the result is not strictly causal
        (balanced windows, or centroids fitted on the input).
    plan : RoutingPlan, optional
        Replay a plan from :func:`eff_attn.methods.routing.route` instead of
        routing (same assignment, ``C``, shapes, causal setting and mask).
    compute_exact : bool, default=False
        Also compare with dense exact attention in ``info`` (dense cost).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with nothing routed (unrouted under ``"zero"``, or no visible
        key) are 0.
    info : dict, only if ``return_info``
        Base keys plus ``assignment``, ``num_clusters``, ``window``,
        ``plan``, ``state``, ``state_source``, ``flops_fit``, ``unrouted``
        (..., Nq), ``unrouted_fraction`` (unrouted rows over rows that see a
        key, before the fallback), ``zero_output_fraction`` (after it),
        ``memberships`` (..., Nq), ``mean_memberships``,
        ``query_cluster_sizes`` / ``key_cluster_sizes`` (..., C),
        ``key_coverage``, ``pairs``, ``density``, ``balance``,
        ``kmeans_loss`` (*H,), ``strictly_causal``; with ``compute_exact``
        also ``captured_mass`` (..., Nq) and ``max_abs_err_vs_exact``.

    Notes
    -----
    The backward pass replays the forward's plan (routing is piecewise
    constant), so it is the true gradient almost everywhere; the centroids
    get none (they move by ``update_centroids``).
    """
    from ...api import attention

    return attention(q, k, v, method="routing", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, state=state, num_clusters=num_clusters,
                     assignment=assignment, window=window, unrouted=unrouted,
                     allow_causal_leak=allow_causal_leak, plan=plan, compute_exact=compute_exact)


def route(q, k, state, *, assignment=None, window=None, mask=None, causal=False, unrouted=None,
          backend="numpy") -> RoutingPlan:
    """The routing plan of ``q`` and ``k`` under ``state``, without attending.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    state : RoutingState
    assignment, window, mask, causal, unrouted
        As in :func:`eff_attn.routing_attention`.
    backend : {"numpy", "numba", "cupy", "auto"}, default="numpy"
        Which backend's routing code runs (``"auto"``: CuPy for GPU arrays).

    Returns
    -------
    RoutingPlan
        With the inputs' leading shape; pass it as ``plan=`` to replay.
    """
    if state is None:
        raise ValueError("route needs a state=; make one with init_centroids")
    problem = check_inputs(q, k, k, mask=mask, causal=causal)
    params = resolve(problem, state=state, assignment=assignment, window=window, unrouted=unrouted)
    drawn = draw(None, problem, params)
    impl = helper_impl(METHOD, backend, problem)
    plan = impl.load().route(problem.q, problem.k, mask=problem.mask, offset=problem.offset,
                             centroids=drawn["centroids"], head_of=drawn["head_of"],
                             num_clusters=params["num_clusters"], assignment=params["assignment"],
                             window=params["window"], unrouted=params["unrouted"])
    return plan.unflatten(problem.batch_shape)


def routing_attention_matrix(q, k, plan, *, mask=None, causal=False, scale=None):
    """The dense attention weights ``A`` (..., Nq, Nk) implied by a plan: ``out = A v``.

    For tests and figures (host NumPy, time and memory ``O(C Nq Nk)``).
    Served rows sum to 1; rows with nothing routed are 0.
    """
    from .reference import attention_matrix

    problem = check_inputs(q, k, k, mask=mask, causal=causal, scale=scale)
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    flat = _checked_flat_plan(plan, problem, plan.assignment, plan.num_clusters, plan.window)
    q, k = (np.asarray(to_host(a)) for a in (problem.q, problem.k))
    mask = None if problem.mask is None else to_host(problem.mask)
    A = attention_matrix(q, k, flat, mask=mask, offset=problem.offset, scale=problem.scale)
    return problem.unflatten(A)
