"""``kdeformer``: LSH-sorted exact diagonal blocks plus importance-sampled keys.

Zandieh, Han, Daliri & Karbasi, "KDEformer: Accelerating Transformers via
Kernel Density Estimation", ICML 2023 (arXiv 2302.02451), the practical
algorithm of its section 2.2: one shared-hyperplane angular hash per slice,
queries and keys sorted by bucket, exact softmax inside diagonal blocks of
the sorted order, and ``m`` keys drawn with probability ``p_j`` and weight
``1 / (m p_j)`` for everything outside the blocks. A ones column on ``v``
estimates the softmax normaliser with the same samples.

Inference only: the estimator has no certified gradient (see
``docs/methods/kdeformer.md``), so every backend declares
``differentiable=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._array import to_host
from ..._validate import check_choice, check_int, check_memory, flatten_leading
from ...random import as_generator
from ...registry import Impl, Method, NotSupportedError, Sharding
from ._common import (
    ORDERS,
    PROBS,
    block_bounds,
    block_pair_count,
    gray_code,
    gray_rank,
    inverse_cdf_sample,
    kdeformer_blocks,
    kdeformer_codes,
    sampling_probabilities,
    slice_flops,
)

__all__ = [
    "kdeformer_attention",
    "flops",
    "resolve",
    "draw",
    "info",
    "METHOD",
    "KDEformerDraw",
    "draw_kdeformer_randomness",
    "kdeformer_codes",
    "gray_rank",
    "gray_code",
    "kdeformer_blocks",
    "block_pair_count",
    "sampling_probabilities",
    "inverse_cdf_sample",
    "DEFAULT_NUM_BITS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_NUM_SAMPLES",
]

#: Hyperplanes per hash, the authors' value.
DEFAULT_NUM_BITS = 7
#: Keys per exact diagonal block, the authors' BigGAN setting.
DEFAULT_BLOCK_SIZE = 64
#: Shared importance samples per slice, the authors' BigGAN setting.
DEFAULT_NUM_SAMPLES = 128

_NO_BACKWARD = "inference-time approximation; no certified gradient of the sampled estimator"


@dataclass(frozen=True)
class KDEformerDraw:
    """The host-side randomness of one call.

    Attributes
    ----------
    hyperplanes : float64 ndarray of shape (*lead, r, D)
        Standard normal rows ``g_t`` of the angular hash.
    uniforms : float64 ndarray of shape (*lead, m)
        ``u_l`` in ``[0, 1)`` of the inverse-CDF draws.
    """

    hyperplanes: np.ndarray
    uniforms: np.ndarray


def _draw(gen, lead, head_dim, num_bits, num_samples, *, planes=True, uniforms=True):
    """Hyperplanes, then uniforms, from one Generator (each only if asked)."""
    h = gen.standard_normal((*lead, num_bits, head_dim)) if planes else None
    u = gen.random((*lead, num_samples)) if uniforms else None
    return h, u


def draw_kdeformer_randomness(rng, lead_shape, head_dim, *, num_bits=DEFAULT_NUM_BITS,
                              num_samples=DEFAULT_NUM_SAMPLES) -> KDEformerDraw:
    """Draw the hyperplanes and uniforms of one call, in the method's order.

    ``as_generator(rng).standard_normal((*lead, r, D))``, then
    ``.random((*lead, m))``. Neither depends on the sequence lengths.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator
    lead_shape : tuple of int
        The broadcast leading (batch, head) axes of q, k, v and mask.
    head_dim : int
        ``D``.
    num_bits, num_samples : int

    Returns
    -------
    KDEformerDraw
    """
    h, u = _draw(as_generator(rng), tuple(lead_shape), head_dim, num_bits, num_samples)
    return KDEformerDraw(hyperplanes=h, uniforms=u)


def _flat_lead(name, a, problem, tail_names, tail):
    """Broadcast ``a`` (``(*lead, *tail)`` or ``tail``) to the batch shape; return ``(G, *tail)``."""
    a = to_host(a)
    ndim = len(tail)
    if a.ndim < ndim or tuple(a.shape[a.ndim - ndim:]) != tuple(tail):
        want = "(..., " + ", ".join(tail_names) + ") = (..., " + ", ".join(map(str, tail)) + ")"
        raise ValueError(f"{name} must have shape {want}, got shape {a.shape}")
    return flatten_leading(name, a, problem, tail)


def _integer_array(name, a):
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a.astype(np.int64)


def resolve(problem, *, num_bits=DEFAULT_NUM_BITS, block_size=DEFAULT_BLOCK_SIZE,
            num_samples=DEFAULT_NUM_SAMPLES, order="gray", probs="columns", hyperplanes=None,
            codes=None, sample_idx=None) -> dict:
    """Check the parameters and flatten injected arrays to the slices ``(G, ...)``."""
    r = check_int("num_bits", num_bits, minimum=0, maximum=30)
    b = check_int("block_size", block_size, minimum=1)
    m = check_int("num_samples", num_samples, minimum=0)
    check_memory("num_samples", m, (problem.G, m, 2 + problem.D + problem.Dv), device=problem.device,
                 what="the sampled keys and values")
    params = {
        "num_bits": r,
        "block_size": b,
        "num_samples": m,
        "order": check_choice("order", order, ORDERS),
        "probs": check_choice("probs", probs, PROBS),
        "hyperplanes": None,
        "q_codes": None,
        "k_codes": None,
        "sample_idx": None,
    }
    if hyperplanes is not None and codes is not None:
        raise ValueError("pass either hyperplanes= or codes=, not both: codes are what the hyperplanes would give")
    if hyperplanes is not None:
        h = _flat_lead("hyperplanes", hyperplanes, problem, ("r", "D"), (r, problem.D)).astype(np.float64)
        if not np.isfinite(h).all():
            raise ValueError("hyperplanes contain NaN or inf")
        params["hyperplanes"] = h
    if codes is not None:
        if not isinstance(codes, (tuple, list)) or len(codes) != 2:
            raise ValueError("codes must be a pair (q_codes of shape (..., Nq), k_codes of shape (..., Nk))")
        qc = _integer_array("q_codes", _flat_lead("q_codes", codes[0], problem, ("Nq",), (problem.Nq,)))
        kc = _integer_array("k_codes", _flat_lead("k_codes", codes[1], problem, ("Nk",), (problem.Nk,)))
        for name, c in (("q_codes", qc), ("k_codes", kc)):
            if c.size and (c.min() < 0 or c.max() >= 1 << r):
                raise ValueError(f"{name} must lie in [0, 2**num_bits) = [0, {1 << r}), got values in "
                                 f"[{c.min()}, {c.max()}]")
        params["q_codes"], params["k_codes"] = qc, kc
    if sample_idx is not None:
        idx = _integer_array("sample_idx", _flat_lead("sample_idx", sample_idx, problem, ("m",), (m,)))
        keep = np.ones((problem.G, problem.Nk), dtype=bool) if problem.mask is None else to_host(problem.mask)
        inside = (idx >= 0) & (idx < problem.Nk)
        if not inside.all() or not np.take_along_axis(keep, np.where(inside, idx, 0), axis=-1).all():
            raise ValueError(f"sample_idx must index kept keys in [0, Nk={problem.Nk}); it holds an index "
                             "outside that range or a masked key")
        params["sample_idx"] = idx
    return params


def draw(rng, problem, params) -> dict:
    """Draw what was not injected: hyperplanes (unless given or codes given), then uniforms."""
    r, m = params["num_bits"], params["num_samples"]
    need_planes = params["hyperplanes"] is None and params["q_codes"] is None
    need_uniforms = params["sample_idx"] is None and m > 0
    injected = not need_planes or params["sample_idx"] is not None
    if rng is not None and injected and not (need_planes or need_uniforms):
        raise ValueError(
            "rng was given but there is nothing left to draw: the hashing (hyperplanes= or codes=) and the "
            "samples (sample_idx= or num_samples=0) are all fixed; pass rng=None"
        )
    h, u = _draw(as_generator(rng), problem.batch_shape, problem.D, r, m,
                 planes=need_planes, uniforms=need_uniforms)
    planes = params["hyperplanes"] if h is None else h.reshape(problem.G, r, problem.D)
    return {"hyperplanes": planes, "uniforms": None if u is None else u.reshape(problem.G, m)}


def flops(Nq, Nk, D, Dv=None, *, batch=1, causal=False, backward=False, num_bits=DEFAULT_NUM_BITS,
          block_size=DEFAULT_BLOCK_SIZE, num_samples=DEFAULT_NUM_SAMPLES, probs="columns", n_kept=None,
          **params) -> int:
    """FLOPs of KDEformer (docs: methods/kdeformer, "Complexity").

    Per slice, with ``P_blk = sum_u |Q_u| |K_u|`` (about ``Nq b``, counted
    exactly) and ``r = num_bits``, ``m = num_samples``::

        2 r D (Nq + Nk) + F_p + Nk + 2m + P_blk (2D + 2Dv + 5)
            + Nq m (2D + 2Dv + 6) + Nq (4 Dv + 8)

    ``F_p`` is ``s Nk (2D + 7) + Nk (2Dv + 6)`` for ``"columns"`` (``s = min(Nq, 16)``
    pilot rows), ``Nk (2Dv + 3)`` for ``"mixture"``, 0 for ``"uniform"`` and
    ``2Nk(Dv+1)^2 + 2Nk(Dv+1) + 3Nk + 4/3 (Dv+1)^3`` for ``"official"``.
    ``n_kept`` (default ``Nk``) is the number of unmasked keys.

    Raises
    ------
    NotSupportedError
        For ``causal`` or ``backward``: KDEformer has neither.
    """
    if causal:
        raise NotSupportedError("kdeformer has no causal form: hash sorting and shared samples ignore position")
    if backward:
        raise NotSupportedError(f"kdeformer has no backward pass ({_NO_BACKWARD})")
    Dv = D if Dv is None else Dv
    n = Nk if n_kept is None else n_kept
    return int(batch * slice_flops(Nq, Nk, D, Dv, n_kept=n, num_bits=num_bits, block_size=block_size,
                                   num_samples=num_samples, probs=probs))


def _block_sizes(plan, xp):
    """``|B_i|``: the size of each query's key block, 0 in slices without kept keys, shape (G, Nq)."""
    n, nb = plan.n_kept[:, None], xp.maximum(plan.n_blocks, 1)[:, None]        # (G, 1)
    alpha = xp.maximum(plan.q_block, 0)                                        # (G, Nq)
    size = block_bounds(alpha + 1, n, nb) - block_bounds(alpha, n, nb)          # (G, Nq)
    return xp.where(plan.q_block >= 0, size, 0)


