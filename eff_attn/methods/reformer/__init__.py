"""Reformer: LSH attention with angular hashing, sorted buckets and chunks.

Each of ``n_h`` rounds hashes the tokens with a random rotation
(``h(x) = argmax[x R; -x R]``), sorts them by (bucket, position), cuts the
sorted order into chunks of ``c`` and lets every query chunk attend to its
own and the previous key chunk. The rounds are combined by their
logsumexp; with ``dedup`` the result is exact softmax attention over the
union of each query's windows. See ``docs/methods/reformer.md``.

The pieces every backend shares live here: the bucket-count defaults, the
rotation draw, the hash and the replay of given buckets.
"""

from __future__ import annotations

import math

import numpy as np

from ..._validate import check_bool, check_int, check_memory
from ...random import as_generator
from ...registry import Impl, Method, NotSupportedError, Sharding
from ._common import SELF_SCORE, assign_buckets, bucket_groups, hash_buckets, shared_keys, total_buckets

__all__ = [
    "reformer_attention",
    "draw_reformer_rotations",
    "hash_buckets",
    "assign_buckets",
    "shared_keys",
    "default_num_buckets",
    "bucket_groups",
    "flops",
    "resolve",
    "METHOD",
    "SELF_SCORE",
]

DEFAULT_HASHES = 4
DEFAULT_CHUNK = 64
#: Above this many buckets the default factorises them as (b1, b2), so the
#: hash costs O(sqrt(b)) columns instead of O(b).
MAX_FLAT_BUCKETS = 64


def default_num_buckets(N: int, chunk_size: int):
    """``b = 2 ceil(N / 2c)``, about one chunk per bucket; ``(b1, b2)`` when ``b > 64``.

    The factors are ``b1 = 2 ceil(sqrt(b) / 2)`` and ``b2 = 2 ceil(b / 2 b1)``,
    so ``b1 b2 >= b`` and both are even.
    """
    b = 2 * math.ceil(N / (2 * chunk_size))
    if b <= MAX_FLAT_BUCKETS:
        return b
    b1 = 2 * math.ceil(math.sqrt(b) / 2)
    return b1, 2 * math.ceil(b / (2 * b1))


def _check_num_buckets(num_buckets, N, chunk_size):
    if num_buckets is None:
        return default_num_buckets(N, chunk_size)
    if isinstance(num_buckets, (tuple, list)):
        groups = tuple(check_int("num_buckets", b, minimum=2) for b in num_buckets)
        if not groups or any(b % 2 for b in groups):
            raise ValueError(
                f"num_buckets={tuple(num_buckets)!r} must be a tuple of even factors (each is an angular "
                "hash over +-x R)"
            )
        return groups if len(groups) > 1 else groups[0]
    b = check_int("num_buckets", num_buckets, minimum=1)
    if b > 1 and b % 2:
        raise ValueError(f"num_buckets={b} must be 1 or even: the angular hash takes the argmax over [x R; -x R]")
    return b


