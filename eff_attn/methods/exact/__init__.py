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

__all__ = ["exact_attention", "flops", "resolve", "METHOD", "cpu_blocks", "gpu_block_k"]

#: Keys per tile on the CPU.
DEFAULT_BLOCK_K_CPU = 512
#: Largest query block on the CPU; one Numba task owns one (slice, query block).
MAX_BLOCK_Q_CPU = 128
#: A CPU tile product ``(Bq, D) x (D, Bk)`` stays within this many multiply-adds,
#: so that the score tile and the q, k, v tiles (about 0.5 MiB at D = 64) stay in
#: a core's L2 cache. Measured on the CPU benchmark machine (N = 4096, D = 64,
#: 8 heads, float32): (128, 512) tiles ran the forward in 0.234 s and forward plus
#: backward in 0.893 s, against 0.347 s and 1.303 s for (32, 128) tiles
#: (docs/methods/exact.md, "What the backends do"). Local, entmax and routing
#: size their tiles by this rule.
CPU_TILE_MACS = 2**22
#: Exact attention's own Numba kernels take query blocks twice as tall (and twice
#: the multiply-adds, about 0.8 MiB of tiles at D = 64, within a 1 MiB L2): OpenBLAS
#: runs more rows per packed panel of k or v. Measured on the benchmark machine
#: (N = 4096, D = 64, 8 heads, float32, two threads, interleaved with torch's SDPA on
#: a shared machine; time relative to SDPA): (256, 512) tiles ran the forward at
#: 0.95 to 1.00 and forward plus backward at 0.66, against 1.14 and 0.69 for
#: (128, 512) tiles (``python scripts/tile_sweep.py``).
EXACT_BLOCK_Q_CPU = 256
EXACT_TILE_MACS = 2**23
#: Largest key tile on the GPU, and the byte budget of one (G, Nq, Bk) score tile.
MAX_BLOCK_K_GPU = 4096
GPU_TILE_BYTES = 256 * 2**20

ALGORITHMS = ("auto", "naive", "blocked")


def resolve(problem, *, algorithm="auto", block_q=None, block_k=None) -> dict:
    """Check the parameters; ``None`` block sizes are resolved by each backend."""
    return {
        "algorithm": check_choice("algorithm", algorithm, ALGORITHMS),
        "block_q": check_int("block_q", block_q, minimum=1, allow_none=True),
        "block_k": check_int("block_k", block_k, minimum=1, allow_none=True),
    }


def cpu_blocks(D: int, Dv: int, block_q=None, block_k=None, *, max_block_q=MAX_BLOCK_Q_CPU,
               tile_macs=CPU_TILE_MACS) -> tuple[int, int]:
    """CPU tile sizes: ``Bk = 512`` and the largest power-of-two ``Bq <= max_block_q``
    with ``Bq * Bk * max(D, Dv) <= tile_macs`` (at least 8), unless given."""
    block_k = block_k or DEFAULT_BLOCK_K_CPU
    if block_q is None:
        block_q = max_block_q
        while block_q > 8 and block_q * block_k * max(D, Dv) > tile_macs:
            block_q //= 2
    return block_q, block_k


def gpu_block_k(G: int, Nq: int, itemsize: int) -> int:
    """Largest power of two <= 4096 with ``G * Nq * Bk * itemsize <= 256 MiB`` (at least 1)."""
    block = MAX_BLOCK_K_GPU
    while block > 1 and G * Nq * block * itemsize > GPU_TILE_BYTES:
        block //= 2
    return block


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
