"""The integer and probability steps of KDEformer, shared by every backend.

Everything here is written against an array module ``xp`` (NumPy or CuPy),
so the three backends run the same hashing, sorting, partitioning and
sampling steps and agree bit for bit at a seed (see the spec, section 4):

1. :func:`kdeformer_codes` -- sign-bit codes of q and k (the shared
   :func:`eff_attn._hashing.sign_bit_codes`, float64 projections);
2. :func:`order_keys` -- the visiting order of the buckets (Gray rank or the
   released code's Gray code);
3. :func:`kdeformer_blocks` -- stable sorts on the unique int64 key
   ``key * N + index`` (the shared :func:`eff_attn._hashing.stable_key_argsort`)
   and the balanced per-slice partition into diagonal blocks;
4. :func:`sampling_probabilities` and :func:`inverse_cdf_sample` -- the
   importance distribution over the kept keys and the inverse-CDF draw of the
   ``m`` shared samples;
5. :func:`block_items` -- the host-side work table (slice, query chunk, key
   block) that the block-diagonal exact part is computed over.

The index arithmetic of the partition lives here once; the backends only
read the arrays it produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._array import to_host
from ..._hashing import MAX_CODE_BITS, sign_bit_codes, stable_key_argsort

__all__ = [
    "ORDERS",
    "PROBS",
    "Plan",
    "kdeformer_codes",
    "gray_rank",
    "gray_code",
    "order_keys",
    "kdeformer_blocks",
    "block_bounds",
    "block_items",
    "block_pair_count",
    "probability_flops",
    "slice_flops",
    "plan_flops",
    "sampling_probabilities",
    "pilot_rows",
    "pilot_column_share",
    "inverse_cdf_sample",
    "make_plan",
]

ORDERS = ("gray", "official")
PROBS = ("columns", "mixture", "official", "uniform")
#: Query rows whose exact softmax estimates the column norms of ``D^-1 A`` (``probs="columns"``).
PILOT_QUERIES = 16

#: Sort key of a masked key: above every bucket key (codes and their Gray
#: transforms are below ``2**30``), so the kept keys sort first.
MASKED_KEY = 1 << MAX_CODE_BITS


def kdeformer_codes(x, hyperplanes, xp=np):
    """Bucket codes ``c(x) = sum_t 2**t [g_t . x > 0]``, one hash per slice.

    The test is strict (a zero projection gives bit 0) and the projections
    are float64, whatever the dtype of ``x``.

    Parameters
    ----------
    x : array of shape (..., N, D)
        Unscaled queries or keys.
    hyperplanes : array of shape (..., r, D)
        Broadcast against the leading axes of ``x``; ``(r, D)`` is shared.

    Returns
    -------
    int32 array of shape (..., N), values in ``[0, 2**r)``.
    """
    return sign_bit_codes(x, hyperplanes[..., None, :, :], xp)[..., 0]     # (..., N)


def gray_code(codes):
    """``gamma(c) = c XOR (c >> 1)``, the binary-reflected Gray code."""
    return codes ^ (codes >> 1)


def gray_rank(codes):
    """``gamma^{-1}(c)``: the position of bucket ``c`` in Gray order.

    A prefix XOR with shifts 1, 2, 4, 8 and 16 (enough for 30-bit codes).
    Sorting buckets by this rank visits them in Gray order, so consecutive
    buckets differ in exactly one bit.
    """
    rank = codes.astype(np.int64)
    for shift in (1, 2, 4, 8, 16):
        rank = rank ^ (rank >> shift)
    return rank


def order_keys(codes, order: str):
    """Sort key of each code: Gray rank (``"gray"``) or Gray code (``"official"``)."""
    return gray_rank(codes) if order == "gray" else gray_code(codes.astype(np.int64))


def block_bounds(u, count, n_blocks):
    """Start ``ceil(u * count / n_blocks)`` of balanced block ``u`` (int64, elementwise).

    Block ``u`` of ``count`` sorted items is ``[start(u), start(u + 1))``;
    sizes are ``floor`` or ``ceil`` of ``count / n_blocks``.
    """
    return (u * count + n_blocks - 1) // n_blocks


def kdeformer_blocks(q_keys, k_keys, keep, block_size: int, xp=np):
    """Sort queries and kept keys by bucket and cut them into diagonal blocks.

    Per slice with ``n`` kept keys and ``n_b = ceil(n / b)`` blocks, the key
    at sorted position ``t`` gets block ``floor(t n_b / n)`` and the query at
    sorted position ``t`` gets ``floor(t n_b / Nq)``. Masked keys get -1; so
    do the queries of a slice without kept keys.

    Parameters
    ----------
    q_keys : int array of shape (G, Nq)
        Order keys of the queries (:func:`order_keys`).
    k_keys : int array of shape (G, Nk)
    keep : bool array of shape (G, Nk)
    block_size : int

    Returns
    -------
    q_perm : int64 array of shape (G, Nq)
        Queries in sorted order.
    k_perm : int64 array of shape (G, Nk)
        Keys in sorted order, the ``n`` kept keys first.
    q_block : int64 array of shape (G, Nq)
    k_block : int64 array of shape (G, Nk)
    n_kept, n_blocks : int64 arrays of shape (G,)
    """
    G, Nq = q_keys.shape
    Nk = k_keys.shape[1]
    n_kept = keep.sum(axis=-1).astype(np.int64)                              # (G,)
    n_blocks = (n_kept + block_size - 1) // block_size                       # (G,)
    k_perm = stable_key_argsort(xp.where(keep, k_keys, MASKED_KEY), xp)      # (G, Nk)
    q_perm = stable_key_argsort(q_keys, xp)                                  # (G, Nq)
    n, nb = n_kept[:, None], n_blocks[:, None]                               # (G, 1)
    t_k = xp.arange(Nk, dtype=np.int64)[None, :]                             # (1, Nk)
    beta_sorted = xp.where(t_k < n, t_k * nb // xp.maximum(n, 1), -1)        # (G, Nk)
    t_q = xp.arange(Nq, dtype=np.int64)[None, :]                             # (1, Nq)
    alpha_sorted = xp.where(n > 0, t_q * nb // Nq, -1)                       # (G, Nq)
    rows_k = xp.arange(G)[:, None]
    k_block = xp.empty((G, Nk), dtype=np.int64)
    k_block[rows_k, k_perm] = beta_sorted                                    # (G, Nk) original order
    q_block = xp.empty((G, Nq), dtype=np.int64)
    q_block[rows_k, q_perm] = alpha_sorted                                   # (G, Nq) original order
    return q_perm, k_perm, q_block, k_block, n_kept, n_blocks


def block_items(n_kept, Nq: int, Nk: int, block_size: int):
    """The work table of the exact block-diagonal part (host NumPy).

    One item is (slice ``g``, a chunk of at most ``c_q`` sorted queries of
    block ``u``, the sorted keys of block ``u``), with
    ``c_q = ceil(Nq / ceil(Nk / b))``. That is one item per block without a
    mask and at most ``2 G ceil(Nk / b)`` items with one, each at most
    ``c_q x b`` pairs, so padded item arrays stay ``O(G (Nq + Nk))``.

    Parameters
    ----------
    n_kept : int array of shape (G,)
        Kept keys per slice (host or device; read on the host).

    Returns
    -------
    items : int64 ndarray of shape (W, 5)
        Rows ``(g, q_start, q_stop, k_start, k_stop)`` in sorted positions.
    c_q : int
        Largest query chunk.
    b_max : int
        Largest key block (``<= block_size``).
    """
    n_kept = to_host(n_kept).astype(np.int64)                                # (G,)
    n_blocks = (n_kept + block_size - 1) // block_size                       # (G,)
    c_q = -(-Nq // -(-Nk // block_size))
    g = np.repeat(np.arange(n_kept.shape[0]), n_blocks)                      # (B,) slice of each block
    first = np.concatenate([[0], np.cumsum(n_blocks)[:-1]])                  # (G,)
    u = np.arange(g.shape[0]) - first[g]                                     # (B,) block index in slice
    nb, n = n_blocks[g], n_kept[g]                                           # (B,)
    q0, q1 = block_bounds(u, Nq, nb), block_bounds(u + 1, Nq, nb)            # (B,) query range
    k0, k1 = block_bounds(u, n, nb), block_bounds(u + 1, n, nb)              # (B,) key range
    chunks = -(-(q1 - q0) // c_q)                                            # (B,) 0 for empty ranges
    block = np.repeat(np.arange(g.shape[0]), chunks)                         # (W,)
    first_chunk = np.concatenate([[0], np.cumsum(chunks)[:-1]])              # (B,)
    c = np.arange(block.shape[0]) - first_chunk[block]                       # (W,) chunk index in block
    start = q0[block] + c * c_q                                              # (W,)
    stop = np.minimum(start + c_q, q1[block])                                # (W,)
    items = np.stack([g[block], start, stop, k0[block], k1[block]], axis=1).astype(np.int64)
    b_max = int((k1 - k0).max(initial=1))
    return items, c_q, b_max


def block_pair_count(Nq: int, n: int, block_size: int) -> int:
    """``P_blk = sum_u |Q_u| |K_u|``, the exact pairs of one slice with ``n`` kept keys."""
    if n == 0:
        return 0
    nb = -(-n // block_size)
    u = np.arange(nb + 1, dtype=np.int64)
    q_sizes = np.diff(block_bounds(u, Nq, nb))
    k_sizes = np.diff(block_bounds(u, n, nb))
    return int((q_sizes * k_sizes).sum())


def pilot_rows(Nq: int) -> np.ndarray:
    """The ``min(Nq, PILOT_QUERIES)`` evenly spaced query rows of ``probs="columns"`` (int64, host)."""
    return np.linspace(0, Nq - 1, min(Nq, PILOT_QUERIES)).round().astype(np.int64)


def probability_flops(Nk: int, Dv: int, probs: str, *, Nq: int = 0, D: int = 0) -> int:
    """``F_p``: the cost of the sampling probabilities (docs: "Complexity")."""
    if probs == "uniform":
        return 0
    if probs == "mixture":
        return Nk * (2 * Dv + 3)
    if probs == "columns":                                   # pilot softmax rows, squares, then the mixture
        return len(pilot_rows(Nq)) * Nk * (2 * D + 7) + Nk * (2 * Dv + 6) if Nq else Nk * (2 * Dv + 6)
    d1 = Dv + 1
    return 2 * Nk * d1 * d1 + 2 * Nk * d1 + 3 * Nk + (4 * d1 ** 3) // 3


def slice_flops(Nq: int, Nk: int, D: int, Dv: int, *, n_kept: int, num_bits: int, block_size: int,
                num_samples: int, probs: str) -> int:
    """FLOPs of one slice with ``n_kept`` kept keys (docs: "Complexity").

    ``2rD(Nq+Nk) + F_p + Nk + 2m + P_blk (2D+2Dv+5) + Nq m (2D+2Dv+6) + Nq (4Dv+8)``;
    a slice without kept keys costs only its hashing and ``F_p``.
    """
    total = 2 * num_bits * D * (Nq + Nk) + probability_flops(Nk, Dv, probs, Nq=Nq, D=D)
    if n_kept == 0:
        return total
    pairs = block_pair_count(Nq, n_kept, block_size)
    m = num_samples
    return (total + Nk + 2 * m + pairs * (2 * D + 2 * Dv + 5) + Nq * m * (2 * D + 2 * Dv + 6)
            + Nq * (4 * Dv + 8))


def plan_flops(plan, Nq: int, Nk: int, D: int, Dv: int, **params) -> int:
    """FLOPs of a call: :func:`slice_flops` summed over the slices' kept counts."""
    counts = np.bincount(to_host(plan.n_kept).astype(np.int64))                # how many slices keep n keys
    return int(sum(int(c) * slice_flops(Nq, Nk, D, Dv, n_kept=n, **params)
                   for n, c in enumerate(counts) if c))


