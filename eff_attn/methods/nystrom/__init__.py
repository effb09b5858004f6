"""Nystrom attention: softmax attention through ``m`` segment-mean landmarks.

``softmax(S) ~ F A^+ B`` with ``F = softmax(q k_hat^T)``,
``A = softmax(q_hat k_hat^T)`` and ``B = softmax(q_hat k^T)``, where the
landmarks ``q_hat``, ``k_hat`` are the means of ``m`` contiguous segments and
``A^+`` comes from a few steps of an iterative pseudo-inverse. Time and memory
are linear in N. See ``docs/methods/nystrom.md`` for the derivation.
"""

from __future__ import annotations

import numpy as np

from ...registry import Impl, Method, NotSupportedError, Sharding
from ..._validate import check_choice, check_int
from ._common import input_scales, segment_bounds

__all__ = ["nystrom_attention", "flops", "resolve", "segment_bounds", "input_scales", "METHOD",
           "DEFAULT_LANDMARKS", "DEFAULT_PINV_ITERS"]

#: Landmarks by default (capped at ``min(Nq, Nk)``), as in the official release.
DEFAULT_LANDMARKS = 64
#: Pseudo-inverse iterations by default, as in the paper.
DEFAULT_PINV_ITERS = 6
PINV_MODES = ("iterative", "exact")
#: FLOPs of one exact pseudo-inverse of an (m, m) matrix, per m**3: a full
#: Golub-Reinsch SVD (21 m^3, Golub & Van Loan) and the product V S^+ U^T (2 m^3).
EXACT_PINV_FLOPS_PER_M3 = 23


def resolve(problem, *, num_landmarks=None, pinv="iterative", pinv_iters=DEFAULT_PINV_ITERS) -> dict:
    """Check the parameters; ``num_landmarks=None`` means ``min(64, Nq, Nk)``."""
    if problem.causal:
        raise NotSupportedError(
            "nystrom has no causal form: its landmarks average the whole sequence, so every "
            "output would depend on future tokens; use causal=False"
        )
    most = min(problem.Nq, problem.Nk)
    if num_landmarks is None:
        num_landmarks = min(DEFAULT_LANDMARKS, most)
    return {
        "num_landmarks": check_int("num_landmarks", num_landmarks, minimum=1, maximum=most),
        "pinv": check_choice("pinv", pinv, PINV_MODES),
        "pinv_iters": check_int("pinv_iters", pinv_iters, minimum=0),
    }


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, num_landmarks=DEFAULT_LANDMARKS,
          pinv="iterative", pinv_iters=DEFAULT_PINV_ITERS, **params) -> int:
    """FLOPs of Nystrom attention (docs: methods/nystrom, "Complexity").

    Forward: ``2m(Nq+Nk)(D+Dv)`` for the two thin softmax products and their
    value products, ``2m^2(D+Dv)`` for ``A`` and ``Z (B v)``, ``8m^3`` per
    pseudo-inverse iteration (four (m, m) products; ``23 m^3`` once for the
    exact SVD pseudo-inverse) and ``5m(Nq+Nk+m)`` for the three softmaxes.
    The backward adds ``4m(Nq+Nk)(D+Dv) + 4m^2(D+Dv)``, ``22m^3`` per
    unrolled iteration (three (m, m) products to recompute, eight to
    differentiate) or ``12m^3`` for the exact pseudo-inverse's pullback, and
    ``4m(Nq+Nk+m)`` for the softmax pullbacks.
    """
    Dv = D if Dv is None else Dv
    m = min(num_landmarks or DEFAULT_LANDMARKS, Nq, Nk)
    iterative = pinv == "iterative"
    total = (2 * m * (Nq + Nk) * (D + Dv) + 2 * m * m * (D + Dv) + 5 * m * (Nq + Nk + m)
             + (8 * m**3 * pinv_iters if iterative else EXACT_PINV_FLOPS_PER_M3 * m**3))
    if backward:
        total += (4 * m * (Nq + Nk) * (D + Dv) + 4 * m * m * (D + Dv) + 4 * m * (Nq + Nk + m)
                  + (22 * m**3 * pinv_iters if iterative else 12 * m**3))
    return int(batch * total)


