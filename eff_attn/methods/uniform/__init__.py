"""``uniform``: the know-nothing baseline, the mean of the visible values.

Its error is the yardstick of the benchmarks: ``err / err_uniform`` below 1
means a method knows more than nothing about where attention goes.
See ``docs/methods/baselines.md``.
"""

from __future__ import annotations

from ... import masks
from ...registry import Impl, Method, Sharding

__all__ = ["uniform_attention", "flops", "resolve", "METHOD"]


def resolve(problem) -> dict:
    """``uniform`` has no parameters."""
    return {}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, **params) -> int:
    """``(Nq + Nk) Dv``: one prefix sum over the values and one division per output.

    The backward adds a suffix sum of the same size.
    """
    Dv = D if Dv is None else Dv
    total = (Nq + Nk) * Dv
    return int(batch * total * (2 if backward else 1))


def info(problem, params, res) -> dict:
    counts = masks.visible_counts(problem.mask, problem.offset, problem.Nq, problem.Nk, problem.xp)
    return {"keys_per_query": problem.xp.broadcast_to(counts, (problem.G, problem.Nq)).mean()}


def log_normalizer(problem, params, res):
    """``log |V_i|`` over the call's keys, ``(G, Nq)``, ``-inf`` for a row that sees none.

    Uniform attention is softmax attention with every score 0, so key blocks
    merge like exact attention's with this in place of the logsumexp (eff_attn.dist).
    """
    xp = problem.xp
    counts = masks.visible_counts(problem.mask, problem.offset, problem.Nq, problem.Nk, xp)
    counts = xp.broadcast_to(counts, (problem.G, problem.Nq))                  # (G, Nq)
    seen = counts > 0
    return xp.where(seen, xp.log(xp.maximum(counts, 1)), -xp.inf).astype(problem.q.dtype)


METHOD = Method(
    name="uniform",
    summary="mean of the visible values (benchmark normaliser)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.uniform.reference"),
        Impl("numba", "eff_attn.methods.uniform.numba"),
        Impl("cupy", "eff_attn.methods.uniform.cupy"),
    ),
    sharding=Sharding(reads_data=False, queries=True, key_blocks=log_normalizer),
)


def uniform_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                      return_info=False):
    """Mean of the visible values, ``out_i = mean_{j in V_i} v_j``.

    Ignores q, k and the scale (they only fix shapes). Time and memory
    ``O((Nq + Nk) Dv)``.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend, mask, causal, scale, rng, return_info
        As in :func:`eff_attn.attention`; ``scale`` and ``rng`` are unused.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``keys_per_query`` (mean ``|V_i|``).
    """
    from ...api import attention

    return attention(q, k, v, method="uniform", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info)