def sampling_probabilities(v, keep, probs: str, xp=np, *, q=None, k=None, scale=None):
    """Importance weights ``pi`` (unnormalised) and probabilities ``p`` of the kept keys.

    - ``"columns"`` (default): the theory's ``p_j = (c_j + |v_j|^2 / sum |v|^2) / 2``
      with the column-norm share ``c_j`` of ``D^-1 A`` estimated from the exact
      softmax rows ``P`` of the ``PILOT_QUERIES`` evenly spaced queries
      (:func:`pilot_rows`), ``c^_j = sum_i P_ij^2 / sum_ij P_ij^2``, and half of it
      spread uniformly over the kept keys for the keys those rows miss:
      ``p_j = c^_j / 4 + 1/(4n) + |v_j|^2 / (2 sum_kept |v|^2)`` (``v`` term as in
      ``"mixture"``). Needs ``q``, ``k`` and ``scale``.
    - ``"mixture"``: ``p_j = 1/(2n) + |v_j|^2 / (2 sum_kept |v|^2)`` (``1/n``
      when every kept v is 0); ``pi = p``.
    - ``"official"``: ``pi_j = |v~_j| / lambda_max(V~^T V~) + 1/n`` with
      ``v~_j = [v_j, 1]`` and ``lambda_max`` exact (``eigvalsh`` on the host);
      ``p = pi / sum(pi)``.
    - ``"uniform"``: ``p_j = 1/n``; ``pi = p``.

    Masked keys get 0. Computed in float64.

    Parameters
    ----------
    v : array of shape (G, Nk, Dv)
    keep : bool array of shape (G, Nk)

    Returns
    -------
    pi, p : float64 arrays of shape (G, Nk)
    """
    n = keep.sum(axis=-1, keepdims=True).astype(np.float64)                  # (G, 1)
    inv_n = 1.0 / xp.maximum(n, 1.0)                                         # (G, 1)
    if probs == "uniform":
        p = xp.where(keep, inv_n, 0.0)                                       # (G, Nk)
        return p, p
    sq = xp.where(keep, xp.square(v, dtype=np.float64).sum(axis=-1), 0.0)   # (G, Nk) |v_j|^2, kept only
    if probs in ("mixture", "columns"):
        total = sq.sum(axis=-1, keepdims=True)                               # (G, 1)
        share = sq / xp.where(total > 0, total, 1.0)                         # (G, Nk)
        p = xp.where(total > 0, 0.5 * inv_n + 0.5 * share, inv_n)            # (G, Nk)
        if probs == "columns":
            column = pilot_column_share(q, k, keep, scale, xp)               # (G, Nk)
            p = 0.5 * (0.5 * column + 0.5 * inv_n) + 0.5 * xp.where(total > 0, share, inv_n)   # (G, Nk)
        p = xp.where(keep, p, 0.0)                                           # (G, Nk)
        return p, p
    ones = keep[..., None].astype(np.float64)                                # (G, Nk, 1)
    v64 = xp.where(keep[..., None], v, 0).astype(np.float64)                 # (G, Nk, Dv)
    v_tilde = xp.concatenate([v64, ones], axis=-1)                           # (G, Nk, Dv+1); 0 rows if masked
    gram = xp.matmul(xp.swapaxes(v_tilde, -1, -2), v_tilde)                  # (G, Dv+1, Dv+1)
    lam = np.linalg.eigvalsh(to_host(gram))[..., -1:]                        # (G, 1) host, exact
    lam = xp.asarray(np.maximum(lam, 1.0))                                   # (G, 1) >= n >= 1 if kept
    pi = xp.sqrt(sq + 1.0) / lam + inv_n                                     # (G, Nk) |v~_j| / lambda + 1/n
    pi = xp.where(keep, pi, 0.0)                                             # (G, Nk)
    total = pi.sum(axis=-1, keepdims=True)                                   # (G, 1)
    return pi, pi / xp.where(total > 0, total, 1.0)


