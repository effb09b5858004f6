"""``sparsefinder``: predict the support of entmax attention, then attend only there.

Sparsefinder (Treviso, Góis, Fernandes, Fonseca & Martins, *Predicting
Attention Sparsity in Transformers*, 2022) learns per-head projections of
the queries and keys to ``r = 4`` dimensions, predicts from them the graph
of pairs where 1.5-entmax attention is non-zero (by distance, quantization
buckets or k-means clusters, plus a local window) and evaluates entmax only
on that graph. Rows whose predicted keys contain the true support are exact.

The learned state (:class:`SparsefinderState`) and its host-side fitting
functions live here; see ``docs/methods/sparsefinder.md``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from ... import interop, masks
from ..._array import to_host
from ..._entmax import entmax_attention_flops as entmax_flops
from ..._entmax import mean_over_slices, threshold_flops, visible_pair_counts
from ..._validate import check_bool, check_choice, check_float, check_inputs, check_int
from ...random import as_generator
from ...registry import Impl, Method, Sharding, scalar_params
from .fitting import (
    draw_sparsefinder_negatives,
    fit_centroids,
    fit_projections,
    fit_sparsefinder,
    fit_threshold,
    gap_threshold,
    init_sparsefinder,
    kmeans,
    sparsefinder_loss,
)
from .graph import (
    gold_graph,
    graph_metrics,
    grouped_pair_count,
    labels_from_groups,
    window_global_counts,
)
from .state import SparsefinderState, state_for_batch

__all__ = [
    "sparsefinder_attention",
    "SparsefinderState",
    "init_sparsefinder",
    "fit_projections",
    "fit_centroids",
    "fit_threshold",
    "gap_threshold",
    "fit_sparsefinder",
    "draw_sparsefinder_negatives",
    "sparsefinder_loss",
    "kmeans",
    "gold_graph",
    "predict_graph",
    "graph_metrics",
    "flops",
    "resolve",
    "METHOD",
    "PREDICTORS",
    "METRICS",
]

PREDICTORS = ("kmeans", "distance", "quantize", "oracle", "none")
METRICS = ("sqeuclidean", "cosine")
#: Predictors that read the learned projections.
PROJECTING = ("kmeans", "distance", "quantize")
#: ``state="fit"``: Adam steps on the call's own inputs (one sequence per slice)
#: and the centroids per slice; the rest are ``fit_sparsefinder``'s defaults.
#: Ten steps and 128 queries keep the fit to a few seconds at N = 2048, 8 heads, and on the
#: shipped real heads reach the recall of 30 steps on 256 queries (docs: "Defaults").
FIT_ON_INPUT_EPOCHS = 10
FIT_ON_INPUT_CLUSTERS = 16
FIT_ON_INPUT_R = 8
#: ``state="fit"`` trains the projections on at most this many queries per slice
#: (all keys): the gold graph and the loss cost O(Nq Nk) per step.
FIT_ON_INPUT_QUERIES = 128


def _fit_queries(Nq: int, Nk: int, offset):
    """Query rows a ``state="fit"`` trains on, and the ``causal=`` that keeps their positions.

    Without causality: ``FIT_ON_INPUT_QUERIES`` rows evenly spaced over the
    sequence. With it: a contiguous run whose offset is again one the
    ``causal=`` argument can express (0: the first rows; ``Nk - m``: the last).
    """
    m = min(Nq, FIT_ON_INPUT_QUERIES)
    if offset is None:
        return np.linspace(0, Nq - 1, m).round().astype(np.int64), False
    start = 0 if offset == 0 else Nq - m                                    # offset + start is 0 or Nk - m
    return np.arange(start, start + m), masks.causal_argument(offset + start, m, Nk)


def _check_graph(problem, graph):
    xp = problem.xp
    g, framework, _ = interop.to_kernel_array(graph, "graph")
    if framework != problem.framework:
        raise TypeError(f"graph is a {framework} array but q, k, v are {problem.framework}")
    if str(g.dtype) != "bool":
        raise TypeError(f"graph must be a boolean array of shape (..., Nq, Nk), got dtype {g.dtype}")
    target = (*problem.batch_shape, problem.Nq, problem.Nk)
    try:
        g = xp.broadcast_to(g, target)
    except ValueError:
        raise ValueError(f"graph of shape {tuple(g.shape)} does not broadcast to (..., Nq, Nk) = {target}") from None
    return xp.ascontiguousarray(g.reshape(problem.G, problem.Nq, problem.Nk))


def _check_state(problem, state, *, alpha, predictor, top_clusters, threshold, metric):
    """Validate a given state against the call and broadcast it to the slices."""
    if state.D != problem.D:
        raise ValueError(f"the state projects D={state.D} features but q has D={problem.D}")
    if predictor == "kmeans":
        if state.centroids is None:
            raise ValueError("predictor='kmeans' needs a state with centroids; run fit_centroids first")
        if top_clusters > state.num_clusters:
            raise ValueError(f"top_clusters={top_clusters} is more than the state's {state.num_clusters} clusters")
    if predictor == "distance" and threshold is None:
        if state.threshold is None:
            raise ValueError("predictor='distance' needs threshold= or a state calibrated by fit_threshold")
        if state.threshold_metric != metric:
            raise ValueError(f"the state's threshold was calibrated for metric={state.threshold_metric!r}, "
                             f"not {metric!r}; pass threshold= or refit")
    if state.alpha is not None and not math.isclose(alpha, state.alpha):
        warnings.warn(f"alpha={alpha} differs from the state's alpha={state.alpha}; the projections were fitted "
                      "to another support", UserWarning, stacklevel=5)
    if state.scale is not None and not math.isclose(problem.scale, state.scale):
        warnings.warn(f"scale={problem.scale} differs from the state's scale={state.scale} (were the queries "
                      "scaled twice?)", UserWarning, stacklevel=5)
    return state_for_batch(state, problem.batch_shape, threshold if predictor == "distance" else None)


def resolve(problem, *, state=None, alpha=1.5, predictor="distance", top_clusters=1, threshold=None,
            metric="sqeuclidean", bucket_size=16, window=5, global_tokens=0, graph=None, compute_recall=False) -> dict:
    """Check the parameters and broadcast the state to the call's slices."""
    alpha = check_float("alpha", alpha, minimum=1.0, open_min=True)
    predictor = check_choice("predictor", predictor, PREDICTORS)
    metric = check_choice("metric", metric, METRICS)
    top_clusters = check_int("top_clusters", top_clusters, minimum=1)
    threshold = check_float("threshold", threshold, allow_none=True)
    bucket_size = check_int("bucket_size", bucket_size, minimum=1)
    window = check_int("window", window, minimum=0, allow_none=True)
    global_tokens = check_int("global_tokens", global_tokens, minimum=0)
    compute_recall = check_bool("compute_recall", compute_recall)
    params = {"alpha": alpha, "predictor": predictor, "top_clusters": top_clusters, "threshold": threshold,
              "metric": metric, "bucket_size": bucket_size, "window": window, "global_tokens": global_tokens,
              "compute_recall": compute_recall}
    if graph is not None:
        params.update(graph=_check_graph(problem, graph), predictor="graph", window=None, global_tokens=0)
        return params
    if isinstance(state, str):
        if state != "fit":
            raise ValueError(f"state={state!r} is not a SparsefinderState, None or 'fit'")
    elif state is not None and not isinstance(state, SparsefinderState):
        raise TypeError(f"state must be a SparsefinderState (see fit_sparsefinder), None or 'fit'; "
                        f"got {type(state).__name__}")
    if predictor not in PROJECTING:
        return params
    if state is None:
        raise ValueError(f"predictor={predictor!r} needs state=: fit one with "
                         "eff_attn.methods.sparsefinder.fit_sparsefinder, or pass state='fit' to fit it on these "
                         "inputs")
    if state == "fit":
        if top_clusters > FIT_ON_INPUT_CLUSTERS:
            raise ValueError(f"top_clusters={top_clusters} is more than the {FIT_ON_INPUT_CLUSTERS} clusters "
                             "that state='fit' fits")
        params.update(state_source="fitted_on_input", r=FIT_ON_INPUT_R, num_clusters=FIT_ON_INPUT_CLUSTERS,
                      n_rounds=1)
        return params
    heads = _check_state(problem, state, alpha=alpha, predictor=predictor, top_clusters=top_clusters,
                         threshold=threshold, metric=metric)
    params.update(heads=heads, state_source="given", r=state.r, num_clusters=state.num_clusters,
                  n_rounds=state.n_rounds)
    return params


