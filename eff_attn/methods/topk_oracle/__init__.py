"""``topk_oracle``: exact softmax over each query's true top-k keys.

The ideal that sparse methods aim at: among all k-subsets of keys, the top-k
set minimises the total-variation distance to the exact attention row. It
computes every score, so it is never faster than exact attention; it is a
benchmark reference. See ``docs/methods/baselines.md``.
"""

from __future__ import annotations

from ... import masks
from ..._validate import check_int
from ...registry import Impl, Method, Sharding

__all__ = ["topk_oracle_attention", "flops", "resolve", "METHOD", "DEFAULT_TOPK"]

DEFAULT_TOPK = 32


def resolve(problem, *, topk=DEFAULT_TOPK) -> dict:
    return {"topk": check_int("topk", topk, minimum=1)}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, topk=DEFAULT_TOPK, **params) -> int:
    """``2 Nq Nk D`` for every score, ``Nq Nk`` for the selection, and the
    exact softmax pair cost ``2D + 2Dv + 5`` on the ``Nq min(k, Nk)`` kept
    pairs (their scores are recomputed from the gathered keys)."""
    Dv = D if Dv is None else Dv
    pairs = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    kept = Nq * min(topk, Nk)
    total = 2 * pairs * D + pairs + kept * (2 * D + 2 * Dv + 5)
    if backward:
        total += kept * (6 * D + 4 * Dv + 5)
    return int(batch * total)


def info(problem, params, res) -> dict:
    support = problem.unflatten(res["support"])
    return {
        "keys_per_query": res["count"].mean(),
        "mass_kept": problem.unflatten(res["mass_kept"]),
        "support": support,
    }


METHOD = Method(
    name="topk_oracle",
    summary="exact softmax over each query's true top-k keys (benchmark ideal)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.topk_oracle.reference"),
        Impl("numba", "eff_attn.methods.topk_oracle.numba", differentiable=False),
        Impl("cupy", "eff_attn.methods.topk_oracle.cupy", differentiable=False),
    ),
    budgets=({"topk": 8}, {"topk": 32}, {"topk": 128}),
    budget_name="topk",
    sharding=Sharding(reads_data=False, queries=True),
)


def topk_oracle_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                          return_info=False, topk=DEFAULT_TOPK):
    """Exact softmax attention over the ``topk`` highest-scoring visible keys.

    ``T_i`` holds the ``min(k, |V_i|)`` largest ``S_ij`` (ties: lower index
    first) and ``out_i = sum_{T_i} exp(S - mu) v / sum_{T_i} exp(S - mu)``.
    Time ``O(Nq Nk D + Nq Nk log Nk)``: it computes every score.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend, mask, causal, scale, rng, return_info
        As in :func:`eff_attn.attention`; ``rng`` is unused.
    topk : int, default=32
        Keys kept per query (at least 1).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``keys_per_query``, ``mass_kept`` (..., Nq) (the exact
        softmax mass of the kept keys) and ``support`` (..., Nq, topk) (the
        kept key indices, -1 where fewer than topk keys are visible).
    """
    from ...api import attention

    return attention(q, k, v, method="topk_oracle", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, topk=topk)