def info(problem, params, res) -> dict:
    """The spec's diagnostics (section 3, "Info"), with the user's leading shape."""
    plan = res["plan"]
    xp = problem.xp
    un = problem.unflatten
    m = params["num_samples"]
    used = res["samples_used"]                                                 # (G, Nq)
    block_sizes = _block_sizes(plan, xp)                                       # (G, Nq)
    return {
        "hyperplanes": None if plan.hyperplanes is None else un(plan.hyperplanes),
        "uniforms": None if plan.uniforms is None else un(plan.uniforms),
        "q_codes": un(plan.q_codes),
        "k_codes": un(plan.k_codes),
        "q_block": un(plan.q_block),
        "k_block": un(plan.k_block),
        "n_blocks": un(plan.n_blocks[:, None])[..., 0],
        "probs": un(plan.p),
        "sample_idx": un(plan.sample_idx),
        "sample_weight": un(plan.sample_weight),
        "samples_used": un(used),
        "block_mass_fraction": un(res["block_mass_fraction"]),
        "log_normaliser": un(res["log_normaliser"]),
        "row_shift": un(res["row_shift"]),
        "num_block": un(block_sizes),
        "num_residual": un(plan.n_kept[:, None] - block_sizes),
        "effective_sample_size": un(res["effective_sample_size"]),
        "wasted_sample_share": float(1.0 - used.mean() / m) if m > 0 else 0.0,
        "block_pairs": int(block_sizes.sum()),
    }


