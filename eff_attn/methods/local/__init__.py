"""``local``: exact softmax restricted to a band of positions (sliding window).

Query ``i`` sits at position ``p_i = i + o`` and attends the visible keys
``j`` with ``p_i - wL <= j <= p_i + wR``: the sliding window of Longformer and
of the Long Range Arena's "local attention". ``window=w`` means ``w`` keys on
each side (``2w + 1`` in all); a pair ``(wL, wR)`` sets the sides apart;
``causal`` forces ``wR = 0``. When ``Nq != Nk`` the bottom-right offset
``o = Nk - Nq`` applies even without ``causal``.

The index arithmetic every backend shares (the band of a query, the chunk
geometry of the sliding-chunks schedule, the count of keys in each band) lives
here. See ``docs/methods/local.md`` for the derivation.
"""

from __future__ import annotations

import numbers

import numpy as np

from ... import masks
from ..._validate import check_int
from ...registry import Impl, Method, Sharding
from ._common import DEFAULT_CHUNK, band, band_key_counts, chunk_geometry

__all__ = [
    "local_attention",
    "flops",
    "resolve",
    "band",
    "band_pair_count",
    "band_key_counts",
    "chunk_geometry",
    "METHOD",
    "DEFAULT_WINDOW",
    "DEFAULT_CHUNK",
]

#: Keys on each side of a query by default: 257 keys per query.
DEFAULT_WINDOW = 128


def _window_pair(window) -> tuple[int, int]:
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or a pair (wL, wR), got {len(window)} values: {window!r}")
        return check_int("window[0] (wL)", window[0], minimum=0), check_int("window[1] (wR)", window[1], minimum=0)
    if isinstance(window, numbers.Integral) and not isinstance(window, (bool, np.bool_)):
        w = check_int("window", window, minimum=0)
        return w, w
    raise TypeError(f"window must be an int or a pair of ints (wL, wR), got {window!r}")


def resolve(problem, *, window=DEFAULT_WINDOW, block_q=None, block_k=None) -> dict:
    """Check the parameters and turn ``window`` into the pair ``(wL, wR)``.

    ``causal`` forces ``wR = 0``: no key after a query's own position is seen.
    ``None`` block sizes are chosen by each backend.
    """
    wL, wR = _window_pair(window)
    if problem.causal:
        wR = 0
    return {
        "window": (wL, wR),
        "block_q": check_int("block_q", block_q, minimum=1, allow_none=True),
        "block_k": check_int("block_k", block_k, minimum=1, allow_none=True),
    }


def band_pair_count(Nq: int, Nk: int, offset, window) -> int:
    """In-band pairs ``P_loc = sum_i |[p_i - wL, p_i + wR] & [0, Nk)|``, ignoring the key mask."""
    o, wL, wR = band(offset, Nq, Nk, window)
    p = np.arange(Nq, dtype=np.int64) + o
    lo = np.clip(p - wL, 0, Nk)
    hi = np.clip(p + wR + 1, 0, Nk)
    return int(np.maximum(hi - lo, 0).sum())


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, window=DEFAULT_WINDOW, **params) -> int:
    """FLOPs of local attention (docs: methods/local, "Complexity").

    ``P_loc (2D + 2Dv + 5)`` for the ``P_loc <= Nq (wL + wR + 1)`` in-band
    pairs, the cost of one exact softmax pair each; ``backward=True`` adds
    ``P_loc (6D + 4Dv + 5)``. The schedule computes some out-of-band scores
    too (``info["computed_pairs"]``); like padding, they are not counted.
    """
    Dv = D if Dv is None else Dv
    offset = masks.causal_offset(causal, Nq, Nk)
    wL, wR = _window_pair(window)
    if offset is not None:
        wR = 0
    pairs = band_pair_count(Nq, Nk, offset, (wL, wR))
    total = pairs * (2 * D + 2 * Dv + 5)
    if backward:
        total += pairs * (6 * D + 4 * Dv + 5)
    return int(batch * total)


def info(problem, params, res) -> dict:
    counts = res["counts"]
    return {
        "keys_per_query": float(counts.mean()) if counts.size else 0.0,
        "computed_pairs": res["computed_pairs"],
        "lse": problem.unflatten(res["lse"]),
    }


METHOD = Method(
    name="local",
    summary="exact softmax over a sliding window of positions (Longformer's band)",
    resolve=resolve,
    flops=flops,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.local.reference"),
        Impl("numba", "eff_attn.methods.local.numba"),
        Impl("cupy", "eff_attn.methods.local.cupy"),
    ),
    budgets=({"window": 16}, {"window": 32}, {"window": 64}, {"window": 128}, {"window": 256}),
    budget_name="window",
    sharding=Sharding(reads_data=False),
)


def local_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                    return_info=False, window=DEFAULT_WINDOW, block_q=None, block_k=None):
    """Sliding-window attention: exact softmax over the keys near each query's position.

    Query ``i`` sits at ``p_i = i + o`` (``o = Nk - Nq``, or the causal
    offset) and attends the visible keys ``j`` with
    ``p_i - wL <= j <= p_i + wR``. Time ``O(Nq (wL + wR + Bq) (D + Dv))``
    and memory ``O(Nq (wL + wR + Bq))`` (``Bq`` the query block), linear in
    the sequence length; it equals exact attention once the window covers
    every key.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended).
    causal : bool, "bottom_right" or "top_left", default=False
        Causal attention; forces ``wR = 0``.
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Unused: local attention is deterministic.
    return_info : bool, default=False
    window : int or pair of int, default=128
        Keys on each side of a query (``w`` gives ``2w + 1`` keys), or
        ``(wL, wR)`` for the left (earlier) and right (later) sides. Per
        side, unlike libraries that give the total width. Negative values
        raise ``ValueError``.
    block_q : int, optional
        Queries per block. Numba: exact attention's rule, the largest power
        of two <= 128 with ``Bq * 512 * max(D, Dv) <= 2**22`` (128 at D = 64),
        lowered to the smallest power of two >= ``wL + wR`` (at least 16) for
        narrow windows, since a block computes ``Bq + wL + wR`` scores per
        row; NumPy and CuPy: the sliding chunk ``c = 64``.
    block_k : int, optional
        Keys per tile of the Numba kernel, default 512 (unused elsewhere).

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        Rows whose band holds no kept key are 0.
    info : dict, only if ``return_info``
        Base keys plus ``keys_per_query`` (mean number of kept keys in a
        band), ``computed_pairs`` (score entries the backend's schedule
        evaluated, over all slices, out-of-band ones included) and ``lse``
        (..., Nq), the band's logsumexp (``-inf`` on empty rows).
    """
    from ...api import attention

    return attention(q, k, v, method="local", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, window=window, block_q=block_q, block_k=block_k)
