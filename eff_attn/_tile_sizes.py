"""Tile sizes of the blocked kernels: how many queries and keys one task holds.

Shared by every method whose kernels stream key tiles (exact, local, routing,
entmax, kdeformer, topk_oracle), so that they size their tiles by one rule.
"""

from __future__ import annotations

__all__ = ["DEFAULT_BLOCK_K_CPU", "MAX_BLOCK_Q_CPU", "CPU_TILE_MACS", "EXACT_BLOCK_Q_CPU", "EXACT_TILE_MACS", "MAX_BLOCK_K_GPU", "GPU_TILE_BYTES",
           "cpu_blocks", "gpu_block_k"]

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
