"""``performer``: FAVOR+ positive random features (Choromanski et al., ICLR 2021).

The softmax kernel ``exp(s q.k)`` is replaced by an unbiased estimate
``phi(q) . phi(k)`` from ``m`` positive random features, so attention
becomes ``phi(Q) (phi(K)^T V)`` / ``phi(Q) (phi(K)^T 1)``: linear in the
sequence length. Causal attention runs the same sums as chunked prefix sums.

This module holds what every backend shares: the parameters, the host-side
feature draw, the shift policy of the stable form, the scan factors and the
chunk layout of causal attention. See ``docs/methods/performer.md``.
"""

from __future__ import annotations

import math

import numpy as np

from ... import interop, masks
from ..._array import to_host
from ..._validate import check_bool, check_choice, check_float, check_int, check_memory
from ...random import as_generator, orthogonal_gaussian
from ...registry import Impl, Method, Sharding

__all__ = [
    "performer_attention",
    "draw_performer_features",
    "default_num_features",
    "flops",
    "resolve",
    "METHOD",
    "DEFAULT_CHUNK",
]

#: Keys (and query positions) per chunk of the causal prefix sums. The
#: intra-chunk term costs ``2 Nq C (m + Dv)``, the chunk states
#: ``(N / C) m Dv`` memory; 64 balances the two at the default m.
DEFAULT_CHUNK = 64
VARIANTS = ("stable", "textbook")
FEATURE_NORMS = ("chi", "sqrt_d")


def default_num_features(D: int) -> int:
    """``m = max(D, floor(D ln D))``, the Theta(D log D) of the theory: 266 at D = 64."""
    return max(D, int(math.floor(D * math.log(D))))


def draw_performer_features(rng, num_features: int, D: int, *, orthogonal: bool = True,
                            feature_norms: str = "chi", lead_shape=()) -> np.ndarray:
    """Random feature matrix ``Omega`` whose rows are marginally N(0, I_D), drawn on the host.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
    num_features : int
        ``m``, the number of rows.
    D : int
    orthogonal : bool, default=True
        Rows in blocks of ``D`` mutually orthogonal rows (QR of a Gaussian
        matrix with the sign fix, :func:`eff_attn.random.orthogonal_gaussian`);
        otherwise i.i.d. Gaussian rows.
    feature_norms : {"chi", "sqrt_d"}, default="chi"
        ``"chi"``: row norms of fresh Gaussian vectors (each row exactly
        N(0, I), the estimate unbiased); ``"sqrt_d"``: every row has norm
        ``sqrt(D)`` (lower variance, slightly biased).
    lead_shape : tuple of int
        Independent matrices for each leading index.

    Returns
    -------
    ndarray of shape (*lead_shape, num_features, D), float64
    """
    check_choice("feature_norms", feature_norms, FEATURE_NORMS)
    if orthogonal:
        return orthogonal_gaussian(rng, num_features, D, norms=feature_norms, lead_shape=lead_shape)
    omega = as_generator(rng).standard_normal((*tuple(lead_shape), num_features, D))    # (..., m, D)
    if feature_norms == "sqrt_d":
        omega *= math.sqrt(D) / np.linalg.norm(omega, axis=-1, keepdims=True)
    return omega


