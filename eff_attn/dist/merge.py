"""The online-softmax merge of attention over disjoint key blocks.

A task that attends queries to one block ``B`` of keys returns the partial
output and the row log-normaliser::

    out_B,i = sum_{j in B} w_ij v_j / sum_{j in B} w_ij       (0 when no j is visible)
    L_B,i   = log sum_{j in B} w_ij                           (-inf when no j is visible)

with ``w_ij = exp(S_ij)`` for softmax attention (``L`` is the logsumexp) or
``w_ij = 1`` for uniform attention (``L = log |V_i ∩ B|``). Because
``exp(L_B) out_B = sum_{j in B} w_ij v_j``, partials over disjoint blocks
combine exactly::

    mu   = max_B L_B
    a_B  = exp(L_B - mu)            (0 for L_B = -inf; at least one a_B = 1)
    out  = sum_B a_B out_B / sum_B a_B
    L    = mu + log sum_B a_B

This is the rescaling step of the blocked online softmax (and of ring and
blockwise attention), applied to whole partials. It is associative and
commutative, so a tree of merges in any order gives the same result in exact
arithmetic. ``docs/distributed.md`` has the proof. NumPy and CuPy arrays both
work; nothing here imports dask.
"""

from __future__ import annotations

from ..interop import array_module

__all__ = ["merge_partials", "merged_output"]


def merge_partials(*parts):
    """Merge ``(out_B, L_B)`` partials over disjoint key blocks into one ``(out, L)``.

    Parameters
    ----------
    *parts : tuple of (array of shape (..., Nq, Dv), array of shape (..., Nq))
        Each the output and row log-normaliser of one key block; all on one
        device, one dtype.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows that see no key in any block are 0.
    lse : array of shape (..., Nq)
        ``-inf`` on those rows.
    """
    outs = [p[0] for p in parts]
    lses = [p[1] for p in parts]
    xp = array_module(outs[0])
    mu = lses[0]
    for lse in lses[1:]:
        mu = xp.maximum(mu, lse)                                                 # (..., Nq)
    seen = xp.isfinite(mu)                                                       # (..., Nq) some key visible
    mu0 = xp.where(seen, mu, 0)                                                  # (..., Nq) finite shift
    total = xp.zeros_like(mu)                                                    # (..., Nq) sum_B a_B
    acc = xp.zeros_like(outs[0])                                                 # (..., Nq, Dv) sum_B a_B out_B
    for out, lse in zip(outs, lses):
        live = xp.isfinite(lse)                                                  # (..., Nq)
        a = xp.where(live, xp.exp(xp.where(live, lse, 0) - mu0), 0).astype(mu.dtype, copy=False)
        total = total + a                                                        # (..., Nq)
        acc = acc + a[..., None] * out                                           # (..., Nq, Dv)
    norm = xp.where(seen, total, 1)                                              # (..., Nq) >= 1 where seen
    out = acc / norm[..., None]                                                  # (..., Nq, Dv)
    lse = xp.where(seen, mu0 + xp.log(norm), -xp.inf).astype(mu.dtype, copy=False)
    return out.astype(outs[0].dtype, copy=False), lse


def merged_output(*parts):
    """The output of :func:`merge_partials`, without the log-normaliser (the root of a tree)."""
    return merge_partials(*parts)[0]