def pilot_column_share(q, k, keep, scale, xp=np):
    """``c^_j = sum_i P_ij^2 / sum_ij P_ij^2`` over the pilot rows' exact softmax ``P`` (float64).

    ``1/n`` on the kept keys where the pilot rows carry no mass (a slice
    without kept keys gets 0 everywhere).

    Parameters
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
    keep : bool array of shape (G, Nk)

    Returns
    -------
    float64 array of shape (G, Nk)
    """
    rows = xp.asarray(pilot_rows(q.shape[1]))                                # (s,)
    qp = q[:, rows].astype(np.float64)                                       # (G, s, D)
    k64 = xp.where(keep[..., None], k, 0).astype(np.float64)                 # (G, Nk, D)
    scores = scale * xp.matmul(qp, xp.swapaxes(k64, -1, -2))                 # (G, s, Nk)
    scores = xp.where(keep[:, None, :], scores, -xp.inf)                     # (G, s, Nk)
    top = scores.max(axis=-1, keepdims=True)                                 # (G, s, 1)
    e = xp.where(keep[:, None, :], xp.exp(scores - xp.where(xp.isfinite(top), top, 0.0)), 0.0)   # (G, s, Nk)
    z = e.sum(axis=-1, keepdims=True)                                        # (G, s, 1)
    P = e / xp.where(z > 0, z, 1.0)                                          # (G, s, Nk)
    c = xp.square(P).sum(axis=1)                                             # (G, Nk)
    total = c.sum(axis=-1, keepdims=True)                                    # (G, 1)
    n = keep.sum(axis=-1, keepdims=True)                                     # (G, 1)
    uniform = xp.where(keep, 1.0 / xp.maximum(n, 1), 0.0)                    # (G, Nk)
    return xp.where(total > 0, c / xp.where(total > 0, total, 1.0), uniform)