def segment_sizes(N: int, m: int) -> np.ndarray:
    """Positions per segment, shape (m,)."""
    return np.diff(segment_bounds(N, m))


def info(problem, params, res) -> dict:
    m = params["num_landmarks"]
    return {
        "pinv_residual": float(res["pinv_residual"].max()),
        "segment_sizes": {"q": segment_sizes(problem.Nq, m), "k": segment_sizes(problem.Nk, m)},
        "invalid_landmarks": {"q": problem.unflatten(~res["valid_q"]), "k": problem.unflatten(~res["valid_k"])},
    }


METHOD = Method(
    name="nystrom",
    summary="Nystrom approximation through segment-mean landmarks and an iterative pseudo-inverse",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.nystrom.reference", supports_causal=False),
        Impl("numba", "eff_attn.methods.nystrom.numba", supports_causal=False, differentiable=False),
        Impl("cupy", "eff_attn.methods.nystrom.cupy", supports_causal=False),
    ),
    budgets=({"num_landmarks": 8}, {"num_landmarks": 16}, {"num_landmarks": 32}, {"num_landmarks": 64}),
    budget_name="num_landmarks",
    sharding=Sharding(reads_data=False),
)


def nystrom_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                      return_info=False, num_landmarks=None, pinv="iterative", pinv_iters=DEFAULT_PINV_ITERS):
    """Nystrom attention: ``out = F Z (B v)`` through ``m`` segment-mean landmarks.

    With ``q~ = sqrt(s) q``, ``k~ = sqrt(s) k`` and the landmarks ``q_hat``,
    ``k_hat`` (means of the kept tokens of ``m`` floor segments
    ``[floor(tN/m), floor((t+1)N/m))``)::

        F = softmax(q~ k_hat^T)        (Nq, m)
        A = softmax(q_hat k_hat^T)     (m, m)
        B = softmax(q_hat k~^T)        (m, Nk)
        Z ~ A^+                        iterative pseudo-inverse, Z0 per (batch, head)
        out = F (Z (B v))

    Time ``O(m (Nq + Nk)(D + Dv) + m^3 pinv_iters)``, memory
    ``O(m (Nq + Nk) + m^2)``; no (Nq, Nk) array is formed.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
        The Numba backend has no backward pass; ``attention_vjp`` picks
        NumPy or CuPy.
    mask : bool array of shape (..., Nk), optional
        Key keep-mask. Masked keys are left out of the key landmarks and of
        ``B``; when ``Nq == Nk`` the masked positions are also left out of
        the query landmarks. A landmark whose segment keeps no token is
        invalid: its column of ``F`` and ``A`` and its row of ``A`` and ``B``
        are 0.
    causal : False
        Not supported (``NotSupportedError``): the landmarks average the
        whole sequence.
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Unused: the method is deterministic.
    return_info : bool, default=False
    num_landmarks : int, optional
        ``m``, in ``[1, min(Nq, Nk)]`` (``ValueError`` outside). Default
        ``min(64, Nq, Nk)``.
    pinv : {"iterative", "exact"}, default="iterative"
        ``"iterative"``: ``Z0 = A^T / (max col sum * max row sum)``, then
        ``pinv_iters`` steps of ``Z <- Z (13I - T(15I - T(7I - T))) / 4``
        with ``T = A Z``. ``"exact"``: an SVD pseudo-inverse, for oracles.
    pinv_iters : int, default=6
        Iterations of the iterative pseudo-inverse (0 keeps ``Z0``).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows are 0 where every key is masked.
    info : dict, only if ``return_info``
        Base keys plus ``pinv_residual`` (the largest ``||A Z A - A||_F /
        ||A||_F`` over the (batch, head) slices), ``segment_sizes``
        (``{"q": (m,), "k": (m,)}`` positions per segment) and
        ``invalid_landmarks`` (``{"q": (..., m), "k": (..., m)}`` bool).
    """
    from ...api import attention

    return attention(q, k, v, method="nystrom", backend=backend, mask=mask, causal=causal, scale=scale, rng=rng,
                     return_info=return_info, num_landmarks=num_landmarks, pinv=pinv, pinv_iters=pinv_iters)