def _fits(problem, params) -> bool:
    """``state='fit'``: the projections are fitted on the call's own inputs."""
    return params.get("state_source") == "fitted_on_input"


def fit(rng, problem, params) -> dict:
    """``state='fit'`` only: fit a state on the call's own q and k (host, NumPy, seeded by ``rng``).

    One sequence per slice: the state's head shape is the inputs' leading
    shape. At most ``FIT_ON_INPUT_QUERIES`` queries per slice train it
    (:func:`_fit_queries`); the centroids (``kmeans``) or the threshold
    (``distance``), whichever the predictor reads, see the same rows.
    The fit sees the gold graph of these very inputs, so it measures what a
    predictor of this kind can reach, not how it generalises.
    """
    rows, causal = _fit_queries(problem.Nq, problem.Nk, problem.offset)
    q = to_host(problem.unflatten(problem.q))[None][..., rows, :].astype(np.float64)  # (1, *batch, m, D)
    k = to_host(problem.unflatten(problem.k))[None].astype(np.float64)      # (1, *batch, Nk, D)
    mask = None if problem.mask is None else to_host(problem.unflatten(problem.mask))[None]
    state, _ = fit_sparsefinder(
        q, k, r=FIT_ON_INPUT_R, alpha=params["alpha"], scale=problem.scale, mask=mask, causal=causal,
        epochs=FIT_ON_INPUT_EPOCHS, metric=params["metric"], rng=as_generator(rng),
        num_clusters=FIT_ON_INPUT_CLUSTERS if params["predictor"] == "kmeans" else None,     # only what the
        target_recall=0.95 if params["predictor"] == "distance" else None)                  # predictor reads
    threshold = params["threshold"] if params["predictor"] == "distance" else None
    heads = state_for_batch(state, problem.batch_shape, threshold)
    return {"heads": heads, "fitted_state": state}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, alpha=1.5, predictor="distance",
          top_clusters=1, bucket_size=16, window=5, global_tokens=0, r=FIT_ON_INPUT_R, num_clusters=16, n_rounds=1,
          pairs=None, **params) -> int:
    """FLOPs of Sparsefinder (docs: methods/sparsefinder, "Complexity").

    Forward ``2 (Nq + Nk) r D`` (projections) ``+ F_pred + E (2D + 2Dv + c_thr(E / Nq))``
    with ``F_pred`` = kmeans ``3 (Nq + Nk) R K r``, distance ``3 Nq Nk r``,
    quantize ``2 (Nq + Nk) r ceil(log2 Nk)``, oracle ``P (2D + c_thr(Nk))``;
    the backward adds ``E (6D + 4Dv + 9)``. ``pairs`` is the number of
    predicted pairs over the whole batch; without it ``E`` is estimated as
    ``Nq min(Nk, 2w + 1 + 2g + e)`` per slice (``e = R t**2 Nk / K`` for kmeans,
    ``r B`` for quantize, ``Nk`` for distance, oracle and a given graph),
    times ``P / (Nq Nk)`` when causal.
    """
    Dv = D if Dv is None else Dv
    visible = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    K, R = num_clusters, n_rounds
    if pairs is None:
        extra = {"kmeans": R * top_clusters ** 2 * Nk / K, "quantize": r * bucket_size, "none": 0}.get(predictor, Nk)
        band = 0 if window is None or predictor == "graph" else 2 * window + 1
        E = Nq * min(Nk, band + 2 * global_tokens + extra) * visible / (Nq * Nk)
    else:
        E = pairs / batch
    algorithm = "sort" if alpha in (1.5, 2.0) else "bisect"
    total = E * (2 * D + 2 * Dv + threshold_flops(algorithm, E / max(Nq, 1)))
    if predictor in PROJECTING:
        total += 2 * (Nq + Nk) * r * D
    total += {
        "kmeans": 3 * (Nq + Nk) * R * K * r,
        "distance": 3 * Nq * Nk * r,
        "quantize": 2 * (Nq + Nk) * r * math.ceil(math.log2(max(Nk, 2))),
        "oracle": visible * (2 * D + threshold_flops(algorithm, Nk)),
    }.get(predictor, 0)
    if backward:
        total += E * (6 * D + 4 * Dv + 9)
    return int(round(batch * total))