def inverse_cdf_sample(pi, u, xp=np):
    """Inverse-CDF draw: ``j_l = #{j : C_j <= u_l C_{Nk-1}}``, ``C`` the prefix sums of ``pi``.

    ``C`` is a sequential float64 prefix sum (NumPy's ``cumsum``), so every
    backend that sums in the same order draws the same indices. A key with
    ``pi_j = 0`` is never drawn: ``C_j = C_{j-1}``, so the first ``C_j``
    exceeding ``x`` always has ``pi_j > 0``. Because ``u < 1``, ``u C`` rounds
    below ``C`` and the count never reaches ``Nk``. A slice whose weights
    are all 0 (every key masked) gets -1.

    This is the readable definition (``O(G m Nk)`` comparisons); the Numba
    and CuPy backends binary-search the same prefix sums.

    Parameters
    ----------
    pi : float64 array of shape (G, Nk)
    u : float64 array of shape (G, m), in ``[0, 1)``

    Returns
    -------
    int64 array of shape (G, m)
    """
    C = xp.cumsum(pi, axis=-1)                                               # (G, Nk)
    x = u * C[:, -1:]                                                        # (G, m)
    count = (C[:, None, :] <= x[:, :, None]).sum(axis=-1)                    # (G, m)
    return xp.where(C[:, -1:] > 0, count, -1).astype(np.int64)               # (G, m)