def _not_causal(problem, params):
    if problem.causal:
        return ["kdeformer has no causal form (hash sorting and shared samples ignore position)"]
    return []


def _kdeformer_reads_data(problem, params) -> bool:
    """Injected sample indices: ``resolve`` checks that they index kept keys (the mask's values)."""
    return params.get("sample_idx") is not None


METHOD = Method(
    name="kdeformer",
    summary="LSH-sorted exact diagonal blocks plus importance-sampled keys (inference only)",
    resolve=resolve,
    flops=flops,
    info=info,
    draw=draw,
    impls=(
        Impl("numpy", "eff_attn.methods.kdeformer.reference", supports_causal=False, differentiable=False,
             check=_not_causal),
        Impl("numba", "eff_attn.methods.kdeformer.numba", supports_causal=False, differentiable=False,
             check=_not_causal),
        Impl("cupy", "eff_attn.methods.kdeformer.cupy", supports_causal=False, differentiable=False,
             check=_not_causal),
    ),
    budgets=tuple({"block_size": f // 2, "num_samples": f} for f in (32, 64, 128, 256)),
    budget_name="num_samples",
    sharding=Sharding(split={n: ("slice",) for n in ("hyperplanes", "uniforms", "q_codes", "k_codes", "sample_idx")}, reads_data=_kdeformer_reads_data),
)


def kdeformer_attention(q, k, v, *, backend="auto", mask=None, causal=False, scale=None, rng=None,
                        return_info=False, num_bits=DEFAULT_NUM_BITS, block_size=DEFAULT_BLOCK_SIZE,
                        num_samples=DEFAULT_NUM_SAMPLES, order="gray", probs="columns", hyperplanes=None,
                        codes=None, sample_idx=None):
    """KDEformer: exact attention in LSH-sorted diagonal blocks, sampled keys for the rest.

    Per slice: hash q and k with ``r`` shared random hyperplanes, sort both
    by bucket (Gray order), cut the sorted sequences into ``ceil(n / b)``
    balanced diagonal blocks and attend exactly inside each query's block.
    Draw ``m`` keys ``j_l ~ p`` (shared by every query) and add, for each
    query, the samples outside its block with weight ``1 / (m p_{j_l})``. A
    ones column on ``v`` estimates the normaliser with the same terms::

        N_i = sum_{j in B_i} e^{s_ij} [v_j, 1] + sum_{l in R_i} e^{s_{i j_l}} [v_{j_l}, 1] / (m p_{j_l})
        out_i = N_{i, :Dv} / N_{i, Dv}

    Given the hash, ``N_i`` is unbiased for ``sum_j e^{s_ij} [v_j, 1]``; the
    ratio has an ``O(1/m)`` bias and is consistent. ``block_size >= Nk``
    gives exact attention. Forward only: :func:`eff_attn.attention_vjp`
    raises :class:`~eff_attn.NotSupportedError` (an inference-time
    approximation; no certified gradient of the sampled estimator).

    Time ``O(Nq (b + m)(D + Dv) + (Nq + Nk)(r D + log N))`` per slice, memory
    ``O((Nq + Nk)(D + Dv) + m (D + Dv))`` plus tiles on Numba and CuPy
    (``O(Nq (b + m))`` on NumPy). No (Nq, Nk) array is formed.

    Parameters
    ----------
    q : array of shape (..., Nq, D)
    k : array of shape (..., Nk, D)
    v : array of shape (..., Nk, Dv)
    backend : {"auto", "numpy", "numba", "cupy"}, default="auto"
    mask : bool array of shape (..., Nk), optional
        Key keep-mask (True = may be attended). Blocks are formed over each
        slice's kept keys, masked keys are never sampled, and their rows of
        k and v are never read (they may hold NaN). A slice with no kept key
        outputs 0.
    causal : bool, default=False
        Only False: ``causal=True`` raises :class:`~eff_attn.NotSupportedError`
        (hash sorting and shared samples ignore position).
    scale : float, optional
        Score scale ``eta``, default ``1/sqrt(D)``; any finite value.
    rng : None, int or numpy.random.Generator
        Draws, on the host, the hyperplanes ``(..., r, D)`` and then the
        uniforms ``(..., m)``, per (batch, head) slice; only what is not
        injected. A non-None ``rng`` with nothing left to draw is a
        ValueError.
    return_info : bool, default=False
    num_bits : int, default=7
        Hyperplanes ``r`` per hash (0 to 30). 0 gives contiguous blocks in
        the original order.
    block_size : int, default=64
        Keys per diagonal block ``b`` (at least 1). Blocks are balanced:
        ``ceil(n / b)`` blocks of ``floor`` or ``ceil`` of ``n / n_b`` keys.
    num_samples : int, default=128
        Shared samples ``m`` (at least 0). 0 is the biased "LSH-only"
        ablation: attention inside the blocks only.
    order : {"gray", "official"}, default="gray"
        Bucket order of the sort: Gray order (neighbouring buckets differ in
        one bit), or the released code's inverted order.
    probs : {"columns", "mixture", "official", "uniform"}, default="columns"
        Sampling distribution over the kept keys: the theory's half
        column norms of ``D^-1 A``, half ``|v_j|^2 / sum |v|^2``, with the
        column norms estimated from the exact softmax rows of 16 evenly
        spaced queries and half of that term spread uniformly
        (``c^_j / 4 + 1/(4n) + |v_j|^2 / (2 sum |v|^2)``; the most accurate on
        real heads, see the docs); ``1/(2n) + |v_j|^2 / (2 sum |v|^2)``; the
        released code's ``|[v_j, 1]| / lambda_max + 1/n`` (normalised); or ``1/n``.
    hyperplanes : array of shape (r, D) or (..., r, D), optional
        Fixed hyperplanes, shared or per slice. Exclusive with ``codes``.
    codes : pair of int arrays of shapes (..., Nq) and (..., Nk), optional
        Fixed bucket codes ``(q_codes, k_codes)`` with values below ``2**r``.
    sample_idx : int array of shape (..., m), optional
        Fixed sampled keys (kept keys only), with ``m = num_samples``.

    Returns
    -------
    out : array of shape (..., Nq, Dv)
    info : dict, only if ``return_info``
        Base keys plus ``hyperplanes``, ``uniforms`` (None where injected),
        ``q_codes``, ``k_codes``, ``q_block``, ``k_block`` (-1 where masked),
        ``n_blocks``, ``probs`` (``p``), ``sample_idx``, ``sample_weight``;
        per row ``samples_used`` (``|R_i|``), ``block_mass_fraction`` (the
        share of the estimated normaliser inside the exact block),
        ``log_normaliser`` (the estimate of the logsumexp), ``row_shift``,
        ``num_block`` (``|B_i|``), ``num_residual`` (kept keys outside the
        block), ``effective_sample_size`` (Kish's ESS of the residual terms);
        and ``wasted_sample_share`` (samples dropped because they fell in
        the query's own block) and ``block_pairs`` (exact pairs computed).

    Raises
    ------
    ValueError
        ``block_size < 1``, ``num_samples < 0``, ``num_bits`` outside 0-30,
        an unknown ``order`` or ``probs``, ``hyperplanes`` with ``codes``,
        injected arrays of the wrong shape or range, ``rng`` with nothing
        left to draw.
    NotSupportedError
        ``causal=True``, float16/bfloat16 inputs, and any backward pass.
    """
    from ...api import attention

    return attention(q, k, v, method="kdeformer", backend=backend, mask=mask, causal=causal, scale=scale,
                     rng=rng, return_info=return_info, num_bits=num_bits, block_size=block_size,
                     num_samples=num_samples, order=order, probs=probs, hyperplanes=hyperplanes, codes=codes,
                     sample_idx=sample_idx)