def predict_graph(state, q, k, *, predictor="kmeans", top_clusters=1, threshold=None, metric="sqeuclidean",
                  bucket_size=16, window=5, global_tokens=0, alpha=None, scale=None, mask=None, causal=False):
    """The predicted graph ``V_i n (W_i u Gamma_i u Pi_i)`` of Sparsefinder (NumPy, dense).

    Takes the parameters of :func:`eff_attn.sparsefinder_attention`; ``alpha``
    and ``scale`` matter only for ``predictor="oracle"`` (default: the
    state's, else 1.5 and ``1/sqrt(D)``).

    Returns
    -------
    bool ndarray of shape (..., Nq, Nk)
    """
    from .reference import dense_predicted_graph

    if alpha is None:
        alpha = 1.5 if state is None or state.alpha is None else state.alpha
    if scale is None and state is not None:
        scale = state.scale
    problem = check_inputs(q, k, k, mask=mask, causal=causal, scale=scale)
    params = resolve(problem, state=state, alpha=alpha, predictor=predictor, top_clusters=top_clusters,
                     threshold=threshold, metric=metric, bucket_size=bucket_size, window=window,
                     global_tokens=global_tokens)
    graph, _, _ = dense_predicted_graph(problem.q, problem.k, mask=problem.mask, offset=problem.offset,
                                        scale=problem.scale, **params)
    return problem.unflatten(graph)