@dataclass(frozen=True)
class Plan:
    """Everything before the attention arithmetic, for one call (see :func:`make_plan`)."""

    keep: object          # (G, Nk) bool
    q_codes: object       # (G, Nq) int
    k_codes: object       # (G, Nk) int
    q_perm: object        # (G, Nq) int64
    k_perm: object        # (G, Nk) int64
    q_block: object       # (G, Nq) int64
    k_block: object       # (G, Nk) int64
    n_kept: object        # (G,) int64
    n_blocks: object      # (G,) int64
    p: object             # (G, Nk) float64
    sample_idx: object    # (G, m) int64, -1 in slices without kept keys
    sample_weight: object  # (G, m) float64, 1 / (m p_j)
    hyperplanes: object   # (G, r, D) float64, or None when codes were given
    uniforms: object      # (G, m) float64, or None when sample_idx was given


def make_plan(q, k, v, mask, *, hyperplanes, q_codes, k_codes, sample_idx, uniforms, num_samples,
              block_size, order, probs, scale=None, xp=np, sampler=inverse_cdf_sample, slice_chunk=None) -> Plan:
    """Hash, sort, partition and sample: the steps 1-6 of the spec's estimator.

    Parameters
    ----------
    q : array of shape (G, Nq, D)
    k : array of shape (G, Nk, D)
        Masked rows must already be 0 (they are never used).
    v : array of shape (G, Nk, Dv)
    mask : bool array of shape (G, Nk), or None
    hyperplanes : float64 array of shape (G, r, D), or None when codes are given
    q_codes, k_codes : int arrays of shape (G, Nq), (G, Nk), or None
    sample_idx : int array of shape (G, m), or None to draw from ``uniforms``
    uniforms : float64 array of shape (G, m), or None
    sampler : callable
        ``sampler(pi, u) -> (G, m)`` indices, a backend's implementation of
        :func:`inverse_cdf_sample`.
    slice_chunk : int, optional
        Slices per float64 projection (bounds the memory of the hashing).
    """
    G, Nk = k.shape[0], k.shape[1]
    keep = xp.ones((G, Nk), dtype=bool) if mask is None else mask              # (G, Nk)
    if q_codes is None:
        step = slice_chunk or G
        q_codes = xp.concatenate([kdeformer_codes(q[g:g + step], hyperplanes[g:g + step], xp)
                                  for g in range(0, G, step)])                 # (G, Nq)
        k_codes = xp.concatenate([kdeformer_codes(k[g:g + step], hyperplanes[g:g + step], xp)
                                  for g in range(0, G, step)])                 # (G, Nk)
        k_codes = xp.where(keep, k_codes, 0)                                   # (G, Nk)
    q_perm, k_perm, q_block, k_block, n_kept, n_blocks = kdeformer_blocks(
        order_keys(q_codes, order), order_keys(k_codes, order), keep, block_size, xp
    )
    pi, p = sampling_probabilities(v, keep, probs, xp, q=q, k=k, scale=scale)  # (G, Nk) each
    if sample_idx is None:
        sample_idx = sampler(pi, uniforms) if num_samples > 0 else xp.zeros((G, 0), dtype=np.int64)
    sample_idx = xp.asarray(sample_idx).astype(np.int64)                       # (G, m)
    p_drawn = xp.take_along_axis(p, xp.maximum(sample_idx, 0), axis=-1)        # (G, m)
    weight = xp.where(sample_idx >= 0, 1.0 / (num_samples * xp.where(p_drawn > 0, p_drawn, 1.0)), 0.0)
    return Plan(keep=keep, q_codes=q_codes, k_codes=k_codes, q_perm=q_perm, k_perm=k_perm,
                q_block=q_block, k_block=k_block, n_kept=n_kept, n_blocks=n_blocks, p=p,
                sample_idx=sample_idx, sample_weight=weight, hyperplanes=hyperplanes, uniforms=uniforms)
