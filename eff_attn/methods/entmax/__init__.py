"""``entmax``: alpha-entmax attention, and the public sparse transforms.

alpha-entmax (Peters, Niculae & Martins 2019) replaces softmax by a map with
exact zeros for every ``alpha > 1``: ``alpha = 2`` is sparsemax (Martins &
Astudillo 2016), ``alpha -> 1`` is softmax. It is a different attention, not a
softmax approximation, and still costs ``O(Nq Nk D)``.

The transforms :func:`sparsemax`, :func:`entmax15` and :func:`entmax_bisect`
(with their ``*_vjp`` forms) live in :mod:`.transforms` and are re-exported
at the package top level. See ``docs/methods/entmax.md``.
"""

from __future__ import annotations

import numpy as np

from ..._array import to_host
from ..._entmax import ALGORITHMS, DEFAULT_ALPHA, DEFAULT_N_ITER, resolve_algorithm, threshold_flops
from ..._entmax import entmax_attention_flops as flops
from ..._entmax import check_alpha_array, mean_over_slices, visible_pair_counts
from ..._validate import check_float, check_int
from ...registry import Impl, Method, Sharding
from .transforms import (
    entmax15,
    entmax15_vjp,
    entmax_bisect,
    entmax_bisect_vjp,
    sparsemax,
    sparsemax_vjp,
)

__all__ = [
    "entmax_attention",
    "sparsemax",
    "entmax15",
    "entmax_bisect",
    "sparsemax_vjp",
    "entmax15_vjp",
    "entmax_bisect_vjp",
    "flops",
    "threshold_flops",
    "resolve",
    "resolve_algorithm",
    "METHOD",
    "ALGORITHMS",
    "DEFAULT_ALPHA",
    "DEFAULT_N_ITER",
]

def resolve(problem, *, alpha=DEFAULT_ALPHA, algorithm="auto", n_iter=DEFAULT_N_ITER) -> dict:
    """Check alpha (a float >= 1, or an array over the leading axes, all > 1), algorithm and n_iter."""
    n_iter = check_int("n_iter", n_iter, minimum=1)
    if isinstance(alpha, np.ndarray) and alpha.ndim == 0:
        alpha = alpha.item()
    if np.ndim(alpha) == 0:
        alpha = check_float("alpha", alpha, minimum=1.0)
        return {"alpha": alpha, "algorithm": resolve_algorithm(alpha, algorithm), "n_iter": n_iter}
    alphas = check_alpha_array(alpha, problem.batch_shape, open_min=True, what="the leading axes")
    return {"alpha": alphas.reshape(problem.G), "algorithm": resolve_algorithm(None, algorithm), "n_iter": n_iter}


def info(problem, params, res) -> dict:
    support = res["support_size"]                                            # (G, Nq)
    visible = to_host(visible_pair_counts(problem))                          # (G,)
    used = to_host(support).sum(axis=-1)                                     # (G,)
    sparsity = 1 - used / np.maximum(visible, 1)
    return {
        "algorithm": params["algorithm"],
        "tau": problem.unflatten(res["tau"]),
        "support_size": problem.unflatten(support),
        "sparsity": mean_over_slices(sparsity, visible > 0),
    }


METHOD = Method(
    name="entmax",
    summary="alpha-entmax attention: exact zeros for alpha > 1 (sparsemax at 2, softmax at 1)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.entmax.reference"),
        Impl("numba", "eff_attn.methods.entmax.numba"),
        Impl("cupy", "eff_attn.methods.entmax.cupy"),
    ),
    budgets=({"alpha": 2.0}, {"alpha": 1.75}, {"alpha": 1.5}, {"alpha": 1.25}),
    budget_name="alpha",
    sharding=Sharding(reads_data=False, queries=True),
)


def entmax_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None, return_info=False,
                     alpha=DEFAULT_ALPHA, algorithm="auto", n_iter=DEFAULT_N_ITER):
    """alpha-entmax attention: ``out_i = sum_j entmax_alpha(s q_i . k_j)_j v_j`` over visible keys.

    ``entmax_alpha(z)_j = [(alpha - 1) z_j - tau]_+ ** (1 / (alpha - 1))`` with
    ``tau`` such that the row sums to one: exact zeros for ``alpha > 1``,
    sparsemax at ``alpha = 2``, softmax (``exact``) at ``alpha = 1``.
    Time ``O(Nq Nk (D + Dv + c))`` with ``c = log Nk`` (sort) or ``n_iter``
    (bisect); memory ``O(Nq Nk)`` on NumPy, ``O(Bq Nk)`` per worker on Numba
    (``Bq = 128`` at D = 64) and
    ``O(G Bq Nk)`` per query block on CuPy.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended).
    causal : bool, "bottom_right" or "top_left", default=False
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Unused: entmax attention is deterministic.
    return_info : bool, default=False
    alpha : float or array, default=1.5
        ``alpha >= 1`` (``alpha < 1`` raises ``ValueError``). An array
        broadcastable to the leading shape ``q.shape[:-2]`` gives each slice
        its own alpha (all > 1) and runs the bisection.
    algorithm : {"auto", "softmax", "sort", "bisect"}, default="auto"
        ``"auto"``: softmax at alpha = 1, the exact sort at alpha = 1.5 and 2,
        bisection otherwise. ``"sort"`` exists for alpha = 1.5 and 2 only.
    n_iter : int, default=50
        Bisection steps; the bracket ends below ``2**-50``.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with no visible key are 0.
    info : dict, only if ``return_info``
        Base keys plus ``algorithm`` (as run), ``tau`` (..., Nq) (unshifted
        threshold, ``p = [(alpha - 1) S - tau]_+ ** beta``; ``+inf`` on empty
        rows), ``support_size`` (..., Nq) and ``sparsity``
        (``1 - sum_i |supp_i| / |V|`` per slice, averaged over slices).
    """
    from ...api import attention

    return attention(q, k, v, method="entmax", backend=backend, mask=mask, causal=causal, scale=scale, rng=rng,
                     return_info=return_info, alpha=alpha, algorithm=algorithm, n_iter=n_iter)