def finish(problem, params, out, res):
    """The backend-independent tail of every forward: counts, flops, empty rows, error vs dense.

    The API calls it after every forward (``Method.finish``)."""
    G, Nq, Nk, D, Dv, offset = problem.G, problem.Nq, problem.Nk, problem.D, problem.Dv, problem.offset
    res["empty_rows"] = res["keys_per_query"] == 0
    pairs = int(res["keys_per_query"].sum())
    res["flops"] = flops(Nq, Nk, D, Dv, batch=G, causal=masks.causal_argument(offset, Nq, Nk), pairs=pairs,
                         **scalar_params(params))
    if params.get("fitted_state") is not None:
        res["fitted_state"] = params["fitted_state"]
    if "out_dense" in res:
        res["max_abs_err_vs_dense"] = float(abs(out.astype(np.float64) - res["out_dense"].astype(np.float64)).max()) \
            if out.size else 0.0
    return res


def info(problem, params, res) -> dict:
    xp = problem.xp
    kpq = res["keys_per_query"]                                                  # (G, Nq)
    pairs = to_host(kpq).sum(axis=-1)                                          # (G,)
    visible = to_host(visible_pair_counts(problem))                            # (G,)
    ok = visible > 0
    support = res["support_size"]                                                # (G, Nq)
    if params["predictor"] == "graph":
        direct = np.zeros(problem.G, dtype=np.int64)
    else:
        direct = to_host(xp.broadcast_to(window_global_counts(problem.mask, problem.offset, problem.Nq, problem.Nk,
                                                           params["window"], params["global_tokens"], xp),
                                      (problem.G, problem.Nq)).sum(axis=-1))   # (G,)
    qg, kg = res.get("query_groups"), res.get("key_groups")
    if qg is None:
        grouped = pairs - direct
    else:
        space = params["num_clusters"] if params["predictor"] == "kmeans" else int(max(qg.max(), kg.max())) + 1
        q_labels, k_labels, n_groups = labels_from_groups(qg, kg, space, xp)
        grouped = to_host(grouped_pair_count(q_labels, k_labels, n_groups, problem.offset, xp))
    causal = masks.causal_argument(problem.offset, problem.Nq, problem.Nk)
    out = {
        "predicted_pairs": int(pairs.sum()),
        "keys_per_query": problem.unflatten(kpq),
        "graph_sparsity": mean_over_slices(1 - pairs / np.maximum(visible, 1), ok),
        "support_size": problem.unflatten(support),
        "output_sparsity": mean_over_slices(1 - to_host(support).sum(axis=-1) / np.maximum(visible, 1), ok),
        "query_groups": None if qg is None else problem.unflatten(qg),
        "key_groups": None if kg is None else problem.unflatten(kg),
        "pairs_with_duplicates": int(grouped.sum()),
        "compute_efficiency": mean_over_slices(1 - (grouped + direct) / np.maximum(visible, 1), ok),
        "flops_dense": entmax_flops(problem.Nq, problem.Nk, problem.D, problem.Dv, batch=problem.G, causal=causal,
                                    alpha=params["alpha"]),
    }
    if params["compute_recall"]:
        hits, gold = to_host(res["gold_hits"]), to_host(res["gold_support"])    # (G, Nq)
        gold_rows = gold > 0
        out.update(
            recall=mean_over_slices(hits.sum(-1) / np.maximum(gold.sum(-1), 1), gold.sum(-1) > 0),
            precision=mean_over_slices(hits.sum(-1) / np.maximum(pairs, 1), pairs > 0),
            gold_sparsity=mean_over_slices(1 - gold.sum(-1) / np.maximum(visible, 1), ok),
            exact_fraction=mean_over_slices((gold_rows & (hits == gold)).sum(-1) / np.maximum(gold_rows.sum(-1), 1),
                                            gold_rows.sum(-1) > 0),
            max_abs_err_vs_dense=res["max_abs_err_vs_dense"],
        )
    if "state_source" in params:
        out["state_source"] = params["state_source"]
    if "fitted_state" in res:
        out["state"] = res["fitted_state"]
    return out