def draw_reformer_rotations(rng, num_hashes: int, D: int, num_buckets) -> np.ndarray:
    """Random rotations for ``num_hashes`` rounds, drawn on the host in float64.

    Round ``r`` is a Gaussian ``(D, sum(b_g / 2))`` matrix, its columns grouped
    by the bucket factors. Rounds are drawn one after the other, so the first
    ``r`` rounds of a larger draw equal an ``r``-round draw at the same seed.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
    num_hashes : int
    D : int
    num_buckets : int or tuple of int

    Returns
    -------
    ndarray of shape (num_hashes, D, sum(b_g / 2)), float64
    """
    gen = as_generator(rng)
    cols = sum(b // 2 for b in bucket_groups(num_buckets))
    return np.stack([gen.standard_normal((D, cols)) for _ in range(num_hashes)])


def _check_rotations(rotations, num_hashes, D, num_buckets):
    if total_buckets(num_buckets) == 1:
        raise ValueError("rotations= was given but num_buckets=1 skips hashing; leave rotations out")
    cols = sum(b // 2 for b in bucket_groups(num_buckets))
    rotations = rotations.get() if hasattr(rotations, "get") else np.asarray(rotations)   # drawn on the host
    expected = (num_hashes, D, cols)
    if rotations.shape != expected:
        raise ValueError(
            f"rotations must have shape (num_hashes, D, sum(b/2)) = {expected} for num_hashes={num_hashes}, "
            f"D={D}, num_buckets={num_buckets!r}; got shape {rotations.shape}"
        )
    if not np.issubdtype(rotations.dtype, np.floating) or not np.isfinite(rotations).all():
        raise ValueError("rotations must be a finite floating-point array")
    return rotations.astype(np.float64)


def _check_buckets(buckets, problem, num_hashes, num_buckets, shared_qk):
    xp = problem.xp
    pair = buckets if isinstance(buckets, (tuple, list)) else (buckets, buckets)
    if len(pair) != 2:
        raise ValueError("buckets must be one int array (n_h, ..., N) or a (q, k) pair of them")
    total = total_buckets(num_buckets)
    out = []
    for name, b in zip(("buckets_q", "buckets_k"), pair):
        b = xp.asarray(b)
        if not np.issubdtype(b.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {b.dtype}")
        if b.ndim < 2 or b.shape[0] != num_hashes or b.shape[-1] != problem.Nq:
            raise ValueError(
                f"{name} must have shape (num_hashes, ..., N) with num_hashes={num_hashes} and N={problem.Nq}, "
                f"got shape {tuple(b.shape)}"
            )
        middle = b.shape[1:-1]                                    # the batch axes, right-aligned
        pad = (1,) * max(0, len(problem.batch_shape) - len(middle))
        try:
            b = xp.broadcast_to(b.reshape(num_hashes, *pad, *middle, problem.Nq),
                                (num_hashes, *problem.batch_shape, problem.Nq))
        except ValueError:
            raise ValueError(
                f"{name} of shape {tuple(b.shape)} does not broadcast to (num_hashes, *batch, N) = "
                f"{(num_hashes, *problem.batch_shape, problem.Nq)}"
            ) from None
        if b.size and (int(b.min()) < 0 or int(b.max()) >= total):
            raise ValueError(f"{name} must lie in [0, {total}) for num_buckets={num_buckets!r}")
        out.append(xp.ascontiguousarray(b.reshape(num_hashes, problem.G, problem.Nq).astype(np.int64)))
    if shared_qk and not bool(xp.array_equal(out[0], out[1])):
        raise ValueError("shared_qk=True hashes queries and keys together; the (q, k) buckets must be equal")
    return tuple(out)


def resolve(problem, *, num_hashes=None, num_buckets=None, chunk_size=DEFAULT_CHUNK, shared_qk=False,
            dedup=True, rotations=None, buckets=None) -> dict:
    """Check the parameters and fill the defaults that depend on N."""
    if problem.Nq != problem.Nk:
        raise NotSupportedError(
            f"reformer needs Nq == Nk (got Nq={problem.Nq}, Nk={problem.Nk}): queries and keys are "
            "sorted into the same chunks"
        )
    N = problem.Nq
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    shared_qk = check_bool("shared_qk", shared_qk)
    dedup = check_bool("dedup", dedup)
    if rotations is not None and buckets is not None:
        raise ValueError("pass rotations= or buckets=, not both: buckets= replaces the hashing")
    num_buckets = _check_num_buckets(num_buckets, N, chunk_size)
    given = rotations if rotations is not None else buckets
    if num_hashes is None:
        first = given[0] if isinstance(given, (tuple, list)) else given
        num_hashes = DEFAULT_HASHES if first is None else first.shape[0]
    num_hashes = check_int("num_hashes", num_hashes, minimum=1)
    check_memory("num_hashes", num_hashes, (num_hashes, problem.G, 2 * N + problem.D), device=problem.device,
                 what="the bucket ids, sort orders and rotations")
    if shared_qk and not bool(problem.xp.array_equal(problem.q, problem.k)):
        raise ValueError("shared_qk=True uses the queries as keys; pass k=None or k=q")
    if rotations is not None:
        rotations = _check_rotations(rotations, num_hashes, problem.D, num_buckets)
    if buckets is not None:
        buckets = _check_buckets(buckets, problem, num_hashes, num_buckets, shared_qk)
    return {
        "num_hashes": num_hashes,
        "num_buckets": num_buckets,
        "chunk_size": chunk_size,
        "shared_qk": shared_qk,
        "dedup": dedup,
        "rotations": rotations,
        "buckets": buckets,
    }


def draw(rng, problem, params) -> dict:
    """The rotations, unless the call replays given rotations or buckets."""
    if params["rotations"] is not None or params["buckets"] is not None:
        if rng is not None:
            raise ValueError(
                "rotations=/buckets= replay a fixed draw; passing rng as well is ambiguous (leave rng=None)"
            )
        return {}
    if total_buckets(params["num_buckets"]) == 1:
        return {}
    return {"rotations": draw_reformer_rotations(rng, params["num_hashes"], problem.D, params["num_buckets"])}


def window_pairs(N: int, chunk_size: int) -> int:
    """(query, key) slot pairs the chunk windows compute, padding slots not counted."""
    n_c = -(-N // chunk_size)
    sizes = [min(chunk_size, N - u * chunk_size) for u in range(n_c)]
    if n_c == 1:
        return N * N
    return sum(sizes[u] * (sizes[u] + sizes[u - 1]) for u in range(n_c))


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, num_hashes=DEFAULT_HASHES,
          num_buckets=None, chunk_size=DEFAULT_CHUNK, shared_qk=False, dedup=True, **params) -> int:
    """FLOPs of LSH attention (docs: methods/reformer, "Complexity").

    Per round: hashing ``N D sum(b)`` per hashed side (a ``(N, D) x (D, sum b/2)``
    product; one side under shared QK, none for one bucket), the windows'
    ``P_w (2D + 2Dv + 5)`` with ``P_w ~ 2cN`` computed pairs (causal pairs are
    computed and then masked), and, with dedup, ``n_h P_w`` chunk-id
    comparisons. The backward adds ``n_h P_w (6D + 4Dv + 5)``. Sorting is
    not counted.
    """
    Dv = D if Dv is None else Dv
    N = Nq
    num_buckets = default_num_buckets(N, chunk_size) if num_buckets is None else num_buckets
    sum_b = sum(bucket_groups(num_buckets))
    pairs = window_pairs(N, chunk_size)
    sides = 1 if shared_qk else 2
    total = num_hashes * (sides * N * D * sum_b + pairs * (2 * D + 2 * Dv + 5))
    if dedup:
        total += num_hashes * num_hashes * pairs
    if backward:
        total += num_hashes * pairs * (6 * D + 4 * Dv + 5)
    return int(batch * total)


def info(problem, params, res) -> dict:
    xp = problem.xp
    R = params["num_hashes"]
    shape = (R, *problem.batch_shape, problem.Nq)
    buckets_q, buckets_k = res["buckets"]
    total = total_buckets(params["num_buckets"])
    rows = xp.arange(R * problem.G, dtype=np.int64)[:, None] * total                   # (R*G, 1)
    largest = max(int(xp.bincount((b.reshape(R * problem.G, -1) + rows).ravel()).max()) for b in (buckets_q, buckets_k))
    return {
        "buckets": (buckets_q.reshape(shape), buckets_k.reshape(shape)),
        "bucket_size_max": largest,
        "keys_per_query": float(res["union_size"].mean()),
        "self_only_rows": problem.unflatten(res["self_only"]),
    }


def _reformer_reads_data(problem, params) -> bool:
    """``shared_qk=True``: ``resolve`` checks that the keys are the queries (their values)."""
    return bool(params.get("shared_qk"))


METHOD = Method(
    name="reformer",
    summary="LSH attention: angular hashing, sorted chunks, rounds combined by logsumexp",
    resolve=resolve,
    flops=flops,
    info=info,
    draw=draw,
    impls=(
        Impl("numpy", "eff_attn.methods.reformer.reference"),
        Impl("numba", "eff_attn.methods.reformer.numba", differentiable=False),
        Impl("cupy", "eff_attn.methods.reformer.cupy"),
    ),
    budgets=({"num_hashes": 1}, {"num_hashes": 2}, {"num_hashes": 4}, {"num_hashes": 8}),
    budget_name="num_hashes",
    sharding=Sharding(split={"buckets": (None, "slice")}, shared=("rotations",), reads_data=_reformer_reads_data),
)


def reformer_attention(q, k=None, v=None, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                       return_info=False, num_hashes=None, num_buckets=None, chunk_size=DEFAULT_CHUNK,
                       shared_qk=False, dedup=True, rotations=None, buckets=None):
    """LSH attention (Reformer): hash, sort, attend within chunks, combine rounds.

    Per round ``r`` (of ``n_h``) the tokens get angular-LSH buckets
    ``h_r(x) = argmax[x R_r; -x R_r]``, are stably sorted by (bucket,
    position) and cut into chunks of ``c``; query chunk ``u`` attends to key
    chunks ``u`` and ``u - 1 (mod n_c)``. With ``z_i^r`` the window's
    logsumexp, ``out_i = sum_r exp(z_i^r - lse_r z_i^r) out_i^r``. With
    ``dedup`` this is exact softmax attention over the union ``U_i`` of the
    windows. Time ``O(n_h N (c (D + Dv) + D sum(b) + log N))``, memory
    ``O(n_h N (c + Dv))``.

    Parameters
    ----------
    q : array of shape (..., N, D)
    k : array of shape (..., N, D), optional
        ``None`` (or ``q`` itself) with ``shared_qk=True``.
    v : array of shape (..., N, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
        The Numba backend has no backward pass; ``attention_vjp`` picks
        NumPy or CuPy.
    mask : bool array of shape (..., N), optional
        Key keep-mask.
    causal : bool, "bottom_right" or "top_left", default=False
        Queries see keys ``j <= i`` (the two alignments agree since
        ``Nq == Nk``). Rows whose windows hold no visible key output 0.
    scale : float, optional
        Default ``1/sqrt(D)``.
    rng : None, int or Generator
        Draws the rotations. Must be None when ``rotations`` or ``buckets``
        are given.
    return_info : bool, default=False
    num_hashes : int, optional
        Rounds ``n_h``; default 4, or the leading size of ``rotations`` or
        ``buckets``.
    num_buckets : int or tuple of int, optional
        ``b``: 1 (no hashing) or even; a tuple ``(b1, b2)`` of even factors
        gives ``h = h1 + b1 h2`` from separate column groups. Default
        ``b = 2 ceil(N / 2c)``, factorised into
        ``(2 ceil(sqrt(b)/2), 2 ceil(b / 2 b1))`` when ``b > 64``.
    chunk_size : int, default=64
        ``c``; each query attends to at most ``2c`` keys per round.
    shared_qk : bool, default=False
        The paper's shared-QK form: keys are ``q_j / ||q_j||`` and the pair
        ``(i, i)`` scores ``-1e5``, so a token attends to itself only when
        nothing else is visible. The gradient then flows to ``q`` (``dk = 0``).
    dedup : bool, default=True
        Subtract ``log c_ij`` (the number of rounds whose window pairs ``i``
        with ``j``), so keys found in several rounds count once.
    rotations : array of shape (n_h, D, sum(b/2)), optional
        Explicit rotations (e.g. from :func:`draw_reformer_rotations`).
    buckets : int array of shape (n_h, ..., N), or a (q, k) pair, optional
        Explicit bucket ids in ``[0, prod(b))``; they replace the hashing
        (replay ``info["buckets"]``, tests).

    Returns
    -------
    out : array of shape (..., N, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``buckets`` (a (q, k) pair of int arrays
        ``(n_h, ..., N)``), ``bucket_size_max`` (the most tokens in one
        bucket of one round), ``keys_per_query`` (mean ``|U_i|``) and
        ``self_only_rows`` ((..., N) bool: the only key attended is the
        token itself).
    """
    from ...api import attention

    if k is None:
        if not shared_qk:
            raise TypeError("k is None; pass the keys, or shared_qk=True to use the queries as keys")
        k = q
    return attention(q, k, v, method="reformer", backend=backend, mask=mask, causal=causal, scale=scale, rng=rng,
                     return_info=return_info, num_hashes=num_hashes, num_buckets=num_buckets, chunk_size=chunk_size,
                     shared_qk=shared_qk, dedup=dedup, rotations=rotations, buckets=buckets)
