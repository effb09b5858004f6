"""The hashing and bucket arithmetic that Reformer's reference and kernels share."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SELF_SCORE", "bucket_groups", "total_buckets", "hash_buckets", "shared_keys", "assign_buckets"]

#: Score of the (i, i) pair under shared QK: a token attends to itself only
#: when nothing else is visible.
SELF_SCORE = -1e5


def bucket_groups(num_buckets) -> tuple[int, ...]:
    """The digit sizes of a bucket id: ``()`` for 1 bucket, ``(b,)`` or ``(b1, b2, ...)``."""
    if isinstance(num_buckets, tuple):
        return num_buckets
    return () if num_buckets == 1 else (num_buckets,)


def total_buckets(num_buckets) -> int:
    return math.prod(bucket_groups(num_buckets))


def hash_buckets(x, rotations, num_buckets, xp=np):
    """Angular LSH bucket ids ``h = h_1 + b_1 h_2 + ...``, in float64.

    For each factor ``b_g`` with its ``b_g / 2`` columns ``R_g`` of the
    rotation, ``h_g(x) = argmax [x R_g; -x R_g]`` (ties: the first index). The
    first factor is the least significant digit.

    Parameters
    ----------
    x : array of shape (G, N, D)
    rotations : array of shape (R, D, sum(b_g / 2))
    num_buckets : int or tuple of int

    Returns
    -------
    int64 array of shape (R, G, N)
    """
    R, D, cols = rotations.shape
    G, N = x.shape[:2]
    flat_rot = xp.moveaxis(rotations.astype(np.float64), 0, 1).reshape(D, R * cols)      # (D, R*cols)
    proj = (x.reshape(G * N, D).astype(np.float64) @ flat_rot).reshape(G, N, R, cols)   # one GEMM
    codes = xp.zeros((G, N, R), dtype=np.int64)                                          # (G, N, R)
    base, col = 1, 0
    for b in bucket_groups(num_buckets):
        p = proj[..., col:col + b // 2]                                                  # (G, N, R, b/2)
        # argmax [p; -p] without forming it: the first half wins ties, so it is
        # argmax p when max p >= -min p, else b/2 + argmin p (first indices both).
        hi, lo = xp.argmax(p, axis=-1), xp.argmin(p, axis=-1)                            # (G, N, R)
        top = xp.take_along_axis(p, hi[..., None], axis=-1)[..., 0]                     # (G, N, R)
        bottom = xp.take_along_axis(p, lo[..., None], axis=-1)[..., 0]                  # (G, N, R)
        codes += base * xp.where(top >= -bottom, hi, b // 2 + lo)                        # (G, N, R)
        base, col = base * b, col + b // 2
    codes = xp.ascontiguousarray(xp.moveaxis(codes, 2, 0))                               # (R, G, N)
    return codes


def shared_keys(q, xp=np):
    """Shared-QK keys ``k_j = q_j / ||q_j||`` (0 for a zero query), shape (G, N, D)."""
    norm = xp.sqrt((q * q).sum(axis=-1, keepdims=True))                     # (G, N, 1)
    return q / xp.where(norm > 0, norm, 1)


def assign_buckets(q, k, *, num_hashes, num_buckets, shared_qk, rotations=None, buckets=None, xp=np,
                   hash_fn=hash_buckets):
    """Bucket ids of queries and keys for every round, hashed (by ``hash_fn``) or replayed.

    Returns
    -------
    (buckets_q, buckets_k) : int64 arrays of shape (R, G, N)
        Under shared QK both are the hash of ``q``.
    """
    if buckets is not None:
        return buckets
    G, N = q.shape[:2]
    if total_buckets(num_buckets) == 1:
        zeros = xp.zeros((num_hashes, G, N), dtype=np.int64)
        return zeros, zeros
    from ..._cuda import to_xp

    rotations = to_xp(xp, rotations)
    buckets_q = hash_fn(q, rotations, num_buckets, xp)
    return buckets_q, buckets_q if shared_qk else hash_fn(k, rotations, num_buckets, xp)