def _check(problem, params):
    if params["predictor"] == "quantize" and problem.causal:
        return ["predictor='quantize' with causal=True: bucket ranks span the whole sequence, so a row's graph "
                "would depend on future keys"]
    return []


def _heads_part(heads, part):
    """The per-slice prediction arrays of the slices a distributed task owns."""
    return dataclasses.replace(heads, **{
        f.name: None if getattr(heads, f.name) is None else getattr(heads, f.name)[part.slices]
        for f in dataclasses.fields(heads)
    })


METHOD = Method(
    name="sparsefinder",
    summary="learned low-dimensional projections predict the entmax support; entmax on the predicted graph only",
    resolve=resolve,
    flops=flops,
    info=info,
    finish=finish,
    fit=fit,
    fit_when=_fits,
    impls=(
        Impl("numpy", "eff_attn.methods.sparsefinder.reference", check=_check),
        Impl("numba", "eff_attn.methods.sparsefinder.numba", differentiable=False, check=_check),
        Impl("cupy", "eff_attn.methods.sparsefinder.cupy", differentiable=False, check=_check),
    ),
    budgets=(*({"state": "fit", "predictor": "kmeans", "top_clusters": t} for t in (1, 2, 4)),
             {"state": "fit", "predictor": "distance"}),
    budget_name="top_clusters",
    compare_defaults={"state": "fit", "predictor": "distance"},
    sharding=Sharding(split={"graph": ("slice", "query"), "heads": _heads_part}, shared=("fitted_state",),
                      reads_data=False),
)


