"""Input regimes for benchmarks and tests.

Approximate attention looks good or bad depending on the inputs:

- ``gaussian``: i.i.d. N(0, 1) q, k, v. Scores ``q.k / sqrt(D)`` are about
  N(0, 1), so attention is close to uniform; every method looks good. Flattering.
- ``clustered``: keys and queries drawn around a few shared centres, so each
  query attends mostly to its own cluster (what LSH and routing exploit).
- ``peaked``: large-logit heads, each query aligned with a few keys, so rows
  are nearly one-hot; the hard case for kernel and low-rank methods.
- ``real``: q, k, v of real attention heads of a small pretrained
  transformer (all-MiniLM-L6-v2) on public-domain text, shipped with the
  package (see :func:`real_heads` and ``scripts/extract_real_heads.py``).

Every generator is seeded and returns float64 arrays of shape
(heads, N, D); cast them for float32 runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["AttentionProblem", "gaussian", "clustered", "peaked", "real_heads", "heads_file", "is_heads_file",
           "make_problem", "REGIMES"]


@dataclass(frozen=True)
class AttentionProblem:
    """One benchmark input: q, k, v of shape (heads, N, D), float64."""

    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    description: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return self.q.shape

    def astype(self, dtype) -> tuple:
        return tuple(np.ascontiguousarray(a, dtype=dtype) for a in (self.q, self.k, self.v))


def gaussian(n: int, d: int = 64, heads: int = 8, seed: int = 0) -> AttentionProblem:
    """IID standard normal q, k and v: near-uniform attention rows."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((heads, n, d)) for _ in range(3))
    return AttentionProblem("gaussian", q, k, v, "iid N(0,1) q, k, v")


def clustered(n: int, d: int = 64, heads: int = 8, clusters: int = 16, spread: float = 0.3,
              strength: float = 3.0, value_noise: float = 0.5, seed: int = 0) -> AttentionProblem:
    """Queries and keys scattered around ``clusters`` shared unit centres; values follow their keys.

    ``x = strength * d^(1/4) * (c + spread * noise)`` places a token near its
    centre; a query's largest scores are with keys of its own cluster. A
    key's value is its cluster's value centre (standard normal) plus
    ``value_noise`` times standard normal noise: tokens that look alike carry
    alike values, as in a trained model, so the exact output of a query is
    close to its cluster's value centre and a method that finds the cluster
    gets it right. (With values independent of the keys, the exact output
    would be the mean of a cluster's noise, a short vector any sparse method
    overshoots.)
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((heads, clusters, d))                    # (H, C, d)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    value_centres = rng.standard_normal((heads, clusters, d))              # (H, C, d)
    amp = strength * d ** 0.25

    def tokens(labels):
        noise = rng.standard_normal((heads, n, d)) / np.sqrt(d)            # (H, n, d)
        return amp * (np.take_along_axis(centres, labels[..., None], axis=1) + spread * noise)

    q_labels = rng.integers(0, clusters, size=(heads, n))                  # (H, n)
    k_labels = rng.integers(0, clusters, size=(heads, n))                  # (H, n)
    q, k = tokens(q_labels), tokens(k_labels)                              # (H, n, d) each
    v = (np.take_along_axis(value_centres, k_labels[..., None], axis=1)
         + value_noise * rng.standard_normal((heads, n, d)))               # (H, n, d)
    return AttentionProblem("clustered", q, k, v, f"{clusters} clusters, spread {spread}, value noise {value_noise}",
                            {"clusters": clusters})


def peaked(n: int, d: int = 64, heads: int = 8, sharpness: float = 3.0, seed: int = 0) -> AttentionProblem:
    """Large-logit heads: each query is a noisy copy of one key, scaled up.

    The scaled score with the matching key is about ``sharpness**2`` (9 by
    default) and the others spread around 0 (standard deviation 1.3 at D = 64);
    at N = 512, D = 64 the matching key carries a median 88 % of a row's
    softmax mass (75 % at D = 32, 92 % at D = 128).
    """
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((heads, n, d))
    match = rng.integers(0, n, size=(heads, n))
    q = np.take_along_axis(k, match[..., None], axis=1) + 0.5 * rng.standard_normal((heads, n, d))
    q *= sharpness / np.sqrt(np.sqrt(d))
    k *= sharpness / np.sqrt(np.sqrt(d))
    v = rng.standard_normal((heads, n, d))
    return AttentionProblem("peaked", q, k, v, f"near one-hot rows, sharpness {sharpness}")


REAL_HEADS_FILE = "real_heads.npz"


def real_heads(n: int = 128, max_heads: int | None = None, text: int | None = None) -> AttentionProblem:
    """q, k, v of real attention heads of all-MiniLM-L6-v2, shipped with the package.

    Parameters
    ----------
    n : int
        Sequence length. The file holds full forward passes at a few lengths
        (128, 256 and 512; see ``docs/benchmarks.md``); a smaller ``n`` is
        the first ``n`` tokens of the shortest stored pass longer than it
        (a crop: its last token is then a word piece, not ``[SEP]``).
    max_heads : int, optional
        Keep the first ``max_heads`` (layer, head) pairs.
    text : int, optional
        Index of the source text; all texts by default.

    Returns
    -------
    AttentionProblem with arrays of shape (heads, n, 32), float64.
    """
    from ..capture import load_heads

    path = resources.files("eff_attn.bench").joinpath("data", REAL_HEADS_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{REAL_HEADS_FILE} is not installed with the package; regenerate it with scripts/extract_real_heads.py"
        )
    with path.open("rb") as fh:
        q, k, v, meta = load_heads(fh, n, max_heads=max_heads, sample=text, name="real heads")
    return AttentionProblem("real", q, k, v, f"{meta['model']} heads", meta)


def heads_file(path, n: int | None = None, max_heads: int | None = None) -> AttentionProblem:
    """The heads of a file written by :mod:`eff_attn.capture` (same format as :func:`real_heads`).

    ``n`` defaults to the longest stored length; a shorter one is a crop.
    """
    from ..capture import load_heads

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"problem={str(path)!r} is neither a regime ({', '.join(REGIMES)}) nor an existing file")
    q, k, v, meta = load_heads(path, n, max_heads=max_heads)
    return AttentionProblem(path.name, q, k, v, f"{meta['model']} heads from {path.name}", meta)


def is_heads_file(name: str) -> bool:
    """Whether a ``--problem`` value names a heads file rather than a regime."""
    return name not in REGIMES and (str(name).endswith(".npz") or Path(name).is_file())


REGIMES = {"gaussian": gaussian, "clustered": clustered, "peaked": peaked, "real": real_heads}


def make_problem(name: str, n: int, d: int = 64, heads: int = 8, seed: int = 0) -> AttentionProblem:
    """Build a regime by name: gaussian, clustered, peaked or real.

    ``real`` is ``real_heads(n, max_heads=heads)``: its heads have size 32
    and no randomness, so ``d`` and ``seed`` do not apply to it. A path to a
    heads file (:mod:`eff_attn.capture`) is ``heads_file(name, n, heads)``.
    """
    if is_heads_file(name):
        return heads_file(name, n, max_heads=heads)
    if name not in REGIMES:
        raise ValueError(f"problem={name!r} is not one of {', '.join(REGIMES)}")
    if name == "real":
        return real_heads(n=n, max_heads=heads)
    return REGIMES[name](n, d=d, heads=heads, seed=seed)
