"""Exact softmax attention: the ground truth and the speed anchor.

Two algorithms compute the same function:

- ``"naive"`` materialises the (Nq, Nk) score matrix: the readable oracle,
  NumPy only;
- ``"blocked"`` is the online softmax over key blocks, with O(Nq Dv) extra
  memory: NumPy (for reading), Numba and CuPy.

See ``docs/methods/exact.md`` for the derivation.
"""

from __future__ import annotations

from ... import masks
from ..._validate import check_choice, check_int
from ...registry import Impl, Method, Sharding

__all__ = ["exact_attention", "flops", "resolve", "METHOD"]

ALGORITHMS = ("auto", "naive", "blocked")


def resolve(problem, *, algorithm="auto", block_q=None, block_k=None) -> dict:
    """Check the parameters; ``None`` block sizes are resolved by each backend."""
    return {
        "algorithm": check_choice("algorithm", algorithm, ALGORITHMS),
        "block_q": check_int("block_q", block_q, minimum=1, allow_none=True),
        "block_k": check_int("block_k", block_k, minimum=1, allow_none=True),
    }


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, **params) -> int:
    """FLOPs of exact attention (docs: methods/exact, "Complexity").

    With ``P`` visible pairs (``Nq*Nk``, or the causal count), the forward
    costs ``P (2D + 2Dv + 5)``: ``2D`` for the score, 1 for the max, 3 for
    subtract/exp/sum, ``2Dv`` for the weighted sum, 1 for the division
    (amortised). The backward adds ``P (6D + 4Dv + 5)``. ``backward=True``
    counts forward plus backward, the cost of a training step.
    """
    Dv = D if Dv is None else Dv
    pairs = masks.causal_pair_count(Nq, Nk, masks.causal_offset(causal, Nq, Nk))
    total = pairs * (2 * D + 2 * Dv + 5)
    if backward:
        total += pairs * (6 * D + 4 * Dv + 5)
    return int(batch * total)


def info(problem, params, res) -> dict:
    return {
        "lse": problem.unflatten(res["lse"]),
        "algorithm": res["algorithm"],
        "block_q": res["block_q"],
        "block_k": res["block_k"],
    }


def log_normalizer(problem, params, res):
    """The rows' logsumexp over the call's keys, ``(G, Nq)``: what merges key blocks (eff_attn.dist)."""
    return res["lse"]


def _blocked_only(problem, params):
    if params["algorithm"] == "naive":
        return ["algorithm='naive' materialises the (Nq, Nk) scores; only the numpy backend runs it"]
    return []


METHOD = Method(
    name="exact",
    summary="softmax attention (naive oracle and blocked online softmax)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.exact.reference"),
        Impl("numba", "eff_attn.methods.exact.numba", check=_blocked_only),
        Impl("cupy", "eff_attn.methods.exact.cupy", check=_blocked_only),
    ),
    budgets=({"algorithm": "naive"}, {"algorithm": "blocked"}),
    budget_name="algorithm",
    sharding=Sharding(reads_data=False, queries=True, key_blocks=log_normalizer),
)


def exact_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                    return_info=False, algorithm="auto", block_q=None, block_k=None):
    """Softmax attention, ``out_i = sum_j softmax_j(s q_i . k_j) v_j`` over visible keys.

    Time ``O(Nq Nk (D + Dv))``; memory ``O(Nq Nk)`` for the naive algorithm
    and ``O(Nq Dv)`` plus one tile per worker for the blocked one.

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
        Unused: exact attention is deterministic.
    return_info : bool, default=False
    algorithm : {"auto", "naive", "blocked"}, default="auto"
        ``"auto"`` is naive on NumPy and blocked elsewhere; ``"naive"`` runs
        on NumPy only.
    block_q : int, optional
        Queries per block of the blocked algorithm. On the CPU, the largest
        power of two <= 128 with ``Bq * Bk * max(D, Dv) <= 2**22`` (128 at
        D = 64); the GPU processes all queries at once.
    block_k : int, optional
        Keys per tile: 512 on the CPU; on the GPU the largest power of two
        <= 4096 whose (G, Nq, Bk) score tile fits 256 MiB.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows with no visible key are 0.
    info : dict, only if ``return_info``
        Base keys plus ``lse`` (..., Nq) (``-inf`` on empty rows),
        ``algorithm``, ``block_q`` and ``block_k`` as run.
    """
    from ...api import attention

    return attention(q, k, v, method="exact", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, algorithm=algorithm, block_q=block_q, block_k=block_k)