def sparsefinder_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                           return_info=False, state=None, alpha=1.5, predictor="distance", top_clusters=1,
                           threshold=None, metric="sqeuclidean", bucket_size=16, window=5, global_tokens=0, graph=None,
                           compute_recall=False):
    """Sparsefinder: alpha-entmax attention evaluated only on a predicted graph.

    The graph is ``G^_i = V_i n (W_i u Gamma_i u Pi_i)``: a local window
    ``W_i = {j : |j - p_i| <= window}``, global tokens ``Gamma_i``, and the
    predictor's pairs ``Pi_i`` computed from the learned projections
    ``q' = W_q q + b_q``, ``k' = W_k k + b_k`` (``r`` dimensions). Then
    ``out_i = sum_j entmax_alpha(s q_i . k_j restricted to G^_i)_j v_j``; a row
    is exact whenever ``G^_i`` contains its true entmax support.
    Time ``O((Nq + Nk) r D + F_pred + E (D + Dv + log(E / Nq)))`` with ``E``
    predicted pairs; memory ``O(E + (Nq + Nk)(r + R t))`` on Numba and CuPy,
    ``O(Nq Nk)`` on NumPy.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask; masked keys never enter ranks, clusters or the graph.
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Used only with ``state="fit"``; every other draw of Sparsefinder
        happens in the host fitting functions.
    return_info : bool, default=False
    state : SparsefinderState, "fit" or None
        The learned predictor (``fit_sparsefinder``). Required by the
        ``"kmeans"``, ``"distance"`` and ``"quantize"`` predictors; its head
        axes ``*H`` broadcast right-aligned against ``q.shape[:-2]``.
        ``"fit"`` fits one on these very inputs (transductive: an upper
        bound on what a trained predictor reaches) and returns it as
        ``info["state"]``.
    alpha : float, default=1.5
        Greater than 1. A UserWarning if it differs from the state's.
    predictor : {"distance", "kmeans", "quantize", "oracle", "none"}, default="distance"
        ``"distance"``: ``d(q'_i, k'_j) <= threshold``, the state's threshold
        calibrated to recall 95 % of the gold pairs (the default: on real
        attention heads it keeps that recall at graph sparsity about 0.6,
        where ``"kmeans"`` with one cluster recalls under half);
        ``"kmeans"``: pairs sharing one of the ``top_clusters`` nearest
        centroids in some round;
        ``"quantize"``: pairs sharing an equal-size bucket on some projected
        coordinate (not with ``causal=True``); ``"oracle"``: the true support
        (dense cost, for testing); ``"none"``: window and global tokens only.
    top_clusters : int, default=1
        Nearest centroids per token and round (at most the state's K).
    threshold : float, optional
        Distance threshold; default the state's calibrated one.
    metric : {"sqeuclidean", "cosine"}, default="sqeuclidean"
        Distance of the ``"distance"`` predictor.
    bucket_size : int, default=16
        Tokens per quantization bucket (not the number of buckets).
    window : int or None, default=5
        Keys on each side of the query position (11 in all); None for none.
    global_tokens : int, default=0
        The first ``g`` keys are seen by every query, and the first ``g``
        query positions see every key.
    graph : bool array broadcastable to (..., Nq, Nk), optional
        A given graph, replacing window, global tokens and predictor.
    compute_recall : bool, default=False
        Also run dense entmax and report the graph's recall of its support.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with an empty predicted graph are 0.
    info : dict, only if ``return_info``
        Base keys plus ``predicted_pairs`` (E over the batch),
        ``keys_per_query`` (..., Nq), ``graph_sparsity``, ``support_size``
        (..., Nq), ``output_sparsity``, ``query_groups``/``key_groups``
        (cluster ids (..., N, R, t) or bucket ids (..., N, r); None for the
        other predictors), ``pairs_with_duplicates`` (the paper's
        duplicate-counting cost ``sum_gamma |Q_gamma| |K_gamma|`` over
        visible pairs), ``compute_efficiency``, ``flops_dense``; with
        ``compute_recall`` also ``recall``, ``precision``, ``gold_sparsity``,
        ``exact_fraction`` and ``max_abs_err_vs_dense``. Ratios are computed
        per slice and averaged over slices.
    """
    from ...api import attention

    return attention(q, k, v, method="sparsefinder", backend=backend, mask=mask, causal=causal, scale=scale, rng=rng,
                     return_info=return_info, state=state, alpha=alpha, predictor=predictor, top_clusters=top_clusters,
                     threshold=threshold, metric=metric, bucket_size=bucket_size, window=window,
                     global_tokens=global_tokens, graph=graph, compute_recall=compute_recall)