def _check_features(features, problem, num_features):
    """The user's ``features``, as a float64 host array of shape (1 or G, m, D)."""
    arr, _, _ = interop.to_kernel_array(features, "features")
    arr = to_host(arr)
    if arr.dtype.kind != "f":
        raise TypeError(f"features must be a floating array of shape (..., m, D), got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.shape[-1] != problem.D or arr.shape[-2] < 1:
        raise ValueError(f"features must have shape (..., m, D) with D={problem.D} and m >= 1, got {arr.shape}")
    m = arr.shape[-2]
    if num_features is not None and num_features != m:
        raise ValueError(f"num_features={num_features} disagrees with features, which has m={m} rows")
    if not np.isfinite(arr).all():
        raise ValueError("features contains NaN or inf")
    lead = arr.shape[:-2]
    try:
        shape = np.broadcast_shapes(lead, problem.batch_shape)
    except ValueError:
        shape = None
    if shape != tuple(problem.batch_shape):
        raise ValueError(f"features' leading axes {lead} do not broadcast to the inputs' {problem.batch_shape}")
    arr = arr.astype(np.float64)
    if math.prod(lead) == 1:
        return arr.reshape(1, m, problem.D)
    return np.broadcast_to(arr, (*problem.batch_shape, m, problem.D)).reshape(problem.G, m, problem.D)


def resolve(problem, *, num_features=None, orthogonal=True, feature_norms="chi", features=None,
            variant="stable", eps=0.0, chunk_size=DEFAULT_CHUNK) -> dict:
    """Check the parameters and fill in ``m``.

    ``orthogonal`` and ``feature_norms`` say how features are drawn; with
    explicit ``features`` they must keep their defaults (a ValueError
    otherwise, rather than an option silently ignored).
    """
    orthogonal = check_bool("orthogonal", orthogonal)
    feature_norms = check_choice("feature_norms", feature_norms, FEATURE_NORMS)
    num_features = check_int("num_features", num_features, minimum=1, allow_none=True)
    if features is not None:
        if not orthogonal or feature_norms != "chi":
            raise ValueError("orthogonal= and feature_norms= describe drawn features; "
                             "they cannot be combined with explicit features=")
        features = _check_features(features, problem, num_features)
        num_features = features.shape[-2]
    if num_features is not None:  # the feature maps of the queries and keys: (G, Nq + Nk, m)
        check_memory("num_features", num_features, (problem.G, problem.Nq + problem.Nk, num_features),
                     problem.q.dtype.itemsize, device=problem.device, what="the feature maps")
    if problem.scale <= 0:
        raise ValueError(f"performer needs scale > 0 (q and k are scaled by sqrt(scale)), got {problem.scale}")
    return {
        "num_features": default_num_features(problem.D) if num_features is None else num_features,
        "orthogonal": orthogonal,
        "feature_norms": feature_norms,
        "features": features,
        "variant": check_choice("variant", variant, VARIANTS),
        "eps": check_float("eps", eps, minimum=0.0),
        "chunk_size": check_int("chunk_size", chunk_size, minimum=1),
    }


def draw(rng, problem, params) -> dict:
    """The feature matrix (1, m, D), float64, shared by every (batch, head) slice; or the user's."""
    if params["features"] is not None:
        if rng is not None:
            raise ValueError("features= fixes the random features; pass rng=None with it (got both)")
        return {"features": params["features"]}
    omega = draw_performer_features(rng, params["num_features"], problem.D, orthogonal=params["orthogonal"],
                                    feature_norms=params["feature_norms"])
    return {"features": omega[None]}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, num_features=None,
          chunk_size=DEFAULT_CHUNK, **params) -> int:
    """FLOPs of FAVOR+ (docs: methods/performer, "Complexity").

    Forward: ``2m(Nq + Nk)(D + Dv) + 6m(Nq + Nk)`` (features ``2mD`` a row,
    states and outputs ``2mDv`` a row, 6 for the norm, shift, exp and
    normaliser), plus ``2 Nq C (m + Dv)`` for causal's intra-chunk term.
    The backward adds ``2m(Nq + Nk)(D + 2Dv) + 6m(Nq + Nk)``, plus
    ``2 Nq C (3m + 2Dv)`` for causal.
    """
    Dv = D if Dv is None else Dv
    m = default_num_features(D) if num_features is None else num_features
    rows = Nq + Nk
    total = 2 * m * rows * (D + Dv) + 6 * m * rows
    is_causal = masks.causal_offset(causal, Nq, Nk) is not None
    if is_causal:
        total += 2 * Nq * chunk_size * (m + Dv)
    if backward:
        total += 2 * m * rows * (D + 2 * Dv) + 6 * m * rows
        if is_causal:
            total += 2 * Nq * chunk_size * (3 * m + 2 * Dv)
    return int(batch * total)


def info(problem, params, res) -> dict:
    xp = problem.xp
    den = res["den"]                                                          # (G, Nq)
    empty = xp.broadcast_to(masks.empty_rows(problem.mask, problem.offset, problem.Nq, problem.Nk, xp), den.shape)
    seen = den[~empty]
    features = res["features"]
    return {
        "num_features": params["num_features"],
        "features": features[0] if features.shape[0] == 1 else problem.unflatten(features),
        "underflow_rows": problem.unflatten((den == 0) & ~empty),
        "min_denominator": float(seen.min()) if seen.size else None,
    }


