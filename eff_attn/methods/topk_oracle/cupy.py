"""``topk_oracle`` on the GPU: blocked scores, a stable sort, a gather.

Matches :func:`eff_attn.methods.topk_oracle.reference.topk_oracle_reference`.
Per block of queries: a batched cuBLAS product gives the (G, Bq, Nk) scores;
the reference's :func:`topk_support` (a stable sort of ``-S``) picks the
support; the kept scores and values are gathered and combined with a
max-shifted softmax. Memory ``O(G Bq Nk)``, with ``Bq`` chosen so the score
block stays within the exact method's 256 MiB tile budget. Forward only.
"""

from __future__ import annotations

from ..._cuda import xp_of
from ...masks import visible_pairs
from ..._tile_sizes import GPU_TILE_BYTES
from .reference import topk_support

__all__ = ["forward"]


def _query_block(G, Nk, itemsize):
    return max(1, GPU_TILE_BYTES // max(1, G * Nk * itemsize * 4))


def forward(q, k, v, *, mask, offset, scale, topk):
    xp = xp_of(q)
    G, Nq, _ = q.shape
    Nk, Dv = k.shape[1], v.shape[2]
    kk = min(topk, Nk)
    out = xp.empty((G, Nq, Dv), dtype=q.dtype)
    support = xp.empty((G, Nq, kk), dtype=xp.int64)
    mass_kept = xp.empty((G, Nq), dtype=q.dtype)
    block = _query_block(G, Nk, q.dtype.itemsize)
    kT = xp.swapaxes(k, -1, -2)                                              # (G, D, Nk)
    for i0 in range(0, Nq, block):
        i1 = min(Nq, i0 + block)
        s = scale * xp.matmul(q[:, i0:i1], kT)                               # (G, Bq, Nk)
        visible = visible_pairs(mask, None if offset is None else offset + i0, i1 - i0, Nk, xp)  # (G|1, Bq, Nk)
        sup = topk_support(s, visible, topk, xp)                             # (G, Bq, kk)
        chosen = sup >= 0                                                    # (G, Bq, kk)
        idx = xp.where(chosen, sup, 0)                                       # (G, Bq, kk)
        s_kept = xp.where(chosen, xp.take_along_axis(s, idx, axis=-1), -xp.inf)  # (G, Bq, kk)
        s_all = xp.where(visible, s, -xp.inf)                                # (G, Bq, Nk)
        mu = s_kept[..., :1]                                                 # (G, Bq, 1) row max (sorted first)
        mu = xp.where(xp.isfinite(mu), mu, 0)                                # (G, Bq, 1)
        w = xp.exp(s_kept - mu)                                              # (G, Bq, kk); 0 where not chosen
        kept = w.sum(axis=-1)                                                # (G, Bq)
        total = xp.exp(s_all - mu).sum(axis=-1)                              # (G, Bq)
        v_kept = v[xp.arange(G)[:, None, None], idx]                         # (G, Bq, kk, Dv)
        acc = xp.einsum("gbk,gbkd->gbd", w, v_kept)                          # (G, Bq, Dv)
        out[:, i0:i1] = acc / xp.where(kept > 0, kept, 1)[..., None]
        mass_kept[:, i0:i1] = xp.where(total > 0, kept / xp.where(total > 0, total, 1), 0)
        support[:, i0:i1] = sup
    return out, {"support": support, "mass_kept": mass_kept, "count": (support >= 0).sum(axis=-1)}
