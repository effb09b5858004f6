"""``yoso``: You Only Sample (Almost) Once (Zeng et al., ICML 2021).

YOSO *replaces* softmax attention. Key ``j`` gets the weight
``P_ij = (1 - theta_ij / pi)^tau``, the probability that ``q_i`` and ``k_j``
fall in the same bucket of a ``tau``-bit sign-random-projection hash, and
each output row is l2-normalised instead of divided by a row sum.

- ``variant="sampled"`` (YOSO-m, the default) draws ``m`` such hashes, sums
  the values of the keys of each bucket into a table of ``2**tau`` rows per
  hash, and lets each query read its buckets: linear time, an unbiased
  estimate of ``P v``.
- ``variant="expectation"`` (YOSO-E) computes ``P v`` exactly in
  ``O(Nq Nk)``: the estimand of the sampled variant and its test oracle.

Helpers (NumPy, host side): :func:`draw_yoso_hyperplanes`, :func:`yoso_codes`,
:func:`collision_probability`, :func:`empirical_collision_matrix`,
:func:`default_tau` and :func:`flops`. See ``docs/methods/yoso.md``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ... import interop, masks
from ..._hashing import MAX_CODE_BITS
from ..._validate import (
    check_array_shape,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_memory,
    flatten_leading,
)
from ...random import as_generator, random_signs
from ...registry import Impl, Method, NotSupportedError, Sharding
from ._common import HASH_DTYPES, unit_rows, yoso_codes

__all__ = [
    "yoso_attention",
    "draw_yoso_hyperplanes",
    "yoso_codes",
    "collision_probability",
    "empirical_collision_matrix",
    "default_tau",
    "flops",
    "resolve",
    "draw",
    "METHOD",
]

VARIANTS = ("sampled", "expectation")
HASH_FAMILIES = ("gaussian", "hadamard")
GRADS = ("surrogate", "exact", "expectation_surrogate")

#: Hashes of the sampled variant: the paper's GLUE and LRA configurations.
DEFAULT_NUM_HASHES = 32
#: Largest number of bits per hash: a table then has at most 2**20 rows.
MAX_TAU = 20
#: Largest default ``tau``: the default tables stay at most 2**16 rows.
MAX_DEFAULT_TAU = 16


# --------------------------------------------------------------------------------------
# Host-side helpers
# --------------------------------------------------------------------------------------


def default_tau(Nk: int) -> int:
    """``clip(ceil(log2 Nk), 1, 16)``: tables of about ``Nk`` rows, so a query
    meets about one random key per hash (the paper's choice, capped)."""
    Nk = check_int("Nk", Nk, minimum=1)
    return int(min(MAX_DEFAULT_TAU, max(1, (Nk - 1).bit_length())))


def _sylvester(n: int) -> np.ndarray:
    """The unnormalised Sylvester-Hadamard matrix of order ``n`` (a power of two), +-1 entries."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def draw_yoso_hyperplanes(rng, num_hashes, tau, head_dim, *, lead_shape=(), family="gaussian") -> np.ndarray:
    """Draw the hyperplanes ``R`` of ``num_hashes`` hashes of ``tau`` bits each.

    Draws are *hash-major*: the first ``m'`` hashes of a draw equal an
    ``m'``-hash draw from the same seed, so a budget sweep nests.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
    num_hashes : int
        ``m >= 1``.
    tau : int
        Bits per hash, ``0 <= tau <= 20``.
    head_dim : int
        ``D``, the feature size of q and k.
    lead_shape : tuple of int, default=()
        Independent hashes for every leading index (batch, head).
    family : {"gaussian", "hadamard"}, default="gaussian"
        ``"gaussian"``: IID N(0, 1) entries, so the collision law
        ``(1 - theta/pi)^tau`` holds exactly. ``"hadamard"``: rows of
        ``H D3 H D2 H D1`` (``Pd x Pd``, ``Pd`` the smallest power of two
        ``>= max(D, tau)``, ``H`` unnormalised Sylvester, ``Di`` random +-1
        diagonals), ``floor(Pd / tau)`` hashes per rotation from consecutive
        ``tau``-row groups, truncated to ``D`` columns; collisions run 5-20%
        below the law.

    Returns
    -------
    ndarray of shape (*lead_shape, num_hashes, tau, head_dim), float64
    """
    m = check_int("num_hashes", num_hashes, minimum=1)
    tau = check_int("tau", tau, minimum=0, maximum=MAX_TAU)
    D = check_int("head_dim", head_dim, minimum=1)
    check_choice("family", family, HASH_FAMILIES)
    lead = tuple(int(n) for n in lead_shape)
    gen = as_generator(rng)
    if tau == 0:
        return np.zeros((*lead, m, 0, D))
    if family == "gaussian":
        planes = gen.standard_normal((m, *lead, tau, D))                     # (m, *lead, tau, D) hash-major
        return np.ascontiguousarray(np.moveaxis(planes, 0, -3))              # (*lead, m, tau, D)
    Pd = 1 << max(D - 1, tau - 1, 0).bit_length()                            # smallest power of two >= max(D, tau)
    H = _sylvester(Pd)                                                       # (Pd, Pd)
    per_rotation = Pd // tau
    rotations = []
    for _ in range(-(-m // per_rotation)):                                   # one rotation after the other
        M = np.broadcast_to(np.eye(Pd), (*lead, Pd, Pd))                     # (*lead, Pd, Pd)
        for _ in range(3):
            signs = random_signs(gen, (*lead, Pd))                           # (*lead, Pd)
            M = H @ (signs[..., :, None] * M)                                # (*lead, Pd, Pd): M <- H D M
        groups = M[..., : per_rotation * tau, :D]                            # (*lead, per_rot * tau, D)
        rotations.append(groups.reshape(*lead, per_rotation, tau, D))        # (*lead, per_rot, tau, D)
    return np.ascontiguousarray(np.concatenate(rotations, axis=-3)[..., :m, :, :])


def collision_probability(q, k, tau, *, damping=1.0) -> np.ndarray:
    """YOSO-E weights ``P_ij = (1 - arccos(clip(c q^.k^, -1, 1)) / pi)^tau``, without a mask.

    ``q^ = q / max(|q|, 1e-12)`` and likewise ``k^``. With ``c = 1`` this is
    the probability that ``q_i`` and ``k_j`` share all ``tau`` sign bits of a
    Gaussian hash.

    Parameters
    ----------
    q : ndarray of shape (..., Nq, D)
    k : ndarray of shape (..., Nk, D)
    tau : int
    damping : float, default=1.0
        ``c`` in ``(0, 1]``.

    Returns
    -------
    ndarray of shape (..., Nq, Nk), in ``[0, 1]``
    """
    q_unit, _ = unit_rows(np.asarray(q))                                    # (..., Nq, D)
    k_unit, _ = unit_rows(np.asarray(k))                                    # (..., Nk, D)
    x = q_unit @ np.swapaxes(k_unit, -1, -2)                                 # (..., Nq, Nk)
    z = np.clip(damping * x, -1.0, 1.0)                                      # (..., Nq, Nk)
    return (1.0 - np.arccos(z) / np.pi) ** tau                               # (..., Nq, Nk)


def empirical_collision_matrix(q_codes, k_codes, mask=None) -> np.ndarray:
    """``C_ij = mu_j (1/m) sum_h [c_h(q_i) = c_h(k_j)]``: the sampled variant's weights.

    Parameters
    ----------
    q_codes : int ndarray of shape (..., Nq, m)
    k_codes : int ndarray of shape (..., Nk, m)
    mask : bool ndarray of shape (..., Nk), optional

    Returns
    -------
    float64 ndarray of shape (..., Nq, Nk)
    """
    q_codes, k_codes = np.asarray(q_codes), np.asarray(k_codes)
    same = q_codes[..., :, None, :] == k_codes[..., None, :, :]              # (..., Nq, Nk, m)
    C = same.mean(axis=-1)                                                   # (..., Nq, Nk)
    if mask is not None:
        C = np.where(np.asarray(mask)[..., None, :], C, 0.0)                 # (..., Nq, Nk)
    return C


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, variant="sampled",
          num_hashes=DEFAULT_NUM_HASHES, tau=None, grad="surrogate", pairs=None, **params) -> int:
    """FLOPs of YOSO (docs: methods/yoso, "Complexity"), per the spec's table.

    - YOSO-E forward: ``Nq Nk (2D + 2Dv + 5) + 3 (Nq + Nk) D + 3 Nq Dv``.
    - Sampled forward: ``(Nq + Nk)(2 m tau D + m tau + m Dv) + 4 Nq Dv``
      (hashing, bit packing, scatter and gather, output normalisation).
    - YOSO-E backward (also the sampled ``grad="expectation_surrogate"``):
      ``Nq Nk (6D + 4Dv + 7)``, plus ``4 Nq Nk`` for ``grad="exact"``.
    - Sampled backward: ``m (Nq + Nk) Dv`` for ``dv`` plus, for ``dq`` and
      ``dk``, ``min(2 Pi (Dv + 2D), 4 m (Nq + Nk) D Dv)`` with ``Pi`` the
      colliding pairs: the pair form, capped by the outer-product form.
      ``Pi`` defaults to ``m Nq Nk 2**-tau`` (codes spread evenly); pass
      ``pairs`` for a real count. The Numba backend picks the cheaper form
      per bucket, which ``info["flops_with_backward"]`` counts exactly.

    ``tau=None`` means :func:`default_tau` of ``Nk``; ``backward=True``
    counts forward plus backward. YOSO has no causal form.
    """
    if masks.causal_offset(causal, Nq, Nk) is not None:
        raise NotSupportedError("yoso defines no causal form, so it has no causal FLOP count")
    Dv = D if Dv is None else Dv
    tau = default_tau(Nk) if tau is None else tau
    m = num_hashes
    if variant == "expectation":
        total = Nq * Nk * (2 * D + 2 * Dv + 5) + 3 * (Nq + Nk) * D + 3 * Nq * Dv
    else:
        total = (Nq + Nk) * (2 * m * tau * D + m * tau + m * Dv) + 4 * Nq * Dv
    if backward:
        if variant == "expectation" or grad == "expectation_surrogate":
            total += Nq * Nk * (6 * D + 4 * Dv + 7) + (4 * Nq * Nk if grad == "exact" else 0)
        else:
            Pi = m * Nq * Nk / 2.0**tau if pairs is None else pairs
            total += m * (Nq + Nk) * Dv + min(2 * Pi * (Dv + 2 * D), 4 * m * (Nq + Nk) * D * Dv)
    return int(round(batch * total))


def _bucket_form_flops(I, J, D, Dv):
    """The backward's ``d q^, d k^`` cost of buckets with ``I`` queries and ``J`` keys."""
    return np.minimum(2 * I * J * (Dv + 2 * D), 4 * (I + J) * D * Dv)


# --------------------------------------------------------------------------------------
# Parameters and draws
# --------------------------------------------------------------------------------------


def _host(a, name) -> np.ndarray:
    """``a`` as a host NumPy array (NumPy, CuPy, torch, JAX or a nested list)."""
    try:
        arr, _, device = interop.to_kernel_array(a, name)
    except TypeError:                                                          # not an array: a list, say
        return np.asarray(a)
    return arr.get() if device == "gpu" else arr


def _given_hyperplanes(problem, hyperplanes, num_hashes, tau):
    R = _host(hyperplanes, "hyperplanes")
    if R.dtype.kind != "f":
        raise TypeError(f"hyperplanes must be a floating array, got dtype {R.dtype}")
    check_array_shape("hyperplanes", R, (None, None, problem.D), " (m, tau, D) or (..., m, tau, D)")
    if R.ndim - 3 > len(problem.batch_shape):
        raise ValueError(f"hyperplanes has shape {R.shape}, more leading axes than the inputs' {problem.batch_shape}")
    m, t = R.shape[-3:-1]
    if m < 1:
        raise ValueError(f"hyperplanes must hold at least one hash, got shape {R.shape}")
    for name, given, actual in (("num_hashes", num_hashes, m), ("tau", tau, t)):
        if given is not None and given != actual:
            raise ValueError(f"{name}={given} disagrees with hyperplanes of shape {R.shape} ({name} = {actual})")
    check_int("tau", t, minimum=0, maximum=MAX_TAU)
    if not np.isfinite(R).all():
        raise ValueError("hyperplanes contains NaN or inf")
    R = R.astype(np.float64)
    flat = R[None] if R.ndim == 3 else flatten_leading("hyperplanes", R, problem, R.shape[-3:])
    return m, t, R, flat                                                     # flat: (1 or G, m, tau, D)


def _given_codes(problem, codes, num_hashes, tau):
    if not (isinstance(codes, (tuple, list)) and len(codes) == 2):
        raise TypeError("codes must be a pair (q_codes, k_codes) of integer arrays")
    if tau is None:
        raise ValueError("codes= needs an explicit tau (the codes' bit width)")
    arrays = []
    for name, c, n in (("q_codes", codes[0], problem.Nq), ("k_codes", codes[1], problem.Nk)):
        c = _host(c, name)
        if c.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an integer array, got dtype {c.dtype}")
        check_array_shape(name, c, (n, None), f" (..., {'Nq' if name == 'q_codes' else 'Nk'}, m)")
        if c.size and (c.min() < 0 or c.max() >= 2**tau):
            raise ValueError(f"{name} must lie in [0, 2**tau) = [0, {2**tau}) for tau={tau}, "
                             f"got values in [{c.min()}, {c.max()}]")
        arrays.append(c)
    m = arrays[0].shape[-1]
    if arrays[1].shape[-1] != m or m < 1:
        raise ValueError(f"q_codes and k_codes must have the same number m >= 1 of hashes, got shapes "
                         f"{arrays[0].shape} and {arrays[1].shape}")
    if num_hashes is not None and num_hashes != m:
        raise ValueError(f"num_hashes={num_hashes} disagrees with codes of {m} hashes")
    q_codes = flatten_leading("q_codes", arrays[0].astype(np.int32), problem, (problem.Nq, m))
    k_codes = flatten_leading("k_codes", arrays[1].astype(np.int32), problem, (problem.Nk, m))
    return m, q_codes, k_codes


def resolve(problem, *, variant="sampled", num_hashes=None, tau=None, damping=1.0, hash_family=None,
            hash_dtype=None, hyperplanes=None, codes=None, normalize_output=True, grad="surrogate") -> dict:
    """Check YOSO's parameters and fill in the defaults (see :func:`yoso_attention`).

    Raises ``NotSupportedError`` for options YOSO does not define (causal,
    a score scale, damping or ``grad="exact"`` with the sampled variant) and
    ``ValueError`` for bad values or conflicting arguments.
    """
    if problem.causal:
        raise NotSupportedError(
            "yoso defines no causal form: the paper's model is encoder-only and every bucket table sums "
            "all keys (a prefix-table extension is unpublished); use causal=False"
        )
    if problem.scale != 1.0 / math.sqrt(problem.D):
        raise NotSupportedError(
            f"yoso takes no score scale (got scale={problem.scale:g}): its kernel is angular and tau plays "
            "the temperature; leave scale=None"
        )
    variant = check_choice("variant", variant, VARIANTS)
    grad = check_choice("grad", grad, GRADS)
    normalize_output = check_bool("normalize_output", normalize_output)
    damping = check_float("damping", damping, minimum=0.0, maximum=1.0, open_min=True)
    num_hashes = check_int("num_hashes", num_hashes, minimum=1, allow_none=True)
    if tau is not None:
        tau = check_int("tau", tau, minimum=0)
        if tau > MAX_TAU:
            limit = f"at most {MAX_CODE_BITS} bits fit an int32 code" if tau > MAX_CODE_BITS else \
                f"a table of 2**{tau} rows per hash is too large"
            raise ValueError(f"tau={tau} is too large; it must be at most {MAX_TAU} ({limit})")

    sampled_only = {"num_hashes": num_hashes, "hash_family": hash_family, "hash_dtype": hash_dtype,
                    "hyperplanes": hyperplanes, "codes": codes}
    if variant == "expectation":
        given = [name for name, value in sampled_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to variant='sampled'; YOSO-E computes P exactly")
        if grad == "expectation_surrogate":
            raise ValueError("grad='expectation_surrogate' is for variant='sampled'; for YOSO-E use 'surrogate'")
        return {"variant": variant, "tau": default_tau(problem.Nk) if tau is None else tau, "damping": damping,
                "normalize_output": normalize_output, "grad": grad}

    if damping != 1.0:
        raise NotSupportedError(
            f"variant='sampled' needs damping=1 (got {damping}): the sampler's expectation is P with c = 1; "
            "damping applies to variant='expectation'"
        )
    if grad == "exact":
        raise NotSupportedError(
            "grad='exact' is not defined for variant='sampled': its output is piecewise constant in q and k "
            "(true gradient 0 almost everywhere); use 'surrogate' or 'expectation_surrogate'"
        )
    if hash_family is not None:
        check_choice("hash_family", hash_family, HASH_FAMILIES)
    if hash_dtype is not None:
        check_choice("hash_dtype", hash_dtype, HASH_DTYPES)
    R_given = q_codes = k_codes = R_flat = None
    if codes is not None:
        if hyperplanes is not None:
            raise ValueError("codes= replays hashing; it cannot be combined with hyperplanes=")
        for name in ("hash_family", "hash_dtype"):
            if sampled_only[name] is not None:
                raise ValueError(f"{name} has no effect with codes= (the codes are given); drop it")
        num_hashes, q_codes, k_codes = _given_codes(problem, codes, num_hashes, tau)
    elif hyperplanes is not None:
        if hash_family is not None:
            raise ValueError("hash_family has no effect with hyperplanes= (the hyperplanes are given); drop it")
        num_hashes, tau, R_given, R_flat = _given_hyperplanes(problem, hyperplanes, num_hashes, tau)
    else:
        hash_family = hash_family or "gaussian"
    given_hashing = codes is not None
    if num_hashes is not None:  # hyperplanes (G, m, tau, D) and codes (G, m, Nq + Nk)
        check_memory("num_hashes", num_hashes,
                     (problem.G, num_hashes, problem.Nq + problem.Nk + (tau or 1) * problem.D),
                     device=problem.device, what="the hyperplanes and codes")
    params = {
        "variant": variant,
        "num_hashes": DEFAULT_NUM_HASHES if num_hashes is None else num_hashes,
        "tau": default_tau(problem.Nk) if tau is None else tau,
        "damping": damping,
        "hash_family": hash_family,
        "hash_dtype": None if given_hashing else (hash_dtype or "float64"),
        "normalize_output": normalize_output,
        "grad": grad,
    }
    if R_flat is not None:     # arrays only when given: the drawn hyperplanes come from draw()
        params.update(hyperplanes=R_flat, given_hyperplanes=R_given)
    if q_codes is not None:
        params.update(q_codes=q_codes, k_codes=k_codes)
    return params


def draw(rng, problem, params) -> dict:
    """The sampled variant's hyperplanes, drawn on the host, one set per (batch, head) slice.

    Returns ``{"hyperplanes": (G, m, tau, D) float64}``, or nothing when the
    caller gave ``hyperplanes`` or ``codes`` (then ``rng`` must be None) or
    for YOSO-E (``rng`` unused).
    """
    if params["variant"] == "expectation":
        return {}
    if "hyperplanes" in params or "q_codes" in params:
        if rng is not None:
            given = "hyperplanes" if "hyperplanes" in params else "codes"
            raise ValueError(f"{given}= fixes the hashes; it cannot be combined with rng= (pass rng=None)")
        return {}
    R = draw_yoso_hyperplanes(rng, params["num_hashes"], params["tau"], problem.D,
                              lead_shape=problem.batch_shape, family=params["hash_family"])
    return {"hyperplanes": R.reshape(problem.G, *R.shape[-3:])}               # (G, m, tau, D)


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


def bucket_sizes(q_codes, k_codes, mask, tau, xp=np):
    """Bucket statistics of the codes, by sorting: ``O(G m (Nq + Nk) log)``.

    Parameters
    ----------
    q_codes : int array of shape (G, Nq, m)
    k_codes : int array of shape (G, Nk, m)
    mask : bool array of shape (G, Nk), or None
    tau : int

    Returns
    -------
    I, J : int64 arrays of shape (B,)
        Queries and kept keys of each of the ``B`` (slice, hash, bucket)
        triples that hold at least one query.
    key_buckets : int64 array of shape (G, m)
        Non-empty kept-key buckets per hash.
    max_bucket : int
        Kept keys in the fullest bucket.
    """
    G, Nk, m = k_codes.shape
    rows = 1 << tau
    base = (xp.arange(G, dtype=np.int64)[:, None, None] * m + xp.arange(m, dtype=np.int64)) * rows  # (G, 1, m)
    q_keys = (base + q_codes).ravel()                                                # (G Nq m,)
    k_keys = base + k_codes                                                          # (G, Nk, m)
    if mask is not None:
        k_keys = xp.where(mask[..., None], k_keys, -1)                               # masked keys: no bucket
    k_keys = xp.sort(k_keys.ravel())                                                 # (G Nk m,)
    k_keys = k_keys[int((k_keys < 0).sum()):]                                        # kept keys only
    q_buckets, I = xp.unique(q_keys, return_counts=True)                             # (B,), (B,)
    J = xp.searchsorted(k_keys, q_buckets, side="right") - xp.searchsorted(k_keys, q_buckets, side="left")
    k_buckets, k_counts = xp.unique(k_keys, return_counts=True)                      # non-empty key buckets
    key_buckets = xp.bincount(k_buckets // rows, minlength=G * m).reshape(G, m)      # (G, m)
    max_bucket = int(k_counts.max()) if k_counts.size else 0
    return I.astype(np.int64), J.astype(np.int64), key_buckets.astype(np.int64), max_bucket


def info(problem, params, res) -> dict:
    """YOSO diagnostics: row mass, output norms, empty rows and, sampled, bucket statistics."""
    xp = problem.xp
    G, Nq, Nk, D, Dv = problem.G, problem.Nq, problem.Nk, problem.D, problem.Dv
    row_mass = res["row_mass"]                                                       # (G, Nq)
    kept = xp.full((G, 1), Nk) if problem.mask is None else problem.mask.sum(axis=-1)[:, None]  # (G, 1)
    out = {
        "row_mass": problem.unflatten(row_mass),
        "collision_rate": float((row_mass / xp.maximum(kept, 1)).mean()),
        "out_norm": problem.unflatten(res["u_norm"]),
        "empty_row_fraction": float(res["empty_rows"].mean()),
    }
    if params["variant"] == "expectation":
        return out
    tau, m, grad = params["tau"], params["num_hashes"], params["grad"]
    I, J, key_buckets, max_bucket = bucket_sizes(res["q_codes"], res["k_codes"], problem.mask, tau, xp)
    occupied = key_buckets > 0                                                       # (G, m)
    occupancy = xp.where(occupied, kept / xp.maximum(key_buckets, 1), 0.0)           # (G, m) keys per bucket
    forward_flops = flops(Nq, Nk, D, Dv, batch=G, variant="sampled", num_hashes=m, tau=tau)
    if grad == "expectation_surrogate":
        backward_flops = (flops(Nq, Nk, D, Dv, batch=G, variant="expectation", backward=True)
                          - flops(Nq, Nk, D, Dv, batch=G, variant="expectation"))
    else:
        backward_flops = G * m * (Nq + Nk) * Dv + int(_bucket_form_flops(I, J, D, Dv).sum())
    R = params.get("given_hyperplanes")
    if R is None and res.get("hyperplanes") is not None:
        R = res["hyperplanes"].reshape(*problem.batch_shape, *res["hyperplanes"].shape[-3:])
    out.update({
        "q_codes": problem.unflatten(res["q_codes"]),
        "k_codes": problem.unflatten(res["k_codes"]),
        "hyperplanes": R,
        "table_rows": 1 << tau,
        "max_bucket": max_bucket,
        "occupied_buckets": problem.unflatten(key_buckets),
        "mean_bucket_occupancy": float(occupancy.sum() / max(int(occupied.sum()), 1)),
        "pairs": int((I * J).sum()),
        "flops_with_backward": int(forward_flops + backward_flops),
    })
    return out


METHOD = Method(
    name="yoso",
    summary="Bernoulli-sampled LSH attention: angular collision weights, linear cost (YOSO)",
    resolve=resolve,
    flops=flops,
    draw=draw,
    info=info,
    impls=(
        Impl("numpy", "eff_attn.methods.yoso.reference", supports_causal=False),
        Impl("numba", "eff_attn.methods.yoso.numba", supports_causal=False),
        Impl("cupy", "eff_attn.methods.yoso.cupy", supports_causal=False),
    ),
    budgets=({"num_hashes": 8}, {"num_hashes": 16}, {"num_hashes": 32}, {"num_hashes": 64}),
    budget_name="num_hashes",
    # normalize_output divides each output row by its norm: the output no longer scales with v.
    value_degree=lambda params: 0 if params["normalize_output"] else 1,
    # eff_attn.dist: hyperplanes (drawn or given) and given codes are per slice (a length-1 axis is
    # shared); a query's output needs only its own codes and every key's table, so queries may split.
    sharding=Sharding(
        split={"hyperplanes": ("slice",), "q_codes": ("slice", "query"), "k_codes": ("slice",)},
        shared=("given_hyperplanes",),
        reads_data=False,
        queries=True,
    ),
)


def yoso_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None, return_info=False,
                   variant="sampled", num_hashes=None, tau=None, damping=1.0, hash_family=None, hash_dtype=None,
                   hyperplanes=None, codes=None, normalize_output=True, grad="surrogate"):
    """YOSO attention: values weighted by LSH collision, rows l2-normalised.

    With ``q^ = q / |q|``, ``k^ = k / |k|`` and ``theta_ij`` the angle
    between ``q_i`` and ``k_j``, YOSO-E computes
    ``u = P v`` with ``P_ij = mu_j (1 - arccos(clip(c q^_i . k^_j, -1, 1)) / pi)^tau``,
    the probability that ``q_i`` and ``k_j`` share a ``tau``-bit
    sign-random-projection bucket. The sampled variant (YOSO-m) estimates it
    without bias with ``m`` hashes: ``u_i = (1/m) sum_h T_h[c_h(q_i)]``, where
    the table ``T_h`` holds, per bucket, the sum of the values of the kept
    keys hashed there. The output is ``y_i = u_i / max(|u_i|, 1e-12)``
    (``normalize_output=True``), so a row that collides with no key is 0.

    Time: sampled ``O(m (Nq + Nk)(tau D + Dv))``, memory ``O(m (Nq + Nk) +
    2**tau Dv)`` per worker; YOSO-E ``O(Nq Nk (D + Dv))`` time, linear memory
    on Numba and CuPy.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended). Masked keys never enter a
        table and may hold NaN or inf. Queries are never masked.
    causal : False
        YOSO defines no causal form; ``causal=True`` raises
        :class:`~eff_attn.NotSupportedError`.
    scale : None
        YOSO's kernel is angular and ``tau`` plays the temperature; any
        other value raises :class:`~eff_attn.NotSupportedError`.
    rng : None, int or numpy.random.Generator
        The hyperplanes' randomness. ``None`` draws fresh hashes on every
        call (so the output changes from call to call); an int or a
        Generator makes the call reproducible. Unused by YOSO-E. Cannot be
        combined with ``hyperplanes`` or ``codes``.
    return_info : bool, default=False
    variant : {"sampled", "expectation"}, default="sampled"
        ``"sampled"`` is YOSO-m, linear; ``"expectation"`` is YOSO-E, the
        exact ``P v`` in ``O(Nq Nk)``.
    num_hashes : int, optional
        ``m >= 1``, the number of hashes (sampled only); default 32.
    tau : int, optional
        Bits per hash, ``0 <= tau <= 20``, the inverse temperature. Default
        ``clip(ceil(log2 Nk), 1, 16)``; pass the value a model was trained
        with. ``tau = 0`` gives ``P = 1``: the normalised sum of the kept values.
    damping : float, default=1.0
        ``c`` in ``(0, 1]`` (YOSO-E only); 0.98 keeps ``arccos`` off its
        infinite slope, but then ``P < 1`` for identical vectors.
    hash_family : {"gaussian", "hadamard"}, optional
        Sampled only; default ``"gaussian"`` (the collision law is exact).
        ``"hadamard"`` uses ``H D3 H D2 H D1`` rotations (collisions 5-20%
        below the law).
    hash_dtype : {"float64", "input"}, optional
        Sampled only; precision of the projections, default ``"float64"``
        (codes agree bit for bit across backends). ``"input"`` may flip
        near-ties.
    hyperplanes : array of shape (m, tau, D) or (..., m, tau, D), optional
        Sampled only; fixed hyperplanes, shared by all slices or broadcast
        over the leading axes.
    codes : tuple (q_codes, k_codes), optional
        Sampled only; int arrays of shapes (..., Nq, m) and (..., Nk, m) with
        values in ``[0, 2**tau)``: replays hashing. Needs ``tau``.
    normalize_output : bool, default=True
        Return ``y = u / |u|`` (the paper's layer) or the unbiased ``u``.
    grad : {"surrogate", "exact", "expectation_surrogate"}, default="surrogate"
        Gradient of :func:`eff_attn.attention_vjp` for q and k (``dv`` is
        always the true ``A^T du``). ``"surrogate"`` is the paper's backward:
        ``dx = (du v^T) * (c tau / 2) A`` with ``A = P`` or ``C`` and
        ``x = q^ k^T``; it under-estimates the true ``dA/dx`` by the factor
        ``(pi - theta) sin(theta) / 2 <= 0.91``. ``"exact"`` (YOSO-E only) is
        the true derivative, with ``|c x|`` capped at ``1 - 1e-6``.
        ``"expectation_surrogate"`` (sampled only) uses ``A = P`` in
        ``O(Nq Nk)``.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
        ``y``, or ``u`` with ``normalize_output=False``. Rows with no
        collision (or no kept key) are 0.
    info : dict, only if ``return_info``
        Base keys (``empty_rows`` marks ``u_i = 0``) plus ``row_mass``
        (..., Nq) (row sums of ``A``: how many keys collide),
        ``collision_rate`` (mean of ``row_mass`` over the kept keys),
        ``out_norm`` (``|u_i|``) and ``empty_row_fraction``. Sampled adds
        ``q_codes`` (..., Nq, m), ``k_codes`` (..., Nk, m), ``hyperplanes``,
        ``table_rows`` (``2**tau``), ``max_bucket``, ``occupied_buckets``
        (..., m), ``mean_bucket_occupancy`` (kept keys per non-empty bucket),
        ``pairs`` (colliding (query, key, hash) triples, which set the
        backward's cost) and ``flops_with_backward`` (from the real buckets).
    """
    if scale is not None:
        raise NotSupportedError(
            f"yoso takes no score scale (got scale={scale}): its kernel is angular and tau plays the "
            "temperature; leave scale=None"
        )
    from ...api import attention

    return attention(q, k, v, method="yoso", backend=backend, mask=mask, causal=causal, scale=None, rng=rng,
                     return_info=return_info, variant=variant, num_hashes=num_hashes, tau=tau, damping=damping,
                     hash_family=hash_family, hash_dtype=hash_dtype, hyperplanes=hyperplanes, codes=codes,
                     normalize_output=normalize_output, grad=grad)