def _performer_queries_independent(problem, params) -> bool:
    """Non-causal queries read only the shared key state; causal ones need the prefix scan."""
    return not problem.causal


METHOD = Method(
    name="performer",
    summary="FAVOR+ positive random features (linear attention, unbiased softmax kernel)",
    resolve=resolve,
    flops=flops,
    info=info,
    draw=draw,
    impls=(
        Impl("numpy", "eff_attn.methods.performer.reference"),
        Impl("numba", "eff_attn.methods.performer.numba"),
        Impl("cupy", "eff_attn.methods.performer.cupy"),
    ),
    budgets=tuple({"num_features": m} for m in (32, 64, 128, 256, 512)),
    budget_name="num_features",
    sharding=Sharding(split={"features": ("slice",)}, reads_data=False, queries=_performer_queries_independent),
)


def performer_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                        return_info=False, num_features=None, orthogonal=True, feature_norms="chi",
                        features=None, variant="stable", eps=0.0, chunk_size=DEFAULT_CHUNK):
    """FAVOR+ attention: softmax attention through positive random features.

    With ``x~ = sqrt(s) x`` and ``lambda_r(x) = omega_r . x~ - |x~|^2 / 2``,
    the features ``phi(x) = exp(lambda(x)) / sqrt(m)`` satisfy
    ``E[phi(q) . phi(k)] = exp(s q . k)``, so
    ``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))``
    estimates softmax attention. The default ``"stable"`` form shifts
    ``lambda`` by maxima that cancel in the ratio. Time
    ``O((Nq + Nk) m (D + Dv))`` (plus ``O(Nq C (m + Dv))`` causal), memory
    ``O((Nq + Nk) m + (N / C) m Dv)``: linear in the sequence length.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended). Masked keys enter neither
        the sums nor the shift.
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Default ``1/sqrt(D)``; must be positive (``sqrt(s)`` scales q and k).
    rng : None, int or Generator
        Draws the features on the host (``None``: fresh on every call). Must
        be None when ``features`` is given.
    return_info : bool, default=False
    num_features : int, optional
        ``m``; default ``max(D, floor(D ln D))`` (266 at D = 64).
    orthogonal : bool, default=True
        Orthogonal random features (blocks of ``D`` orthogonal rows) rather
        than i.i.d. rows; lower variance at the same ``m``.
    feature_norms : {"chi", "sqrt_d"}, default="chi"
        Row norms of orthogonal features: ``"chi"`` keeps every row exactly
        N(0, I) (unbiased); ``"sqrt_d"`` fixes them to ``sqrt(D)``.
    features : array of shape (m, D) or (..., m, D), optional
        An explicit feature matrix (its leading axes broadcast against the
        inputs'), used as given: never redrawn.
    variant : {"stable", "textbook"}, default="stable"
        ``"stable"`` shifts ``lambda`` by the query's max over features and
        by one max over the keys each query sees; ``"textbook"`` evaluates
        ``exp(lambda)`` unshifted and raises ``FloatingPointError`` when it
        overflows.
    eps : float, default=0.0
        Added to every feature after the shift, to reproduce implementations
        that do so. Biased for ``eps > 0``: on large-norm inputs it pulls
        attention towards uniform. With ``eps > 0`` all keys share one
        shift (their global max), also under ``causal``.
    chunk_size : int, default=64
        Keys per chunk ``C`` of the causal prefix sums (and of the
        parallel key pass on Numba).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with no visible key, and rows whose denominator underflows to
        0, are 0.
    info : dict, only if ``return_info``
        Base keys plus ``num_features``, ``features`` (the float64 matrix
        used, (m, D), or (..., m, D) when it differs per slice),
        ``underflow_rows`` (..., Nq) (rows that see keys but whose
        denominator is 0) and ``min_denominator`` (the smallest denominator
        of a row that sees keys, in the shifted units; None if there is none).
    """
    from ...api import attention

    return attention(q, k, v, method="performer", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, num_features=num_features, orthogonal=orthogonal,
                     feature_norms=feature_norms, features=features, variant=variant, eps=eps,
                     chunk_size=chunk_size)
